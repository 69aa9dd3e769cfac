//! `gpt2rs._gpt2rs`: the Python face of the `gpt2` engine (PyO3). The pure-Python package `gpt2rs`
//! re-exports it; `gpt2rs/__init__.pyi` holds the typed signatures.
//!
//! Rules every method keeps:
//! - engine work runs with the GIL released ([`Inner::run`]), so Python threads compute in parallel;
//! - nothing panics into Python: engine errors become `ValueError` (bad input or config),
//!   `TypeError` (an argument of the wrong type), `FileNotFoundError` (a missing file),
//!   `MemoryError` (more memory than the machine has), `OSError` / `ConnectionError` (a hub
//!   download) or `RuntimeError`, and a panic is caught and reported as a `RuntimeError` too;
//! - long calls (generate, stream, score, perplexity) look for Python signals while the engine
//!   works ([`Inner::run_long`]), so Ctrl-C stops them with `KeyboardInterrupt`;
//! - a [`gpt2::Model`] is shared (it is `Sync`); every call makes its own [`gpt2::State`].

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpt2::embed::Pooling;
use gpt2::generate::engine::{Engine, Request, Update};
use gpt2::generate::{
    beam::beam_search, ConstraintSpec, EarlyStopping, FinishReason, Generation, GenerationConfig,
    Generator, Grammars, Sequence,
};
use gpt2::sampling::SamplingParams;
use gpt2::{LoadOptions, Logits, SeqInput};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2};
use pyo3::exceptions::{
    PyConnectionError, PyFileNotFoundError, PyMemoryError, PyOSError, PyRuntimeError, PyTypeError,
    PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyString, PyTuple};

mod research;
mod serving;

fn to_py(e: gpt2::Error) -> PyErr {
    let msg = e.to_string();
    match &e {
        gpt2::Error::Input(_) | gpt2::Error::Config { .. } => PyValueError::new_err(msg),
        gpt2::Error::Io { err, .. } if err.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(msg)
        }
        // The engine refuses what the machine cannot give (it checks before allocating), so
        // the interpreter lives to raise it.
        gpt2::Error::Resource(_) => PyMemoryError::new_err(msg),
        _ => PyRuntimeError::new_err(msg),
    }
}

/// A hub id that could not be had, as huggingface_hub raises it (its errors are `OSError`s):
/// `ConnectionError` when the Hub could not be reached, `FileNotFoundError` when it is not in the
/// cache and `HF_HUB_OFFLINE` forbids a download (huggingface_hub's `LocalEntryNotFoundError` is a
/// `FileNotFoundError`), `ValueError` for a bad `HF_HUB_*_TIMEOUT` setting, else `OSError`.
///
/// The library reports all of these as [`gpt2::Error::Input`]; they are told apart by its
/// messages (the no-network hint, the timeout variables' names).
fn hub_error(e: gpt2::Error) -> PyErr {
    let msg = e.to_string();
    if !matches!(e, gpt2::Error::Input(_)) {
        return to_py(e);
    }
    if msg.contains("_TIMEOUT=") && msg.contains("expected a positive number of seconds") {
        PyValueError::new_err(msg)
    } else if gpt2::hub::offline() && msg.contains("HF_HUB_OFFLINE") {
        PyFileNotFoundError::new_err(msg)
    } else if msg.contains("no network?") {
        PyConnectionError::new_err(msg)
    } else {
        PyOSError::new_err(msg)
    }
}

fn input(msg: impl Into<String>) -> gpt2::Error {
    gpt2::Error::Input(msg.into())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Run engine work without the GIL; a panic becomes a `RuntimeError` instead of unwinding into
/// Python.
fn nogil<T: Send>(py: Python<'_>, f: impl FnOnce() -> gpt2::Result<T> + Send) -> PyResult<T> {
    py.detach(|| catch_unwind(AssertUnwindSafe(f)))
        .map_err(|p| {
            PyRuntimeError::new_err(format!(
                "internal error in the gpt2 engine: {}",
                panic_message(&*p)
            ))
        })?
        .map_err(to_py)
}

/// How often a long call looks for Python signals (Ctrl-C) while the engine works.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Set when a Python signal handler raised (Ctrl-C's `KeyboardInterrupt`) during a long call: the
/// engine work stops at its next check, and the handler's exception is raised instead.
struct Stop(AtomicBool);

/// The unwind that leaves library work whose only hook is a progress callback (perplexity). It is
/// raised by `resume_unwind`, so no panic message is printed; [`Inner::run_long`] catches it.
struct Interrupted;

impl Stop {
    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// An error that ends the work; [`Inner::run_long`] raises the signal's exception instead.
    fn check(&self) -> gpt2::Result<()> {
        if self.is_set() {
            Err(input("interrupted"))
        } else {
            Ok(())
        }
    }

    /// For a progress callback: unwind out of the library's loop.
    fn unwind_if_set(&self) {
        if self.is_set() {
            std::panic::resume_unwind(Box::new(Interrupted));
        }
    }
}

/// What a Python `Model` (and its `Tokenizer`) share.
struct Inner {
    model: gpt2::Model,
    tok: gpt2::Tokenizer,
    /// rayon's loops of this model (batch tokenizing; on CUDA, scoring rows) run here, sized like the
    /// model's own pool, so that models with different thread counts do not share one global pool.
    pool: rayon::ThreadPool,
    threads: usize,
    path: PathBuf,
    /// The structured-output compiler (its token trie), built for the first call that needs it.
    grammars: std::sync::OnceLock<Result<Grammars, String>>,
}

impl Inner {
    /// `constraint` compiled for this model (a ValueError with llguidance's message if it does
    /// not compile).
    fn constrain(&self, cfg: &mut GenerationConfig, spec: Option<ConstraintSpec>) -> PyResult<()> {
        let Some(spec) = spec else {
            return Ok(());
        };
        let g = self
            .grammars
            .get_or_init(|| {
                Grammars::new(&self.tok, self.model.config().eos_token_id)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| PyRuntimeError::new_err(e.clone()))?;
        cfg.constraint = Some(g.compile(&spec).map_err(to_py)?);
        Ok(())
    }

    /// Engine work without the GIL, inside this model's rayon pool.
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce() -> gpt2::Result<T> + Send,
    ) -> PyResult<T> {
        nogil(py, || self.pool.install(f))
    }

    /// Long engine work: as [`Inner::run`], while the calling thread looks for Python signals every
    /// [`SIGNAL_POLL`] (taking the GIL for a moment). When a handler raises (Ctrl-C), `f`'s
    /// [`Stop`] is set; the work ends at its next check and the handler's exception is raised.
    /// (Python runs signal handlers only on its main thread; elsewhere no check ever raises.)
    fn run_long<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Stop) -> gpt2::Result<T> + Send,
    ) -> PyResult<T> {
        let stop = Stop(AtomicBool::new(false));
        let mut raised: Option<PyErr> = None;
        let done = py.detach(|| {
            let (tx, rx) = mpsc::channel();
            let stop = &stop;
            self.pool.in_place_scope(|s| {
                s.spawn(move |_| {
                    let _ = tx.send(catch_unwind(AssertUnwindSafe(|| f(stop))));
                });
                loop {
                    match rx.recv_timeout(SIGNAL_POLL) {
                        Ok(r) => return Some(r),
                        Err(RecvTimeoutError::Disconnected) => return None,
                        Err(RecvTimeoutError::Timeout) if raised.is_none() => {
                            if let Err(e) = Python::attach(|py| py.check_signals()) {
                                raised = Some(e);
                                stop.0.store(true, Ordering::Relaxed);
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                    }
                }
            })
        });
        if let Some(e) = raised {
            return Err(e);
        }
        match done {
            Some(Ok(r)) => r.map_err(to_py),
            Some(Err(p)) => Err(PyRuntimeError::new_err(format!(
                "internal error in the gpt2 engine: {}",
                panic_message(&*p)
            ))),
            None => Err(PyRuntimeError::new_err(
                "internal error in the gpt2 engine: the work ended without a result",
            )),
        }
    }

    fn vocab(&self) -> usize {
        self.model.config().vocab_size
    }

    fn check_ids(&self, ids: &[i64], what: &str) -> gpt2::Result<Vec<u32>> {
        let v = self.vocab();
        ids.iter()
            .enumerate()
            .map(|(i, &t)| {
                if t < 0 || t as u64 >= v as u64 {
                    Err(input(format!(
                        "{what}: token {i} has id {t}, outside the vocabulary of {v} ids"
                    )))
                } else {
                    Ok(t as u32)
                }
            })
            .collect()
    }

    /// A text (`str`) or token ids (a sequence of ints) as ids.
    fn ids(&self, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u32>> {
        if let Ok(s) = obj.cast::<PyString>() {
            return Ok(self.tok.encode(&s.to_cow()?));
        }
        not_bytes(obj, what, "a str or a list of token ids")?;
        match obj.extract::<Vec<i64>>() {
            Ok(ids) => self.check_ids(&ids, what).map_err(to_py),
            Err(_) => Err(PyTypeError::new_err(format!(
                "{what}: expected a str or a list of token ids, got {}",
                obj.get_type().name()?
            ))),
        }
    }

    /// One prompt (a str or a list of ids) or several (a list of those): `(prompts, several)`.
    fn prompts(&self, obj: &Bound<'_, PyAny>) -> PyResult<(Vec<Vec<u32>>, bool)> {
        self.inputs(obj, "prompt")
    }

    /// One text (a str or a list of ids) or several (a list of those), called `what` in errors:
    /// `(texts as ids, several)`.
    fn inputs(&self, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<(Vec<Vec<u32>>, bool)> {
        if obj.is_instance_of::<PyString>() {
            return Ok((vec![self.ids(obj, what)?], false));
        }
        if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
            let len = obj.len()?;
            if len == 0 {
                return Err(PyValueError::new_err(format!(
                    "no {what}s: give a str, a list of token ids, or a list of those"
                )));
            }
            let first = obj.get_item(0)?;
            if first.is_instance_of::<PyString>() || first.extract::<i64>().is_err() {
                let mut out = Vec::with_capacity(len);
                for (i, p) in obj.try_iter()?.enumerate() {
                    out.push(self.ids(&p?, &format!("{what} {i}"))?);
                }
                return Ok((out, true));
            }
        }
        Ok((vec![self.ids(obj, what)?], false))
    }
}

/// `bytes` and `bytearray` are sequences of ints to Python, but they are encoded text, not token
/// ids: refused rather than read as ids 0 to 255.
fn not_bytes(obj: &Bound<'_, PyAny>, what: &str, expected: &str) -> PyResult<()> {
    if obj.is_instance_of::<PyBytes>() || obj.is_instance_of::<PyByteArray>() {
        return Err(PyTypeError::new_err(format!(
            "{what}: expected {expected}, got {}; decode bytes to a str first",
            obj.get_type().name()?
        )));
    }
    Ok(())
}

/// An id-valued argument (`what`, such as `eos_token_id`) checked against the vocabulary.
fn token_id(id: i64, what: &str, vocab: usize) -> PyResult<u32> {
    match u32::try_from(id) {
        Ok(t) if (t as usize) < vocab => Ok(t),
        _ => Err(PyValueError::new_err(format!(
            "{what} {id} is not a token id: the vocabulary has {vocab} entries"
        ))),
    }
}

/// Positions per `score_batch` call in [`score_sliced`] at first: one of its forward passes.
const SCORE_SLICE_POSITIONS: usize = 1024;

/// A call of [`score_sliced`] that takes less doubles the next one's texts.
const SCORE_SLICE_TIME: Duration = Duration::from_millis(100);

/// `score_batch` of `docs` in slices of texts, so that [`Stop`] ends it between slices. Each text's
/// values are the same bits (`score_batch` scores every text as it would alone). A slice starts as
/// one forward pass of texts and grows while slices are quick, so a small model does not pay a new
/// KV cache every few texts.
fn score_sliced<R>(
    model: &gpt2::Model,
    docs: &[Vec<u32>],
    stop: &Stop,
    score_batch: impl Fn(&gpt2::Model, &[Vec<u32>]) -> gpt2::Result<Vec<R>>,
) -> gpt2::Result<Vec<R>> {
    // `score_batch` checks every text before any work and names a bad one by its index: the first
    // bad text k is reported, by its own index, by a call on texts 0..=k that computes nothing.
    let (v, n_pos) = (model.config().vocab_size, model.config().n_positions);
    let mut out = match docs
        .iter()
        .position(|d| d.len() < 2 || d.len() > n_pos || d.iter().any(|&t| t as usize >= v))
    {
        Some(k) => score_batch(model, &docs[..=k])?,
        None => Vec::with_capacity(docs.len()),
    };
    let mut budget = SCORE_SLICE_POSITIONS;
    let mut i = out.len();
    while i < docs.len() {
        stop.check()?;
        let (mut j, mut positions) = (i + 1, docs[i].len());
        while j < docs.len() && positions + docs[j].len() <= budget {
            positions += docs[j].len();
            j += 1;
        }
        let t = Instant::now();
        out.extend(score_batch(model, &docs[i..j])?);
        if t.elapsed() < SCORE_SLICE_TIME {
            budget = budget.saturating_mul(2);
        }
        i = j;
    }
    Ok(out)
}

fn nonneg(v: i64, what: &str) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| PyValueError::new_err(format!("{what} {v} must be ≥ 0")))
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        FinishReason::Eos => "eos",
        FinishReason::Stop => "stop",
    }
}

/// The sampling settings shared by `generate` and `stream`.
#[allow(clippy::too_many_arguments)]
fn gen_config(
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
    ignore_eos: bool,
    eos_token_id: Option<i64>,
    truncate_prompt: bool,
    vocab: usize,
) -> PyResult<GenerationConfig> {
    if max_tokens < 1 {
        return Err(PyValueError::new_err(format!(
            "max_tokens {max_tokens} must be at least 1"
        )));
    }
    let stop = match stop {
        None => Vec::new(),
        Some(s) if s.is_none() => Vec::new(),
        Some(s) => match s.cast::<PyString>() {
            Ok(s) => vec![s.to_cow()?.into_owned()],
            Err(_) => s
                .extract::<Vec<String>>()
                .map_err(|_| PyTypeError::new_err("stop: expected a str or a list of str"))?,
        },
    };
    // As the CLI: no seed means a fresh one (reported in the result).
    let seed = seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        t.as_nanos() as u64 ^ std::process::id() as u64
    });
    let cfg = GenerationConfig {
        max_new_tokens: max_tokens as usize,
        sampling: SamplingParams {
            temperature,
            top_k: nonneg(top_k, "top_k")?,
            top_p,
            min_p,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
            no_repeat_ngram_size: nonneg(no_repeat_ngram_size, "no_repeat_ngram_size")?,
            seed,
        },
        stop,
        ignore_eos,
        eos_token_id: eos_token_id
            .map(|e| token_id(e, "eos_token_id", vocab))
            .transpose()?,
        truncate_prompt,
        ..Default::default()
    };
    Ok(cfg)
}

/// The structured-output keyword arguments of `generate` and `stream`: one at most.
fn constraint_spec(
    py: Python<'_>,
    json_schema: Option<&Bound<'_, PyAny>>,
    json_object: bool,
    regex: Option<String>,
    choice: Option<Vec<String>>,
    grammar: Option<String>,
) -> PyResult<Option<ConstraintSpec>> {
    let json_schema = json_schema.filter(|j| !j.is_none());
    let given = [
        ("json_schema", json_schema.is_some()),
        ("json_object", json_object),
        ("regex", regex.is_some()),
        ("choice", choice.is_some()),
        ("grammar", grammar.is_some()),
    ];
    let on: Vec<&str> = given.iter().filter(|g| g.1).map(|g| g.0).collect();
    if on.len() > 1 {
        return Err(PyValueError::new_err(format!(
            "{} were all given; one constraint (structured output) at most",
            on.join(", ")
        )));
    }
    Ok(if let Some(j) = json_schema {
        // A str holds the schema as JSON text; anything else goes through json.dumps.
        let text = match j.cast::<PyString>() {
            Ok(s) => s.to_cow()?.into_owned(),
            Err(_) => py
                .import("json")?
                .call_method1("dumps", (j,))
                .map_err(|e| {
                    PyTypeError::new_err(format!("json_schema: expected a dict or a str: {e}"))
                })?
                .extract::<String>()?,
        };
        Some(ConstraintSpec::json_schema_text(&text).map_err(to_py)?)
    } else if json_object {
        Some(ConstraintSpec::JsonObject)
    } else if let Some(r) = regex {
        Some(ConstraintSpec::Regex(r))
    } else if let Some(c) = choice {
        Some(ConstraintSpec::Choice(c))
    } else {
        grammar.map(ConstraintSpec::Grammar)
    })
}

/// The result of one generated sequence.
#[pyclass(frozen, get_all, module = "gpt2rs")]
struct GenerationResult {
    /// The generated text (without the stop string or `<|endoftext|>`).
    text: String,
    /// Generated token ids (`<|endoftext|>` included when it ended the text).
    tokens: Vec<u32>,
    /// Log-softmax of the raw model logits at each generated token.
    logprobs: Vec<f32>,
    /// "length", "eos" or "stop".
    finish_reason: &'static str,
    /// The prompt's ids as run (after any truncation).
    prompt_ids: Vec<u32>,
    /// Beam search only: the beam's length-penalised score.
    score: Option<f32>,
    /// The sampling seed used.
    seed: u64,
}

impl GenerationResult {
    fn new(g: Generation, seed: u64) -> Self {
        GenerationResult {
            text: g.text,
            tokens: g.tokens,
            logprobs: g.logprobs,
            finish_reason: finish_name(g.finish_reason),
            prompt_ids: g.prompt_tokens,
            score: g.score,
            seed,
        }
    }
}

#[pymethods]
impl GenerationResult {
    /// Tokens in the prompt as run.
    #[getter]
    fn prompt_tokens(&self) -> usize {
        self.prompt_ids.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "GenerationResult(text={:?}, tokens=<{} ids>, finish_reason={:?})",
            self.text,
            self.tokens.len(),
            self.finish_reason
        )
    }
}

/// Strided perplexity of a text.
#[pyclass(frozen, get_all, module = "gpt2rs")]
struct Perplexity {
    /// exp(nll / scored).
    perplexity: f64,
    /// Total negative log-likelihood of the scored tokens, in nats.
    nll: f64,
    /// Tokens in the text.
    tokens: usize,
    /// Tokens scored.
    scored: usize,
}

#[pymethods]
impl Perplexity {
    fn __repr__(&self) -> String {
        format!(
            "Perplexity(perplexity={}, nll={}, tokens={}, scored={})",
            self.perplexity, self.nll, self.tokens, self.scored
        )
    }
}

/// The model's byte-level BPE tokenizer (identical to `GPT2TokenizerFast`).
#[pyclass(frozen, module = "gpt2rs")]
struct Tokenizer {
    inner: Arc<Inner>,
}

#[pymethods]
impl Tokenizer {
    /// Token ids of `text` (no BOS added; `<|endoftext|>` in the text is the special token).
    fn encode(&self, py: Python<'_>, text: String) -> PyResult<Vec<u32>> {
        let tok = &self.inner.tok;
        nogil(py, || Ok(tok.encode(&text)))
    }

    /// Token ids of each text, encoded in parallel.
    fn encode_batch(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        let inner = &*self.inner;
        inner.run(py, || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            Ok(inner.tok.encode_batch(&refs, gpt2::Special::Allow))
        })
    }

    /// The text of `ids` (invalid UTF-8 becomes U+FFFD, as transformers' decode).
    fn decode(&self, ids: &Bound<'_, PyAny>) -> PyResult<String> {
        not_bytes(ids, "decode", "a list of token ids")?;
        let ids: Vec<i64> = ids.extract()?;
        let ids: Vec<u32> = ids
            .iter()
            .map(|&t| {
                u32::try_from(t)
                    .map_err(|_| PyValueError::new_err(format!("{t} is not a token id")))
            })
            .collect::<PyResult<_>>()?;
        self.inner.tok.decode(&ids).map_err(to_py)
    }

    /// The bytes of token `id` (a token may hold part of a UTF-8 character): what OpenAI's chat
    /// `logprobs` report as `bytes`.
    fn token_bytes<'py>(&self, py: Python<'py>, id: i64) -> PyResult<Bound<'py, PyBytes>> {
        let id = token_id(id, "token_bytes", self.inner.tok.vocab_size())?;
        let b = self.inner.tok.token_bytes(id).unwrap_or_default();
        Ok(PyBytes::new(py, b))
    }

    /// The ids the tokenizer knows.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.tok.vocab_size()
    }

    fn __len__(&self) -> usize {
        self.inner.tok.vocab_size()
    }

    fn __repr__(&self) -> String {
        format!(
            "Tokenizer(source={:?}, vocab_size={})",
            self.inner.tok.source(),
            self.inner.tok.vocab_size()
        )
    }
}

/// Text generated step by step: an iterator of text pieces. The GIL is released during each step.
/// After the last piece, `result` holds the whole `GenerationResult`.
#[pyclass(frozen, module = "gpt2rs")]
struct Stream {
    inner: Arc<Inner>,
    run: Mutex<StreamRun>,
    seed: u64,
}

/// A stream's sequence on the crate's batch engine (one slot), stepped one token at a time.
struct StreamRun {
    engine: Engine<()>,
    result: Option<Generation>,
}

impl StreamRun {
    /// The next non-empty piece of text, or `None` at the end. `check` (a signal check) can end it
    /// between tokens; the stream stays usable, as each token is taken whole or not at all.
    fn next_piece(
        &mut self,
        inner: &Inner,
        mut check: impl FnMut() -> gpt2::Result<()>,
    ) -> gpt2::Result<Option<String>> {
        while !self.engine.is_idle() {
            check()?;
            let mut piece = String::new();
            for u in self.engine.step(&inner.model, &inner.tok) {
                match u {
                    Update::Token { event, .. } => piece.push_str(&event.text),
                    Update::Retired { seq, .. } => {
                        self.result = seq.map(Sequence::into_generation);
                    }
                    Update::Failed { error, .. } => return Err(error),
                    Update::Prefilled { .. } => {}
                }
            }
            if !piece.is_empty() {
                return Ok(Some(piece));
            }
        }
        Ok(None)
    }
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let inner = &*self.inner;
        let run = &self.run;
        // A piece is usually one token: it runs on this thread (no hand-over to the pool per
        // token), which looks for signals itself when a piece takes longer than SIGNAL_POLL.
        let mut raised: Option<PyErr> = None;
        let piece = nogil(py, || {
            let mut run = run
                .lock()
                .map_err(|_| gpt2::Error::Input("the stream failed earlier".into()))?;
            let mut last = Instant::now();
            run.next_piece(inner, || {
                if last.elapsed() < SIGNAL_POLL {
                    return Ok(());
                }
                last = Instant::now();
                Python::attach(|py| py.check_signals()).map_err(|e| {
                    raised = Some(e);
                    input("interrupted")
                })
            })
        });
        match raised {
            Some(e) => Err(e),
            None => piece,
        }
    }

    /// The whole generation once the stream is exhausted, else None.
    #[getter]
    fn result(&self) -> PyResult<Option<GenerationResult>> {
        let run = self
            .run
            .lock()
            .map_err(|_| PyRuntimeError::new_err("the stream failed earlier"))?;
        Ok(run
            .result
            .clone()
            .map(|g| GenerationResult::new(g, self.seed)))
    }
}

/// A GPT-2 model loaded by the Rust engine.
///
/// Safe to share between Python threads: the engine runs without the GIL and every call has its
/// own KV cache.
#[pyclass(frozen, module = "gpt2rs")]
struct Model {
    inner: Arc<Inner>,
}

impl Model {
    /// A Python model over a loaded one, with a rayon pool of `opts.threads` (default: one per
    /// core).
    fn with(
        model: gpt2::Model,
        tok: gpt2::Tokenizer,
        opts: &LoadOptions,
        path: PathBuf,
    ) -> PyResult<Model> {
        let n = opts
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("gpt2rs-{i}"))
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("starting {n} threads: {e}")))?;
        let inner = Inner {
            model,
            tok,
            pool,
            threads: n,
            path,
            grammars: std::sync::OnceLock::new(),
        };
        Ok(Model {
            inner: Arc::new(inner),
        })
    }
}

#[pymethods]
impl Model {
    /// Load a model from a local checkpoint directory or a Hugging Face hub id (`gpt2`,
    /// `gpt2-medium`, `owner/name`), taken from the Hugging Face cache or downloaded into it,
    /// exactly as the `gpt2` CLI's `--model`.
    ///
    /// dtype: how the weight matrices are stored: "f32", "f16", "bf16" or "q8" (CPU only).
    /// device: "cpu", "cuda" or "cuda:N" (CUDA builds only), "gpu" or "gpu:N" (wgpu builds only).
    /// threads: CPU threads of this model (default: one per core).
    /// revision: hub branch, tag or commit (default "main").
    #[staticmethod]
    #[pyo3(signature = (name_or_dir, dtype="f32", device="cpu", threads=None, revision=None))]
    fn from_pretrained(
        py: Python<'_>,
        name_or_dir: PathBuf,
        dtype: &str,
        device: &str,
        threads: Option<i64>,
        revision: Option<String>,
    ) -> PyResult<Model> {
        let opts = LoadOptions::parse(device, dtype, threads.map(i128::from), "").map_err(to_py)?;
        let name = name_or_dir.to_string_lossy().into_owned();
        // A path that is plainly a path (not a hub id) and is missing: FileNotFoundError, as
        // Python's own file functions say it.
        let looks_like_path = name_or_dir.is_absolute()
            || name.starts_with("./")
            || name.starts_with("../")
            || name.starts_with('~');
        if looks_like_path && !name_or_dir.exists() {
            return Err(PyFileNotFoundError::new_err(format!(
                "{name}: no such checkpoint directory"
            )));
        }
        let revision = revision.unwrap_or_else(|| "main".into());
        // A hub id's failures (offline, no network, a failed download) are OSErrors, as
        // huggingface_hub's; a local path's keep the engine's kinds.
        let hub_id = !gpt2::hub::is_local(&name);
        let dir = nogil(py, || Ok(gpt2::hub::resolve(&name, &revision)))?.map_err(|e| {
            if hub_id {
                hub_error(e)
            } else {
                to_py(e)
            }
        })?;
        let (model, tok) = nogil(py, || {
            let model = gpt2::Model::load_with(&dir, &opts)?;
            let tok = gpt2::Tokenizer::from_dir(&dir)?;
            Ok((model, tok))
        })?;
        Model::with(model, tok, &opts, dir)
    }

    /// Random weights at a released shape (`"gpt2"`, `"gpt2-medium"`, `"gpt2-large"`,
    /// `"gpt2-xl"`, `"distilgpt2"`) with the GPT-2 tokenizer, as `gpt2 serve --random PRESET`
    /// and `gpt2 bench --random`: for speed measurements without a checkpoint. The same `seed`
    /// gives the same weights.
    #[staticmethod]
    #[pyo3(signature = (preset="gpt2", dtype="f32", device="cpu", threads=None, seed=1))]
    fn random(
        py: Python<'_>,
        preset: &str,
        dtype: &str,
        device: &str,
        threads: Option<i64>,
        seed: u64,
    ) -> PyResult<Model> {
        let opts = LoadOptions::parse(device, dtype, threads.map(i128::from), "").map_err(to_py)?;
        let Some(cfg) = gpt2::GPT2Config::preset(preset) else {
            return Err(PyValueError::new_err(format!(
                "random {preset:?}: expected one of {}",
                gpt2::config::PRESETS.join(", ")
            )));
        };
        let model = nogil(py, || gpt2::Model::random(cfg, seed, &opts))?;
        Model::with(
            model,
            gpt2::Tokenizer::gpt2(),
            &opts,
            PathBuf::from(format!("random:{preset}")),
        )
    }

    /// The model's tokenizer.
    #[getter]
    fn tokenizer(&self) -> Tokenizer {
        Tokenizer {
            inner: self.inner.clone(),
        }
    }

    /// The checkpoint directory the model was loaded from.
    #[getter]
    fn path(&self) -> String {
        self.inner.path.display().to_string()
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.model.dtype().name()
    }

    #[getter]
    fn device(&self) -> String {
        self.inner.model.device().to_string()
    }

    #[getter]
    fn threads(&self) -> usize {
        self.inner.threads
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab()
    }

    /// The end-of-text token id (`<|endoftext|>` for GPT-2).
    #[getter]
    fn eos_token_id(&self) -> u32 {
        self.inner.model.config().eos_token_id
    }

    /// The context length (positions).
    #[getter]
    fn n_positions(&self) -> usize {
        self.inner.model.config().n_positions
    }

    /// What runs the model: device, instruction set, threads.
    fn describe(&self) -> String {
        self.inner.model.describe()
    }

    fn __repr__(&self) -> String {
        format!(
            "Model(path={:?}, dtype={:?}, device={:?}, threads={})",
            self.inner.path.display().to_string(),
            self.dtype(),
            self.device(),
            self.inner.threads
        )
    }

    /// Logits of every position of `ids` (a str is tokenized): a float32 array `(len, vocab)`.
    fn logits<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let inner = &*self.inner;
        let ids = inner.ids(ids, "logits")?;
        let n_pos = inner.model.config().n_positions;
        if ids.is_empty() || ids.len() > n_pos {
            return Err(PyValueError::new_err(format!(
                "logits: {} ids; expected 1 to the context of {n_pos}",
                ids.len()
            )));
        }
        let (n, v) = (ids.len(), inner.vocab());
        let rows = inner.run(py, || {
            let mut state = inner.model.new_state(1, n)?;
            let logits = inner.model.forward(
                &mut state,
                &[SeqInput {
                    slot: 0,
                    tokens: &ids,
                }],
                Logits::All,
            )?;
            Ok(logits.to_vec())
        })?;
        let arr = Array2::from_shape_vec((n, v), rows)
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Ok(arr.into_pyarray(py))
    }

    /// The `k` most likely next tokens after `prompt` (a str or ids), best first:
    /// a list of `(id, token text, logprob)`.
    #[pyo3(signature = (prompt, k=10))]
    fn top(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        k: i64,
    ) -> PyResult<Vec<(u32, String, f32)>> {
        let inner = &*self.inner;
        let ids = inner.ids(prompt, "prompt")?;
        let k = nonneg(k, "k")?;
        let top = inner.run(py, || gpt2::eval::top_k(&inner.model, &ids, k))?;
        top.into_iter()
            .map(|(id, lp)| {
                let text = inner.tok.token_texts(&[id]).map_err(to_py)?.remove(0);
                Ok((id, text, lp))
            })
            .collect()
    }

    /// Each token's log-probability given its prefix, for one text or a list of texts (str or
    /// ids): a float32 array of `len(ids) - 1` values per text (a list of arrays for a list).
    /// Short texts are run several per forward pass. With `diagnostics=True`, a dict per text
    /// instead: `logprobs` (the same values), `ranks` (int64: 1 + how many tokens have a larger
    /// logit) and `entropies` (float32: each next-token distribution's entropy, nats).
    #[pyo3(signature = (texts, diagnostics=false))]
    fn score<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        diagnostics: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let inner = &*self.inner;
        let single = texts.is_instance_of::<PyString>()
            || (!texts.is_instance_of::<PyList>() && !texts.is_instance_of::<PyTuple>())
            || (texts.len()? > 0 && texts.get_item(0)?.extract::<i64>().is_ok());
        let docs: Vec<Vec<u32>> = if single {
            vec![inner.ids(texts, "text")?]
        } else {
            // Text is tokenized in parallel without the GIL; ids are taken as they are.
            let mut strings = Vec::new();
            let mut ids = Vec::new();
            for (i, t) in texts.try_iter()?.enumerate() {
                let t = t?;
                match t.cast::<PyString>() {
                    Ok(s) => strings.push((i, s.to_cow()?.into_owned())),
                    Err(_) => ids.push((i, inner.ids(&t, &format!("text {i}"))?)),
                }
            }
            let n = strings.len() + ids.len();
            let encoded = inner.run(py, || {
                let refs: Vec<&str> = strings.iter().map(|(_, s)| s.as_str()).collect();
                Ok(inner.tok.encode_batch(&refs, gpt2::Special::Allow))
            })?;
            let mut docs = vec![Vec::new(); n];
            for ((i, _), e) in strings.iter().zip(encoded) {
                docs[*i] = e;
            }
            for (i, e) in ids {
                docs[i] = e;
            }
            docs
        };
        if diagnostics {
            let found = inner.run_long(py, |stop| {
                score_sliced(&inner.model, &docs, stop, gpt2::eval::score_diagnostics)
            })?;
            let mut dicts = Vec::with_capacity(found.len());
            for d in found {
                let dict = PyDict::new(py);
                dict.set_item("logprobs", PyArray1::from_vec(py, d.logprobs))?;
                let ranks: Vec<i64> = d.ranks.into_iter().map(i64::from).collect();
                dict.set_item("ranks", PyArray1::from_vec(py, ranks))?;
                dict.set_item("entropies", PyArray1::from_vec(py, d.entropies))?;
                dicts.push(dict);
            }
            if single {
                return Ok(dicts.swap_remove(0).into_any());
            }
            return Ok(PyList::new(py, dicts)?.into_any());
        }
        let scores = inner.run_long(py, |stop| {
            score_sliced(&inner.model, &docs, stop, gpt2::eval::score_batch)
        })?;
        if single {
            let s = scores.into_iter().next().unwrap_or_default();
            return Ok(PyArray1::from_vec(py, s).into_any());
        }
        let arrays: Vec<Bound<'py, PyArray1<f32>>> = scores
            .into_iter()
            .map(|s| PyArray1::from_vec(py, s))
            .collect();
        Ok(PyList::new(py, arrays)?.into_any())
    }

    /// TransformerLens's `run_with_cache`: the logits `(T, vocab)` and a dict of the activation
    /// sites `names` selects (names or glob patterns such as `"blocks.*.hook_resid_post"`; `None`:
    /// every site), each a float32 array in the site's shape. A list of texts gives a list of
    /// `(logits, cache)` tuples. With `logits=False` the logits are `None` and the pass stops
    /// after the last block a site is in.
    #[pyo3(signature = (texts, names=None, logits=true))]
    fn run_with_cache<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        names: Option<&Bound<'py, PyAny>>,
        logits: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let inner = &*self.inner;
        let (docs, several) = inner.inputs(texts, "text")?;
        let sites = research::sites_of(inner, names)?;
        let out = inner.run_long(py, |stop| {
            research::run_batches(inner, &docs, &sites, logits, stop)
        })?;
        let items = out
            .into_iter()
            .zip(&docs)
            .map(|(a, d)| research::cache_tuple(py, inner, a, d.len()))
            .collect::<PyResult<_>>()?;
        research::one_or_list(py, several, items)
    }

    /// The logits `(T, vocab)` with activation sites replaced: `patches` maps site names to arrays
    /// in the site's shape (e.g. one from `run_with_cache`, with a head's slice of `hook_z`
    /// changed). Patching a site with its own cached value changes nothing.
    fn run_with_patches<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyAny>,
        patches: &Bound<'py, PyDict>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let inner = &*self.inner;
        let ids = inner.ids(text, "text")?;
        let patches = research::patches_of(inner, patches, ids.len())?;
        let logits = inner.run(py, || research::run_patched(inner, &ids, &patches))?;
        research::array2(py, ids.len(), inner.vocab(), logits)
    }

    /// transformers' `output_hidden_states`: `(n_layer + 1, T, n_embd)`, the embeddings, then each
    /// block's output, the last after `ln_f`. A list of texts gives a list of arrays.
    fn hidden_states<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        research::stacked_for(py, &self.inner, texts, research::hidden_state_sites)
    }

    /// transformers' `output_attentions`: `(n_layer, n_head, T, T)`, each block's attention
    /// pattern. A list of texts gives a list of arrays.
    fn attentions<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        research::stacked_for(py, &self.inner, texts, research::pattern_sites)
    }

    /// Embeddings: the final hidden state (after `ln_f`) pooled over positions (`"mean"`) or taken
    /// at the last (`"last"`), unit length when `normalize` (as OpenAI's embeddings are):
    /// `(N, n_embd)` for a list of texts, `(n_embd,)` for one.
    #[pyo3(signature = (texts, pooling="mean", normalize=true))]
    fn embed<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        pooling: &str,
        normalize: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let inner = &*self.inner;
        let pooling = Pooling::parse(pooling).map_err(to_py)?;
        let (docs, several) = inner.inputs(texts, "text")?;
        let n_embd = inner.model.config().n_embd;
        let pooled = inner.run_long(py, |stop| {
            research::embed_sliced(inner, &docs, pooling, normalize, stop)
        })?;
        if several {
            research::array2(py, docs.len(), n_embd, pooled)
        } else {
            research::array_of(py, &[n_embd], pooled)
        }
    }

    /// Strided perplexity of a text (str or ids), as transformers' perplexity guide: windows of
    /// `context` tokens (default the model's context) advanced by `stride` (default `context`),
    /// `batch` windows per forward pass.
    #[pyo3(signature = (text, context=None, stride=None, batch=None))]
    fn perplexity(
        &self,
        py: Python<'_>,
        text: &Bound<'_, PyAny>,
        context: Option<i64>,
        stride: Option<i64>,
        batch: Option<i64>,
    ) -> PyResult<Perplexity> {
        let inner = &*self.inner;
        let ids = inner.ids(text, "text")?;
        let context = match context {
            Some(c) => nonneg(c, "context")?,
            None => inner.model.config().n_positions,
        };
        let stride = match stride {
            Some(s) => nonneg(s, "stride")?,
            None => context,
        };
        let batch = match batch {
            Some(b) if b >= 1 => b as usize,
            Some(b) => return Err(PyValueError::new_err(format!("batch {b} must be ≥ 1"))),
            None => (2048 / context.max(1)).max(1),
        };
        // The library's only hook inside its loop is progress, called after each forward pass.
        let p = inner.run_long(py, |stop| {
            gpt2::eval::perplexity(&inner.model, &ids, context, stride, batch, |_, _| {
                stop.unwind_if_set()
            })
        })?;
        Ok(Perplexity {
            perplexity: p.perplexity,
            nll: p.nll,
            tokens: p.tokens,
            scored: p.scored,
        })
    }

    /// Generate from a prompt (a str or a list of ids) or a list of prompts.
    ///
    /// Sampling as the `gpt2 generate` CLI: temperature 0 is greedy; `seed` None picks a fresh one
    /// (in `result.seed`); the same seed and settings give the same tokens. `num_beams > 1` is
    /// transformers' beam search. Returns a `GenerationResult` for one prompt, a list for a list
    /// (prompt-major, `num_return_sequences` per prompt; also a list when that is > 1).
    #[pyo3(signature = (prompt, max_tokens=50, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
        repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
        no_repeat_ngram_size=0, stop=None, seed=None, num_beams=1, length_penalty=1.0,
        early_stopping=None, num_return_sequences=1, eos_token_id=None, ignore_eos=false,
        truncate_prompt=false, json_schema=None, json_object=false, regex=None, choice=None,
        grammar=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompt: &Bound<'py, PyAny>,
        max_tokens: i64,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repetition_penalty: f32,
        frequency_penalty: f32,
        presence_penalty: f32,
        no_repeat_ngram_size: i64,
        stop: Option<&Bound<'py, PyAny>>,
        seed: Option<u64>,
        num_beams: i64,
        length_penalty: f32,
        early_stopping: Option<&Bound<'py, PyAny>>,
        num_return_sequences: i64,
        eos_token_id: Option<i64>,
        ignore_eos: bool,
        truncate_prompt: bool,
        json_schema: Option<&Bound<'py, PyAny>>,
        json_object: bool,
        regex: Option<String>,
        choice: Option<Vec<String>>,
        grammar: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let inner = &*self.inner;
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
            inner.vocab(),
        )?;
        cfg.num_beams = nonneg(num_beams, "num_beams")?;
        cfg.num_return_sequences = nonneg(num_return_sequences, "num_return_sequences")?;
        cfg.length_penalty = length_penalty;
        cfg.early_stopping = match early_stopping {
            None => EarlyStopping::False,
            Some(e) if e.is_none() => EarlyStopping::False,
            Some(e) => match (e.extract::<bool>(), e.extract::<String>().as_deref()) {
                (Ok(true), _) | (_, Ok("true")) => EarlyStopping::True,
                (Ok(false), _) | (_, Ok("false")) => EarlyStopping::False,
                (_, Ok("never")) => EarlyStopping::Never,
                _ => {
                    return Err(PyValueError::new_err(
                        "early_stopping: expected True, False or \"never\"",
                    ))
                }
            },
        };
        let spec = constraint_spec(py, json_schema, json_object, regex, choice, grammar)?;
        inner.constrain(&mut cfg, spec)?;
        cfg.validate().map_err(to_py)?;
        let (prompts, several) = inner.prompts(prompt)?;
        let seed = cfg.sampling.seed;
        // As `generate_batch`, one step at a time so that Ctrl-C stops it between tokens (beam
        // search has no such hook: between prompts only).
        let gens = inner.run_long(py, |stop| {
            if cfg.num_beams > 1 {
                let mut out = Vec::new();
                for p in &prompts {
                    stop.check()?;
                    out.extend(beam_search(&inner.model, &inner.tok, p, &cfg)?);
                }
                Ok(out)
            } else {
                let mut g = Generator::new(&inner.model, &inner.tok, &prompts, &cfg)?;
                while !g.is_done() {
                    stop.check()?;
                    g.step()?;
                }
                g.run(|_| {})
            }
        })?;
        let mut results: Vec<GenerationResult> = gens
            .into_iter()
            .map(|g| GenerationResult::new(g, seed))
            .collect();
        if !several && results.len() == 1 {
            return Ok(Bound::new(py, results.remove(0))?.into_any());
        }
        Ok(PyList::new(py, results)?.into_any())
    }

    /// Generate from one prompt as text arrives: an iterator of text pieces (see `generate` for
    /// the settings; no beam search). The GIL is released during each step.
    #[pyo3(signature = (prompt, max_tokens=50, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
        repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
        no_repeat_ngram_size=0, stop=None, seed=None, eos_token_id=None, ignore_eos=false,
        truncate_prompt=false, json_schema=None, json_object=false, regex=None, choice=None,
        grammar=None))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
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
        json_schema: Option<&Bound<'_, PyAny>>,
        json_object: bool,
        regex: Option<String>,
        choice: Option<Vec<String>>,
        grammar: Option<String>,
    ) -> PyResult<Stream> {
        let inner = &*self.inner;
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
            inner.vocab(),
        )?;
        let spec = constraint_spec(py, json_schema, json_object, regex, choice, grammar)?;
        inner.constrain(&mut cfg, spec)?;
        let ids = inner.ids(prompt, "prompt")?;
        let seed = cfg.sampling.seed;
        let seq = Sequence::new(inner.model.config(), ids, cfg).map_err(to_py)?;
        let state = inner.model.new_state(1, seq.capacity()).map_err(to_py)?;
        let mut engine = Engine::new(state, usize::MAX);
        engine.submit(Request::generate((), seq)).map_err(to_py)?;
        Ok(Stream {
            inner: self.inner.clone(),
            run: Mutex::new(StreamRun {
                engine,
                result: None,
            }),
            seed,
        })
    }
}

#[pymodule]
fn _gpt2rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<Tokenizer>()?;
    m.add_class::<GenerationResult>()?;
    m.add_class::<Perplexity>()?;
    m.add_class::<Stream>()?;
    m.add_class::<serving::AsyncEngine>()?;
    m.add_class::<serving::RequestHandle>()?;
    m.add("EngineFull", m.py().get_type::<serving::EngineFull>())?;
    m.add("EngineClosed", m.py().get_type::<serving::EngineClosed>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MAX_THREADS", gpt2::MAX_THREADS)?;
    Ok(())
}
