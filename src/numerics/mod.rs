//! Host-side numerics every layer shares, on the ground floor so that every import points down:
//! log-sum-exp and log-softmax of a row of logits (the one source of every log-probability the crate
//! reports, whichever backend made the logits), argmax, and the reproducible RNG.

pub(crate) mod lse;
pub(crate) mod simd;

use lse::log_sum_exp;

/// `log_softmax` of one row of logits, written to `out` (the normaliser summed in f64 lanes: a
/// vocabulary is 50k terms).
pub fn log_softmax(logits: &[f32], out: &mut [f32]) {
    let lse = log_sum_exp(logits);
    for (o, &l) in out.iter_mut().zip(logits) {
        *o = (l as f64 - lse) as f32;
    }
}

/// The log-probability of `target` under one row of logits, without materialising the row. Every
/// log-probability the crate reports (score, perplexity, generation, the server) comes from here or
/// [`log_softmax`], so they agree bit for bit.
pub fn logprob_of(logits: &[f32], target: u32) -> f64 {
    logits[target as usize] as f64 - log_sum_exp(logits)
}

/// One scored token's diagnostics under its row's next-token distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetStats {
    /// [`logprob_of`] the target.
    pub logprob: f64,
    /// 1 + how many logits are strictly larger than the target's.
    pub rank: u32,
    /// H = -Σ p_i ln p_i of the softmax, in nats ([`lse::lse_entropy_of_chunks`]).
    pub entropy: f64,
}

/// [`TargetStats`] of `target` under one stored row of logits, reduced chunk by chunk as the CPU's
/// unembedding reduces its panels ([`lse::chunk_diag_of_outputs`]): the same bits.
pub fn target_stats(logits: &[f32], target: u32) -> TargetStats {
    let t = logits[target as usize];
    let mut above = 0;
    let stats: Vec<[f32; 3]> = logits
        .chunks(lse::LSE_CHUNK)
        .map(|c| {
            let mut acc = [0f32; lse::LSE_CHUNK];
            acc[..c.len()].copy_from_slice(c);
            let (s, n) = lse::chunk_diag_of_outputs(&acc, c.len(), t);
            above += n;
            s
        })
        .collect();
    TargetStats {
        logprob: logprob_of(logits, target),
        rank: 1 + above,
        entropy: lse::lse_entropy_of_chunks(&stats)[1],
    }
}

/// The first index of the largest value (as `torch.argmax`), NaN skipped (a NaN first value would
/// otherwise win every comparison by losing them all).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = logits.iter().position(|l| !l.is_nan()).unwrap_or(0);
    for (i, &l) in logits.iter().enumerate().skip(best) {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// xoshiro256++ seeded through SplitMix64: small, fast, and the same on every platform.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut split = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [split(), split(), split(), split()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = (s[0].wrapping_add(s[3])).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}
