//! `gpt2 serve`: an OpenAI-compatible HTTP server (axum on tokio) with continuous batching.
//!
//! The async runtime only parses requests and streams answers; the model runs on one scheduler
//! thread (`scheduler`) with the model's own CPU pool, so inference never blocks the runtime's
//! workers and the HTTP side never slows a forward pass beyond its share of the cores.
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both streaming as SSE),
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus), `POST /tokenize`,
//! `POST /detokenize` (vLLM's shapes). Errors are OpenAI's `{"error": {message, type, param, code}}`.
//!
//! Connections are served by hyper's HTTP/1 directly (not `axum::serve`), so that a client gets a
//! bounded time to send its headers and its body, at most `max_connections` are open at once, and
//! shutdown waits only for generation requests in flight, never for idle or half-sent connections.

mod access_log;
mod chat;
mod metrics;
mod openai;
mod request;
mod routes;
mod scheduler;

pub use chat::ChatTemplate;
#[doc(hidden)]
pub use scheduler::PREFILL_CHUNK;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::backend::Model;
use crate::config::GPT2Config;
use crate::generate::engine::Engine;
use crate::model::{Device, LoadOptions};
use crate::tokenizer::Tokenizer;

use metrics::Metrics;
use scheduler::Work;

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
    /// Keys a request may give as "Authorization: Bearer KEY"; none: no key needed.
    pub api_keys: Vec<String>,
    /// The access log: `-` for stderr, a file to append to, or none.
    pub access_log: Option<std::path::PathBuf>,
    /// Origins allowed by CORS (`*` any); none: no CORS headers.
    pub cors_origins: Vec<String>,
    /// The name `model` must have in requests (any when absent from them).
    pub served_model_name: String,
    pub chat_template: ChatTemplate,
    /// A request's whole time; after it, its sequences end with finish_reason `length`.
    pub time_limit: Duration,
    /// Largest request body, in bytes (413 beyond).
    pub body_limit: usize,
    /// Prompt tokens prefilled per step at most, across requests.
    pub prefill_chunk: usize,
    /// Reuse the keys and values of prompt prefixes that running and finished requests computed
    /// (CPU only: its rows are the same bits however a prompt is split).
    pub prefix_cache: bool,
    /// Tokens that finished requests may leave in the prefix cache (in KV-cache slots beside the
    /// `parallel` running ones).
    pub cache_tokens: usize,
    /// Time a client has to send a request's headers, from the connection's opening or the end of
    /// its previous reply (so also how long an idle keep-alive connection stays open).
    pub header_timeout: Duration,
    /// Time a client has to send a request's body once its headers are in (408 beyond).
    pub body_timeout: Duration,
    /// Connections open at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// After SIGINT/SIGTERM, how long generation requests in flight may go on; they then end with
    /// finish_reason `length`. Idle and half-sent connections are closed at once.
    pub drain_timeout: Duration,
}

/// Tokens finished requests may leave in the prefix cache by default: four of GPT-2's contexts.
#[doc(hidden)]
pub const CACHE_TOKENS: usize = 4096;

/// KV-cache slots the server takes: `parallel` for the running sequences, and with a prefix cache
/// enough beside them for `cache_tokens` of finished requests' prefixes.
#[doc(hidden)]
pub fn kv_slots(config: &GPT2Config, parallel: usize, cache_tokens: Option<usize>) -> usize {
    parallel + cache_tokens.map_or(0, |t| t.div_ceil(config.n_positions))
}

/// The largest `--time-limit`, `--drain-timeout`, `--header-timeout` and `--body-timeout`: one day.
#[doc(hidden)]
pub const MAX_TIMEOUT_SECS: u64 = 86_400;

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            parallel: 8,
            max_queue: 128,
            api_keys: Vec::new(),
            access_log: Some("-".into()),
            cors_origins: Vec::new(),
            served_model_name: "gpt2".into(),
            chat_template: ChatTemplate::default(),
            time_limit: Duration::from_secs(600),
            body_limit: 4 << 20,
            prefill_chunk: scheduler::PREFILL_CHUNK,
            prefix_cache: true,
            cache_tokens: CACHE_TOKENS,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Refuses `parallel` KV-cache slots of the whole context when they cannot fit in the memory the
/// machine has available, before any weights are read or built.
#[doc(hidden)]
pub fn check_kv_budget(
    config: &GPT2Config,
    parallel: usize,
    cache_tokens: Option<usize>,
    load: &LoadOptions,
) -> crate::Result<()> {
    let slots = kv_slots(config, parallel, cache_tokens);
    crate::backend::check_state_fits(config, load, slots, config.n_positions).map_err(|e| match e {
        crate::Error::Resource(m) => crate::Error::Resource(match cache_tokens {
            Some(t) => format!("--parallel {parallel} with --cache-tokens {t}: {m}"),
            None => format!("--parallel {parallel}: {m}"),
        }),
        e => e,
    })
}

/// What the handlers share.
pub(crate) struct AppState {
    tok: Arc<Tokenizer>,
    config: GPT2Config,
    model_name: String,
    parallel: usize,
    max_queue: usize,
    api_keys: Vec<String>,
    access_log: access_log::AccessLog,
    cors_origins: Vec<String>,
    chat: ChatTemplate,
    jobs: mpsc::Sender<Work>,
    metrics: Arc<Metrics>,
    time_limit: Duration,
    body_limit: usize,
    body_timeout: Duration,
    started: u64,
    request_ids: AtomicU64,
    seeds: AtomicU64,
    /// Generation requests from their submission to the end of their reply.
    in_flight: AtomicUsize,
    /// Set on SIGINT/SIGTERM: new generation requests get 503.
    shutting_down: AtomicBool,
    /// The structured-output compiler (its token trie), built for the first request that needs it.
    grammars: std::sync::OnceLock<Result<crate::generate::Grammars, String>>,
}

/// One generation request in flight (counted in [`AppState::in_flight`] while this lives).
pub(crate) struct InFlight(Arc<AppState>);

impl InFlight {
    fn new(s: &Arc<AppState>) -> Self {
        s.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(s.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AppState {
    /// The structured-output compiler for this model's tokenizer.
    fn grammars(&self) -> Result<&crate::generate::Grammars, String> {
        self.grammars
            .get_or_init(|| {
                crate::generate::Grammars::new(&self.tok, self.config.eos_token_id)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(Clone::clone)
    }

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
/// stdout, and serve until SIGINT or SIGTERM; generation requests in flight then finish (within
/// `drain_timeout`, after which they end with finish_reason `length`) before this returns.
///
/// Errors: the model's loading error as it is, or [`crate::Error::Server`] (the address cannot be
/// bound, a thread or the runtime cannot start).
pub fn serve(
    opts: ServerOptions,
    tok: Tokenizer,
    load: impl FnOnce() -> crate::Result<Model> + Send + 'static,
) -> crate::Result<()> {
    run(opts, tok, load).map_err(|e| match e.downcast::<crate::Error>() {
        Ok(e) => e,
        Err(e) => crate::Error::Server(format!("{e:#}")),
    })
}

fn run(
    opts: ServerOptions,
    tok: Tokenizer,
    load: impl FnOnce() -> crate::Result<Model> + Send + 'static,
) -> Result<()> {
    let tok = Arc::new(tok);
    let metrics = Arc::new(Metrics::default());
    let (job_tx, job_rx) = mpsc::channel::<Work>();
    let (ready_tx, ready_rx) = mpsc::channel::<crate::Result<(GPT2Config, String, String)>>();
    let (parallel, chunk) = (opts.parallel, opts.prefill_chunk);
    let cache_tokens = opts.prefix_cache.then_some(opts.cache_tokens);
    let stop = Arc::new(AtomicBool::new(false));
    let sched = {
        let tok = tok.clone();
        let metrics = metrics.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("gpt2-scheduler".into())
            .spawn(move || {
                let loaded = load().and_then(|m| {
                    // Other backends' rows may depend on how a prompt is split: no reuse there.
                    let cache_tokens_asked = cache_tokens;
                    let cache_tokens = cache_tokens.filter(|_| m.device() == Device::Cpu);
                    let n_pos = m.config().n_positions;
                    let slots = kv_slots(m.config(), parallel, cache_tokens);
                    let mut state = m.new_state(slots, n_pos)?;
                    // Before /health says ready: the first requests would otherwise fault the
                    // cache in (huge pages, possibly compacting memory) inside their time to
                    // first token.
                    state.prefault();
                    let engine = match cache_tokens {
                        Some(t) => Engine::with_prefix_cache(state, chunk, parallel, t),
                        None => Engine::new(state, chunk),
                    };
                    let note = match (cache_tokens, cache_tokens_asked) {
                        (Some(t), _) => format!("a prefix cache of {t} tokens"),
                        (None, Some(_)) => "no prefix cache (CPU only)".into(),
                        (None, None) => "no prefix cache".into(),
                    };
                    Ok((m, engine, note))
                });
                match loaded {
                    Ok((model, engine, note)) => {
                        let described = model.describe();
                        let _ = ready_tx.send(Ok((model.config().clone(), described, note)));
                        scheduler::run(Arc::new(model), tok, engine, job_rx, metrics, stop);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("starting the scheduler thread")?
    };
    let (config, described, cache) = ready_rx
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
        api_keys: opts.api_keys.clone(),
        access_log: access_log::AccessLog::open(opts.access_log.as_deref())?,
        cors_origins: opts.cors_origins.clone(),
        chat: opts.chat_template.clone(),
        jobs: job_tx,
        metrics,
        time_limit: opts.time_limit,
        body_limit: opts.body_limit,
        body_timeout: opts.body_timeout,
        started: since_epoch.as_secs(),
        request_ids: AtomicU64::new(0),
        seeds: AtomicU64::new(since_epoch.as_nanos() as u64 ^ (std::process::id() as u64) << 32),
        in_flight: AtomicUsize::new(0),
        shutting_down: AtomicBool::new(false),
        grammars: std::sync::OnceLock::new(),
    });

    // Two workers: the HTTP side is light, and the cores belong to the model's pool.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_http(&opts, (described, cache), state, &stop))?;
    // The router (and the job sender in it) is gone with the runtime's tasks: the scheduler ends
    // what still runs at its next step and returns.
    drop(rt);
    let _ = sched.join();
    eprintln!("gpt2 serve: stopped");
    Ok(())
}

/// Accept connections until SIGINT or SIGTERM, then drain: see [`ServerOptions::drain_timeout`].
async fn run_http(
    opts: &ServerOptions,
    (described, cache): (String, String),
    state: Arc<AppState>,
    stop: &AtomicBool,
) -> Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use tokio::sync::{watch, Semaphore};

    let addr = format!("{}:{}", opts.host, opts.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local: SocketAddr = listener.local_addr()?;
    // Listening for signals before the address is printed: a SIGTERM right after it stops the
    // server gracefully, never by the signal's default action.
    let mut signals = Signals::install();
    eprintln!(
        "gpt2 serve: `{}` on {described}; {} slots of {} positions, {cache}",
        state.model_name, state.parallel, state.config.n_positions
    );
    println!("listening on http://{local}");
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    let app = routes::router(state.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(opts.header_timeout);
    let max_connections = opts
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let open = Arc::new(Semaphore::new(max_connections));
    let (closing_tx, closing_rx) = watch::channel(false);
    loop {
        // A permit first: beyond max_connections, connections wait in the listen backlog.
        let permit = tokio::select! {
            _ = signals.recv() => break,
            p = open.clone().acquire_owned() => p.context("the connection limit closed")?,
        };
        let stream = tokio::select! {
            _ = signals.recv() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of file descriptors or a connection reset before it was accepted:
                    // try again shortly rather than spin or stop serving.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let mut closing = closing_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = closing.wait_for(|c| *c) => {}
            }
            // Idle connections close now; one with a reply in progress closes after it.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    state.shutting_down.store(true, Ordering::SeqCst);
    let in_flight = state.in_flight.load(Ordering::SeqCst);
    eprintln!("gpt2 serve: shutting down; {in_flight} requests in flight");
    let _ = closing_tx.send(true);

    // Generation requests in flight may finish within drain_timeout; then they are ended (finish
    // reason `length`, their streams closed properly) and get a moment to send that.
    let drained = |within: Duration| {
        let state = state.clone();
        async move {
            let until = Instant::now().checked_add(within);
            while state.in_flight.load(Ordering::SeqCst) > 0 {
                if until.is_some_and(|u| Instant::now() >= u) {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            true
        }
    };
    let drain = async {
        if !drained(opts.drain_timeout).await {
            eprintln!(
                "gpt2 serve: requests still running after {:?}; ending them",
                opts.drain_timeout
            );
            stop.store(true, Ordering::SeqCst);
            drained(Duration::from_secs(2)).await;
        }
    };
    tokio::select! {
        _ = drain => {}
        // A second SIGINT or SIGTERM: stop now, cutting what still runs.
        _ = signals.recv() => {
            eprintln!("gpt2 serve: second signal; stopping now");
            stop.store(true, Ordering::SeqCst);
            return Ok(());
        }
    }
    // Let finished replies reach their clients: connections with nothing more to send have
    // closed; what stays open (a half-sent request, a stuck reader) is dropped with the runtime.
    let all_closed = open.acquire_many(max_connections as u32);
    let _ = tokio::time::timeout(Duration::from_millis(500), all_closed).await;
    Ok(())
}

/// SIGINT and SIGTERM, listened for from when this is made.
struct Signals {
    #[cfg(unix)]
    kinds: Vec<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Must run inside the runtime.
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let kinds = [SignalKind::interrupt(), SignalKind::terminate()]
                .into_iter()
                .filter_map(|k| signal(k).ok())
                .collect();
            Signals { kinds }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Resolves at the next SIGINT or SIGTERM (cancel-safe).
    async fn recv(&mut self) {
        #[cfg(unix)]
        std::future::poll_fn(|cx| {
            for s in &mut self.kinds {
                if s.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(());
                }
            }
            std::task::Poll::Pending
        })
        .await;
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
