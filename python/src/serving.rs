//! `gpt2rs._gpt2rs._AsyncEngine`: the native half of `gpt2rs.AsyncEngine` (vLLM's
//! `AsyncLLMEngine` for this crate). One thread owns the crate's batch engine
//! ([`gpt2::generate::engine::Engine`]) over `parallel` KV-cache slots of the whole context and
//! runs continuous batching, as `gpt2 serve`'s scheduler does (that one lives in the server
//! module, which the wheel does not build: no tokio or axum here). Requests come over a channel;
//! each step's events go back to Python through one callback per request, called with the GIL
//! held for a moment (the Python side makes that callback `loop.call_soon_threadsafe(queue.put)`,
//! so it never blocks this thread nor touches the event loop from it).
//!
//! The engine gives each row of a batch exactly its lone result, so a request's tokens equal
//! `Model.generate`'s with the same settings and seed, whatever runs beside it.
//!
//! Bounds: at most `parallel + max_queue` requests (generations and embedding calls) are in
//! flight; a submit beyond that raises `EngineFull` at once (a server answers 429), so neither the
//! channel nor the engine's waiting queue grows without bound.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gpt2::embed::Pooling;
use gpt2::generate::engine::{Engine, Request, Update};
use gpt2::generate::{FinishReason, Generation, Sequence};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::{finish_name, gen_config, nonneg, panic_message, to_py, token_id, GenerationResult};
use crate::{Inner, Model};

pyo3::create_exception!(
    gpt2rs,
    EngineFull,
    PyRuntimeError,
    "The engine holds `parallel + max_queue` requests already: try again later (HTTP 429)."
);
pyo3::create_exception!(
    gpt2rs,
    EngineClosed,
    PyRuntimeError,
    "The engine is shut down (or its thread failed): it takes no more requests (HTTP 503)."
);

/// What the engine's thread knows of one request: where its events go, and whether anybody still
/// waits for them.
struct Req {
    callback: Py<PyAny>,
    cancelled: AtomicBool,
    seed: u64,
}

/// The engine's name for a request (it must be `Clone`; the callback is not, without the GIL).
type Tag = Arc<Req>;

/// One event for Python.
enum Ev {
    Token {
        text: String,
        token: u32,
        logprob: f32,
        top: Option<Vec<(u32, f32)>>,
        finish: Option<FinishReason>,
    },
    Done(Generation),
    Embedded(Vec<Vec<f32>>),
    Error(String),
}

struct EmbedJob {
    texts: Vec<Vec<u32>>,
    pooling: Pooling,
    normalize: bool,
    done: Vec<Vec<f32>>,
    tag: Tag,
}

// Each request is moved once through the channel: boxing would allocate once per request for
// nothing.
#[allow(clippy::large_enum_variant)]
enum Work {
    Generate(Request<Tag>),
    Embed(EmbedJob),
}

/// What the Python object and the thread share.
struct Shared {
    /// Requests submitted and not yet answered in full.
    in_flight: AtomicUsize,
    running: AtomicUsize,
    waiting: AtomicUsize,
    /// End every request now (a shutdown whose drain time is over).
    stop: AtomicBool,
    /// The thread's loop panicked: the engine is unhealthy.
    failed: AtomicBool,
}

/// Events of one step, grouped by request, so that each request's callback is called once a step.
#[derive(Default)]
struct Outbox(Vec<(Tag, Vec<Ev>)>);

impl Outbox {
    fn push(&mut self, tag: &Tag, ev: Ev) {
        match self.0.iter_mut().find(|(t, _)| Arc::ptr_eq(t, tag)) {
            Some((_, evs)) => evs.push(ev),
            None => self.0.push((tag.clone(), vec![ev])),
        }
    }

    /// Call each request's callback with its events (a list of tuples), holding the GIL once. A
    /// callback that raises (its event loop closed) cancels its request.
    fn deliver(self) {
        if self.0.is_empty() {
            return;
        }
        Python::attach(|py| {
            for (tag, evs) in self.0 {
                if tag.cancelled.load(Ordering::Relaxed) {
                    continue;
                }
                let sent = events_to_py(py, &tag, evs)
                    .and_then(|list| tag.callback.call1(py, (list,)).map(drop));
                if sent.is_err() {
                    tag.cancelled.store(true, Ordering::Relaxed);
                }
            }
        });
    }
}

fn events_to_py<'py>(py: Python<'py>, tag: &Req, evs: Vec<Ev>) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for ev in evs {
        let item = match ev {
            Ev::Token {
                text,
                token,
                logprob,
                top,
                finish,
            } => ("token", text, token, logprob, top, finish.map(finish_name))
                .into_pyobject(py)?
                .into_any(),
            Ev::Done(g) => {
                let r = Bound::new(py, GenerationResult::new(g, tag.seed))?;
                PyTuple::new(py, [PyString::new(py, "done").into_any(), r.into_any()])?.into_any()
            }
            Ev::Embedded(v) => ("embedded", v).into_pyobject(py)?.into_any(),
            Ev::Error(msg) => ("error", msg).into_pyobject(py)?.into_any(),
        };
        list.append(item)?;
    }
    Ok(list)
}

/// One batch of an embedding call (at most 2048 positions, as the server), so that streams keep
/// flowing while it runs; the job back when texts are left.
fn embed_step(inner: &Inner, mut job: EmbedJob, out: &mut Outbox) -> Option<EmbedJob> {
    let texts = &job.texts[job.done.len()..];
    let (mut n, mut positions) = (1, texts[0].len());
    while n < texts.len() && positions + texts[n].len() <= 2048 {
        positions += texts[n].len();
        n += 1;
    }
    match gpt2::embed::embed(&inner.model, &texts[..n], job.pooling, job.normalize) {
        Ok(e) => job.done.extend(e),
        Err(e) => {
            out.push(&job.tag, Ev::Error(e.to_string()));
            return None;
        }
    }
    if job.done.len() < job.texts.len() {
        return Some(job);
    }
    let done = std::mem::take(&mut job.done);
    out.push(&job.tag, Ev::Embedded(done));
    None
}

const SHUT_DOWN: &str = "the engine shut down before the request finished";

/// The scheduler thread: take requests, step the engine, send events, until every sender is gone
/// and nothing is left to run.
fn run(inner: Arc<Inner>, engine: Engine<Tag>, rx: Receiver<Work>, shared: Arc<Shared>) {
    let mut engine = engine;
    let mut embeds: VecDeque<EmbedJob> = VecDeque::new();
    let mut closed = false;
    let take = |engine: &mut Engine<Tag>, embeds: &mut VecDeque<EmbedJob>, w: Work| match w {
        Work::Generate(req) => {
            let tag = req.tag.clone();
            // Requests are checked against the context when made: only a programming error
            // lands here; the request is answered, not lost.
            if let Err(e) = engine.submit(req) {
                shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                let mut out = Outbox::default();
                out.push(&tag, Ev::Error(e.to_string()));
                out.deliver();
            }
        }
        Work::Embed(job) => embeds.push_back(job),
    };
    loop {
        if engine.is_idle() && embeds.is_empty() {
            if closed {
                return;
            }
            match rx.recv() {
                Ok(w) => take(&mut engine, &mut embeds, w),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(w) => take(&mut engine, &mut embeds, w),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let mut out = Outbox::default();
        let stopping = shared.stop.load(Ordering::Relaxed);
        // Drop what nobody waits for (a client gone, a task cancelled) and, once the drain time
        // of a shutdown is over, everything.
        for (tag, _) in engine.retain(|t| !stopping && !t.cancelled.load(Ordering::Relaxed)) {
            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            out.push(&tag, Ev::Error(SHUT_DOWN.into()));
        }
        embeds.retain(|j| {
            let keep = !stopping && !j.tag.cancelled.load(Ordering::Relaxed);
            if !keep {
                shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                out.push(&j.tag, Ev::Error(SHUT_DOWN.into()));
            }
            keep
        });
        if let Some(job) = embeds.pop_front() {
            match embed_step(&inner, job, &mut out) {
                Some(rest) => embeds.push_front(rest),
                None => {
                    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        engine.admit();
        shared.running.store(engine.running(), Ordering::Relaxed);
        shared.waiting.store(engine.waiting(), Ordering::Relaxed);
        for u in engine.step(&inner.model, &inner.tok) {
            match u {
                Update::Token {
                    tag,
                    event,
                    logprob,
                } => out.push(
                    &tag,
                    Ev::Token {
                        text: event.text,
                        token: event.token,
                        logprob: event.logprob,
                        top: logprob.map(|l| l.top),
                        finish: event.finished,
                    },
                ),
                Update::Retired { tag, seq } => {
                    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                    match seq {
                        Some(seq) => out.push(&tag, Ev::Done(seq.into_generation())),
                        None => out.push(&tag, Ev::Error("the request ran no generation".into())),
                    }
                }
                Update::Failed {
                    tag,
                    error,
                    in_model,
                } => {
                    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                    let what = if in_model {
                        "the model failed"
                    } else {
                        "sampling failed"
                    };
                    out.push(&tag, Ev::Error(format!("{what}: {error}")));
                }
                Update::Prefilled { .. } => {}
            }
        }
        shared.running.store(engine.running(), Ordering::Relaxed);
        shared.waiting.store(engine.waiting(), Ordering::Relaxed);
        out.deliver();
    }
}

/// A request in flight: cancel it to free its slot at the next step (the consumer went away).
#[pyclass(frozen, module = "gpt2rs")]
pub(crate) struct RequestHandle {
    req: Tag,
}

#[pymethods]
impl RequestHandle {
    /// Stop the request at the engine's next step; its callback is called no more.
    fn cancel(&self) {
        self.req.cancelled.store(true, Ordering::Relaxed);
    }

    /// The sampling seed the request runs with (chosen when none was given).
    #[getter]
    fn seed(&self) -> u64 {
        self.req.seed
    }
}

/// The native engine: see the module's comment. `gpt2rs.AsyncEngine` wraps it for asyncio.
#[pyclass(frozen, module = "gpt2rs", name = "_AsyncEngine")]
pub(crate) struct AsyncEngine {
    inner: Arc<Inner>,
    tx: Mutex<Option<Sender<Work>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
    parallel: usize,
    max_queue: usize,
}

impl AsyncEngine {
    /// Count a new request in, or refuse it: the engine is closed or full.
    fn reserve(&self) -> PyResult<Sender<Work>> {
        let tx = self
            .tx
            .lock()
            .map_err(|_| EngineClosed::new_err("the engine failed"))?
            .clone()
            .ok_or_else(|| EngineClosed::new_err("the engine is shut down"))?;
        if !self.alive() {
            return Err(EngineClosed::new_err(
                "the engine's thread has stopped (it failed): restart the engine",
            ));
        }
        let limit = self.parallel + self.max_queue;
        let mut now = self.shared.in_flight.load(Ordering::Relaxed);
        loop {
            if now >= limit {
                return Err(EngineFull::new_err(format!(
                    "{now} requests are in flight, the most this engine takes ({} running + {} waiting)",
                    self.parallel, self.max_queue
                )));
            }
            match self.shared.in_flight.compare_exchange(
                now,
                now + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(tx),
                Err(v) => now = v,
            }
        }
    }

    fn send(&self, tx: Sender<Work>, w: Work) -> PyResult<()> {
        tx.send(w).map_err(|_| {
            self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            EngineClosed::new_err("the engine's thread has stopped")
        })
    }

    fn alive(&self) -> bool {
        !self.shared.failed.load(Ordering::Relaxed)
            && self
                .thread
                .lock()
                .map(|t| t.as_ref().is_some_and(|t| !t.is_finished()))
                .unwrap_or(false)
    }
}

#[pymethods]
impl AsyncEngine {
    /// An engine over `model` with `parallel` sequences batched together (each a KV-cache slot of
    /// the whole context, allocated and faulted in now), at most `max_queue` more waiting, and at
    /// most `prefill_chunk` prompt tokens per step (so running streams keep flowing). On the CPU,
    /// requests reuse the prefixes that running and finished ones computed, bit for bit, finished
    /// ones keeping up to `cache_tokens` tokens (in slots beside the `parallel` ones; `None`: no
    /// prefix cache).
    #[new]
    #[pyo3(signature = (model, parallel=8, max_queue=256, prefill_chunk=256, cache_tokens=Some(4096)))]
    fn new(
        py: Python<'_>,
        model: &Model,
        parallel: i64,
        max_queue: i64,
        prefill_chunk: i64,
        cache_tokens: Option<i64>,
    ) -> PyResult<Self> {
        let parallel = match nonneg(parallel, "parallel")? {
            p @ 1..=256 => p,
            p => {
                return Err(PyValueError::new_err(format!(
                    "parallel {p} must be between 1 and 256"
                )))
            }
        };
        let max_queue = nonneg(max_queue, "max_queue")?;
        let prefill_chunk = nonneg(prefill_chunk, "prefill_chunk")?.max(1);
        let cache_tokens = cache_tokens
            .map(|t| nonneg(t, "cache_tokens"))
            .transpose()?
            // Other backends' rows may depend on how a prompt is split: no reuse there.
            .filter(|_| model.inner.model.device() == gpt2::Device::Cpu);
        let inner = model.inner.clone();
        let n_pos = inner.model.config().n_positions;
        let slots = parallel + cache_tokens.map_or(0, |t| t.div_ceil(n_pos));
        let state = crate::nogil(py, || {
            let mut state = inner.model.new_state(slots, n_pos)?;
            // As `gpt2 serve`: the first requests do not pay the cache's page faults.
            state.prefault();
            Ok(state)
        })?;
        let engine = match cache_tokens {
            Some(t) => Engine::with_prefix_cache(state, prefill_chunk, parallel, t),
            None => Engine::new(state, prefill_chunk),
        };
        let shared = Arc::new(Shared {
            in_flight: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let thread = {
            let (inner, shared) = (inner.clone(), shared.clone());
            std::thread::Builder::new()
                .name("gpt2rs-engine".into())
                .spawn(move || {
                    let s = shared.clone();
                    if let Err(p) = catch_unwind(AssertUnwindSafe(|| run(inner, engine, rx, s))) {
                        // The requests in flight are lost with the engine's state: say so, and
                        // fail the health check so that a supervisor replaces this engine.
                        shared.failed.store(true, Ordering::Relaxed);
                        eprintln!("gpt2rs: the engine thread failed: {}", panic_message(&*p));
                    }
                })
                .map_err(|e| PyRuntimeError::new_err(format!("starting the engine thread: {e}")))?
        };
        Ok(AsyncEngine {
            inner,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            shared,
            parallel,
            max_queue,
        })
    }

    /// Queue a generation; `callback(events)` is called from the engine's thread after each step
    /// that produced events for it, with a list of tuples: `("token", text, id, logprob, top,
    /// finish_reason)` (`top`: `[(id, logprob)]` best first when `logprobs` was given, else
    /// None; `finish_reason` set on the last token), then `("done", GenerationResult)` or
    /// `("error", message)`. Settings as `Model.generate` (no beam search), plus vLLM's
    /// `stop_token_ids`, `min_tokens`, `include_stop_str_in_output`, `skip_special_tokens`,
    /// OpenAI's `logit_bias` ({id: bias}) and `logprobs` (alternatives per token, 0 to 20).
    #[pyo3(signature = (prompt, callback, max_tokens=50, temperature=1.0, top_k=0, top_p=1.0,
        min_p=0.0, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
        no_repeat_ngram_size=0, stop=None, seed=None, eos_token_id=None, ignore_eos=false,
        truncate_prompt=false, stop_token_ids=None, min_tokens=0,
        include_stop_str_in_output=false, skip_special_tokens=false, logit_bias=None,
        logprobs=None))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        prompt: &Bound<'_, PyAny>,
        callback: Py<PyAny>,
        max_tokens: i64,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repetition_penalty: f32,
        frequency_penalty: f32,
        presence_penalty: f32,
        no_repeat_ngram_size: i64,
        stop: Option<&Bound<'_, PyAny>>,
        seed: Option<u64>,
        eos_token_id: Option<i64>,
        ignore_eos: bool,
        truncate_prompt: bool,
        stop_token_ids: Option<Vec<i64>>,
        min_tokens: i64,
        include_stop_str_in_output: bool,
        skip_special_tokens: bool,
        logit_bias: Option<&Bound<'_, PyDict>>,
        logprobs: Option<i64>,
    ) -> PyResult<RequestHandle> {
        let inner = &*self.inner;
        let vocab = inner.vocab();
        let mut cfg = gen_config(
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
            no_repeat_ngram_size,
            stop,
            seed,
            ignore_eos,
            eos_token_id,
            truncate_prompt,
            vocab,
        )?;
        cfg.stop_token_ids = stop_token_ids
            .unwrap_or_default()
            .into_iter()
            .map(|t| token_id(t, "stop_token_ids", vocab))
            .collect::<PyResult<_>>()?;
        cfg.min_tokens = nonneg(min_tokens, "min_tokens")?;
        cfg.include_stop_str_in_output = include_stop_str_in_output;
        cfg.skip_special_tokens = skip_special_tokens;
        cfg.validate().map_err(to_py)?;
        let logprobs = match logprobs {
            None => None,
            Some(k @ 0..=20) => Some(k as usize),
            Some(k) => {
                return Err(PyValueError::new_err(format!(
                    "logprobs {k} must be between 0 and 20"
                )))
            }
        };
        let mut bias = Vec::new();
        if let Some(d) = logit_bias {
            for (k, v) in d.iter() {
                let id = token_id(k.extract::<i64>()?, "logit_bias", vocab)?;
                let b: f32 = v.extract()?;
                if !b.is_finite() {
                    return Err(PyValueError::new_err(format!(
                        "logit_bias of token {id} must be a finite number"
                    )));
                }
                bias.push((id, b));
            }
        }
        let ids = inner.ids(prompt, "prompt")?;
        let seed = cfg.sampling.seed;
        let seq = Sequence::new(inner.model.config(), ids, cfg).map_err(to_py)?;
        let req = Arc::new(Req {
            callback,
            cancelled: AtomicBool::new(false),
            seed,
        });
        let mut request = Request::generate(req.clone(), seq);
        request.logprobs = logprobs;
        request.logit_bias = Arc::new(bias);
        let tx = self.reserve()?;
        self.send(tx, Work::Generate(request))?;
        Ok(RequestHandle { req })
    }

    /// Queue an embedding call (as `Model.embed`, a list of texts); `callback` gets
    /// `[("embedded", vectors)]` or `[("error", message)]`. It runs on the engine's thread
    /// between generation steps, a batch of at most 2048 tokens per step.
    #[pyo3(signature = (texts, callback, pooling="mean", normalize=true))]
    fn submit_embed(
        &self,
        texts: &Bound<'_, PyAny>,
        callback: Py<PyAny>,
        pooling: &str,
        normalize: bool,
    ) -> PyResult<RequestHandle> {
        let inner = &*self.inner;
        let pooling = Pooling::parse(pooling).map_err(to_py)?;
        let (texts, _) = inner.inputs(texts, "text")?;
        let n_pos = inner.model.config().n_positions;
        if let Some(i) = texts.iter().position(|d| d.is_empty() || d.len() > n_pos) {
            return Err(PyValueError::new_err(format!(
                "text {i} has {} tokens; expected 1 to the context of {n_pos}",
                texts[i].len()
            )));
        }
        let req = Arc::new(Req {
            callback,
            cancelled: AtomicBool::new(false),
            seed: 0,
        });
        let tx = self.reserve()?;
        self.send(
            tx,
            Work::Embed(EmbedJob {
                texts,
                pooling,
                normalize,
                done: Vec::new(),
                tag: req.clone(),
            }),
        )?;
        Ok(RequestHandle { req })
    }

    /// `{"running", "waiting", "in_flight", "parallel", "max_queue", "alive"}`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("running", self.shared.running.load(Ordering::Relaxed))?;
        d.set_item("waiting", self.shared.waiting.load(Ordering::Relaxed))?;
        d.set_item("in_flight", self.shared.in_flight.load(Ordering::Relaxed))?;
        d.set_item("parallel", self.parallel)?;
        d.set_item("max_queue", self.max_queue)?;
        d.set_item("alive", self.alive())?;
        Ok(d)
    }

    /// Whether the engine's thread runs and takes requests (a health check).
    fn is_alive(&self) -> bool {
        self.alive()
    }

    /// Stop taking requests; those in flight go on. With `timeout` (seconds), wait at most that
    /// long for them to finish (the GIL released), then end the rest (their consumers get
    /// an error) and wait for the thread. Returns whether everything in flight finished.
    #[pyo3(signature = (timeout=None))]
    fn shutdown(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let Some(timeout) = timeout else {
            return Ok(self.shared.in_flight.load(Ordering::Relaxed) == 0);
        };
        let limit = Duration::try_from_secs_f64(timeout.max(0.0)).unwrap_or(Duration::MAX);
        let shared = &self.shared;
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        let finished = py.detach(|| {
            let start = Instant::now();
            while shared.in_flight.load(Ordering::Relaxed) > 0 && start.elapsed() < limit {
                std::thread::sleep(Duration::from_millis(10));
            }
            let finished = shared.in_flight.load(Ordering::Relaxed) == 0;
            shared.stop.store(true, Ordering::Relaxed);
            if let Some(t) = thread {
                let _ = t.join();
            }
            finished
        });
        Ok(finished)
    }
}

impl Drop for AsyncEngine {
    fn drop(&mut self) {
        // Nobody can submit or wait any more: the thread ends what runs and exits.
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
    }
}
