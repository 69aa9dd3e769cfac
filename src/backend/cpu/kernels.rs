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

/// Logits per chunk of a log-sum-exp: one panel of the unembedding, so that a product can reduce
/// its outputs panel by panel as it computes them ([`chunk_stats_of_outputs`]) and give the very
/// bits of [`log_sum_exp`] over the stored row.
pub const LSE_CHUNK: usize = 32;

/// `(max, Σ e^{x - max})` of one chunk (at most [`LSE_CHUNK`] logits; only the last chunk of a row
/// is shorter). A whole chunk runs in 16 lanes (element l with l + 16) and then halves them
/// 16 → 8 → 4 → 2 → 1; a short one in order. A NaN gives a NaN sum.
#[inline(always)]
fn chunk_stats_inline(x: &[f32]) -> [f32; 2] {
    if x.len() != LSE_CHUNK {
        let m = x
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        return [m, x.iter().fold(0.0, |s, &v| s + exp_fast(v - m))];
    }
    // Plain loops, not `array::from_fn`: its closures are not inlined into the caller's target
    // features (`mul_add` would become a libm call).
    let (lo, hi) = x.split_at(16);
    let mut a = [0f32; 16];
    for l in 0..16 {
        a[l] = if hi[l] > lo[l] { hi[l] } else { lo[l] };
    }
    for w in [8, 4, 2, 1] {
        for l in 0..w {
            a[l] = if a[l + w] > a[l] { a[l + w] } else { a[l] };
        }
    }
    let m = a[0];
    let mut e = [0f32; 16];
    for l in 0..16 {
        e[l] = exp_fast(lo[l] - m) + exp_fast(hi[l] - m);
    }
    for w in [8, 4, 2, 1] {
        for l in 0..w {
            e[l] += e[l + w];
        }
    }
    [m, e[0]]
}

/// [`chunk_stats_inline`] of `acc[..cols] + 0.0`: a product's accumulators for one row and panel
/// as its epilogue would store them without a bias, reduced straight from the kernel's output
/// (called once per row and panel, so a whole chunk runs a hand-written reduction: the same steps,
/// the same bits). `cols` ≤ [`LSE_CHUNK`].
pub fn chunk_stats_of_outputs(acc: &[f32; LSE_CHUNK], cols: usize) -> [f32; 2] {
    #[cfg(target_arch = "x86_64")]
    if cols == LSE_CHUNK {
        match Isa::detect().level() {
            // SAFETY: an `Isa` of this level proves the CPU has its features.
            Level::Avx512 => return unsafe { x86::chunk_stats512(acc) },
            // SAFETY: as above.
            Level::Avx2 => return unsafe { x86::chunk_stats256(acc) },
            Level::Portable => {}
        }
    }
    let mut x = [0f32; LSE_CHUNK];
    for (d, a) in x.iter_mut().zip(&acc[..cols]) {
        *d = a + 0.0;
    }
    chunk_stats(&x[..cols])
}

multiversion! {
/// [`chunk_stats_inline`] on its own.
pub fn chunk_stats(x: &[f32]) -> [f32; 2] {
    chunk_stats_inline(x)
}
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::LSE_CHUNK;

    /// [`super::exp_fast`] on 8 lanes, operation for operation (`mul` then `add` where it has
    /// them, one FMA where it has `mul_add`), so every lane gets its bits.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn exp8(x: __m256) -> __m256 {
        const MAGIC: f32 = 12_582_912.0;
        // `clamp`: a NaN passes through (maxps/minps return their second operand on NaN).
        let x = _mm256_min_ps(
            _mm256_set1_ps(88.0),
            _mm256_max_ps(_mm256_set1_ps(-87.0), x),
        );
        let magic = _mm256_set1_ps(MAGIC);
        let t = _mm256_add_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            magic,
        );
        let n = _mm256_sub_ps(t, magic);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693_145_75), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
        }
        let bits = _mm256_slli_epi32(
            _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B40_0000 - 127)),
            23,
        );
        _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
    }

    /// The halving steps 8 → 4 → 2 → 1 of [`super::chunk_stats_inline`]: lane l with lane l + w.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn finish(a: __m256, e: __m256) -> [f32; 2] {
        // max(a[l + w], a[l]) is `if a[l + w] > a[l] { a[l + w] } else { a[l] }`.
        let a = _mm_max_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
        let a = _mm_max_ps(_mm_movehl_ps(a, a), a);
        let a = _mm_max_ps(_mm_shuffle_ps(a, a, 1), a);
        let e = _mm_add_ps(_mm256_castps256_ps128(e), _mm256_extractf128_ps(e, 1));
        let e = _mm_add_ps(e, _mm_movehl_ps(e, e));
        let e = _mm_add_ss(e, _mm_shuffle_ps(e, e, 1));
        [_mm_cvtss_f32(a), _mm_cvtss_f32(e)]
    }

    /// The reduction of 32 values held in four registers, `+ 0.0` first.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn reduce32(lo0: __m256, lo1: __m256, hi0: __m256, hi1: __m256) -> [f32; 2] {
        let z = _mm256_setzero_ps();
        let (lo0, lo1) = (_mm256_add_ps(lo0, z), _mm256_add_ps(lo1, z));
        let (hi0, hi1) = (_mm256_add_ps(hi0, z), _mm256_add_ps(hi1, z));
        // a[l] for l < 16 in two halves, then the step w = 8.
        let (a0, a1) = (_mm256_max_ps(hi0, lo0), _mm256_max_ps(hi1, lo1));
        let a = _mm256_max_ps(a1, a0);
        let m = _mm256_set1_ps(finish(a, z)[0]);
        let e0 = _mm256_add_ps(exp8(_mm256_sub_ps(lo0, m)), exp8(_mm256_sub_ps(hi0, m)));
        let e1 = _mm256_add_ps(exp8(_mm256_sub_ps(lo1, m)), exp8(_mm256_sub_ps(hi1, m)));
        finish(a, _mm256_add_ps(e0, e1))
    }

    /// Loads as the AVX2 kernels store (8 lanes), so the loads take their values from the stores.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn chunk_stats256(x: &[f32; LSE_CHUNK]) -> [f32; 2] {
        let p = x.as_ptr();
        reduce32(
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        )
    }

    /// [`super::log_sum_exp`] with AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn log_sum_exp256(x: &[f32]) -> f64 {
        // SAFETY: this function's features are chunk_stats256's.
        super::log_sum_exp_with(x, |c| unsafe { chunk_stats256(c) })
    }

    /// [`super::log_sum_exp`] with AVX-512.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) unsafe fn log_sum_exp512(x: &[f32]) -> f64 {
        // SAFETY: this function's features include chunk_stats512's.
        super::log_sum_exp_with(x, |c| unsafe { chunk_stats512(c) })
    }

    /// [`exp8`] on 16 lanes.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn exp16(x: __m512) -> __m512 {
        const MAGIC: f32 = 12_582_912.0;
        let x = _mm512_min_ps(
            _mm512_set1_ps(88.0),
            _mm512_max_ps(_mm512_set1_ps(-87.0), x),
        );
        let magic = _mm512_set1_ps(MAGIC);
        let t = _mm512_add_ps(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
            magic,
        );
        let n = _mm512_sub_ps(t, magic);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693_145_75), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(c));
        }
        let bits = _mm512_slli_epi32(
            _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B40_0000 - 127)),
            23,
        );
        _mm512_mul_ps(p, _mm512_castsi512_ps(bits))
    }

    /// [`reduce32`] in 16-lane registers (loads as the AVX-512 kernels store): the same steps.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn chunk_stats512(x: &[f32; LSE_CHUNK]) -> [f32; 2] {
        let z = _mm512_setzero_ps();
        let lo = _mm512_add_ps(_mm512_loadu_ps(x.as_ptr()), z);
        let hi = _mm512_add_ps(_mm512_loadu_ps(x.as_ptr().add(16)), z);
        let upper = |v: __m512| _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        // a[l] = max(hi[l], lo[l]), then the step w = 8 on its halves.
        let a16 = _mm512_max_ps(hi, lo);
        let a = _mm256_max_ps(upper(a16), _mm512_castps512_ps256(a16));
        let m = _mm512_set1_ps(finish(a, _mm256_setzero_ps())[0]);
        let e = _mm512_add_ps(exp16(_mm512_sub_ps(lo, m)), exp16(_mm512_sub_ps(hi, m)));
        finish(a, _mm256_add_ps(_mm512_castps512_ps256(e), upper(e)))
    }
}

/// ln Σ over the chunks given their stats and the largest logit `max`: each chunk's sum scaled by
/// e^{its max - max} (`exp_fast`) and added in f64, chunk c in lane c mod 16, then lane by lane.
#[inline(always)]
fn merge_chunks(max: f32, stats: impl Iterator<Item = [f32; 2]>) -> f64 {
    let mut acc = [0f64; 16];
    // Sixteen chunks at a time, so that the lanes' updates vectorise.
    let (mut ms, mut ss, mut k) = ([0f32; 16], [0f32; 16], 0);
    for [m, s] in stats {
        (ms[k], ss[k]) = (m, s);
        k += 1;
        if k == 16 {
            for l in 0..16 {
                acc[l] += ss[l] as f64 * exp_fast(ms[l] - max) as f64;
            }
            k = 0;
        }
    }
    for l in 0..k {
        acc[l] += ss[l] as f64 * exp_fast(ms[l] - max) as f64;
    }
    max as f64 + acc.iter().sum::<f64>().ln()
}

/// ln Σ e^{x_i} over a row of logits (a vocabulary of them), for log-probabilities: per chunk of
/// [`LSE_CHUNK`] logits its max and Σ e^{x - max} (`exp_fast`, ~2 ulp), then the chunks merged in
/// f64 ([`merge_chunks`]), so that every instruction set gives the same bits, and so does a product
/// that reduces its outputs chunk by chunk ([`log_sum_exp_of_chunks`]). A NaN anywhere gives NaN.
pub fn log_sum_exp(x: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    match Isa::detect().level() {
        // SAFETY: an `Isa` of this level proves the CPU has its features.
        Level::Avx512 => return unsafe { x86::log_sum_exp512(x) },
        // SAFETY: as above.
        Level::Avx2 => return unsafe { x86::log_sum_exp256(x) },
        Level::Portable => {}
    }
    log_sum_exp_with(x, |c| chunk_stats_inline(c))
}

/// [`log_sum_exp`]'s steps, whole chunks reduced by `whole`. The hand-written reductions add 0.0
/// first ([`chunk_stats_of_outputs`]); that only turns a -0 into +0, which changes no result.
#[inline(always)]
fn log_sum_exp_with(x: &[f32], whole: impl Fn(&[f32; LSE_CHUNK]) -> [f32; 2]) -> f64 {
    if x.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let stats = x
        .chunks(LSE_CHUNK)
        .map(|c| match <&[f32; LSE_CHUNK]>::try_from(c) {
            Ok(c) => whole(c),
            Err(_) => chunk_stats_inline(c),
        });
    merge_chunks(max(x), stats)
}

multiversion! {
/// [`log_sum_exp`] of a row from its chunks' [`chunk_stats_of_outputs`], in order: the same bits.
pub fn log_sum_exp_of_chunks(stats: &[[f32; 2]]) -> f64 {
    let max = stats
        .iter()
        .fold(f32::NEG_INFINITY, |m, &[v, _]| if v > m { v } else { m });
    merge_chunks(max, stats.iter().copied())
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
            // Chunk by chunk, as a product reducing its outputs does: the same bits.
            let stats: Vec<[f32; 2]> = x.chunks(LSE_CHUNK).map(chunk_stats).collect();
            assert_eq!(
                got.to_bits(),
                log_sum_exp_of_chunks(&stats).to_bits(),
                "{n}"
            );
            // The same steps in plain code (baseline features: `mul_add` is libm's exact fma):
            // the detected instruction set's version gives its bits.
            let mf = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let plain = merge_chunks(mf, x.chunks(LSE_CHUNK).map(chunk_stats_inline));
            assert_eq!(got.to_bits(), plain.to_bits(), "{n}");
        }
        assert!(log_sum_exp(&[1.0, f32::NAN]).is_nan());
        assert!(
            log_sum_exp_of_chunks(&[chunk_stats(&[1.0; 32]), chunk_stats(&[1.0, f32::NAN])])
                .is_nan()
        );
    }

    /// The hand-written chunk reduction gives the portable one's bits on the outputs `+ 0.0`, NaN,
    /// ±0, ties, huge and tiny values and a short last chunk included.
    #[test]
    fn chunk_stats_of_outputs_equal_the_plain_steps() {
        let mut cases: Vec<Vec<f32>> = (0..200)
            .map(|s| {
                data(LSE_CHUNK, s)
                    .iter()
                    .map(|v| v * (s as f32 + 1.0))
                    .collect()
            })
            .collect();
        let mut odd = vec![-0.0f32; LSE_CHUNK];
        odd[3] = -1.0;
        odd[20] = 1e30;
        odd[7] = -1e30;
        cases.push(odd.clone());
        cases.push(vec![-0.0; LSE_CHUNK]);
        cases.push(vec![-5.0; LSE_CHUNK]);
        odd[9] = f32::NAN;
        cases.push(odd);
        for x in &cases {
            let acc: &[f32; LSE_CHUNK] = x[..].try_into().unwrap();
            for cols in [LSE_CHUNK, 17] {
                let stored: Vec<f32> = x[..cols].iter().map(|v| v + 0.0).collect();
                let (a, b) = (
                    chunk_stats_of_outputs(acc, cols),
                    chunk_stats_inline(&stored),
                );
                assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits), "{cols} {x:?}");
            }
        }
        let nan: &[f32; LSE_CHUNK] = cases.last().unwrap()[..].try_into().unwrap();
        assert!(chunk_stats_of_outputs(nan, LSE_CHUNK)[1].is_nan());
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
