//! Logits → next token: the logits processors (each pinned to transformers' own, or to OpenAI's rule
//! for the frequency and presence penalties), greedy argmax, and sampling from a seeded RNG that the
//! project owns, so that a seed gives the same tokens on every run and platform.
//!
//! The documented API is [`SamplingParams`], which [`crate::generate`] applies. The processors
//! themselves stay public (undocumented) for the parity tests that pin each to transformers and
//! for the fuzz targets; they are not a stable API.

#[doc(hidden)]
pub use crate::numerics::{argmax, Rng};
use std::cell::RefCell;

/// Floats, f64 probabilities, an index order, and per-token counts (reset after each use).
type Scratch = (Vec<f32>, Vec<f64>, Vec<usize>, Vec<u32>);

thread_local! {
    /// Per-thread scratch, so that choosing a token allocates nothing once warmed up.
    static SCRATCH: RefCell<Scratch> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new(), Vec::new())) };
}

/// Sampling settings. The defaults change nothing (temperature 1, no filtering, no penalties).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: off).
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one's probability (0: off).
    pub min_p: f32,
    /// transformers' rule over prompt and generated tokens: divide positive logits, multiply negative
    /// ones (1: off).
    pub repetition_penalty: f32,
    /// OpenAI's rule over generated tokens: logit −= count × frequency_penalty.
    pub frequency_penalty: f32,
    /// OpenAI's rule over generated tokens: logit −= presence_penalty if the token appeared.
    pub presence_penalty: f32,
    /// Forbid repeating any n-gram of this size (0: off), as transformers' `no_repeat_ngram_size`.
    pub no_repeat_ngram_size: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            no_repeat_ngram_size: 0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Check ranges; the message names the setting and what it accepts.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |v: f32| v.is_finite();
        if !finite(self.temperature) || self.temperature < 0.0 {
            return Err(format!(
                "temperature {} must be ≥ 0 (0 is greedy)",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p {} must be in [0, 1]", self.min_p));
        }
        if !finite(self.repetition_penalty) || self.repetition_penalty <= 0.0 {
            return Err(format!(
                "repetition penalty {} must be > 0 (1 is off)",
                self.repetition_penalty
            ));
        }
        if !finite(self.frequency_penalty) || !finite(self.presence_penalty) {
            return Err("frequency and presence penalties must be finite numbers".into());
        }
        Ok(())
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: every token in `context` (prompt and generated)
/// has its logit divided by `penalty` if positive, multiplied if negative.
#[doc(hidden)]
pub fn repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    SCRATCH.with_borrow_mut(|(_, _, _, seen)| {
        seen.resize(logits.len(), 0);
        for &t in context {
            let t = t as usize;
            if t < logits.len() && seen[t] == 0 {
                seen[t] = 1;
                let l = &mut logits[t];
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
        for &t in context {
            if let Some(v) = seen.get_mut(t as usize) {
                *v = 0;
            }
        }
    });
}

/// OpenAI's frequency and presence penalties over the generated tokens:
/// `logit[j] −= count[j]·frequency + (count[j] > 0)·presence`.
#[doc(hidden)]
pub fn frequency_presence_penalty(
    logits: &mut [f32],
    generated: &[u32],
    frequency: f32,
    presence: f32,
) {
    if frequency == 0.0 && presence == 0.0 {
        return;
    }
    SCRATCH.with_borrow_mut(|(_, _, _, counts)| {
        counts.resize(logits.len(), 0);
        for &t in generated {
            if let Some(c) = counts.get_mut(t as usize) {
                *c += 1;
            }
        }
        // Each token once: apply at its first occurrence, then clear its count.
        for &t in generated {
            let t = t as usize;
            if t < logits.len() && counts[t] > 0 {
                logits[t] -= counts[t] as f32 * frequency + presence;
                counts[t] = 0;
            }
        }
    });
}

/// transformers' `NoRepeatNGramLogitsProcessor`: ban every token that would complete an n-gram that
/// already occurs in `ids`.
#[doc(hidden)]
pub fn no_repeat_ngram(logits: &mut [f32], ids: &[u32], n: usize) {
    if n == 0 || ids.len() + 1 < n {
        return;
    }
    let prefix = &ids[ids.len() + 1 - n..];
    for w in ids.windows(n) {
        if &w[..n - 1] == prefix {
            if let Some(l) = logits.get_mut(w[n - 1] as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// transformers' `TemperatureLogitsWarper`, except where dividing would overflow: a tiny temperature
/// (1e-39) turns finite logits into ±∞, and softmax of ∞ − ∞ is NaN. Then the logits are shifted by
/// their largest finite value first, `(l − max) / t`, which cannot overflow upwards, keeps the same
/// distribution (softmax ignores a shift) and tends to greedy as t → 0.
#[doc(hidden)]
pub fn temperature(logits: &mut [f32], t: f32) {
    if t == 1.0 || t.is_nan() || t <= 0.0 {
        return;
    }
    let finite = logits.iter().copied().filter(|l| l.is_finite());
    let largest = finite.clone().fold(0.0f32, |m, l| m.max(l.abs()));
    if (largest / t).is_finite() {
        logits.iter_mut().for_each(|l| *l /= t);
        return;
    }
    let max = finite.fold(f32::NEG_INFINITY, f32::max);
    for l in logits.iter_mut().filter(|l| l.is_finite()) {
        *l = (*l - max) / t;
    }
}

/// transformers' `TopKLogitsWarper`: keep tokens at least as likely as the k-th (ties kept).
#[doc(hidden)]
pub fn top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let threshold = SCRATCH.with_borrow_mut(|(sorted, _, _, _)| {
        sorted.clear();
        sorted.extend_from_slice(logits);
        *sorted
            .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a))
            .1
    });
    logits
        .iter_mut()
        .filter(|l| **l < threshold)
        .for_each(|l| *l = f32::NEG_INFINITY);
}

/// Probabilities of logits into `p` (f64; −∞ gives 0). When some logits are +∞ (a huge negative
/// frequency penalty), they share all the probability, as the limit would; NaN logits give 0. When
/// no logit is above −∞ every probability is NaN ([`try_choose`] refuses that).
fn softmax64(logits: &[f32], p: &mut Vec<f64>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    p.clear();
    if max == f64::INFINITY {
        p.extend(
            logits
                .iter()
                .map(|&l| if l == f32::INFINITY { 1.0 } else { 0.0 }),
        );
    } else {
        p.extend(logits.iter().map(|&l| {
            if l.is_nan() {
                0.0
            } else {
                libm::exp(l as f64 - max)
            }
        }));
    }
    let sum: f64 = p.iter().sum();
    p.iter_mut().for_each(|v| *v /= sum);
}

/// transformers' `TopPLogitsWarper`: sort ascending, drop the tokens whose cumulative probability
/// (from the least likely) is ≤ 1 − p, always keeping the `min_keep` most likely.
#[doc(hidden)]
pub fn top_p(logits: &mut [f32], p: f32, min_keep: usize) {
    if p >= 1.0 {
        return;
    }
    SCRATCH.with_borrow_mut(|(_, probs, order, _)| {
        softmax64(logits, probs);
        order.clear();
        order.extend(0..logits.len());
        order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)));
        let keep_from = order.len().saturating_sub(min_keep.max(1));
        let mut cum = 0.0;
        for (rank, &i) in order.iter().enumerate() {
            cum += probs[i];
            if rank < keep_from && cum <= 1.0 - p as f64 {
                logits[i] = f32::NEG_INFINITY;
            }
        }
    });
}

/// transformers' `MinPLogitsWarper`: drop tokens with probability below min_p × the top probability,
/// always keeping the `min_keep` most likely.
#[doc(hidden)]
pub fn min_p(logits: &mut [f32], min_p: f32, min_keep: usize) {
    if min_p <= 0.0 {
        return;
    }
    SCRATCH.with_borrow_mut(|(_, probs, order, _)| {
        softmax64(logits, probs);
        let top = probs.iter().copied().fold(0.0, f64::max);
        let threshold = min_p as f64 * top;
        order.clear();
        order.extend(0..logits.len());
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        for &i in order.iter().skip(min_keep.max(1)) {
            if probs[i] < threshold {
                logits[i] = f32::NEG_INFINITY;
            }
        }
    });
}

/// The processors that change the logits before choosing, in transformers' order: repetition
/// penalty, no-repeat n-gram, (OpenAI's frequency/presence), then the sampling warpers temperature,
/// top-k, top-p, min-p. `context` is prompt + generated, `generated` the generated part.
#[doc(hidden)]
pub fn process(params: &SamplingParams, logits: &mut [f32], context: &[u32], generated: &[u32]) {
    repetition_penalty(logits, context, params.repetition_penalty);
    no_repeat_ngram(logits, context, params.no_repeat_ngram_size);
    frequency_presence_penalty(
        logits,
        generated,
        params.frequency_penalty,
        params.presence_penalty,
    );
    if params.is_greedy() {
        return;
    }
    temperature(logits, params.temperature);
    top_k(logits, params.top_k);
    top_p(logits, params.top_p, 1);
    min_p(logits, params.min_p, 1);
}

/// Draw a token from processed logits (−∞ entries are never drawn).
#[doc(hidden)]
pub fn sample(logits: &[f32], rng: &mut Rng) -> u32 {
    let u = rng.next_f64();
    SCRATCH.with_borrow_mut(|(_, probs, _, _)| {
        softmax64(logits, probs);
        let mut cum = 0.0;
        let mut last = argmax(logits);
        for (i, p) in probs.iter().enumerate() {
            if *p > 0.0 {
                cum += p;
                last = i as u32;
                if u < cum {
                    return i as u32;
                }
            }
        }
        last
    })
}

/// Choose the next token: greedy when the temperature is 0, else a draw. Prefer [`try_choose`]: with
/// NaN logits, or none above −∞, there is no right answer and this returns the first index.
#[doc(hidden)]
pub fn choose(params: &SamplingParams, logits: &[f32], rng: &mut Rng) -> u32 {
    if params.is_greedy() {
        argmax(logits)
    } else {
        sample(logits, rng)
    }
}

/// [`choose`], refusing logits that name no token: any NaN (the model's arithmetic broke down), or
/// every logit −∞ (every token banned). The message says which; the caller adds the step.
#[doc(hidden)]
pub fn try_choose(params: &SamplingParams, logits: &[f32], rng: &mut Rng) -> Result<u32, String> {
    if let Some(i) = logits.iter().position(|l| l.is_nan()) {
        return Err(format!(
            "the logits are NaN (first at token {i} of {}): the model's arithmetic overflowed",
            logits.len()
        ));
    }
    if logits.iter().all(|&l| l == f32::NEG_INFINITY) {
        return Err(format!(
            "every one of the {} tokens is banned (all logits are −∞)",
            logits.len()
        ));
    }
    Ok(choose(params, logits, rng))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_penalties_follow_the_formula() {
        let mut l = vec![1.0, 2.0, 3.0, -1.0];
        frequency_presence_penalty(&mut l, &[1, 1, 3], 0.5, 0.25);
        assert_eq!(l, [1.0, 2.0 - 1.0 - 0.25, 3.0, -1.0 - 0.5 - 0.25]);
    }

    #[test]
    fn no_repeat_ngram_bans_completions() {
        let mut l = vec![0.0; 6];
        // 1 2 3 ... 1 2 → 3 banned; bigram prefix "2" was followed by 3 and 5.
        no_repeat_ngram(&mut l, &[1, 2, 3, 2, 5, 1, 2], 3);
        assert_eq!(l, [0.0, 0.0, 0.0, f32::NEG_INFINITY, 0.0, 0.0]);
        let mut l = vec![0.0; 6];
        no_repeat_ngram(&mut l, &[2, 3, 2, 5, 2], 2);
        assert_eq!(
            l,
            [0.0, 0.0, 0.0, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY]
        );
    }

    #[test]
    fn rng_is_fixed_by_the_seed() {
        let mut a = Rng::new(42);
        let first: Vec<u64> = (0..3).map(|_| a.next_u64()).collect();
        let mut b = Rng::new(42);
        assert_eq!(first, (0..3).map(|_| b.next_u64()).collect::<Vec<_>>());
        // Pinned to an independent implementation of SplitMix64 + xoshiro256++ (Python, by hand): a
        // change of generator would change every seeded output.
        assert_eq!(
            first,
            [
                15021278609987233951,
                5881210131331364753,
                18149643915985481100
            ]
        );
        assert_ne!(Rng::new(43).next_u64(), first[0]);
        let x = Rng::new(7).next_f64();
        assert!((0.0..1.0).contains(&x));
    }

    #[test]
    fn a_tiny_temperature_is_greedy_not_token_0() {
        // logits / 1e-39 overflow to ±∞ and softmax(∞ − ∞) was NaN: every draw was token 0.
        for t in [1e-38f32, 1e-39, 1e-45] {
            for top_k in [0, 1] {
                let params = SamplingParams {
                    temperature: t,
                    top_k,
                    ..Default::default()
                };
                let mut rng = Rng::new(1);
                for _ in 0..20 {
                    let mut l = vec![1.0f32, 5.0, 3.0, -2.0, 4.999];
                    process(&params, &mut l, &[], &[]);
                    assert!(l.iter().all(|v| !v.is_nan()), "t {t}: {l:?}");
                    assert_eq!(try_choose(&params, &l, &mut rng), Ok(1), "t {t}, k {top_k}");
                }
            }
        }
        // Equal best logits stay equally likely.
        let mut l = vec![-60.0f32, 2.0, 2.0];
        temperature(&mut l, 1e-44);
        assert_eq!(l, [f32::NEG_INFINITY, 0.0, 0.0]);
        // Ordinary temperatures divide, exactly as transformers does.
        let mut l = vec![1.0f32, -3.0];
        temperature(&mut l, 0.7);
        assert_eq!(l, [1.0 / 0.7, -3.0 / 0.7]);
    }

    #[test]
    fn logits_that_name_no_token_are_errors_not_token_0() {
        let p = SamplingParams::default();
        let mut rng = Rng::new(3);
        let e = try_choose(&p, &[0.5, f32::NAN, 1.0], &mut rng).unwrap_err();
        assert!(e.contains("NaN") && e.contains("token 1"), "{e}");
        let all_banned = [f32::NEG_INFINITY; 4];
        assert!(try_choose(&p, &all_banned, &mut rng)
            .unwrap_err()
            .contains("banned"));
        assert!(try_choose(&SamplingParams::greedy(), &[f32::NAN; 2], &mut rng).is_err());
        // +∞ logits (a huge negative frequency penalty) share the probability.
        for _ in 0..50 {
            let t = try_choose(&p, &[0.0, f32::INFINITY, 3.0, f32::INFINITY], &mut rng).unwrap();
            assert!(t == 1 || t == 3, "{t}");
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), 2);
    }

    #[test]
    fn validation_names_the_setting() {
        let bad = [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                min_p: 2.0,
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
        ];
        let words = [
            "temperature",
            "top-p",
            "top-p",
            "min-p",
            "repetition penalty",
        ];
        for (p, w) in bad.iter().zip(words) {
            assert!(p.validate().unwrap_err().contains(w));
        }
        assert!(SamplingParams::default().validate().is_ok());
    }
}
