//! Fast f32 CPU kernels for everything but the matrix products (`packed`, `q8`) and attention
//! (`attention`): layer norm, activations, softmax, residual adds; and the instruction-set token
//! ([`Isa`]) every SIMD kernel takes. Sums run in one fixed order (8 lanes, then a fixed lane reduction, then
//! the tail), so a row's result never depends on the other rows in the batch. The scalar oracle for
//! each op is in `reference`.

use super::pool::{parallel_for, Disjoint};
use crate::config::Activation;

use super::reference;

const LANES: usize = 8;

/// Compile a kernel for AVX-512 and AVX2+FMA besides the baseline and pick one at run time: the
/// `#[inline(always)]` helpers it calls are then compiled with those features (`mul_add` becomes one
/// instruction instead of a call, loops use wide registers). Every version gives the same bits.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v512($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v256($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                match Isa::detect().level() {
                    // SAFETY: an `Isa` of this level proves the CPU has its features.
                    Level::Avx512 => return unsafe { v512($($arg),*) },
                    // SAFETY: as above.
                    Level::Avx2 => return unsafe { v256($($arg),*) },
                    Level::Portable => {}
                }
            }
            imp($($arg),*)
        }
    };
}

#[inline(always)]
fn reduce(a: [f32; LANES]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

/// `MR × NR` dot products of `MR` rows of x with `NR` rows of w, all of length `k`.
#[inline(always)]
fn tile<const MR: usize, const NR: usize>(
    xs: [&[f32]; MR],
    ws: [&[f32]; NR],
    k: usize,
) -> [[f32; NR]; MR] {
    let kc = k / LANES * LANES;
    let mut acc = [[[0f32; LANES]; NR]; MR];
    let mut c = 0;
    while c < kc {
        let xv: [[f32; LANES]; MR] =
            std::array::from_fn(|i| xs[i][c..c + LANES].try_into().unwrap());
        for j in 0..NR {
            let wv: &[f32; LANES] = ws[j][c..c + LANES].try_into().unwrap();
            for i in 0..MR {
                for l in 0..LANES {
                    acc[i][j][l] += xv[i][l] * wv[l];
                }
            }
        }
        c += LANES;
    }
    let mut out = [[0f32; NR]; MR];
    for i in 0..MR {
        for j in 0..NR {
            let mut s = reduce(acc[i][j]);
            for t in kc..k {
                s += xs[i][t] * ws[j][t];
            }
            out[i][j] = s;
        }
    }
    out
}

/// An instruction set the kernels can run with; all give identical results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Portable,
    /// AVX2 with FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F and VL, with AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => "avx512",
        }
    }
}

/// Proof that the running CPU has an instruction set: only detection makes one, so a kernel given
/// an `Isa` of some [`Level`] may use that level's instructions (every `unsafe` SIMD call relies on
/// this).
///
/// ```
/// use gpt2::internal::{Isa, Level};
/// let best = Isa::detect();
/// assert!(Isa::new(best.level()).is_some());
/// assert_eq!(Isa::portable().level(), Level::Portable);
/// ```
///
/// No safe code can claim a level the CPU lacks:
///
/// ```compile_fail
/// let avx512 = gpt2::internal::Isa(gpt2::internal::Level::Avx512); // the field is private
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Isa(Level);

/// Whether the CPU has every feature a level's kernels use.
fn supported(level: Level) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        match level {
            Level::Portable => true,
            Level::Avx2 => avx2,
            Level::Avx512 => {
                avx2 && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        level == Level::Portable
    }
}

impl Isa {
    /// The plain loops: every CPU runs them.
    pub fn portable() -> Isa {
        Isa(Level::Portable)
    }

    /// The best the running CPU supports, at most the level named by the environment variable
    /// `GPT2_ISA` (`portable`, `avx2`, `avx512`), which lets one machine measure the others' paths.
    pub fn detect() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = std::env::var("GPT2_ISA").ok();
            let best = Isa::available()
                .into_iter()
                .rfind(|i| cap.as_deref().is_none_or(|c| i.0 <= level_named(c)));
            best.unwrap_or(Isa::portable())
        })
    }

    /// Every level this CPU can run, lowest first (for the tests).
    pub fn available() -> Vec<Isa> {
        let mut all = vec![Level::Portable];
        #[cfg(target_arch = "x86_64")]
        all.extend([Level::Avx2, Level::Avx512]);
        all.into_iter().filter(|&l| supported(l)).map(Isa).collect()
    }

    /// The token for `level`, if the CPU has it.
    pub fn new(level: Level) -> Option<Isa> {
        supported(level).then_some(Isa(level))
    }

    pub fn level(self) -> Level {
        self.0
    }

    /// This token or a lower level (each level's features include the lower ones').
    pub fn at_most(self, level: Level) -> Isa {
        Isa(self.0.min(level))
    }
}

/// The level `GPT2_ISA` names; an unknown name caps nothing.
fn level_named(name: &str) -> Level {
    match name {
        "portable" => Level::Portable,
        #[cfg(target_arch = "x86_64")]
        "avx2" => Level::Avx2,
        #[cfg(target_arch = "x86_64")]
        _ => Level::Avx512,
        #[cfg(not(target_arch = "x86_64"))]
        _ => Level::Portable,
    }
}

/// Dot product in the kernels' fixed summation order.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    tile::<1, 1>([a], [b], a.len())[0][0]
}

multiversion! {
/// LayerNorm of each row of `x (rows, c)` into `out`.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let c = weight.len();
    for (xr, or) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        let mean = sum(xr) / c as f32;
        for (o, v) in or.iter_mut().zip(xr) {
            *o = v - mean;
        }
        let var = dot(or, or) / c as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((o, w), b) in or.iter_mut().zip(weight).zip(bias) {
            *o = *o * inv * w + b;
        }
    }
}
}

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for ch in chunks {
        for l in 0..LANES {
            acc[l] += ch[l];
        }
    }
    tail.iter().fold(reduce(acc), |s, v| s + v)
}

/// The largest element (in lanes, so that it vectorises; no NaN handling needed here).
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for ch in chunks {
        for l in 0..16 {
            acc[l] = if ch[l] > acc[l] { ch[l] } else { acc[l] };
        }
    }
    tail.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// e^x for |x| ≤ 88, branch-free so that loops over it vectorise: x = n·ln2 + r, e^r by a degree-6
/// polynomial (error ~2 ulp), 2^n through the exponent bits.
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer (to nearest, ties to even) held in the low mantissa
    // bits: n without a float-to-int conversion, which does not vectorise (it saturates).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = n.mul_add(-0.693_145_75, x);
    let r = n.mul_add(-1.428_606_8e-6, r);
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // t's bits are 0x4B40_0000 + n, so 2ⁿ's exponent field is those bits − 0x4B40_0000 + 127.
    p * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23)
}

/// `gelu_new` through the vectorisable exp: tanh(u) = 1 − 2/(e^{2u} + 1), saturated beyond |u| = 10.
#[inline(always)]
fn gelu_new_fast(x: f32) -> f32 {
    const S: f32 = 0.797_884_6; // √(2/π)
    let u = (S * (x + 0.044715 * x * x * x)).clamp(-10.0, 10.0);
    let t = 1.0 - 2.0 / (exp_fast(2.0 * u) + 1.0);
    0.5 * x * (1.0 + t)
}

multiversion! {
/// Apply the MLP activation in place (`gelu_new` vectorised; the others through the reference).
/// A decode's products run it on each panel's outputs as they store them
/// ([`super::packed::Epilogue`]).
pub fn activate(act: Activation, c: &mut [f32]) {
    match act {
        Activation::GeluNew => c.iter_mut().for_each(|v| *v = gelu_new_fast(*v)),
        _ => c
            .iter_mut()
            .for_each(|v| *v = reference::activation(act, *v)),
    }
}
}

/// [`activate`] over a whole batch's outputs, split across the threads when there are many.
pub fn activation(act: Activation, x: &mut [f32]) {
    if x.len() >= 1 << 14 {
        let len = x.len();
        let out = Disjoint::new(x);
        parallel_for(len.div_ceil(4096), &|c| {
            // SAFETY: each task takes its own chunk of `x`, which outlives the loop.
            activate(act, unsafe {
                out.slice(c * 4096, (len - c * 4096).min(4096))
            })
        });
    } else {
        activate(act, x);
    }
}

multiversion! {
/// `x += y`, elementwise.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
}

multiversion! {
/// Softmax of `scale · scores`, in place (the attention weights of one query).
pub fn softmax_scaled(scores: &mut [f32], scale: f32) {
    for s in scores.iter_mut() {
        *s *= scale;
    }
    let max = max(scores);
    for s in scores.iter_mut() {
        *s = exp_fast(*s - max);
    }
    let inv = 1.0 / sum(scores);
    for s in scores.iter_mut() {
        *s *= inv;
    }
}
}

multiversion! {
/// ln Σ e^{x_i} over a row of logits (a vocabulary of them), for log-probabilities: e^{x - max} by
/// `exp_fast` (~2 ulp), summed in 16 lanes of f64 and then lane by lane, so that every instruction
/// set gives the same bits. A NaN anywhere gives NaN.
pub fn log_sum_exp(x: &[f32]) -> f64 {
    if x.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let m = max(x);
    let mut acc = [0f64; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for ch in chunks {
        for l in 0..16 {
            acc[l] += exp_fast(ch[l] - m) as f64;
        }
    }
    let s = acc.iter().sum::<f64>();
    let s = tail.iter().fold(s, |s, &v| s + exp_fast(v - m) as f64);
    m as f64 + s.ln()
}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Within 1e-6 of the f64 sum of f64 exponentials, and the same bits on every instruction set.
    #[test]
    fn log_sum_exp_is_accurate_and_the_same_on_every_isa() {
        for (n, scale) in [(50257, 8.0), (33, 30.0), (5, 1.0)] {
            let x: Vec<f32> = data(n, 9).iter().map(|v| v * scale).collect();
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let want = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            let got = log_sum_exp(&x);
            assert!((got - want).abs() < 1e-6, "{n}: {got} vs {want}");
            // The same steps in plain code (baseline features: `mul_add` is libm's exact fma):
            // the detected instruction set's version gives its bits.
            let mf = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut acc = [0f64; 16];
            for (i, &v) in x.iter().enumerate().take(n / 16 * 16) {
                acc[i % 16] += exp_fast(v - mf) as f64;
            }
            let plain = x[n / 16 * 16..]
                .iter()
                .fold(acc.iter().sum::<f64>(), |s, &v| s + exp_fast(v - mf) as f64);
            assert_eq!(got.to_bits(), (mf as f64 + plain.ln()).to_bits(), "{n}");
        }
        assert!(log_sum_exp(&[1.0, f32::NAN]).is_nan());
    }

    #[test]
    fn layer_norm_matches_reference() {
        let c = 100;
        let x: Vec<f32> = data(3 * c, 6).iter().map(|v| v * 5.0 + 2.0).collect();
        let (w, b) = (data(c, 7), data(c, 8));
        let mut got = vec![0.0; 3 * c];
        layer_norm(&x, &w, &b, 1e-5, &mut got);
        for r in 0..3 {
            let mut want = vec![0.0; c];
            reference::layer_norm(&x[r * c..(r + 1) * c], &w, &b, 1e-5, &mut want);
            assert!(max_diff(&got[r * c..(r + 1) * c], &want) < 1e-5);
        }
    }

    #[test]
    fn fast_gelu_matches_the_reference() {
        let mut worst = 0f32;
        for i in -200_000..200_000 {
            let x = i as f32 * 1e-4;
            let (a, b) = (gelu_new_fast(x), reference::gelu_new(x));
            worst = worst.max((a - b).abs() / b.abs().max(1.0));
        }
        assert!(worst < 5e-7, "{worst}");
        assert_eq!(gelu_new_fast(-100.0), 0.0);
        assert_eq!(gelu_new_fast(100.0), 100.0);
        assert!((exp_fast(1.0) - std::f32::consts::E).abs() < 1e-6);
    }

    #[test]
    fn activations_match_reference_formulas() {
        // Values from torch: NewGELUActivation()(x) and F.gelu(x) in float64, rounded.
        let cases = [
            (-3.0f32, -0.0036373),
            (-0.5, -0.1542859),
            (0.1, 0.0539828),
            (2.0, 1.9545977),
        ];
        for (x, want) in cases {
            assert!((reference::gelu_new(x) - want).abs() < 1e-6, "{x}");
        }
        assert!((reference::activation(Activation::Gelu, 1.0) - 0.8413447).abs() < 1e-6);
        let mut v = vec![1.0f32, -2.0];
        activation(Activation::Relu, &mut v);
        assert_eq!(v, [1.0, 0.0]);
    }
}
