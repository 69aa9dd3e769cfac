//! Evaluation over the same forward pass the generator uses: the next-token distribution, each
//! token's log-probability given its prefix, and strided perplexity (transformers' perplexity guide,
//! with the exact count of scored tokens).

use crate::backend::Model;
use crate::error::{Error, Result};
use crate::model::{Logits, SeqInput};
#[doc(hidden)]
pub use crate::numerics::log_softmax;

fn check_ids(model: &Model, ids: &[u32], what: &str) -> Result<()> {
    let v = model.config().vocab_size;
    match ids.iter().position(|&t| t as usize >= v) {
        Some(i) => Err(Error::Input(format!(
            "{what}: token {i} has id {}, beyond the vocabulary of {v}",
            ids[i]
        ))),
        None => Ok(()),
    }
}

/// Refuse logits with a NaN in them: the model's arithmetic broke down (huge weights), and any
/// answer drawn from them would be silently wrong. `step` names the position for the message.
pub(crate) fn check_finite(logits: &[f32], step: usize) -> Result<()> {
    match logits.iter().position(|l| l.is_nan()) {
        Some(i) => Err(Error::Input(format!(
            "the model's logits at step {step} are NaN (first at token {i}): its arithmetic overflowed; are the weights sane?"
        ))),
        None => Ok(()),
    }
}

/// The next-token log-probabilities `(vocab_size)` after `ids` (which must fit the context).
pub(crate) fn next_token_logprobs(model: &Model, ids: &[u32]) -> Result<Vec<f32>> {
    if ids.is_empty() {
        return Err(Error::Input("the prompt has no tokens".into()));
    }
    let mut state = model.new_state(1, ids.len())?;
    let logits = model.forward(
        &mut state,
        &[SeqInput {
            slot: 0,
            tokens: ids,
        }],
        Logits::Last,
    )?;
    check_finite(logits, ids.len())?;
    let mut out = vec![0.0; logits.len()];
    log_softmax(logits, &mut out);
    Ok(out)
}

/// The `k` most likely next tokens after `ids`, best first: `(id, logprob)`; ties by lower id.
pub fn top_k(model: &Model, ids: &[u32], k: usize) -> Result<Vec<(u32, f32)>> {
    let lp = next_token_logprobs(model, ids)?;
    let mut order: Vec<u32> = (0..lp.len() as u32).collect();
    let k = k.min(order.len());
    let cmp = |a: &u32, b: &u32| lp[*b as usize].total_cmp(&lp[*a as usize]).then(a.cmp(b));
    if k < order.len() {
        order.select_nth_unstable_by(k, cmp);
        order.truncate(k);
    }
    order.sort_by(cmp);
    Ok(order.into_iter().map(|i| (i, lp[i as usize])).collect())
}

/// The log-probability of each token after the first given all tokens before it (`ids.len() - 1`
/// values). The text must fit the context; [`perplexity`] handles longer ones.
pub fn score(model: &Model, ids: &[u32]) -> Result<Vec<f32>> {
    if let Some(e) = unscorable(model, ids, &"the text") {
        return Err(e);
    }
    let mut state = model.new_state(1, ids.len())?;
    let mut out = score_group(model, &mut state, &[ids])?;
    Ok(out.pop().unwrap_or_default())
}

/// Slots × positions of one [`score_batch`] forward pass: texts are scored several at a time
/// (short texts use the matrix kernels poorly alone), as many as fit this bound on the KV cache and
/// work buffers (75 MB of cache for gpt2 in f32); a longer text goes alone.
const BATCH_POSITIONS: usize = 1024;

/// [`score`] of each text (each `ids.len() - 1` values), several texts per forward pass; each
/// text's values are the very bits [`score`] gives it alone. Every text is checked before any work.
pub fn score_batch(model: &Model, texts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    score_groups(model, texts, score_group)
}

/// Per-token diagnostics of a text ([`score_diagnostics`]), aligned: entry `i` of each is about
/// token `i + 1` given the tokens before it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Diagnostics {
    /// Each token's log-probability: [`score`]'s values, bit for bit.
    pub logprobs: Vec<f32>,
    /// Each token's rank in the vocabulary: 1 + how many tokens have a strictly larger logit
    /// (1 is the greedy choice; tied logits share the better rank).
    pub ranks: Vec<u32>,
    /// The entropy of each next-token distribution (softmax over the whole vocabulary), in nats.
    pub entropies: Vec<f32>,
}

/// [`score_batch`] with, besides each token's log-probability (the same bits), its rank and the
/// entropy of the distribution it was drawn from. On the CPU these are reduced inside the
/// unembedding as the log-probabilities are (no row of logits is stored), for the cost of one
/// more 32-logit panel per token.
pub fn score_diagnostics(model: &Model, texts: &[Vec<u32>]) -> Result<Vec<Diagnostics>> {
    score_groups(model, texts, diagnose_group)
}

/// `run` over the texts several per forward pass (each group from empty slots of one state), once
/// every text is checked.
fn score_groups<R>(
    model: &Model,
    texts: &[Vec<u32>],
    run: impl Fn(&Model, &mut crate::backend::State, &[Vec<u32>]) -> Result<Vec<R>>,
) -> Result<Vec<R>> {
    for (i, ids) in texts.iter().enumerate() {
        if let Some(e) = unscorable(model, ids, &format_args!("text {i}")) {
            return Err(e);
        }
    }
    let mut out = Vec::with_capacity(texts.len());
    // One state while the groups fit it: a new one would fault in and zero its cache again.
    let mut state: Option<crate::backend::State> = None;
    let mut i = 0;
    while i < texts.len() {
        let (mut j, mut longest) = (i, 0);
        while j < texts.len() {
            let l = longest.max(texts[j].len());
            if j > i && (j - i + 1) * l > BATCH_POSITIONS {
                break;
            }
            longest = l;
            j += 1;
        }
        let group = &texts[i..j];
        let state = match state.as_mut() {
            Some(st) if st.slots() >= group.len() && st.capacity() >= longest => {
                st.clear();
                st
            }
            _ => state.insert(model.new_state(group.len(), longest)?),
        };
        out.extend(run(model, state, group)?);
        i = j;
    }
    Ok(out)
}

/// Why `ids` cannot be scored, if it cannot; `text` names it in the message.
fn unscorable(model: &Model, ids: &[u32], text: &dyn std::fmt::Display) -> Option<Error> {
    let (v, n_pos) = (model.config().vocab_size, model.config().n_positions);
    let msg = if ids.len() < 2 {
        format!(
            "{text}: scoring needs at least 2 tokens (the first is only context); got {}",
            ids.len()
        )
    } else if ids.len() > n_pos {
        format!(
            "{text} has {} tokens, more than the context of {n_pos}; use perplexity (strided windows) for long texts",
            ids.len()
        )
    } else if let Some(p) = ids.iter().position(|&t| t as usize >= v) {
        format!(
            "{text}: token {p} has id {}, outside the vocabulary of {v} ids",
            ids[p]
        )
    } else {
        return None;
    };
    Some(Error::Input(msg))
}

/// Checked texts that fit a state together as one batch from its empty slots, and each row's
/// target: text k's row r predicts its token r + 1; its last row predicts past the text.
fn group_batch(group: &[impl AsRef<[u32]>]) -> (Vec<SeqInput<'_>>, Vec<Option<u32>>) {
    let inputs = group
        .iter()
        .enumerate()
        .map(|(slot, ids)| SeqInput {
            slot,
            tokens: ids.as_ref(),
        })
        .collect();
    let targets = group
        .iter()
        .flat_map(|ids| ids.as_ref()[1..].iter().map(|&t| Some(t)).chain([None]))
        .collect();
    (inputs, targets)
}

/// The scores of checked texts that fit `state` together, in one forward pass from empty slots.
fn score_group(
    model: &Model,
    state: &mut crate::backend::State,
    group: &[impl AsRef<[u32]>],
) -> Result<Vec<Vec<f32>>> {
    let (inputs, targets) = group_batch(group);
    let lp = finite(model.forward_logprobs(state, &inputs, &targets)?)?;
    let mut at = 0;
    Ok(group
        .iter()
        .map(|ids| {
            let n = ids.as_ref().len() - 1;
            at += n;
            lp[at - n..at].iter().map(|&l| l as f32).collect()
        })
        .collect())
}

/// [`score_group`] with ranks and entropies.
fn diagnose_group(
    model: &Model,
    state: &mut crate::backend::State,
    group: &[impl AsRef<[u32]>],
) -> Result<Vec<Diagnostics>> {
    let (inputs, targets) = group_batch(group);
    let stats = model.forward_diagnostics(state, &inputs, &targets)?;
    finite(stats.iter().map(|s| s.logprob).collect())?;
    let mut rows = stats.into_iter();
    Ok(group
        .iter()
        .map(|ids| {
            let n = ids.as_ref().len() - 1;
            let mut d = Diagnostics {
                logprobs: Vec::with_capacity(n),
                ranks: Vec::with_capacity(n),
                entropies: Vec::with_capacity(n),
            };
            for s in rows.by_ref().take(n) {
                d.logprobs.push(s.logprob as f32);
                d.ranks.push(s.rank);
                d.entropies.push(s.entropy as f32);
            }
            d
        })
        .collect())
}

/// Log-probabilities as computed, or an error if one is NaN: the model's arithmetic broke down
/// (huge weights), and a score drawn from it would be silently wrong.
pub(crate) fn finite(lp: Vec<f64>) -> Result<Vec<f64>> {
    match lp.iter().position(|l| l.is_nan()) {
        Some(i) => Err(Error::Input(format!(
            "the model's log-probability of target {i} is NaN: its arithmetic overflowed; are the weights sane?"
        ))),
        None => Ok(lp),
    }
}

/// What [`perplexity`] reports.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Perplexity {
    /// exp(nll / scored).
    pub perplexity: f64,
    /// Total negative log-likelihood of the scored tokens, in nats.
    pub nll: f64,
    /// Tokens in the text.
    pub tokens: usize,
    /// Tokens scored: all but the first token of the text and, when stride = context, the first token
    /// of each window (which has no prefix inside its window).
    pub scored: usize,
}

/// One window of the strided evaluation: the tokens `[begin, end)` are run; the last `targets` of
/// them are scored, each given the window's tokens before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub begin: usize,
    pub end: usize,
    pub targets: usize,
}

/// The windows of transformers' strided perplexity: `context` tokens advanced by `stride`, each
/// scoring the tokens no earlier window reached that have a prefix inside it. The first token of the
/// text is never scored, nor (when stride = context) the first token of any window.
pub(crate) fn windows(len: usize, context: usize, stride: usize) -> Vec<Window> {
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < len {
        let end = (begin + context).min(len);
        let targets = end - prev_end.max(begin + 1);
        if targets > 0 {
            out.push(Window {
                begin,
                end,
                targets,
            });
        }
        prev_end = end;
        if end == len {
            break;
        }
        begin += stride;
    }
    out
}

/// Strided perplexity of `ids` with windows of `context` tokens advanced by `stride`. Windows are
/// independent, so they run `batch` at a time. `progress(scored, total)` is called as tokens are scored.
pub fn perplexity(
    model: &Model,
    ids: &[u32],
    context: usize,
    stride: usize,
    batch: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    let n_pos = model.config().n_positions;
    if context < 2 || context > n_pos {
        return Err(Error::Input(format!(
            "context {context} must be between 2 and the model's {n_pos} positions"
        )));
    }
    if stride == 0 || stride > context {
        return Err(Error::Input(format!(
            "stride {stride} must be between 1 and the context ({context})"
        )));
    }
    if ids.len() < 2 {
        return Err(Error::Input(format!(
            "perplexity needs a text of at least 2 tokens (the first is only context); got {}",
            ids.len()
        )));
    }
    check_ids(model, ids, "perplexity")?;
    let wins = windows(ids.len(), context, stride);
    let total = wins.iter().map(|w| w.targets).sum();
    let batch = batch.max(1);
    let mut state = model.new_state(batch.min(wins.len()), context)?;
    let (mut nll, mut scored) = (0f64, 0usize);
    progress(0, total);
    for group in wins.chunks(batch) {
        state.clear();
        let inputs: Vec<SeqInput> = group
            .iter()
            .enumerate()
            .map(|(slot, w)| SeqInput {
                slot,
                tokens: &ids[w.begin..w.end],
            })
            .collect();
        // Row j of a window predicts its token j + 1; the window scores its last `targets`
        // tokens, so its rows `len - targets - 1 .. len - 1`, and the other rows are not unembedded.
        let mut targets = Vec::new();
        for w in group {
            let len = w.end - w.begin;
            targets.extend((0..len).map(|j| {
                let scored = j + 1 >= len - w.targets && j + 1 < len;
                scored.then(|| ids[w.begin + j + 1])
            }));
        }
        let lp = finite(model.forward_logprobs(&mut state, &inputs, &targets)?)?;
        nll -= lp.iter().sum::<f64>();
        for w in group {
            scored += w.targets;
            progress(scored, total);
        }
    }
    Ok(Perplexity {
        perplexity: (nll / scored as f64).exp(),
        nll,
        tokens: ids.len(),
        scored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_score_every_token_but_the_first_once() {
        for len in 2..60 {
            for context in 2..20 {
                for stride in 1..=context {
                    let w = windows(len, context, stride);
                    assert!(w
                        .iter()
                        .all(|w| w.end - w.begin <= context && w.targets < w.end - w.begin));
                    // Scored ranges follow each other; a token is skipped only where a window starts
                    // right at the previous window's end (it has no prefix in its window).
                    let mut next = 1;
                    for x in &w {
                        let first = x.end - x.targets;
                        assert!(
                            first == next || (first == next + 1 && x.begin == next),
                            "{len} {context} {stride}"
                        );
                        next = x.end;
                    }
                    // The last token goes unscored only when a window would start on it alone.
                    assert!(
                        next == len
                            || (next == len - 1 && stride == context && (len - 1) % stride == 0)
                    );
                    if stride < context {
                        assert_eq!(w.iter().map(|w| w.targets).sum::<usize>(), len - 1);
                    }
                }
            }
        }
        assert_eq!(
            windows(10, 4, 2),
            [
                Window {
                    begin: 0,
                    end: 4,
                    targets: 3
                },
                Window {
                    begin: 2,
                    end: 6,
                    targets: 2
                },
                Window {
                    begin: 4,
                    end: 8,
                    targets: 2
                },
                Window {
                    begin: 6,
                    end: 10,
                    targets: 2
                }
            ]
        );
        // stride = context: each window's first token goes unscored.
        assert_eq!(
            windows(10, 4, 4),
            [
                Window {
                    begin: 0,
                    end: 4,
                    targets: 3
                },
                Window {
                    begin: 4,
                    end: 8,
                    targets: 3
                },
                Window {
                    begin: 8,
                    end: 10,
                    targets: 1
                }
            ]
        );
    }

    /// CUDA's diagnostics (`numerics::target_stats` over stored rows of logits) are the CPU's
    /// streamed ones, bit for bit, given the same logits: checked on the CPU's own logits, in
    /// every format, with a short last panel (1000 = 31·32 + 8).
    #[test]
    fn diagnostics_of_stored_logits_equal_the_streamed_ones() {
        let mut cfg = crate::GPT2Config::preset("gpt2").unwrap();
        (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_inner) = (1, 64, 2, 128);
        (cfg.vocab_size, cfg.n_positions) = (1000, 64);
        let base = Model::random(cfg, 4, &Default::default()).unwrap();
        let ids: Vec<u32> = (0..40).map(|i| (i * 389 + 7) % 1000).collect();
        let targets: Vec<Option<u32>> = ids[1..].iter().map(|&t| Some(t)).chain([None]).collect();
        let batch = [SeqInput {
            slot: 0,
            tokens: &ids,
        }];
        for dtype in crate::DType::ALL {
            let model = base.to_dtype(dtype).unwrap();
            let mut st = model.new_state(1, 64).unwrap();
            let streamed = model
                .forward_diagnostics(&mut st, &batch, &targets)
                .unwrap();
            let mut st = model.new_state(1, 64).unwrap();
            let logits = model.forward(&mut st, &batch, Logits::All).unwrap();
            let stored: Vec<_> = logits
                .chunks_exact(1000)
                .zip(&ids[1..])
                .map(|(row, &t)| crate::numerics::target_stats(row, t))
                .collect();
            let bits = |s: &[crate::numerics::TargetStats]| -> Vec<(u64, u32, u64)> {
                s.iter()
                    .map(|s| (s.logprob.to_bits(), s.rank, s.entropy.to_bits()))
                    .collect()
            };
            assert_eq!(bits(&streamed), bits(&stored), "{dtype:?}");
        }
    }

    #[test]
    fn log_softmax_normalises() {
        let mut out = [0.0; 3];
        log_softmax(&[1.0, 2.0, 3.0], &mut out);
        let total: f32 = out.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((out[2] - -0.407_605_97).abs() < 1e-6);
        // The exponentials are f32 (within 2 ulp), summed in f64.
        assert!(
            (crate::numerics::logprob_of(&[1.0, 2.0, 3.0], 2) - -0.407_605_964_444_380_9).abs()
                < 1e-7
        );
    }
}
