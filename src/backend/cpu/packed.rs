//! Matrix products against weights packed once at load into panels of 32 output columns,
//! `[n/32][k][32]`: each step over k reads 32 consecutive weights, so the FMA micro-kernels stream a
//! panel while broadcasting the inputs. The panels hold f32, f16 or bf16 ([`Elem`]); 16-bit weights
//! widen exactly to f32 as they are loaded. Every output is one f32 FMA chain over k in order, then
//! the bias is added: the same bits on every instruction set, for any batch shape, and for a 16-bit
//! matrix the same bits as the f32 product with its widened weights.

use std::cell::RefCell;

use half::{bf16, f16};

use super::huge_buf::{HugeBuf, Plain};
use super::kernels::{self, Isa, Level};
use super::pool::{parallel_for, parallel_for_contiguous, Disjoint};
use crate::config::Activation;

/// What a product does to its outputs as it stores them: add the bias, then apply the activation.
/// Fused into a decode's product, the activation runs on a panel's outputs while the core waits on
/// the weight stream, instead of in a pass of its own. A batch's products run it in one pass after
/// (see `for_panels`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub act: Option<Activation>,
}

impl<'a> Epilogue<'a> {
    /// Add `bias` (if any), nothing else.
    pub fn bias(bias: Option<&'a [f32]>) -> Self {
        Epilogue { bias, act: None }
    }

    fn check(&self, n: usize) {
        if let Some(b) = self.bias {
            assert_eq!(b.len(), n);
        }
    }

    /// `dst = act(acc + bias[j0..])`: outputs `j0..j0 + dst.len()`.
    fn store(&self, j0: usize, acc: &[f32], dst: &mut [f32]) {
        // `+ 0.0` without a bias, as with one of zeros (it turns -0 into +0).
        let bias = self
            .bias
            .map_or(&ZEROS[..dst.len()], |b| &b[j0..j0 + dst.len()]);
        for ((d, a), b) in dst.iter_mut().zip(acc).zip(bias) {
            *d = a + b;
        }
        if let Some(act) = self.act {
            kernels::activate(act, dst);
        }
    }
}

/// Output columns per panel.
pub const PANEL: usize = 32;

/// A panel's bias when there is none.
static ZEROS: [f32; PANEL] = [0.0; PANEL];

/// A panel element: how a weight is stored and widened.
pub trait Elem: Plain + Default {
    /// 0 f32, 1 f16, 2 bf16: picks the SIMD load at compile time.
    const FMT: u8;
    /// Bytes ahead of each panel stream that the decode kernel prefetches (see [`PREFETCH`]).
    const PREFETCH: usize = PREFETCH;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// `dst[i] = from_f32(src[i])`, in bulk (SIMD where the format has it).
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(s);
        }
    }
}

impl Elem for f32 {
    const FMT: u8 = 0;
    // Shorter than the 16-bit distance: an f32 stream is consumed twice as fast per step, and
    // prefetches much further ahead miss the L2 and hold the core's few fill buffers for a whole
    // memory round trip (`cargo bench --bench matvec` measures the distance).
    const PREFETCH: usize = 512;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for f16 {
    const FMT: u8 = 1;
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        #[cfg(target_arch = "x86_64")]
        if Isa::detect().level() != Level::Portable {
            // SAFETY: AVX2 or AVX-512 level implies F16C (`kernels::supported` checks it).
            return unsafe { x86::to_f16(src, dst) };
        }
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

impl Elem for bf16 {
    const FMT: u8 = 2;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Pack a row-major `(n, k)` matrix (one output per row) into panels, rounding to `T` (to nearest,
/// ties to even); the last panel is zero-padded.
pub fn pack<T: Elem>(w: &[f32], n: usize, k: usize) -> HugeBuf<T> {
    assert_eq!(w.len(), n * k);
    let mut out = HugeBuf::<T>::zeroed(n.div_ceil(PANEL) * k * PANEL);
    for (p, panel) in out.chunks_exact_mut(k * PANEL).enumerate() {
        let rows = &w[p * PANEL * k..((p + 1) * PANEL).min(n) * k];
        for (c, row) in rows.chunks_exact(k).enumerate() {
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * PANEL + c] = T::from_f32(v);
            }
        }
    }
    out
}

/// Pack a `(k, n)` matrix stored one input per row (transformers' Conv1D layout) into the same
/// panels as [`pack`], without a transposed copy: each panel's row `kk` is a slice of input row `kk`.
pub fn pack_cols<T: Elem>(w: &[f32], n: usize, k: usize) -> HugeBuf<T> {
    assert_eq!(w.len(), n * k);
    let mut out = HugeBuf::<T>::zeroed(n.div_ceil(PANEL) * k * PANEL);
    for (p, panel) in out.chunks_exact_mut(k * PANEL).enumerate() {
        let (j0, j1) = (p * PANEL, ((p + 1) * PANEL).min(n));
        for (kk, dst) in panel.chunks_exact_mut(PANEL).enumerate() {
            for (d, &v) in dst.iter_mut().zip(&w[kk * n + j0..kk * n + j1]) {
                *d = T::from_f32(v);
            }
        }
    }
    out
}

/// Output `j`'s `k` weights, widened to f32 (an embedding lookup of a tied matrix).
pub fn row<T: Elem>(wp: &[T], k: usize, j: usize, out: &mut [f32]) {
    let (p, c) = (j / PANEL, j % PANEL);
    for (kk, o) in out[..k].iter_mut().enumerate() {
        *o = wp[(p * k + kk) * PANEL + c].to_f32();
    }
}

/// The row-major `(n, k)` matrix back from its panels, widened to f32 (the tests' view; the
/// model goes through `Matrix::to_rows`).
#[cfg(test)]
pub fn unpack<T: Elem>(wp: &[T], n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0; n * k];
    for (j, r) in out.chunks_exact_mut(k).enumerate() {
        row(wp, k, j, r);
    }
    out
}

/// What a task does with one row's 32 accumulated outputs of a panel: `store(row, acc)`.
pub(crate) type Store<'s> = dyn FnMut(usize, &[f32; PANEL]) + 's;

/// What a visited product hands over for each row and panel: `visit(panel, row, acc)` (the last
/// panel's columns past `n` are padding).
pub(crate) type Visit<'v> = dyn Fn(usize, usize, &[f32; PANEL]) + Sync + 'v;

/// What [`visit_row_panels`] hands over: `visit(row, acc)`.
pub(crate) type RowVisit<'v> = dyn Fn(usize, &[f32; PANEL]) + Sync + 'v;

/// Run `panel(p, store)` for every panel, across the thread pool when the product is big enough;
/// `store(row, acc)` writes one row's 32 accumulated outputs of the panel through the epilogue.
pub(crate) fn for_panels(
    m: usize,
    n: usize,
    k: usize,
    epi: Epilogue,
    out: &mut [f32],
    panel: impl Fn(usize, &mut Store) + Sync + Send,
) {
    assert_eq!(out.len(), m * n);
    epi.check(n);
    // Rows of a batch get the activation in one parallel pass after the product: applied to each
    // row's 32 outputs of a panel inside the product, it costs more than the pass.
    let (epi, after) = match m {
        1 => (epi, None),
        _ => (Epilogue { act: None, ..epi }, epi.act),
    };
    let o = Disjoint::new(&mut *out);
    let level = Isa::detect().level();
    let store = |p: usize, i: usize, acc: &[f32; PANEL]| {
        let (j0, cols) = (p * PANEL, PANEL.min(n - p * PANEL));
        // SAFETY: each task writes only its panel's columns of `out`, which outlives the loop.
        let dst = unsafe { o.slice(i * n + j0, cols) };
        #[cfg(target_arch = "x86_64")]
        if let (Ok(dst), None) = (<&mut [f32; PANEL]>::try_from(&mut *dst), epi.act) {
            // Whole panels with wide stores: a batch's rows each write a panel's columns to
            // lines of their own, and 16-byte stores of them fill the store buffer while those
            // lines are fetched. `+ 0.0` without a bias, as in `Epilogue::store`.
            let bias = epi
                .bias
                .map_or(&ZEROS, |b| b[j0..j0 + PANEL].try_into().unwrap());
            match level {
                // SAFETY: an `Isa` of this level proves the CPU has its features.
                Level::Avx512 => return unsafe { x86::add512(acc, bias, dst) },
                // SAFETY: as above.
                Level::Avx2 => return unsafe { x86::add256(acc, bias, dst) },
                Level::Portable => {}
            }
        }
        epi.store(j0, acc, dst);
    };
    for_panels_visit(m, n, k, &store, panel);
    if let Some(act) = after {
        kernels::activation(act, out);
    }
}

/// Run `panel(p, store)` for every panel as [`for_panels`] does, handing each row's outputs to
/// `visit(p, row, acc)` instead of storing them.
pub(crate) fn for_panels_visit(
    m: usize,
    n: usize,
    k: usize,
    visit: &Visit,
    panel: impl Fn(usize, &mut Store) + Sync + Send,
) {
    let run = |p: usize| panel(p, &mut |i, acc| visit(p, i, acc));
    let panels = n.div_ceil(PANEL);
    if m * n * k < 1 << 15 {
        (0..panels).for_each(run);
    } else if m <= STREAM_ROWS {
        parallel_for_contiguous(panels, &run);
    } else {
        parallel_for(panels, &run);
    }
}

/// Rows up to which a product does too few multiplies per weight to hide the misses of weights
/// streamed from memory (batched decoding, beams): each thread then walks a contiguous share of the
/// panels, as one-row decoding does, so that the kernels that prefetch run on into their next
/// panel and memory is read in order.
const STREAM_ROWS: usize = 16;

/// One panel's columns for rows `[i0, i0 + MR)` (portable: `mul_add` is one FMA).
#[inline(always)]
fn micro_portable<const MR: usize, T: Elem>(
    x: &[f32],
    wp: &[T],
    k: usize,
    i0: usize,
    acc: &mut [[f32; PANEL]; MR],
) {
    for kk in 0..k {
        let w: [f32; PANEL] = std::array::from_fn(|c| wp[kk * PANEL + c].to_f32());
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = x[(i0 + r) * k + kk];
            for (c, av) in a.iter_mut().enumerate() {
                *av = xv.mul_add(w[c], *av);
            }
        }
    }
}

fn panel_portable<T: Elem>(
    x: &[f32],
    wp: &[T],
    k: usize,
    m: usize,
    store: &mut dyn FnMut(usize, &[f32; PANEL]),
) {
    let mut i = 0;
    while i + 4 <= m {
        let mut acc = [[0.0; PANEL]; 4];
        micro_portable::<4, T>(x, wp, k, i, &mut acc);
        for (r, a) in acc.iter().enumerate() {
            store(i + r, a);
        }
        i += 4;
    }
    for i in i..m {
        let mut acc = [[0.0; PANEL]; 1];
        micro_portable::<1, T>(x, wp, k, i, &mut acc);
        store(i, &acc[0]);
    }
}

#[cfg(target_arch = "x86_64")]
// Indexing the accumulator arrays keeps each register's role visible.
#[allow(clippy::needless_range_loop)]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{Elem, PANEL};

    /// 16 weights at `p`, widened to f32.
    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    pub(crate) unsafe fn load16<T: Elem>(p: *const T) -> __m512 {
        match T::FMT {
            0 => _mm512_loadu_ps(p as *const f32),
            1 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            _ => _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)),
                16,
            )),
        }
    }

    /// 8 weights at `p`, widened to f32.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    pub(crate) unsafe fn load8<T: Elem>(p: *const T) -> __m256 {
        match T::FMT {
            0 => _mm256_loadu_ps(p as *const f32),
            1 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            _ => _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                16,
            )),
        }
    }

    /// Ask for the panel row `T::PREFETCH` bytes ahead of `w` (every line of it). The first row
    /// block of a panel streams the panel from memory: with few rows (batched decoding, a beam) the
    /// FMAs per weight are too few to hide the misses, and the hardware prefetcher stops at page
    /// boundaries. A hint: it may point past the buffer and never faults.
    const MICRO_AHEAD: usize = 48;

    #[inline(always)]
    unsafe fn prefetch_row<T: Elem>(w: *const T) {
        let row = PANEL * size_of::<T>();
        for l in 0..row / 64 {
            let ahead = (w as *const i8).wrapping_add(MICRO_AHEAD * row + 64 * l);
            _mm_prefetch::<_MM_HINT_T0>(ahead);
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    unsafe fn micro512<const MR: usize, T: Elem, const PF: bool>(
        x: *const f32,
        wp: *const T,
        k: usize,
        out: &mut [[f32; PANEL]; MR],
    ) {
        let mut lo = [_mm512_setzero_ps(); MR];
        let mut hi = [_mm512_setzero_ps(); MR];
        for kk in 0..k {
            if PF {
                prefetch_row(wp.add(kk * PANEL));
            }
            let w0 = load16(wp.add(kk * PANEL));
            let w1 = load16(wp.add(kk * PANEL + 16));
            for r in 0..MR {
                let b = _mm512_set1_ps(*x.add(r * k + kk));
                lo[r] = _mm512_fmadd_ps(b, w0, lo[r]);
                hi[r] = _mm512_fmadd_ps(b, w1, hi[r]);
            }
        }
        for r in 0..MR {
            _mm512_storeu_ps(out[r].as_mut_ptr(), lo[r]);
            _mm512_storeu_ps(out[r].as_mut_ptr().add(16), hi[r]);
        }
    }

    /// AVX2 has 16 registers: the panel's two halves of 16 outputs run one after the other, each
    /// `MR` rows × 16 outputs (12 accumulators for 6 rows), so that each weight load serves 6 rows
    /// and half as many weight bytes per FMA come from the L2 as with a whole panel of 3 rows.
    /// Each output's FMA chain runs over k in order from zero, as in every other kernel.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn micro256<const MR: usize, T: Elem, const PF: bool>(
        x: *const f32,
        wp: *const T,
        k: usize,
        out: &mut [[f32; PANEL]; MR],
    ) {
        for half in 0..2 {
            let w = wp.add(16 * half);
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            for kk in 0..k {
                // The first half's pass brings in whole rows of the panel, the second's too.
                if PF && half == 0 {
                    prefetch_row(wp.add(kk * PANEL));
                }
                let w0 = load8(w.add(kk * PANEL));
                let w1 = load8(w.add(kk * PANEL + 8));
                for r in 0..MR {
                    let b = _mm256_set1_ps(*x.add(r * k + kk));
                    acc[r][0] = _mm256_fmadd_ps(b, w0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(b, w1, acc[r][1]);
                }
            }
            for r in 0..MR {
                let o = out[r].as_mut_ptr().add(16 * half);
                _mm256_storeu_ps(o, acc[r][0]);
                _mm256_storeu_ps(o.add(8), acc[r][1]);
            }
        }
    }

    /// One row against `G` adjacent panels (panel `g` starts `g · k · 32` weights after the first):
    /// `2G` independent FMA chains instead of two, so that FMA latency does not bound the weight
    /// stream when decoding. Each output's chain is the same as in [`micro512`].
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn group512<const G: usize, T: Elem>(
        x: &[f32],
        wp: *const T,
        k: usize,
    ) -> [[f32; PANEL]; G] {
        let mut acc = [[_mm512_setzero_ps(); 2]; G];
        // Lines of weights per step over k (2 for f32, 1 for 16-bit).
        let lines = PANEL * size_of::<T>() / 64;
        for kk in 0..k {
            let b = _mm512_set1_ps(*x.get_unchecked(kk));
            for g in 0..G {
                let w = wp.add((g * k + kk) * PANEL);
                for l in 0..lines {
                    // `wrapping_add`: the hint may point past the buffer (it never faults). To L2
                    // (T1), which streams these products faster than T0 (q8 keeps T0).
                    let ahead = (w as *const i8).wrapping_add(T::PREFETCH + 64 * l);
                    _mm_prefetch::<_MM_HINT_T1>(ahead);
                }
                acc[g][0] = _mm512_fmadd_ps(b, load16(w), acc[g][0]);
                acc[g][1] = _mm512_fmadd_ps(b, load16(w.add(16)), acc[g][1]);
            }
        }
        let mut out = [[0f32; PANEL]; G];
        for g in 0..G {
            _mm512_storeu_ps(out[g].as_mut_ptr(), acc[g][0]);
            _mm512_storeu_ps(out[g].as_mut_ptr().add(16), acc[g][1]);
        }
        out
    }

    /// One row against `G` adjacent panels with AVX2, as [`group512`] does: `4G` independent FMA
    /// chains and the weight stream prefetched. Each output's chain is the same as in [`micro256`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group256<const G: usize, T: Elem>(
        x: &[f32],
        wp: *const T,
        k: usize,
    ) -> [[f32; PANEL]; G] {
        let mut acc = [[_mm256_setzero_ps(); 4]; G];
        let lines = PANEL * size_of::<T>() / 64;
        for kk in 0..k {
            let b = _mm256_set1_ps(*x.get_unchecked(kk));
            for g in 0..G {
                let w = wp.add((g * k + kk) * PANEL);
                for l in 0..lines {
                    // As in `group512`.
                    let ahead = (w as *const i8).wrapping_add(T::PREFETCH + 64 * l);
                    _mm_prefetch::<_MM_HINT_T1>(ahead);
                }
                for q in 0..4 {
                    acc[g][q] = _mm256_fmadd_ps(b, load8(w.add(8 * q)), acc[g][q]);
                }
            }
        }
        let mut out = [[0f32; PANEL]; G];
        for g in 0..G {
            for q in 0..4 {
                _mm256_storeu_ps(out[g].as_mut_ptr().add(8 * q), acc[g][q]);
            }
        }
        out
    }

    /// `dst[i] = f16(src[i])`, rounded to nearest even as `f16::from_f32` rounds: `half` converts
    /// through a call per 8 values, which costs the KV cache's stores of a prompt a few percent.
    #[target_feature(enable = "avx2,f16c")]
    pub(crate) unsafe fn to_f16(src: &[f32], dst: &mut [half::f16]) {
        assert_eq!(src.len(), dst.len());
        let n8 = src.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            let h =
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.as_ptr().add(i)));
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
        }
        for (d, &v) in dst[n8..].iter_mut().zip(&src[n8..]) {
            *d = half::f16::from_f32(v);
        }
    }

    /// `dst = acc + bias` on a whole panel.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn add512(acc: &[f32; PANEL], bias: &[f32; PANEL], dst: &mut [f32; PANEL]) {
        for h in [0, 16] {
            let v = _mm512_add_ps(
                _mm512_loadu_ps(acc.as_ptr().add(h)),
                _mm512_loadu_ps(bias.as_ptr().add(h)),
            );
            _mm512_storeu_ps(dst.as_mut_ptr().add(h), v);
        }
    }

    /// `dst = acc + bias` on a whole panel.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn add256(acc: &[f32; PANEL], bias: &[f32; PANEL], dst: &mut [f32; PANEL]) {
        for h in [0, 8, 16, 24] {
            let v = _mm256_add_ps(
                _mm256_loadu_ps(acc.as_ptr().add(h)),
                _mm256_loadu_ps(bias.as_ptr().add(h)),
            );
            _mm256_storeu_ps(dst.as_mut_ptr().add(h), v);
        }
    }

    /// Widen a panel (a multiple of 32 weights) into `dst`.
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn widen512<T: Elem>(src: &[T], dst: &mut [f32]) {
        assert!(src.len() == dst.len() && src.len().is_multiple_of(16));
        for i in (0..src.len()).step_by(16) {
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), load16(src.as_ptr().add(i)));
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen256<T: Elem>(src: &[T], dst: &mut [f32]) {
        assert!(src.len() == dst.len() && src.len().is_multiple_of(8));
        for i in (0..src.len()).step_by(8) {
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), load8(src.as_ptr().add(i)));
        }
    }

    /// A driver running all rows of `x` against one panel, in blocks of at most `MR` rows. A
    /// remainder that would leave a block of only a few rows is split into two nearly equal blocks
    /// instead (8 rows with AVX2: 4 + 4, not 6 + 2): a block of r rows has 2r independent FMA chains
    /// per pass, and below about 8 chains the FMA latency, not its throughput, bounds the pass.
    macro_rules! rows {
        ($name:ident, $features:literal, $micro:ident, $mr:literal, [$($r:literal),+]) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name<T: Elem>(
                x: &[f32],
                wp: &[T],
                k: usize,
                m: usize,
                store: &mut dyn FnMut(usize, &[f32; PANEL]),
            ) {
                let mut i = 0;
                let (xp, w) = (x.as_ptr(), wp.as_ptr());
                while i < m {
                    let rem = m - i;
                    let r = if rem >= 2 * $mr || rem == $mr {
                        $mr
                    } else if rem > $mr {
                        rem.div_ceil(2)
                    } else {
                        rem
                    };
                    // The first block prefetches the panel (see `prefetch_row`); the later ones
                    // find it in cache.
                    match r {
                        $($r => {
                            let mut acc = [[0.0; PANEL]; $r];
                            if i == 0 {
                                $micro::<$r, T, true>(xp, w, k, &mut acc);
                            } else {
                                $micro::<$r, T, false>(xp.add(i * k), w, k, &mut acc);
                            }
                            for (j, a) in acc.iter().enumerate() {
                                store(i + j, a);
                            }
                        })+
                        _ => unreachable!("blocks have 1 to {} rows", $mr),
                    }
                    i += r;
                }
            }
        };
    }

    // 8 × 32 with AVX-512 (16 of 32 registers accumulate) and 6 × 16 twice with AVX2 (12 of 16).
    rows!(
        panel512,
        "avx512f,f16c",
        micro512,
        8,
        [1, 2, 3, 4, 5, 6, 7, 8]
    );
    rows!(panel256, "avx2,fma,f16c", micro256, 6, [1, 2, 3, 4, 5, 6]);
}

/// Rows from which a 16-bit panel is widened once into f32 scratch rather than at every load: the
/// conversion is then paid once per panel instead of once per group of rows. Not on AVX2: its
/// micro-kernel converts 16 weights per 12 FMAs, which its ports absorb, while the scratch (up to
/// 512 KiB a panel) competes with the rows for L2 (gpt2-medium f16 prompts ran 20% slower widened).
const WIDEN_ROWS: usize = 12;

thread_local! {
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn run_panel<T: Elem>(
    isa: Isa,
    x: &[f32],
    panel: &[T],
    k: usize,
    m: usize,
    store: &mut dyn FnMut(usize, &[f32; PANEL]),
) {
    match isa.level() {
        // SAFETY: an `Isa` of this level proves the CPU has its features; the kernels bound their
        // accesses by the slices' lengths.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::panel512(x, panel, k, m, store) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::panel256(x, panel, k, m, store) },
        Level::Portable => panel_portable(x, panel, k, m, store),
    }
}

/// [`matmul_with`] on the detected instruction set.
#[cfg(test)]
fn matmul<T: Elem>(x: &[f32], wp: &[T], epi: Epilogue, k: usize, n: usize, out: &mut [f32]) {
    matmul_with(Isa::detect(), x, wp, epi, k, n, out)
}

/// `out (m, n) = epi(x (m, k) · Wᵀ)` with `W` packed by [`pack`]; split over panels across threads.
pub fn matmul_with<T: Elem>(
    isa: Isa,
    x: &[f32],
    wp: &[T],
    epi: Epilogue,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    assert!(k > 0 && x.len().is_multiple_of(k));
    let m = x.len() / k;
    assert_eq!(wp.len(), n.div_ceil(PANEL) * k * PANEL);
    #[cfg(target_arch = "x86_64")]
    if m == 1 && isa.level() == Level::Avx512 {
        // SAFETY: an `Isa` of level Avx512 proves the features.
        return unsafe { gemv_grouped(x, wp, epi, k, n, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if m == 1 && isa.level() == Level::Avx2 {
        // SAFETY: an `Isa` of level Avx2 proves the features.
        return unsafe { gemv_grouped256(x, wp, epi, k, n, out) };
    }
    for_panels(m, n, k, epi, out, panel_task(isa, x, wp, k, m));
}

/// `visit(panel, row, acc)` with each row's 32 outputs of each panel of `x (m, k) · Wᵀ`, `W` packed
/// by [`pack`] (no bias): the accumulators bit for bit as [`matmul_with`] gets them.
pub fn matmul_visit<T: Elem>(isa: Isa, x: &[f32], wp: &[T], k: usize, n: usize, visit: &Visit) {
    assert!(k > 0 && x.len().is_multiple_of(k));
    let m = x.len() / k;
    assert_eq!(wp.len(), n.div_ceil(PANEL) * k * PANEL);
    for_panels_visit(m, n, k, visit, panel_task(isa, x, wp, k, m));
}

/// `visit(row, acc)` with each row's 32 outputs of one panel of `x (m, k) · Wᵀ`, `panel(row)`,
/// rows across the pool: the accumulators [`matmul_visit`] hands over for that (panel, row), bit
/// for bit (each output is one FMA chain over its row, whatever else is computed with it).
pub fn visit_row_panels<T: Elem>(
    isa: Isa,
    x: &[f32],
    wp: &[T],
    k: usize,
    n: usize,
    panel: &(dyn Fn(usize) -> usize + Sync),
    visit: &RowVisit,
) {
    assert!(k > 0 && x.len().is_multiple_of(k));
    let panels = n.div_ceil(PANEL);
    assert_eq!(wp.len(), panels * k * PANEL);
    parallel_for(x.len() / k, &|i| {
        let p = panel(i);
        assert!(p < panels);
        let w = &wp[p * k * PANEL..(p + 1) * k * PANEL];
        run_panel(isa, &x[i * k..(i + 1) * k], w, k, 1, &mut |_, acc| {
            visit(i, acc)
        });
    });
}

/// One panel's task of a many-row product: its rows through the kernel, 16-bit panels widened
/// first where that pays.
fn panel_task<'a, T: Elem>(
    isa: Isa,
    x: &'a [f32],
    wp: &'a [T],
    k: usize,
    m: usize,
) -> impl Fn(usize, &mut Store) + Sync + Send + 'a {
    move |p, store| {
        let panel = &wp[p * k * PANEL..(p + 1) * k * PANEL];
        if T::FMT == 0 || m < WIDEN_ROWS || isa.level() == Level::Avx2 {
            return run_panel(isa, x, panel, k, m, store);
        }
        WIDE.with(|w| {
            // A task stolen while this one waits cannot reach here: panels do not nest.
            let mut wide = w.borrow_mut();
            wide.resize(panel.len(), 0.0);
            match isa.level() {
                // SAFETY: an `Isa` of this level proves the CPU has its features; `wide` was sized
                // to the panel.
                #[cfg(target_arch = "x86_64")]
                Level::Avx512 => unsafe { x86::widen512(panel, &mut wide) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 => unsafe { x86::widen256(panel, &mut wide) },
                Level::Portable => {
                    for (d, v) in wide.iter_mut().zip(panel) {
                        *d = v.to_f32();
                    }
                }
            }
            run_panel(isa, x, &wide, k, m, store);
        })
    }
}

/// Bytes ahead of each weight stream that the decode kernels prefetch (16-bit and q8 panels; f32
/// has its own, [`Elem::PREFETCH`]): the hardware prefetcher stops at 4 KiB page boundaries and
/// keeps too few lines in flight for two cores to saturate memory. Prefetching past a panel's end
/// is harmless (a hint; it never faults).
pub(crate) const PREFETCH: usize = 1536;

/// Panels per task when decoding one row (16-bit and f32 panels; q8 has its own).
pub(crate) const GEMV_GROUP: usize = 4;

/// One row (decoding): tasks of `G` adjacent panels, whose outputs `group(p0)` gives
/// (more independent accumulator chains than one panel has, so latency does not bound the weight
/// stream); leftover panels one by one through `one(p)`. The epilogue runs as the outputs are stored.
pub(crate) fn for_panel_groups<const G: usize>(
    n: usize,
    epi: Epilogue,
    out: &mut [f32],
    group: impl Fn(usize) -> [[f32; PANEL]; G] + Sync,
    one: impl Fn(usize) -> [f32; PANEL] + Sync,
) {
    assert_eq!(out.len(), n);
    epi.check(n);
    let panels = n.div_ceil(PANEL);
    let o = Disjoint::new(out);
    let put = |p: usize, acc: &[f32; PANEL]| {
        let (j0, cols) = (p * PANEL, PANEL.min(n - p * PANEL));
        // SAFETY: each task writes only its panels' columns of `out`, which outlives the loop.
        epi.store(j0, acc, unsafe { o.slice(j0, cols) });
    };
    parallel_for_contiguous(panels.div_ceil(G), &|t| {
        let p0 = t * G;
        if p0 + G <= panels {
            for (g, acc) in group(p0).iter().enumerate() {
                put(p0 + g, acc);
            }
        } else {
            for p in p0..panels {
                put(p, &one(p));
            }
        }
    });
}

/// Panels per task when decoding one row with AVX2: two panels' 8 accumulators leave AVX2's 16
/// registers room for the broadcast and the loads.
const GEMV_GROUP_AVX2: usize = 2;

/// One row on AVX2 through [`x86::group256`].
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (an `Isa` of level `Avx2` or above proves it).
#[cfg(target_arch = "x86_64")]
unsafe fn gemv_grouped256<T: Elem>(
    x: &[f32],
    wp: &[T],
    epi: Epilogue,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    let panel = |p: usize| &wp[p * k * PANEL..(p + 1) * k * PANEL];
    for_panel_groups(
        n,
        epi,
        out,
        // SAFETY: the caller promised the features; `panel` bounds-checks the group's first panel
        // and `for_panel_groups` hands out only groups that lie wholly inside the matrix.
        |p0| unsafe { x86::group256::<GEMV_GROUP_AVX2, T>(x, panel(p0).as_ptr(), k) },
        // SAFETY: as above, one panel.
        |p| unsafe { x86::group256::<1, T>(x, panel(p).as_ptr(), k) }[0],
    );
}

/// One row on AVX-512 through [`x86::group512`].
///
/// # Safety
/// The CPU has AVX-512 F and VL, and F16C (an `Isa` of level `Avx512` proves it).
#[cfg(target_arch = "x86_64")]
unsafe fn gemv_grouped<T: Elem>(
    x: &[f32],
    wp: &[T],
    epi: Epilogue,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    let panel = |p: usize| &wp[p * k * PANEL..(p + 1) * k * PANEL];
    for_panel_groups(
        n,
        epi,
        out,
        // SAFETY: the caller promised the features; `panel` bounds-checks the group's first panel
        // and `for_panel_groups` hands out only groups that lie wholly inside the matrix.
        |p0| unsafe { x86::group512::<GEMV_GROUP, T>(x, panel(p0).as_ptr(), k) },
        |p| {
            let mut acc = [0.0; PANEL];
            // SAFETY: the caller promised the features; the panel is a checked slice.
            unsafe { x86::panel512(x, panel(p), k, 1, &mut |_, a| acc = *a) };
            acc
        },
    );
}

#[cfg(test)]
mod tests {
    use super::super::{reference, test_data as data};
    use super::*;

    #[test]
    fn packing_round_trips() {
        let w = data(70 * 9, 1);
        assert_eq!(unpack(&pack::<f32>(&w, 70, 9), 70, 9), w);
        // 70 = 2 panels + 6 columns: the last panel's other 26 columns are zero padding.
        let last = &pack::<f32>(&w, 70, 9)[2 * 9 * PANEL..];
        assert!(last
            .chunks_exact(PANEL)
            .all(|c| c[6..].iter().all(|&v| v == 0.0)));
        let h = unpack(&pack::<f16>(&w, 70, 9), 70, 9);
        assert!(w.iter().zip(&h).all(|(a, b)| (a - b).abs() <= 1e-3));
        let mut one = vec![0.0; 9];
        row(&pack::<bf16>(&w, 70, 9), 9, 33, &mut one);
        assert!(one
            .iter()
            .zip(&w[33 * 9..34 * 9])
            .all(|(a, b)| (a - b).abs() <= 4e-3));
    }

    /// Every ISA gives the bits of the first one; each row alone gives its bits inside the batch;
    /// and all are within rounding of the scalar reference on the widened weights.
    fn check<T: Elem>() {
        for &(m, k, n) in &[
            (1, 768, 2304),
            // Decode groups of panels and a partial last panel.
            (1, 100, 330),
            (5, 37, 13),
            (7, 64, 96),
            // Row blocks split in two (AVX2: 8 = 4 + 4, 10 = 5 + 5; AVX-512: 10 = 5 + 5).
            (8, 40, 64),
            (10, 33, 40),
            (13, 129, 33),
            (128, 96, 200),
            (3, 1, 2),
        ] {
            let (x, w, b) = (data(m * k, 2), data(n * k, 3), data(n, 4));
            let wp = pack::<T>(&w, n, k);
            let mut want = vec![0.0; m * n];
            reference::matmul(&x, &unpack(&wp, n, k), Some(&b), k, &mut want);
            let mut first: Option<Vec<f32>> = None;
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; m * n];
                matmul_with(isa, &x, &wp, Epilogue::bias(Some(&b)), k, n, &mut got);
                let d = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(d < 1e-4 * (k as f32).sqrt(), "{isa:?} {m}x{k}x{n}: {d}");
                if let Some(f) = &first {
                    assert!(
                        f.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?} {m}x{k}x{n}"
                    );
                }
                first = Some(got);
            }
            let mut all = vec![0.0; m * n];
            matmul(&x, &wp, Epilogue::bias(Some(&b)), k, n, &mut all);
            for i in 0..m {
                let mut one = vec![0.0; n];
                matmul(
                    &x[i * k..(i + 1) * k],
                    &wp,
                    Epilogue::bias(Some(&b)),
                    k,
                    n,
                    &mut one,
                );
                assert_eq!(one, all[i * n..(i + 1) * n], "row {i} of {m}x{k}x{n}");
            }
        }
    }

    #[test]
    fn f32_panels_match_reference_with_identical_bits_on_every_isa() {
        check::<f32>();
    }

    #[test]
    fn f16_panels_match_reference_with_identical_bits_on_every_isa() {
        check::<f16>();
    }

    #[test]
    fn bf16_panels_match_reference_with_identical_bits_on_every_isa() {
        check::<bf16>();
    }

    /// The F16C conversion rounds as `f16::from_f32` does: ties, subnormals, overflow, ±0, ±∞.
    #[test]
    fn bulk_f16_conversion_equals_the_scalar_one() {
        let mut src: Vec<f32> = data(1003, 9).iter().map(|v| v * 70000.0).collect();
        src.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e-7,
            -3e-8,
            65520.0,
            65519.0,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            f32::MIN_POSITIVE,
        ]);
        let mut got = vec![f16::ZERO; src.len()];
        f16::from_f32_slice(&src, &mut got);
        for (g, &s) in got.iter().zip(&src) {
            assert_eq!(g.to_bits(), f16::from_f32(s).to_bits(), "{s}");
        }
    }

    #[test]
    fn a_16_bit_product_equals_the_f32_product_of_its_widened_weights() {
        let (m, k, n) = (20, 70, 45);
        let (x, w) = (data(m * k, 5), data(n * k, 6));
        let wp = pack::<bf16>(&w, n, k);
        let wide = pack::<f32>(&unpack(&wp, n, k), n, k);
        let (mut a, mut b) = (vec![0.0; m * n], vec![0.0; m * n]);
        matmul(&x, &wp, Epilogue::default(), k, n, &mut a);
        matmul(&x, &wide, Epilogue::default(), k, n, &mut b);
        assert_eq!(a, b);
    }
}
