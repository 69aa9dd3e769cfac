//! Beam search as transformers' `generate(num_beams=…, length_penalty=…, early_stopping=…)` does it
//! (its vectorised `_beam_search`), for one prompt: at each step the best `2·num_beams` continuations
//! of all beams are ranked; those that end (EOS or the length limit) among the top `num_beams` become
//! finished hypotheses scored `sum_logprobs / generated_len^length_penalty`, the rest carry on.

use crate::backend::Model;
use crate::error::{Error, Result};
use crate::eval::log_softmax;
use crate::model::{Logits, SeqInput};
use crate::sampling;
use crate::tokenizer::Tokenizer;

use super::sequence::prepare_prompt;
use super::{EarlyStopping, FinishReason, Generation, GenerationConfig};

/// transformers' stand-in for −∞ in beam scores.
const DEAD: f32 = -1.0e9;

#[derive(Clone)]
struct Hyp {
    /// Generated ids.
    tokens: Vec<u32>,
    /// Raw-model log-probabilities of the generated ids.
    raw: Vec<f32>,
    score: f32,
    finished: bool,
}

/// Indices of the `k` largest values, best first; ties go to the lower index (as `torch.topk` on CPU
/// in practice).
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let cmp = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

/// The `num_return_sequences` best finished beams for `prompt`, best first.
pub fn beam_search(
    model: &Model,
    tok: &Tokenizer,
    prompt: &[u32],
    cfg: &GenerationConfig,
) -> Result<Vec<Generation>> {
    cfg.validate()?;
    let sp = &cfg.sampling;
    if sp.top_k != 0
        || sp.top_p != 1.0
        || sp.min_p != 0.0
        || !(sp.temperature == 1.0 || sp.temperature == 0.0)
    {
        return Err(Error::Input(
            "beam search is deterministic: temperature, top-k, top-p and min-p do not apply to it"
                .into(),
        ));
    }
    if !cfg.stop.is_empty() {
        return Err(Error::Input(
            "stop strings are not supported with beam search".into(),
        ));
    }
    if !cfg.stop_token_ids.is_empty() || cfg.min_tokens > 0 {
        return Err(Error::Input(
            "stop tokens and min tokens are not supported with beam search".into(),
        ));
    }
    let nb = cfg.num_beams;
    let prompt = prepare_prompt(model.config(), prompt.to_vec(), cfg)?;
    let p_len = prompt.len();
    let max_length = p_len + cfg.max_new_tokens;
    let eos = (!cfg.ignore_eos).then_some(cfg.eos_token_id.unwrap_or(model.config().eos_token_id));
    let keep = 2.max(1 + eos.is_some() as usize) * nb;
    let v = model.config().vocab_size;
    let lp_pow = |len: usize| (len as f32).powf(cfg.length_penalty);

    // Per beam and step: the model's logits row and its activations, the raw and processed
    // log-probabilities, and the candidate indices that ranking sorts. Checked before anything is
    // allocated, so that `--num-beams 100000` is an error rather than the OOM killer.
    let per_beam = v * (3 * size_of::<f32>() + size_of::<usize>())
        + 16 * model.config().n_embd.max(model.config().n_inner) * size_of::<f32>();
    crate::memory::check(
        &format!("beam search over {nb} beams of a {v}-token vocabulary"),
        "beams",
        nb,
        per_beam,
    )?;

    // Two sets of nb cache slots: each step copies parents from one set into the other.
    let mut state = model.new_state(2 * nb, max_length)?;
    let mut base = 0;
    let mut running: Vec<Hyp> = (0..nb)
        .map(|b| Hyp {
            tokens: vec![],
            raw: vec![],
            score: if b == 0 { 0.0 } else { DEAD },
            finished: false,
        })
        .collect();
    let mut done: Vec<Hyp> = vec![
        Hyp {
            tokens: vec![],
            raw: vec![],
            score: DEAD,
            finished: false
        };
        nb
    ];
    let mut unsatisfied = true;
    let (mut raw, mut processed) = (vec![0f32; nb * v], vec![0f32; nb * v]);
    let mut context = Vec::with_capacity(max_length);
    let mut cur_len = p_len;

    loop {
        // Log-probabilities of every running beam's next token (on the first step all beams hold the
        // prompt, so beam 0's row serves for all).
        if cur_len == p_len {
            let logits = model.forward(
                &mut state,
                &[SeqInput {
                    slot: 0,
                    tokens: &prompt,
                }],
                Logits::Last,
            )?;
            crate::eval::check_finite(logits, 1)?;
            log_softmax(logits, &mut raw[..v]);
            for b in 1..nb {
                raw.copy_within(..v, b * v);
            }
        } else {
            let last: Vec<[u32; 1]> = running
                .iter()
                .map(|h| [*h.tokens.last().expect("generated")])
                .collect();
            let inputs: Vec<SeqInput> = last
                .iter()
                .enumerate()
                .map(|(b, t)| SeqInput {
                    slot: base + b,
                    tokens: t,
                })
                .collect();
            let logits = model.forward(&mut state, &inputs, Logits::Last)?;
            crate::eval::check_finite(logits, cur_len - p_len + 1)?;
            for (row, out) in logits.chunks_exact(v).zip(raw.chunks_exact_mut(v)) {
                log_softmax(row, out);
            }
        }
        for (b, h) in running.iter().enumerate() {
            let row = &mut processed[b * v..(b + 1) * v];
            row.copy_from_slice(&raw[b * v..(b + 1) * v]);
            context.clear();
            context.extend_from_slice(&prompt);
            context.extend_from_slice(&h.tokens);
            sampling::process(
                &sampling::SamplingParams {
                    temperature: 0.0,
                    ..sp.clone()
                },
                row,
                &context,
                &h.tokens,
            );
            let s = h.score;
            row.iter_mut().for_each(|x| *x += s);
        }

        // The best `keep` continuations over all beams, and which of them end here.
        let cand = top_indices(&processed, keep);
        let hits: Vec<bool> = cand
            .iter()
            .map(|&c| Some((c % v) as u32) == eos || cur_len + 1 >= max_length)
            .collect();
        let make = |c: usize, score: f32, finished: bool| {
            let (b, t) = (c / v, (c % v) as u32);
            let mut h = running[b].clone();
            h.tokens.push(t);
            h.raw.push(raw[c]);
            h.score = score;
            h.finished = finished;
            (b, h)
        };

        // Next running beams: the best candidates that did not end.
        let alive: Vec<f32> = cand
            .iter()
            .zip(&hits)
            .map(|(&c, &hit)| processed[c] + if hit { DEAD } else { 0.0 })
            .collect();
        let next: Vec<(usize, Hyp)> = top_indices(&alive, nb)
            .into_iter()
            .map(|i| make(cand[i], alive[i], false))
            .collect();

        // Finished hypotheses: merge the ones ending now (only among the top nb) into the kept best nb.
        let all_done = done.iter().all(|h| h.finished);
        let mut merged = done.clone();
        for (i, (&c, &hit)) in cand.iter().zip(&hits).enumerate() {
            let just_finished = hit && i < nb;
            let mut score = processed[c] / lp_pow(cur_len + 1 - p_len);
            if all_done && cfg.early_stopping == EarlyStopping::True {
                score += DEAD;
            }
            if !unsatisfied {
                score += DEAD;
            }
            if !just_finished {
                score += DEAD;
            }
            merged.push(make(c, score, just_finished).1);
        }
        let scores: Vec<f32> = merged.iter().map(|h| h.score).collect();
        done = top_indices(&scores, nb)
            .into_iter()
            .map(|i| merged[i].clone())
            .collect();

        // Move the caches: new beam j continues its parent's slot.
        let other = if base == 0 { nb } else { 0 };
        for (j, (parent, _)) in next.iter().enumerate() {
            state.copy_slot(base + parent, other + j)?;
        }
        base = other;
        running = next.into_iter().map(|(_, h)| h).collect();
        cur_len += 1;

        // transformers' early-stop heuristic and end conditions.
        let best_len = if cfg.early_stopping == EarlyStopping::Never && cfg.length_penalty > 0.0 {
            max_length - p_len
        } else {
            cur_len - p_len
        };
        let best_possible = running[0].score / lp_pow(best_len);
        let worst_done = done.iter().map(|h| h.score).fold(f32::INFINITY, f32::min);
        unsatisfied &= done
            .iter()
            .any(|h| best_possible > if h.finished { worst_done } else { DEAD });
        let open_beam =
            !(done.iter().all(|h| h.finished) && cfg.early_stopping == EarlyStopping::True);
        if !(unsatisfied && open_beam && !hits.iter().all(|&h| h)) {
            break;
        }
    }

    done.truncate(cfg.num_return_sequences);
    done.into_iter()
        .map(|h| {
            let ends_eos = eos.is_some() && h.tokens.last() == eos.as_ref();
            let text_ids = if ends_eos {
                &h.tokens[..h.tokens.len() - 1]
            } else {
                &h.tokens[..]
            };
            Ok(Generation {
                prompt_tokens: prompt.clone(),
                text: tok.decode(text_ids)?,
                tokens: h.tokens,
                logprobs: h.raw,
                finish_reason: if ends_eos {
                    FinishReason::Eos
                } else {
                    FinishReason::Length
                },
                score: Some(h.score),
            })
        })
        .collect()
}
