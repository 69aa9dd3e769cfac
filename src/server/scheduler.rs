//! Continuous batching: one thread owns the [`Model`] and the batch engine
//! ([`crate::generate::engine`]) over a [`crate::State`] of `parallel` slots (and, with the prefix cache, slots keeping finished requests' prefixes). Each step the engine takes
//! new requests into free slots, then runs ONE forward pass over every running sequence: a decode
//! token for each sequence past its prompt, and chunks of at most [`PREFILL_CHUNK`] prompt tokens
//! in all for sequences still being prefilled, so running streams never wait behind a long prompt.
//! This loop feeds it requests, ends those whose client went away or whose time ran out, and turns
//! its updates into each request's [`Event`]s.
//!
//! Each sequence samples with its own [`Sequence`] (own settings, own seeded RNG) from its own row of
//! logits, and the CPU forward pass gives each row of a ragged batch exactly its lone result, so a
//! request's tokens do not depend on what runs beside it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use crate::backend::Model;
use crate::embed::{self, Pooling, BATCH_POSITIONS};
use crate::generate::beam::beam_search;
pub use crate::generate::engine::TokenLogprob;
use crate::generate::engine::{Engine, Request, Update};
use crate::generate::{FinishReason, Generation, GenerationConfig, Sequence};
use crate::tokenizer::Tokenizer;

use super::metrics::Metrics;

/// Prompt tokens run per step at most (the default), across all sequences being prefilled: a
/// 256-token chunk costs about what a few decode steps do, so streams keep flowing.
pub const PREFILL_CHUNK: usize = 256;

/// What the scheduler tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// The prompt's tokens with their log-probs (echo with logprobs), once prefilled.
    Prompt {
        index: usize,
        logprobs: Vec<TokenLogprob>,
    },
    /// One generated token of choice `index`, with the text it made final.
    Token {
        index: usize,
        text: String,
        logprob: Option<TokenLogprob>,
        finish: Option<&'static str>,
    },
    /// Choice `index` took a slot: it waits no more.
    Admitted,
    /// Choice `index`'s prompt has run, its first `tokens` from the prefix cache.
    Cached { index: usize, tokens: usize },
    /// Choice `index` ended without a token (max_tokens 0, or its time ran out).
    Done { index: usize, finish: &'static str },
    /// The model failed: the request cannot go on.
    Error(String),
}

/// One sequence to run: a choice of a request.
pub struct Choice {
    pub index: usize,
    /// The prompt as it runs (never empty); the same ids as `seq`'s prompt.
    pub prompt: Vec<u32>,
    /// What generates; `None` for max_tokens 0: only the prompt runs (its log-probs for echo), so
    /// a prompt may fill the whole context.
    pub seq: Option<Sequence>,
    /// Send the prompt's log-probs with this many alternatives (echo with logprobs, vLLM's
    /// prompt_logprobs).
    pub prompt_logprobs: Option<usize>,
    /// Log-probs of generated tokens with this many alternatives (`None`: no log-probs).
    pub logprobs: Option<usize>,
    /// OpenAI's logit_bias, added to the logits before sampling.
    pub logit_bias: Arc<Vec<(u32, f32)>>,
}

/// A request: its choices, where its events go, and when it must end (`None`: a time limit too
/// far away for an [`Instant`] to hold).
pub struct Job {
    pub choices: Vec<Choice>,
    pub tx: UnboundedSender<Event>,
    pub deadline: Option<Instant>,
}

/// Texts to embed: run between generation steps, a batch of at most [`BATCH_POSITIONS`] tokens per
/// step, so running streams keep flowing.
pub struct EmbedJob {
    pub texts: Vec<Vec<u32>>,
    pub pooling: Pooling,
    pub tx: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

/// A beam search (vLLM's `use_beam_search`): run beside the batch engine on a thread of its own
/// (beam search moves caches between beams, so it has its own loop), one at a time.
pub struct BeamJob {
    pub prompt: Vec<u32>,
    pub cfg: GenerationConfig,
    pub tx: oneshot::Sender<Result<Vec<Generation>, String>>,
}

/// What the scheduler thread takes.
pub enum Work {
    Generate(Job),
    Embed(EmbedJob),
    Beam(BeamJob),
}

/// The thread that runs beam searches, one after another, on the shared model.
fn beam_worker(model: Arc<Model>, tok: Arc<Tokenizer>) -> std::sync::mpsc::Sender<BeamJob> {
    let (tx, rx) = std::sync::mpsc::channel::<BeamJob>();
    let spawned = std::thread::Builder::new()
        .name("gpt2-beams".into())
        .spawn(move || {
            for job in rx {
                if job.tx.is_closed() {
                    continue;
                }
                let r = beam_search(&model, &tok, &job.prompt, &job.cfg).map_err(|e| e.to_string());
                let _ = job.tx.send(r);
            }
        });
    if let Err(e) = spawned {
        // The receiver is gone with the closure: each job's sender reports the failure.
        eprintln!("gpt2 serve: cannot start the beam search thread: {e}");
    }
    tx
}

/// An embedding job part done.
struct Embedding {
    job: EmbedJob,
    done: Vec<Vec<f32>>,
}

impl Embedding {
    /// Embed the next batch of texts; the job when it is complete (or failed), to answer.
    fn step(mut self, model: &Model) -> Option<Self> {
        if self.job.tx.is_closed() {
            return None;
        }
        let texts = &self.job.texts[self.done.len()..];
        let (mut n, mut positions) = (1, texts[0].len());
        while n < texts.len() && positions + texts[n].len() <= BATCH_POSITIONS {
            positions += texts[n].len();
            n += 1;
        }
        match embed::embed(model, &texts[..n], self.job.pooling, true) {
            Ok(e) => self.done.extend(e),
            Err(e) => {
                let _ = self.job.tx.send(Err(e.to_string()));
                return None;
            }
        }
        if self.done.len() < self.job.texts.len() {
            return Some(self);
        }
        let _ = self.job.tx.send(Ok(self.done));
        None
    }
}

struct Shared {
    tx: UnboundedSender<Event>,
    deadline: Option<Instant>,
}

impl Shared {
    /// Whether the request should go on at `now`: its client waits, its time is not up, and the
    /// server is not ending every request (`stop`).
    fn live(&self, now: Instant, stop: bool) -> bool {
        !stop && !self.tx.is_closed() && self.deadline.is_none_or(|d| now < d)
    }
}

/// The engine's name for a choice: its request and its index there.
#[derive(Clone)]
pub(crate) struct Tag {
    job: Arc<Shared>,
    index: usize,
}

impl Choice {
    fn into_request(self, job: Arc<Shared>) -> Request<Tag> {
        Request {
            tag: Tag {
                job,
                index: self.index,
            },
            prompt_logprobs: self.prompt_logprobs,
            prompt: self.prompt,
            seq: self.seq,
            logprobs: self.logprobs,
            logit_bias: self.logit_bias,
        }
    }
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop => "stop",
    }
}

/// Run requests from `rx` on `model` until every sender is gone and nothing runs. Once `stop` is
/// set, every request ends at the next step as if its time had run out (finish_reason `length`).
/// Admission, planning, the forward pass, sampling and retirement are the batch engine's
/// ([`Engine::step`]); this loop takes requests in, ends those nobody waits for, and sends events.
pub fn run(
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    mut engine: Engine<Tag>,
    rx: Receiver<Work>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) {
    let mut embeddings: VecDeque<Embedding> = VecDeque::new();
    let mut closed = false;
    let take_job = |engine: &mut Engine<Tag>, job: Job| {
        let shared = Arc::new(Shared {
            tx: job.tx,
            deadline: job.deadline,
        });
        for ch in job.choices {
            let index = ch.index;
            if let Err(e) = engine.submit(ch.into_request(shared.clone())) {
                // Requests are checked against the context when made: a programming error.
                metrics.queued.fetch_sub(1, Ordering::Relaxed);
                let _ = shared
                    .tx
                    .send(Event::Error(format!("{e} (choice {index})")));
            }
        }
    };
    let mut beams: Option<std::sync::mpsc::Sender<BeamJob>> = None;
    let mut take =
        |engine: &mut Engine<Tag>, embeddings: &mut VecDeque<Embedding>, work: Work| match work {
            Work::Generate(job) => take_job(engine, job),
            Work::Beam(job) => {
                let worker = beams.get_or_insert_with(|| beam_worker(model.clone(), tok.clone()));
                if let Err(e) = worker.send(job) {
                    let _ =
                        e.0.tx
                            .send(Err("the beam search thread is not running".into()));
                }
            }
            Work::Embed(job) if job.texts.is_empty() => {
                let _ = job.tx.send(Ok(Vec::new()));
            }
            Work::Embed(job) => embeddings.push_back(Embedding {
                job,
                done: Vec::new(),
            }),
        };
    loop {
        // Take new requests: block when there is nothing to do.
        if engine.is_idle() && embeddings.is_empty() {
            if closed {
                return;
            }
            match rx.recv() {
                Ok(work) => take(&mut engine, &mut embeddings, work),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(work) => take(&mut engine, &mut embeddings, work),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        // Drop what nobody waits for any more, and what ran out of time.
        let now = Instant::now();
        let stopping = stop.load(Ordering::Relaxed);
        for (tag, was_running) in engine.retain(|t| t.job.live(now, stopping)) {
            if !was_running {
                metrics.queued.fetch_sub(1, Ordering::Relaxed);
            }
            let _ = tag.job.tx.send(Event::Done {
                index: tag.index,
                finish: "length",
            });
        }

        // One batch of the oldest embedding request per step, then the generation step.
        if let Some(e) = embeddings.pop_front() {
            if let Some(rest) = e.step(&model) {
                embeddings.push_front(rest);
            }
        }

        // Admission first, so that the metrics say what runs while the step does.
        let admitted = engine.admit();
        metrics.queued.fetch_sub(admitted as i64, Ordering::Relaxed);
        for tag in engine.newest(admitted) {
            let _ = tag.job.tx.send(Event::Admitted);
        }
        metrics
            .running
            .store(engine.running() as i64, Ordering::Relaxed);
        let updates = engine.step(&model, &tok);
        metrics
            .running
            .store(engine.running() as i64, Ordering::Relaxed);
        for u in updates {
            match u {
                Update::Prefilled {
                    tag,
                    prompt_tokens,
                    cached_tokens,
                    logprobs,
                } => {
                    metrics
                        .prompt_tokens
                        .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
                    metrics
                        .prefix_hit_tokens
                        .fetch_add(cached_tokens as u64, Ordering::Relaxed);
                    metrics
                        .prefix_miss_tokens
                        .fetch_add((prompt_tokens - cached_tokens) as u64, Ordering::Relaxed);
                    if cached_tokens > 0 {
                        let _ = tag.job.tx.send(Event::Cached {
                            index: tag.index,
                            tokens: cached_tokens,
                        });
                    }
                    if let Some(logprobs) = logprobs {
                        let _ = tag.job.tx.send(Event::Prompt {
                            index: tag.index,
                            logprobs,
                        });
                    }
                }
                Update::Token {
                    tag,
                    event,
                    logprob,
                } => {
                    metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
                    let _ = tag.job.tx.send(Event::Token {
                        index: tag.index,
                        text: event.text,
                        logprob,
                        finish: event.finished.map(finish_str),
                    });
                }
                // A prompt-only choice ends once its prompt has run; a generating one's last
                // token said why it ended.
                Update::Retired { tag, seq: None } => {
                    let _ = tag.job.tx.send(Event::Done {
                        index: tag.index,
                        finish: "length",
                    });
                }
                Update::Retired { seq: Some(_), .. } => {}
                Update::Failed {
                    tag,
                    error,
                    in_model,
                } => {
                    let what = if in_model {
                        "the model failed"
                    } else {
                        "sampling failed"
                    };
                    let _ = tag.job.tx.send(Event::Error(format!("{what}: {error}")));
                }
            }
        }
    }
}
