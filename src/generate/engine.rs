//! The one batch engine under every decoding loop: the CLI's batches and Python's streams
//! ([`super::Generator`]) and the server's continuous batching all drive it, and differ only in
//! how requests arrive and results leave.
//!
//! Each [`Engine::step`] does the same five things: **admission** (waiting requests into free slots
//! of the [`State`]), **planning** (a decode token for every sequence past its prompt, then chunks
//! of at most `prefill_chunk` prompt tokens in all, oldest first), **one forward pass**
//! ([`Model::forward_rows`], each sequence saying which rows it needs back: none for a prompt chunk
//! that only fills the cache, the last for a decode step or a finished prompt, all of them for a
//! prompt whose log-probs are wanted), **advancing** each sequence from its own rows (its own
//! settings and seeded RNG, [`Sequence::advance`]) and **retirement** (finished sequences leave and
//! their slots are emptied for the next step).
//!
//! The CPU forward pass gives each row of a ragged batch exactly its lone result, so a request's
//! tokens and log-probs do not depend on what runs beside it, nor on how its prompt was chunked.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::backend::{Model, State};
use crate::error::{Error, Result};
use crate::generate::prefix_cache::{common_prefix, Hit, PrefixCache};
use crate::generate::sequence::{Sequence, TokenEvent};
use crate::model::{Rows, SeqInput};
use crate::numerics::{log_softmax, logprob_of};
use crate::tokenizer::Tokenizer;

/// One token's log-probability (`None` for a text's first token, which has no prefix) and the
/// most likely alternatives under the raw logits, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
    /// 1 + the number of tokens whose logit is strictly larger, where the row's logits were at
    /// hand (alternatives asked for).
    pub rank: Option<u32>,
}

/// 1 + the number of logits strictly larger than `token`'s.
fn rank_of(row: &[f32], token: u32) -> u32 {
    let l = row[token as usize];
    1 + row.iter().filter(|&&x| x > l).count() as u32
}

/// A sequence to run, and what it needs back.
pub struct Request<T> {
    /// The caller's name for it, handed back with every [`Update`].
    pub tag: T,
    /// The prompt as it runs (never empty; the same ids as `seq`'s prompt).
    pub prompt: Vec<u32>,
    /// What generates; `None` runs the prompt only (for its log-probs), so a prompt may fill the
    /// whole context.
    pub seq: Option<Sequence>,
    /// The prompt's log-probs, with this many alternatives each (`None`: not wanted).
    pub prompt_logprobs: Option<usize>,
    /// Alternatives to each generated token's log-prob (`None`: no [`TokenLogprob`] per token).
    pub logprobs: Option<usize>,
    /// Added to the logits before sampling (OpenAI's `logit_bias`); log-probs stay the raw model's.
    pub logit_bias: Arc<Vec<(u32, f32)>>,
}

impl<T> Request<T> {
    /// A request that generates with `seq` and wants nothing but its tokens.
    pub fn generate(tag: T, seq: Sequence) -> Self {
        Request {
            tag,
            prompt: seq.prompt().to_vec(),
            seq: Some(seq),
            prompt_logprobs: None,
            logprobs: None,
            logit_bias: Arc::new(Vec::new()),
        }
    }
}

/// What a step produced for one request.
// Updates are moved once each; boxing the large variant would allocate per generated token.
#[allow(clippy::large_enum_variant)]
pub enum Update<T> {
    /// The whole prompt is in the cache: its length, and its log-probs if they were asked for
    /// (the first token's `None`).
    Prefilled {
        tag: T,
        prompt_tokens: usize,
        /// Of those, the tokens whose keys and values came from the prefix cache.
        cached_tokens: usize,
        logprobs: Option<Vec<TokenLogprob>>,
    },
    /// One generated token, with the text it made final; `event.finished` is set on the last.
    Token {
        tag: T,
        event: TokenEvent,
        logprob: Option<TokenLogprob>,
    },
    /// The request left the engine: after its last token (`seq` holds the finished sequence), or
    /// a prompt-only request after [`Update::Prefilled`] (`seq` is `None`).
    Retired { tag: T, seq: Option<Sequence> },
    /// The model (`in_model`) or the sampler failed for this request; it has left the engine.
    Failed {
        tag: T,
        error: Error,
        in_model: bool,
    },
}

/// What a planned sequence needs back from the forward pass (the engine's side of [`Rows`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    None,
    Last,
    All,
    Targets,
}

struct Running<T> {
    req: Request<T>,
    slot: usize,
    /// Prompt tokens in the cache.
    prompt_fed: usize,
    /// Of those, the ones the prefix cache gave.
    cached: usize,
    prompt_lp: Vec<TokenLogprob>,
}

impl<T> Running<T> {
    fn prefilling(&self) -> bool {
        self.prompt_fed < self.req.prompt.len()
    }
}

/// The batch engine: a [`State`] of slots, the requests waiting for one and those running. It
/// holds no model: each [`Engine::step`] is given the model its state was made by (and the
/// tokenizer), so that an engine can live in a Python object or a thread beside them.
pub struct Engine<T> {
    state: State,
    prefill_chunk: usize,
    free: Vec<usize>,
    waiting: VecDeque<Request<T>>,
    running: Vec<Running<T>>,
    /// Scratch: processed logits, log-softmax rows.
    work: Vec<f32>,
    /// Requests running at once at most (the other slots only keep cached prefixes).
    max_running: usize,
    cache: Option<PrefixCache>,
}

/// A waiting request whose prompt shares at least this many tokens with one still being
/// prefilled, more than any slot holds yet, waits for that prefill (a step or a few) to reuse it.
const WAIT_FOR_PREFIX: usize = 16;

impl<T: Clone> Engine<T> {
    /// An engine over `state`'s slots, running at most `prefill_chunk` prompt tokens per step
    /// (`usize::MAX`: whole prompts at once).
    pub fn new(state: State, prefill_chunk: usize) -> Self {
        Engine {
            free: (0..state.slots()).rev().collect(),
            state,
            prefill_chunk: prefill_chunk.max(1),
            waiting: VecDeque::new(),
            running: Vec::new(),
            work: Vec::new(),
            max_running: usize::MAX,
            cache: None,
        }
    }

    /// An engine with a prefix cache: at most `running` requests at once, the state's other
    /// slots (and idle ones) keeping what finished requests left, up to `cache_tokens` tokens in
    /// all. A new request starts from the longest prefix of its prompt that any slot holds
    /// (running or idle), with the prompt log-probs computed along it, and waits a step for a
    /// long shared prefix still being prefilled. Its tokens and log-probs are the same bits as
    /// without the cache (the CPU backend's rows do not depend on batching or chunking).
    pub fn with_prefix_cache(
        state: State,
        prefill_chunk: usize,
        running: usize,
        cache_tokens: usize,
    ) -> Self {
        let slots = state.slots();
        Engine {
            max_running: running.clamp(1, slots),
            cache: Some(PrefixCache::new(slots, cache_tokens)),
            ..Engine::new(state, prefill_chunk)
        }
    }

    /// Queue a request; it takes a slot at the next step with one free. A request that can never
    /// fit a slot is refused here.
    pub fn submit(&mut self, req: Request<T>) -> Result<()> {
        let need = req
            .seq
            .as_ref()
            .map_or(req.prompt.len(), Sequence::capacity);
        if req.prompt.is_empty() || need > self.state.capacity() {
            return Err(Error::Input(format!(
                "a request of {} prompt tokens needing {need} positions does not fit a slot of {}",
                req.prompt.len(),
                self.state.capacity()
            )));
        }
        self.waiting.push_back(req);
        Ok(())
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests holding a slot.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Keep only the requests whose tag `keep` accepts (a client gone, a time limit passed); the
    /// others leave at once, their slots emptied. Returns the tags that left and whether each was
    /// running.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) -> Vec<(T, bool)> {
        let mut gone = Vec::new();
        for req in std::mem::take(&mut self.waiting) {
            if keep(&req.tag) {
                self.waiting.push_back(req);
            } else {
                gone.push((req.tag, false));
            }
        }
        let mut i = 0;
        while i < self.running.len() {
            if keep(&self.running[i].req.tag) {
                i += 1;
            } else {
                let r = self.retire(i);
                gone.push((r.req.tag, true));
            }
        }
        gone
    }

    /// Take running request `i` out and empty its slot; the others keep their order (admission
    /// order, so that a batch's events come in its prompts' order).
    fn retire(&mut self, i: usize) -> Running<T> {
        let r = self.running.remove(i);
        self.free.push(r.slot);
        match &mut self.cache {
            Some(cache) => {
                // What it left stays for the requests that share it, within the budget.
                cache.touch(r.slot);
                for s in cache.over_budget(&self.free) {
                    cache.truncate(s, 0);
                    let _ = self.state.truncate(s, 0);
                }
            }
            // The slot exists: it came from this state.
            None => {
                let _ = self.state.truncate(r.slot, 0);
            }
        }
        r
    }

    /// Empty `slot`: a failed forward pass may have left it half written.
    fn forget(&mut self, slot: usize) {
        let _ = self.state.truncate(slot, 0);
        if let Some(cache) = &mut self.cache {
            cache.truncate(slot, 0);
        }
    }

    /// Admission: waiting requests into free slots, oldest first ([`Engine::step`] begins with it;
    /// a caller that reports what runs calls it first). Returns how many took a slot.
    pub fn admit(&mut self) -> usize {
        if self.cache.is_some() {
            return self.admit_cached();
        }
        let before = self.waiting.len();
        while !self.free.is_empty() && !self.waiting.is_empty() {
            let (Some(req), Some(slot)) = (self.waiting.pop_front(), self.free.pop()) else {
                break;
            };
            self.running.push(Running {
                req,
                slot,
                prompt_fed: 0,
                cached: 0,
                prompt_lp: Vec::new(),
            });
        }
        before - self.waiting.len()
    }

    /// Admission with the prefix cache: each waiting request, oldest first, into the slot that
    /// holds the longest prefix of its prompt (or a copy of it in a free slot), unless a prompt
    /// being prefilled shares much more with it (it then waits for that prefill).
    fn admit_cached(&mut self) -> usize {
        let mut admitted = 0;
        let mut i = 0;
        while i < self.waiting.len()
            && !self.free.is_empty()
            && self.running.len() < self.max_running
        {
            let Some(cache) = &self.cache else { break };
            let req = &self.waiting[i];
            let free = &self.free;
            let hit = cache.best(&req.prompt, req.prompt_logprobs, |s| free.contains(&s));
            let have = hit.map_or(0, |h| h.len);
            // Only a prefill that will hold what this request needs: its prompt log-probs, with
            // as many alternatives, where it wants them.
            let coming = self
                .running
                .iter()
                .filter(|r| {
                    r.prefilling()
                        && req
                            .prompt_logprobs
                            .is_none_or(|k| r.req.prompt_logprobs.is_some_and(|k2| k2 >= k))
                })
                .map(|r| common_prefix(&r.req.prompt, &req.prompt))
                .max()
                .unwrap_or(0)
                .min(req.prompt.len() - 1);
            if coming >= WAIT_FOR_PREFIX && coming > have {
                i += 1;
                continue;
            }
            let Some(req) = self.waiting.remove(i) else {
                break;
            };
            let Some((slot, len)) = self.place(hit) else {
                // Unreachable: a slot is free.
                self.waiting.insert(i, req);
                break;
            };
            self.start(req, slot, len);
            admitted += 1;
        }
        admitted
    }

    /// A free slot for a request that reuses `hit`, holding that prefix, and its length: the hit's
    /// own slot when it is free and nothing past the prefix would be lost there (or no other slot
    /// is free), else a copy in an empty or the least recently used free slot.
    fn place(&mut self, hit: Option<Hit>) -> Option<(usize, usize)> {
        let cache = self.cache.as_mut()?;
        let in_place = hit.and_then(|h| {
            let pos = self.free.iter().position(|&s| s == h.slot)?;
            let others_empty = self
                .free
                .iter()
                .any(|&s| s != h.slot && cache.tokens(s) == 0);
            (cache.tokens(h.slot) == h.len || !others_empty).then_some(pos)
        });
        let (slot, len) = match (hit, in_place) {
            (Some(h), Some(pos)) => (self.free.swap_remove(pos), h.len),
            (hit, _) => {
                let slot = cache.victim(&self.free, hit.map(|h| h.slot))?;
                self.free.retain(|&s| s != slot);
                match hit {
                    Some(h) => {
                        if self.state.copy_slot(h.slot, slot).is_err() {
                            (slot, 0)
                        } else {
                            cache.copy(h.slot, slot, h.len);
                            (slot, h.len)
                        }
                    }
                    None => (slot, 0),
                }
            }
        };
        let _ = self.state.truncate(slot, len);
        cache.truncate(slot, len);
        cache.touch(slot);
        Some((slot, len))
    }

    /// `req` runs in `slot`, whose first `len` positions hold its prompt's first tokens.
    fn start(&mut self, mut req: Request<T>, slot: usize, len: usize) {
        let mut prompt_lp = Vec::new();
        if let (Some(k), true) = (req.prompt_logprobs, len > 0) {
            prompt_lp.push(TokenLogprob {
                token: req.prompt[0],
                logprob: None,
                top: Vec::new(),
                rank: None,
            });
            if let Some(cache) = &self.cache {
                prompt_lp.extend(cache.logprobs(slot, len, k));
            }
        }
        if let Some(seq) = &mut req.seq {
            seq.feed(len);
        }
        self.running.push(Running {
            req,
            slot,
            prompt_fed: len,
            cached: len,
            prompt_lp,
        });
    }

    /// The tags of the `n` requests admitted last (after [`Engine::admit`] returned `n`: those it
    /// admitted).
    pub fn newest(&self, n: usize) -> impl Iterator<Item = &T> {
        let from = self.running.len().saturating_sub(n);
        self.running[from..].iter().map(|r| &r.req.tag)
    }

    /// Planning: `(running index, new tokens, what comes back)`: every decode, then prompt chunks
    /// within the budget, oldest first. A prompt chunk whose log-probs are asked for wants their
    /// targets' log-probs (all its rows when it also needs alternatives, or the last row to choose
    /// the first token), else only the last row of its final chunk (to choose the first token).
    fn plan(&self) -> Vec<(usize, usize, Want)> {
        let mut plan = Vec::with_capacity(self.running.len());
        for (i, r) in self.running.iter().enumerate() {
            if let (false, Some(seq)) = (r.prefilling(), &r.req.seq) {
                plan.push((i, seq.pending().len(), Want::Last));
            }
        }
        let mut budget = self.prefill_chunk;
        for (i, r) in self.running.iter().enumerate() {
            let left = r.req.prompt.len() - r.prompt_fed;
            if left > 0 && budget > 0 {
                let n = left.min(budget);
                budget -= n;
                let last = n == left && r.req.seq.is_some();
                let want = match r.req.prompt_logprobs {
                    Some(0) if !last => Want::Targets,
                    Some(_) => Want::All,
                    None if last => Want::Last,
                    None => Want::None,
                };
                plan.push((i, n, want));
            }
        }
        plan
    }

    /// One step on `model` (the one the state was made for): admit, plan, run one forward pass,
    /// advance every planned sequence, retire the finished. Nothing to run is an empty step. A
    /// failure of the model ends the planned requests ([`Update::Failed`]), not the engine.
    pub fn step(&mut self, model: &Model, tok: &Tokenizer) -> Vec<Update<T>> {
        self.admit();
        let plan = self.plan();
        if plan.is_empty() {
            return Vec::new();
        }
        let inputs: Vec<SeqInput> = plan
            .iter()
            .map(|&(i, n, _)| {
                let r = &self.running[i];
                let tokens = match &r.req.seq {
                    Some(seq) if !r.prefilling() => &seq.pending()[..n],
                    _ => &r.req.prompt[r.prompt_fed..r.prompt_fed + n],
                };
                SeqInput {
                    slot: r.slot,
                    tokens,
                }
            })
            .collect();
        // Each prompt chunk's targets: row j predicts prompt[fed + j + 1].
        let targets: Vec<Vec<Option<u32>>> = plan
            .iter()
            .map(|&(i, n, want)| {
                let r = &self.running[i];
                match want {
                    Want::Targets => (1..=n)
                        .map(|j| r.req.prompt.get(r.prompt_fed + j).copied())
                        .collect(),
                    _ => Vec::new(),
                }
            })
            .collect();
        let rows: Vec<Rows> = plan
            .iter()
            .zip(&targets)
            .map(|(&(_, _, want), t)| match want {
                Want::None => Rows::None,
                Want::Last => Rows::Last,
                Want::All => Rows::All,
                Want::Targets => Rows::Targets(t),
            })
            .collect();
        let mut updates = Vec::new();
        let (logits, target_lp) = match model.forward_rows(&mut self.state, &inputs, &rows) {
            Ok(l) => l,
            Err(e) => {
                // Nothing a request brings can cause this (requests are checked when made): end
                // the requests of this batch rather than the engine.
                // The first gets the error itself, the others its message.
                let mut failed: Vec<usize> = plan.iter().map(|p| p.0).collect();
                failed.sort_unstable();
                let msg = e.to_string();
                let mut first = Some(e);
                for i in failed.into_iter().rev() {
                    let r = self.retire(i);
                    self.forget(r.slot);
                    updates.push(Update::Failed {
                        tag: r.req.tag,
                        error: first.take().unwrap_or_else(|| Error::Input(msg.clone())),
                        in_model: true,
                    });
                }
                return updates;
            }
        };

        let vocab = model.config().vocab_size;
        let (mut row0, mut lp0) = (0, 0);
        let mut done: Vec<(usize, Option<Error>)> = Vec::new();
        for (&(i, n, want), &rows) in plan.iter().zip(&rows) {
            let k = rows.count(n);
            let block = &logits[row0 * vocab..(row0 + k) * vocab];
            row0 += k;
            let r = &mut self.running[i];
            if let Some(cache) = &mut self.cache {
                let ran = match &r.req.seq {
                    Some(seq) if !r.prefilling() => &seq.pending()[..n],
                    _ => &r.req.prompt[r.prompt_fed..r.prompt_fed + n],
                };
                cache.extend(r.slot, ran);
            }
            if r.prefilling() {
                if let Some(top) = r.req.prompt_logprobs {
                    let prompt = &r.req.prompt;
                    if r.prompt_fed == 0 {
                        r.prompt_lp.push(TokenLogprob {
                            token: prompt[0],
                            logprob: None,
                            top: Vec::new(),
                            rank: None,
                        });
                    }
                    if want == Want::Targets {
                        let end = (r.prompt_fed + n + 1).min(prompt.len());
                        for (p, &token) in
                            prompt.iter().enumerate().take(end).skip(r.prompt_fed + 1)
                        {
                            let lp = TokenLogprob {
                                token,
                                logprob: Some(target_lp[lp0] as f32),
                                top: Vec::new(),
                                rank: None,
                            };
                            if let Some(cache) = &mut self.cache {
                                cache.set_logprob(r.slot, p, &lp, 0);
                            }
                            r.prompt_lp.push(lp);
                            lp0 += 1;
                        }
                    }
                    // Row j saw prompt[..=fed + j] and predicts prompt[fed + j + 1].
                    for (j, row) in block.chunks_exact(vocab).enumerate() {
                        let target = r.prompt_fed + j + 1;
                        if target < prompt.len() {
                            let lp = TokenLogprob {
                                token: prompt[target],
                                logprob: Some(logprob_of(row, prompt[target]) as f32),
                                top: top_logprobs(row, top, &mut self.work),
                                rank: Some(rank_of(row, prompt[target])),
                            };
                            if let Some(cache) = &mut self.cache {
                                cache.set_logprob(r.slot, target, &lp, top);
                            }
                            r.prompt_lp.push(lp);
                        }
                    }
                }
                r.prompt_fed += n;
                if r.prefilling() {
                    if let Some(seq) = &mut r.req.seq {
                        seq.feed(n);
                    }
                    continue;
                }
                updates.push(Update::Prefilled {
                    tag: r.req.tag.clone(),
                    prompt_tokens: r.req.prompt.len(),
                    cached_tokens: r.cached,
                    logprobs: r
                        .req
                        .prompt_logprobs
                        .map(|_| std::mem::take(&mut r.prompt_lp)),
                });
                if r.req.seq.is_none() {
                    done.push((i, None));
                    continue;
                }
            }
            let Some(seq) = &mut r.req.seq else {
                // Unreachable: a prompt-only request is done once its prompt has run.
                done.push((i, None));
                continue;
            };
            let row = &block[(k - 1) * vocab..];
            match seq.advance(tok, row, &r.req.logit_bias, &mut self.work) {
                Ok(event) => {
                    let logprob = r.req.logprobs.map(|k| TokenLogprob {
                        token: event.token,
                        logprob: Some(event.logprob),
                        top: top_logprobs(row, k, &mut self.work),
                        rank: Some(rank_of(row, event.token)),
                    });
                    let finished = event.finished.is_some();
                    updates.push(Update::Token {
                        tag: r.req.tag.clone(),
                        event,
                        logprob,
                    });
                    if finished {
                        done.push((i, None));
                    }
                }
                Err(e) => done.push((i, Some(e))),
            }
        }
        // Retirement, from the highest index down, so that the lower ones stay where they are.
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        for (i, err) in done {
            let r = self.retire(i);
            updates.push(match err {
                None => Update::Retired {
                    tag: r.req.tag,
                    seq: r.req.seq,
                },
                Some(error) => Update::Failed {
                    tag: r.req.tag,
                    error,
                    in_model: false,
                },
            });
        }
        updates
    }
}

/// The `k` most likely tokens under raw logits, best first (ties by lower id).
fn top_logprobs(logits: &[f32], k: usize, work: &mut Vec<f32>) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    work.resize(logits.len(), 0.0);
    log_softmax(logits, work);
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
