//! Log-sum-exp of a row of logits, in a fixed chunked order so that a product reducing its
//! outputs panel by panel ([`chunk_stats_of_outputs`]) gives the very bits of [`log_sum_exp`] over
//! the stored row, on every instruction set.

use super::simd::{exp_fast, max, multiversion, Isa, Level};

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

/// [`chunk_stats_inline`] with what token diagnostics need besides: `[max, Σ e^{x - max},
/// Σ e^{x - max}·(x - max)]` (the first two the bits of [`chunk_stats_inline`]; the third by the
/// same lanes and halvings, each lane's term `e_lo·d_lo + e_hi·d_hi` as a multiply, a multiply and
/// an add), and how many of the chunk's values are strictly above `target`.
#[inline(always)]
fn chunk_diag_inline(x: &[f32], target: f32) -> ([f32; 3], u32) {
    let above = x.iter().filter(|&&v| v > target).count() as u32;
    if x.len() != LSE_CHUNK {
        let m = x
            .iter()
            .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
        let (mut s, mut t) = (0.0f32, 0.0f32);
        for &v in x {
            let (d, e) = (v - m, exp_fast(v - m));
            s += e;
            t += e * d;
        }
        return ([m, s, t], above);
    }
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
    let (mut e, mut t) = ([0f32; 16], [0f32; 16]);
    for l in 0..16 {
        let (dl, dh) = (lo[l] - m, hi[l] - m);
        let (el, eh) = (exp_fast(dl), exp_fast(dh));
        e[l] = el + eh;
        t[l] = el * dl + eh * dh;
    }
    for w in [8, 4, 2, 1] {
        for l in 0..w {
            e[l] += e[l + w];
            t[l] += t[l + w];
        }
    }
    ([m, e[0], t[0]], above)
}

/// [`chunk_diag_inline`] of `acc[..cols] + 0.0`, as [`chunk_stats_of_outputs`] reduces a product's
/// outputs (a whole chunk by a hand-written reduction: the same steps, the same bits; its max and
/// sum are [`chunk_stats_of_outputs`]'s). `cols` ≤ [`LSE_CHUNK`].
pub fn chunk_diag_of_outputs(acc: &[f32; LSE_CHUNK], cols: usize, target: f32) -> ([f32; 3], u32) {
    #[cfg(target_arch = "x86_64")]
    if cols == LSE_CHUNK {
        match Isa::detect().level() {
            // SAFETY: an `Isa` of this level proves the CPU has its features.
            Level::Avx512 => return unsafe { x86::chunk_diag512(acc, target) },
            // SAFETY: as above.
            Level::Avx2 => return unsafe { x86::chunk_diag256(acc, target) },
            Level::Portable => {}
        }
    }
    let mut x = [0f32; LSE_CHUNK];
    for (d, a) in x.iter_mut().zip(&acc[..cols]) {
        *d = a + 0.0;
    }
    chunk_diag_inline(&x[..cols], target)
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

    /// How many of 8 lanes are strictly above `t` (false for a NaN).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn above8(v: __m256, t: __m256) -> u32 {
        (_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(v, t)) as u32).count_ones()
    }

    /// [`super::chunk_diag_inline`] of 32 values (loads as the AVX2 kernels store): [`reduce32`]'s
    /// steps, and the third sum by the same lanes and halvings.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn chunk_diag256(x: &[f32; LSE_CHUNK], target: f32) -> ([f32; 3], u32) {
        let p = x.as_ptr();
        let z = _mm256_setzero_ps();
        let (lo0, lo1) = (
            _mm256_add_ps(_mm256_loadu_ps(p), z),
            _mm256_add_ps(_mm256_loadu_ps(p.add(8)), z),
        );
        let (hi0, hi1) = (
            _mm256_add_ps(_mm256_loadu_ps(p.add(16)), z),
            _mm256_add_ps(_mm256_loadu_ps(p.add(24)), z),
        );
        let tv = _mm256_set1_ps(target);
        let above = above8(lo0, tv) + above8(lo1, tv) + above8(hi0, tv) + above8(hi1, tv);
        let (a0, a1) = (_mm256_max_ps(hi0, lo0), _mm256_max_ps(hi1, lo1));
        let a = _mm256_max_ps(a1, a0);
        let m = _mm256_set1_ps(finish(a, z)[0]);
        let (dl0, dl1) = (_mm256_sub_ps(lo0, m), _mm256_sub_ps(lo1, m));
        let (dh0, dh1) = (_mm256_sub_ps(hi0, m), _mm256_sub_ps(hi1, m));
        let (el0, el1, eh0, eh1) = (exp8(dl0), exp8(dl1), exp8(dh0), exp8(dh1));
        let e = _mm256_add_ps(_mm256_add_ps(el0, eh0), _mm256_add_ps(el1, eh1));
        let term = |el, dl, eh, dh| _mm256_add_ps(_mm256_mul_ps(el, dl), _mm256_mul_ps(eh, dh));
        let t = _mm256_add_ps(term(el0, dl0, eh0, dh0), term(el1, dl1, eh1, dh1));
        let [m, s] = finish(a, e);
        ([m, s, finish(a, t)[1]], above)
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

    /// [`chunk_diag256`] in 16-lane registers (loads as the AVX-512 kernels store): the same steps.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn chunk_diag512(x: &[f32; LSE_CHUNK], target: f32) -> ([f32; 3], u32) {
        let z = _mm512_setzero_ps();
        let lo = _mm512_add_ps(_mm512_loadu_ps(x.as_ptr()), z);
        let hi = _mm512_add_ps(_mm512_loadu_ps(x.as_ptr().add(16)), z);
        let tv = _mm512_set1_ps(target);
        let above = (_mm512_cmp_ps_mask::<_CMP_GT_OQ>(lo, tv) as u32).count_ones()
            + (_mm512_cmp_ps_mask::<_CMP_GT_OQ>(hi, tv) as u32).count_ones();
        let upper = |v: __m512| _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        let a16 = _mm512_max_ps(hi, lo);
        let a = _mm256_max_ps(upper(a16), _mm512_castps512_ps256(a16));
        let m = _mm512_set1_ps(finish(a, _mm256_setzero_ps())[0]);
        let (dl, dh) = (_mm512_sub_ps(lo, m), _mm512_sub_ps(hi, m));
        let (el, eh) = (exp16(dl), exp16(dh));
        let e = _mm512_add_ps(el, eh);
        let t = _mm512_add_ps(_mm512_mul_ps(el, dl), _mm512_mul_ps(eh, dh));
        let half = |v: __m512| _mm256_add_ps(_mm512_castps512_ps256(v), upper(v));
        let [m, s] = finish(a, half(e));
        ([m, s, finish(a, half(t))[1]], above)
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

/// One chunk's terms of Z and A in [`lse_entropy_of_chunks`] (a function, not a closure, so that
/// it is inlined into the caller's target features).
#[inline(always)]
fn add_chunk(z: &mut f64, a: &mut f64, max: f32, [m, s, t]: [f32; 3]) {
    let f = exp_fast(m - max) as f64;
    *z += s as f64 * f;
    *a += (t as f64 + (m as f64 - max as f64) * s as f64) * f;
}

multiversion! {
/// [`log_sum_exp_of_chunks`] (the same bits) and the entropy H = -Σ p_i ln p_i of softmax over
/// the row, in nats, from its chunks' [`chunk_diag_of_outputs`] in order: with M the row's max,
/// each chunk's sums scaled by e^{its max - M} (`exp_fast`, as [`merge_chunks`] scales them) and
/// added in f64 lanes, Z = Σ e^{x - M} and A = Σ e^{x - M}·(x - M), and H = ln Z - A / Z (the
/// log-sum-exp minus the mean logit, both taken from M, so nothing large cancels). A NaN anywhere
/// gives NaN.
pub fn lse_entropy_of_chunks(stats: &[[f32; 3]]) -> [f64; 2] {
    let max = stats
        .iter()
        .fold(f32::NEG_INFINITY, |m, &[v, ..]| if v > m { v } else { m });
    // Z lane by lane as `merge_chunks` sums it (the same terms in the same order: its bits), and
    // A beside it with the same factors.
    let (mut z, mut a) = ([0f64; 16], [0f64; 16]);
    let groups = stats.chunks_exact(16);
    let rest = groups.remainder();
    for g in groups {
        for l in 0..16 {
            add_chunk(&mut z[l], &mut a[l], max, g[l]);
        }
    }
    for (l, &c) in rest.iter().enumerate() {
        add_chunk(&mut z[l], &mut a[l], max, c);
    }
    let (z, a) = (z.iter().sum::<f64>(), a.iter().sum::<f64>());
    [max as f64 + z.ln(), z.ln() - a / z]
}
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    pub(crate) fn data(n: usize, seed: u64) -> Vec<f32> {
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

    /// The diagnostics' chunk reduction: the hand-written one gives the plain steps' bits, its max
    /// and sum are [`chunk_stats_of_outputs`]'s, and its count is the plain count of values above
    /// the target (NaN, ±0, ties with the target, huge and tiny values, a short chunk included).
    #[test]
    fn chunk_diag_of_outputs_equal_the_plain_steps() {
        let mut cases: Vec<Vec<f32>> = (0..200)
            .map(|s| {
                data(LSE_CHUNK, s + 1000)
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
        cases.push(vec![-5.0; LSE_CHUNK]);
        odd[9] = f32::NAN;
        cases.push(odd);
        for x in &cases {
            let acc: &[f32; LSE_CHUNK] = x[..].try_into().unwrap();
            for cols in [LSE_CHUNK, 17] {
                let stored: Vec<f32> = x[..cols].iter().map(|v| v + 0.0).collect();
                for target in [x[0], x[5], x[20], 0.0, -0.0, f32::NEG_INFINITY, f32::NAN] {
                    let (got, above) = chunk_diag_of_outputs(acc, cols, target);
                    let (want, n) = chunk_diag_inline(&stored, target);
                    assert_eq!(
                        got.map(f32::to_bits),
                        want.map(f32::to_bits),
                        "{cols} {x:?}"
                    );
                    let lse = chunk_stats_of_outputs(acc, cols);
                    assert_eq!([got[0], got[1]].map(f32::to_bits), lse.map(f32::to_bits));
                    let count = stored.iter().filter(|&&v| v > target).count() as u32;
                    assert_eq!((above, n), (count, count), "{cols} {target} {x:?}");
                }
            }
        }
    }

    /// The entropy from the chunks is within 1e-6 nats of the f64 entropy of f64 exponentials:
    /// spread, peaked and uniform rows, a short last chunk.
    #[test]
    fn entropy_of_chunks_is_accurate() {
        let peaked: Vec<f32> = data(50257, 3)
            .iter()
            .enumerate()
            .map(|(i, v)| if i == 777 { 25.0 } else { v * 4.0 })
            .collect();
        let rows = [
            data(50257, 9).iter().map(|v| v * 8.0).collect(),
            data(33, 4).iter().map(|v| v * 30.0).collect(),
            data(5, 5),
            vec![0.0; 50257],
            peaked,
        ];
        for x in &rows {
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let want = -e.iter().map(|p| p / z * (p / z).ln()).sum::<f64>();
            let stats: Vec<[f32; 3]> = x
                .chunks(LSE_CHUNK)
                .map(|c| chunk_diag_inline(c, 0.0).0)
                .collect();
            let [lse, got] = lse_entropy_of_chunks(&stats);
            assert!((got - want).abs() < 1e-6, "{}: {got} vs {want}", x.len());
            assert_eq!(lse.to_bits(), log_sum_exp(x).to_bits());
        }
        let uniform = lse_entropy_of_chunks(&[chunk_diag_inline(&[0.0; 32], 0.0).0]);
        assert!((uniform[1] - 32f64.ln()).abs() < 1e-6);
        assert!(lse_entropy_of_chunks(&[[1.0, 1.0, f32::NAN]])[1].is_nan());
    }
}
