//! The access log: one JSON line per request, written by a thread of its own so that a slow or
//! blocked destination (a full stderr pipe nobody reads) never stalls a request; when its queue is
//! full, lines are dropped and counted. Also the request id each request carries (its
//! `X-Request-Id`, echoed in the reply).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{json, Value};

use super::AppState;

/// Lines waiting to be written at most; beyond, they are dropped (and counted).
const QUEUE: usize = 4096;

pub struct AccessLog {
    tx: Option<SyncSender<String>>,
    pub dropped: AtomicU64,
}

impl AccessLog {
    /// Off, to stderr (`-`), or appended to a file.
    pub fn open(target: Option<&Path>) -> anyhow::Result<AccessLog> {
        let Some(target) = target else {
            return Ok(AccessLog {
                tx: None,
                dropped: AtomicU64::new(0),
            });
        };
        let mut out: Box<dyn Write + Send> = if target.as_os_str() == "-" {
            Box::new(std::io::stderr())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(target)
                    .with_context(|| format!("--log-file {}", target.display()))?,
            )
        };
        let (tx, rx) = sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("gpt2-access-log".into())
            .spawn(move || {
                for line in rx {
                    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                        // The destination is gone: drain without writing.
                        continue;
                    }
                }
            })
            .context("starting the access log thread")?;
        Ok(AccessLog {
            tx: Some(tx),
            dropped: AtomicU64::new(0),
        })
    }

    pub fn write(&self, v: Value) {
        if let Some(tx) = &self.tx {
            if let Err(TrySendError::Full(_)) = tx.try_send(v.to_string()) {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A request's id: the client's `X-Request-Id` when it is sane, else one of ours.
#[derive(Clone)]
pub struct RequestId(pub String);

/// Set by a handler that writes its own access log line (with tokens and timings).
#[derive(Clone, Copy)]
pub struct Logged;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

fn sane(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=".contains(&b))
}

/// Give each request its id (echoed as `X-Request-Id`), and log the ones whose handler does not.
pub async fn middleware(
    State(s): State<std::sync::Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| sane(v))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req-{:x}", s.request_ids.fetch_add(1, Ordering::Relaxed)));
    let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if resp.extensions().get::<Logged>().is_none() {
        s.access_log.write(json!({
            "request_id": id, "method": method, "path": path,
            "status": resp.status().as_u16(),
            "total_s": started.elapsed().as_secs_f64(),
        }));
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    resp
}
