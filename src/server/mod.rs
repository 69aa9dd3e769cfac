//! `gpt2 serve`: an OpenAI-compatible HTTP server (axum on tokio) with continuous batching.
//!
//! The async runtime only parses requests and streams answers; the model runs on one scheduler
//! thread ([`scheduler`]) with the model's own CPU pool, so inference never blocks the runtime's
//! workers and the HTTP side never slows a forward pass beyond its share of the cores.
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both streaming as SSE),
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus), `POST /tokenize`,
//! `POST /detokenize` (vLLM's shapes). Errors are OpenAI's `{"error": {message, type, param, code}}`.

pub mod chat;
pub mod metrics;
pub mod openai;
mod routes;
pub mod scheduler;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::backend::Model;
use crate::config::GPT2Config;
use crate::tokenizer::Tokenizer;

use chat::ChatTemplate;
use metrics::Metrics;
use scheduler::Job;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub host: String,
    /// 0 picks a free port (printed on start).
    pub port: u16,
    /// Sequences run together (slots of the KV cache).
    pub parallel: usize,
    /// Sequences that may wait for a slot; beyond, 429.
    pub max_queue: usize,
    pub api_key: Option<String>,
    /// The name `model` must have in requests (any when absent from them).
    pub served_model_name: String,
    pub chat_template: ChatTemplate,
    /// A request's whole time; after it, its sequences end with finish_reason `length`.
    pub time_limit: Duration,
    /// Largest request body, in bytes (413 beyond).
    pub body_limit: usize,
    /// Prompt tokens prefilled per step at most, across requests.
    pub prefill_chunk: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            parallel: 8,
            max_queue: 128,
            api_key: None,
            served_model_name: "gpt2".into(),
            chat_template: ChatTemplate::default(),
            time_limit: Duration::from_secs(600),
            body_limit: 4 << 20,
            prefill_chunk: scheduler::PREFILL_CHUNK,
        }
    }
}

/// What the handlers share.
pub(crate) struct AppState {
    tok: Arc<Tokenizer>,
    config: GPT2Config,
    model_name: String,
    parallel: usize,
    max_queue: usize,
    api_key: Option<String>,
    chat: ChatTemplate,
    jobs: Mutex<mpsc::Sender<Job>>,
    metrics: Arc<Metrics>,
    time_limit: Duration,
    body_limit: usize,
    started: u64,
    request_ids: AtomicU64,
    seeds: AtomicU64,
}

impl AppState {
    /// A seed for a request that gives none: different per request and per run.
    fn next_seed(&self) -> u64 {
        let n = self
            .seeds
            .fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::Relaxed);
        // splitmix64's finaliser, so that consecutive requests get unrelated seeds.
        let mut z = n;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Load the model with `load` on the scheduler thread, bind, print `listening on http://ADDR` on
/// stdout, and serve until SIGINT or SIGTERM; requests in flight then finish (within the time
/// limit) before this returns.
pub fn serve(
    opts: ServerOptions,
    tok: Tokenizer,
    load: impl FnOnce() -> crate::Result<Model> + Send + 'static,
) -> Result<()> {
    let tok = Arc::new(tok);
    let metrics = Arc::new(Metrics::default());
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = mpsc::channel::<crate::Result<(GPT2Config, String)>>();
    let (parallel, chunk) = (opts.parallel, opts.prefill_chunk);
    let sched = {
        let tok = tok.clone();
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("gpt2-scheduler".into())
            .spawn(move || {
                let loaded = load().and_then(|m| {
                    let n_pos = m.config().n_positions;
                    let mut state = m.new_state(parallel, n_pos)?;
                    // Before /health says ready: the first requests would otherwise fault the
                    // cache in (huge pages, possibly compacting memory) inside their time to
                    // first token.
                    state.prefault();
                    Ok((m, state))
                });
                match loaded {
                    Ok((model, state)) => {
                        let _ = ready_tx.send(Ok((model.config().clone(), model.describe())));
                        scheduler::run(model, tok, state, job_rx, metrics, chunk);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("starting the scheduler thread")?
    };
    let (config, described) = ready_rx
        .recv()
        .context("the scheduler thread ended while loading the model")??;
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let state = Arc::new(AppState {
        tok,
        config,
        model_name: opts.served_model_name.clone(),
        parallel: opts.parallel,
        max_queue: opts.max_queue,
        api_key: opts.api_key.clone(),
        chat: opts.chat_template.clone(),
        jobs: Mutex::new(job_tx),
        metrics,
        time_limit: opts.time_limit,
        body_limit: opts.body_limit,
        started: since_epoch.as_secs(),
        request_ids: AtomicU64::new(0),
        seeds: AtomicU64::new(since_epoch.as_nanos() as u64 ^ (std::process::id() as u64) << 32),
    });

    // Two workers: the HTTP side is light, and the cores belong to the model's pool.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let grace = opts.time_limit + Duration::from_secs(5);
    rt.block_on(async move {
        let addr = format!("{}:{}", opts.host, opts.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local: SocketAddr = listener.local_addr()?;
        eprintln!(
            "gpt2 serve: `{}` on {described}; {} slots of {} positions",
            state.model_name, state.parallel, state.config.n_positions
        );
        println!("listening on http://{local}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let app = routes::router(state);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal(grace))
            .await
            .context("serving")
    })?;
    // The router (and the job sender in it) is gone: the scheduler finishes what runs and ends.
    drop(rt);
    let _ = sched.join();
    eprintln!("gpt2 serve: stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. In-flight requests then have `grace` to finish before the process
/// exits anyway, so that shutdown never hangs on a stuck client.
async fn shutdown_signal(grace: Duration) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("gpt2 serve: shutting down; finishing requests in flight");
    std::thread::spawn(move || {
        std::thread::sleep(grace);
        eprintln!("gpt2 serve: requests still running after {grace:?}; exiting");
        std::process::exit(0);
    });
}
