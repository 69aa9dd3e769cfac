//! Continuous batching: one thread owns the [`Model`] and a [`State`] of `parallel` slots. Each step
//! it takes new requests into free slots, then runs ONE forward pass over every running sequence:
//! a decode token for each sequence past its prompt, and chunks of at most [`PREFILL_CHUNK`] prompt
//! tokens in all for sequences still being prefilled, so running streams never wait behind a long
//! prompt. A sequence leaves when it finishes, its client goes away or its time runs out; its slot
//! is emptied and reused at the next step.
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

use crate::backend::{Model, State};
use crate::generate::{FinishReason, Sequence};
use crate::model::{Logits, SeqInput};
use crate::tokenizer::Tokenizer;

use super::metrics::Metrics;

/// Prompt tokens run per step at most (the default), across all sequences being prefilled: a
/// 256-token chunk costs about what a few decode steps do, so streams keep flowing.
pub const PREFILL_CHUNK: usize = 256;

/// One token's log-probability (`None` for a text's first token) and the most likely alternatives.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

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
        token: u32,
        text: String,
        logprob: Option<TokenLogprob>,
        finish: Option<&'static str>,
    },
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
    /// Send the prompt's log-probs (echo with logprobs).
    pub prompt_logprobs: bool,
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

struct Running {
    job: Arc<Shared>,
    ch: Choice,
    slot: usize,
    /// Prompt tokens in the cache.
    prompt_fed: usize,
    prompt_lp: Vec<TokenLogprob>,
}

/// The `k` most likely tokens under raw logits, best first (ties by lower id).
fn top_logprobs(logits: &[f32], k: usize, work: &mut Vec<f32>) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    work.resize(logits.len(), 0.0);
    crate::eval::log_softmax(logits, work);
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(order.len());
    let lp = &*work;
    let cmp = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
    if k < order.len() {
        order.select_nth_unstable_by(k, cmp);
        order.truncate(k);
    }
    order.sort_by(cmp);
    order.into_iter().map(|i| (i, lp[i as usize])).collect()
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop => "stop",
    }
}

/// Run requests from `rx` on `model` until every sender is gone and nothing runs. Once `stop` is
/// set, every request ends at the next step as if its time had run out (finish_reason `length`).
pub fn run(
    model: Model,
    tok: Arc<Tokenizer>,
    mut state: State,
    rx: Receiver<Job>,
    metrics: Arc<Metrics>,
    prefill_chunk: usize,
    stop: Arc<AtomicBool>,
) {
    let slots = state.slots();
    let vocab = model.config().vocab_size;
    let mut free: Vec<usize> = (0..slots).rev().collect();
    let mut waiting: VecDeque<(Arc<Shared>, Choice)> = VecDeque::new();
    let mut running: Vec<Running> = Vec::new();
    let mut work = Vec::new();
    let mut biased = Vec::new();
    let mut closed = false;
    loop {
        // Take new requests: block when there is nothing to do.
        if running.is_empty() && waiting.is_empty() {
            if closed {
                return;
            }
            match rx.recv() {
                Ok(job) => enqueue(&mut waiting, job),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(job) => enqueue(&mut waiting, job),
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
        waiting.retain(|(job, ch)| {
            let keep = job.live(now, stopping);
            if !keep {
                metrics.queued.fetch_sub(1, Ordering::Relaxed);
                let _ = job.tx.send(Event::Done {
                    index: ch.index,
                    finish: "length",
                });
            }
            keep
        });
        running.retain(|r| {
            let keep = r.job.live(now, stopping);
            if !keep {
                let _ = state.truncate(r.slot, 0);
                free.push(r.slot);
                let _ = r.job.tx.send(Event::Done {
                    index: r.ch.index,
                    finish: "length",
                });
            }
            keep
        });
        while let (Some(_), Some(_)) = (free.last(), waiting.front()) {
            let (job, ch) = waiting.pop_front().expect("checked");
            let slot = free.pop().expect("checked");
            metrics.queued.fetch_sub(1, Ordering::Relaxed);
            running.push(Running {
                job,
                ch,
                slot,
                prompt_fed: 0,
                prompt_lp: Vec::new(),
            });
        }
        metrics
            .running
            .store(running.len() as i64, Ordering::Relaxed);
        if running.is_empty() {
            continue;
        }

        // One batch: every decode, then prompt chunks within the budget (oldest first).
        let mut plan: Vec<(usize, usize)> = Vec::with_capacity(running.len());
        let mut budget = prefill_chunk.max(1);
        for (i, r) in running.iter().enumerate() {
            let prefilling = r.prompt_fed < r.ch.prompt.len();
            if let (false, Some(seq)) = (prefilling, &r.ch.seq) {
                plan.push((i, seq.pending().len()));
            }
        }
        for (i, r) in running.iter().enumerate() {
            let left = r.ch.prompt.len() - r.prompt_fed;
            if left > 0 && budget > 0 {
                let n = left.min(budget);
                budget -= n;
                plan.push((i, n));
            }
        }
        let all = plan.iter().any(|&(i, n)| {
            let r = &running[i];
            r.ch.prompt_logprobs && n > 0 && r.prompt_fed < r.ch.prompt.len()
        });
        let inputs: Vec<SeqInput> = plan
            .iter()
            .map(|&(i, n)| {
                let r = &running[i];
                let tokens = match &r.ch.seq {
                    Some(seq) if r.prompt_fed >= r.ch.prompt.len() => &seq.pending()[..n],
                    _ => &r.ch.prompt[r.prompt_fed..r.prompt_fed + n],
                };
                SeqInput {
                    slot: r.slot,
                    tokens,
                }
            })
            .collect();
        let which = if all { Logits::All } else { Logits::Last };
        let logits = match model.forward(&mut state, &inputs, which) {
            Ok(l) => l,
            Err(e) => {
                // Nothing a request sends can cause this (batches are checked when requests are
                // made); end the requests of this batch rather than the server.
                for &(i, _) in &plan {
                    let r = &running[i];
                    let _ = r
                        .job
                        .tx
                        .send(Event::Error(format!("the model failed: {e}")));
                }
                let mut failed: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
                failed.sort_unstable();
                for i in failed.into_iter().rev() {
                    let r = running.swap_remove(i);
                    let _ = state.truncate(r.slot, 0);
                    free.push(r.slot);
                }
                continue;
            }
        };

        let mut row0 = 0;
        let mut done = Vec::new();
        for &(i, n) in &plan {
            let rows = if all { n } else { 1 };
            let block = &logits[row0 * vocab..(row0 + rows) * vocab];
            row0 += rows;
            let r = &mut running[i];
            let prompt_len = r.ch.prompt.len();
            let prefilling = r.prompt_fed < prompt_len;
            if prefilling {
                if r.ch.prompt_logprobs {
                    let prompt = &r.ch.prompt;
                    if r.prompt_fed == 0 {
                        r.prompt_lp.push(TokenLogprob {
                            token: prompt[0],
                            logprob: None,
                            top: Vec::new(),
                        });
                    }
                    // Row j saw prompt[..=fed + j] and predicts prompt[fed + j + 1].
                    for (j, row) in block.chunks_exact(vocab).enumerate() {
                        let target = r.prompt_fed + j + 1;
                        if target < prompt_len {
                            r.prompt_lp.push(TokenLogprob {
                                token: prompt[target],
                                logprob: Some(crate::eval::logprob_of(row, prompt[target]) as f32),
                                top: top_logprobs(row, r.ch.logprobs.unwrap_or(0), &mut work),
                            });
                        }
                    }
                }
                r.prompt_fed += n;
                if r.prompt_fed < prompt_len {
                    if let Some(seq) = &mut r.ch.seq {
                        seq.feed(n);
                    }
                    continue;
                }
                metrics
                    .prompt_tokens
                    .fetch_add(prompt_len as u64, Ordering::Relaxed);
                if r.ch.prompt_logprobs {
                    let _ = r.job.tx.send(Event::Prompt {
                        index: r.ch.index,
                        logprobs: std::mem::take(&mut r.prompt_lp),
                    });
                }
                if r.ch.seq.is_none() {
                    let _ = r.job.tx.send(Event::Done {
                        index: r.ch.index,
                        finish: "length",
                    });
                    done.push(i);
                    continue;
                }
            }
            let Some(seq) = &mut r.ch.seq else {
                // Unreachable: a choice without a sequence is done once its prompt has run.
                done.push(i);
                continue;
            };
            let row = &block[(rows - 1) * vocab..];
            let input = if r.ch.logit_bias.is_empty() {
                row
            } else {
                biased.clear();
                biased.extend_from_slice(row);
                for &(t, b) in r.ch.logit_bias.iter() {
                    biased[t as usize] += b;
                }
                &biased[..]
            };
            let ev = match seq.advance(&tok, input, &mut work) {
                Ok(ev) => ev,
                Err(e) => {
                    let _ = r.job.tx.send(Event::Error(format!("sampling failed: {e}")));
                    done.push(i);
                    continue;
                }
            };
            metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
            let logprob = r.ch.logprobs.map(|k| TokenLogprob {
                token: ev.token,
                logprob: Some(ev.logprob),
                top: top_logprobs(row, k, &mut work),
            });
            let finish = ev.finished.map(finish_str);
            let _ = r.job.tx.send(Event::Token {
                index: r.ch.index,
                token: ev.token,
                text: ev.text,
                logprob,
                finish,
            });
            if finish.is_some() {
                done.push(i);
            }
        }
        done.sort_unstable();
        for i in done.into_iter().rev() {
            let r = running.swap_remove(i);
            let _ = state.truncate(r.slot, 0);
            free.push(r.slot);
        }
        metrics
            .running
            .store(running.len() as i64, Ordering::Relaxed);
    }
}

fn enqueue(waiting: &mut VecDeque<(Arc<Shared>, Choice)>, job: Job) {
    let shared = Arc::new(Shared {
        tx: job.tx,
        deadline: job.deadline,
    });
    for ch in job.choices {
        waiting.push_back((shared.clone(), ch));
    }
}
