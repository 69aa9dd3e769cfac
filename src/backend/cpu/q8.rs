//! 8-bit weights: blocks of 32 consecutive inputs of one output share an f16 scale (8.5 bits per
//! weight, llama.cpp's q8_0). Products quantize the activations the same way (one f32 scale per
//! block of 32) and sum each block exactly in integers, then accumulate `isum · (d_w · d_x)` in f32
//! block by block: every instruction set gives the same bits as the scalar reference
//! (`reference::matmul_q8`).
//!
//! Layout, per panel of 32 outputs and block of 32 inputs: 8 groups of 4 inputs, each `[32 outputs][4
//! inputs]` bytes (one 32-bit lane per output, the shape of VNNI's `vpdpbusd`), stored as `q + 128`
//! so that the weights are the unsigned operand; then the block's 32 f16 scales. Scales sit right
//! after their codes, so that decoding reads each panel as one sequential stream (a separate
//! stream of scales per panel cost about a tenth of the read rate).

use std::cell::RefCell;

use half::f16;

use super::huge_buf::HugeBuf;
use super::kernels::{Isa, Level};
use super::packed::{
    for_panel_groups, for_panels, for_panels_visit, Epilogue, RowVisit, Store, Visit, PANEL,
};
use super::pool::{self, parallel_for, Disjoint};

/// Inputs per block (one scale).
pub const BLOCK: usize = 32;
/// Inputs per 32-bit lane of a VNNI dot product.
const GROUP: usize = 4;
/// Bytes of one panel's block: 32 outputs × 32 inputs.
const BLOCK_BYTES: usize = PANEL * BLOCK;
/// Bytes of one panel's block with its scales: 17 cache lines.
const STRIDE: usize = BLOCK_BYTES + 2 * PANEL;
/// Panels per task when decoding one row, where the tasks still balance across threads (see
/// [`wide_groups`]): a q8 panel is a quarter of an f32 one, so 8 streams per thread keep enough
/// loads in flight (for f32 and f16, 8 was slower than 4).
const GEMV_GROUP: usize = 8;
/// Otherwise.
const GEMV_GROUP_NARROW: usize = 4;

/// Whether tasks of [`GEMV_GROUP`] panels split evenly over the threads, or are many enough that
/// one task more on a thread costs little. Tasks are not split: gpt2's 24-panel q8 products in
/// tasks of 8 on 2 threads would leave a thread idle a third of the time.
fn wide_groups(panels: usize, threads: usize) -> bool {
    let tasks = panels / GEMV_GROUP;
    tasks >= 8 * threads
        || (tasks >= 2 * threads
            && tasks.is_multiple_of(threads)
            && panels.is_multiple_of(GEMV_GROUP))
}

/// Quantize one block of weights exactly as ggml's `quantize_row_q8_0_ref` (and gguf-py) do:
/// `d = max|w| / 127` (stored rounded to f16), `q = round(w · (1/d))`, halves away from zero. So our
/// q8 of a checkpoint holds the same codes and scales as llama.cpp's q8_0 of it.
pub fn quantize_weights(w: &[f32], q: &mut [i8]) -> f16 {
    let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (o, &v) in q.iter_mut().zip(w) {
        *o = (v * id).round().clamp(-127.0, 127.0) as i8;
    }
    f16::from_f32(d.min(f16::MAX.to_f32()))
}

/// Quantize one block of activations: returns the f32 scale `max|x| / 127`; `q = round(x · 127 / max|x|)`.
pub fn quantize_activations(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * id).round_ties_even() as i8;
    }
    amax / 127.0
}

/// A matrix of `n` outputs × `k` inputs in the 8-bit panel layout.
pub struct Q8 {
    /// `[panels][blocks]` of (`q + 128` as `[groups][32][4]`, then 32 little-endian f16 scales);
    /// padding inputs and outputs hold 128 (zero) with scale 0.
    pub q: HugeBuf<u8>,
    pub n: usize,
    pub k: usize,
    /// Whether a code is -128, which a q8_0 file may hold though ggml's quantizer (and ours) never
    /// writes one: the one-row AVX2 kernel then takes its exact but slower form.
    min_code: bool,
}

impl Q8 {
    fn blocks(&self) -> usize {
        self.k.div_ceil(BLOCK)
    }

    /// Quantize a row-major `(n, k)` matrix (one output per row).
    pub fn pack(w: &[f32], n: usize, k: usize) -> Q8 {
        assert_eq!(w.len(), n * k);
        let mut q = Q8::empty(n, k);
        for (j, row) in w.chunks_exact(k).enumerate() {
            q.set_row(j, row);
        }
        q
    }

    /// As [`Q8::pack`], from a `(k, n)` matrix stored one input per row (transformers' Conv1D
    /// layout), one output gathered at a time rather than through a transposed copy.
    pub fn pack_cols(w: &[f32], n: usize, k: usize) -> Q8 {
        assert_eq!(w.len(), n * k);
        let mut q = Q8::empty(n, k);
        let mut row = vec![0.0; k];
        for j in 0..n {
            for (r, &v) in row.iter_mut().zip(w[j..].iter().step_by(n)) {
                *r = v;
            }
            q.set_row(j, &row);
        }
        q
    }

    /// Zero codes and scales for `n` outputs of `k` inputs.
    fn empty(n: usize, k: usize) -> Q8 {
        let (panels, kb) = (n.div_ceil(PANEL), k.div_ceil(BLOCK));
        let mut q = HugeBuf::filled(panels * kb * STRIDE, 128u8);
        for p in 0..panels * kb {
            q[p * STRIDE + BLOCK_BYTES..(p + 1) * STRIDE].fill(0);
        }
        Q8 {
            q,
            n,
            k,
            min_code: false,
        }
    }

    /// Quantize output `j`'s `k` weights into its place in the panels.
    fn set_row(&mut self, j: usize, row: &[f32]) {
        let kb = self.k.div_ceil(BLOCK);
        let (p, c) = (j / PANEL, j % PANEL);
        let mut qb = [0i8; BLOCK];
        for (b, src) in row.chunks(BLOCK).enumerate() {
            let base = (p * kb + b) * STRIDE;
            let d = quantize_weights(src, &mut qb[..src.len()]);
            self.q[base + BLOCK_BYTES + 2 * c..][..2].copy_from_slice(&d.to_bits().to_le_bytes());
            for (i, &v) in qb[..src.len()].iter().enumerate() {
                self.q[base + (i / GROUP) * PANEL * GROUP + c * GROUP + i % GROUP] =
                    (v as i16 + 128) as u8;
            }
        }
    }

    /// From ggml q8_0 blocks of a row-major `(n, k)` matrix (`k` a multiple of 32; per output,
    /// `k / 32` blocks of an f16 scale and 32 signed codes), kept exactly: a q8_0 checkpoint runs
    /// the same codes and scales llama.cpp would.
    pub fn from_q8_0(blocks: &[u8], n: usize, k: usize) -> Q8 {
        assert!(k.is_multiple_of(BLOCK) && blocks.len() == n * k / BLOCK * 34);
        let (panels, kb) = (n.div_ceil(PANEL), k / BLOCK);
        let mut q = HugeBuf::filled(panels * kb * STRIDE, 128u8);
        for p in 0..panels * kb {
            q[p * STRIDE + BLOCK_BYTES..(p + 1) * STRIDE].fill(0);
        }
        let mut min_code = false;
        for (jb, src) in blocks.chunks_exact(34).enumerate() {
            let (j, b) = (jb / kb, jb % kb);
            let (p, c) = (j / PANEL, j % PANEL);
            let base = (p * kb + b) * STRIDE;
            q[base + BLOCK_BYTES + 2 * c..][..2].copy_from_slice(&src[..2]);
            for (i, &v) in src[2..].iter().enumerate() {
                min_code |= v as i8 == i8::MIN;
                q[base + (i / GROUP) * PANEL * GROUP + c * GROUP + i % GROUP] =
                    (v as i8 as i16 + 128) as u8;
            }
        }
        Q8 { q, n, k, min_code }
    }

    /// Output `j`'s weight at input `kk`, as the signed code.
    fn code(&self, j: usize, kk: usize) -> i8 {
        let (p, c, b, i) = (j / PANEL, j % PANEL, kk / BLOCK, kk % BLOCK);
        let at = (p * self.blocks() + b) * STRIDE + (i / GROUP) * PANEL * GROUP + c * GROUP;
        (self.q[at + i % GROUP] as i16 - 128) as i8
    }

    /// Output `j`'s scale for block `b`.
    fn scale(&self, j: usize, b: usize) -> f32 {
        let (p, c) = (j / PANEL, j % PANEL);
        let at = (p * self.blocks() + b) * STRIDE + BLOCK_BYTES + 2 * c;
        f16::from_bits(u16::from_le_bytes([self.q[at], self.q[at + 1]])).to_f32()
    }

    /// Output `j`'s quantized weights and per-block scales, `(k, blocks)` (the reference's input).
    #[cfg(test)]
    pub fn output(&self, j: usize) -> (Vec<i8>, Vec<f32>) {
        let q = (0..self.k).map(|kk| self.code(j, kk)).collect();
        let d = (0..self.blocks()).map(|b| self.scale(j, b)).collect();
        (q, d)
    }

    /// Output `j`'s weights, dequantized (the embedding lookup of a tied matrix: no allocation).
    pub fn row(&self, j: usize, out: &mut [f32]) {
        for (b, out) in out[..self.k].chunks_mut(BLOCK).enumerate() {
            let d = self.scale(j, b);
            for (i, o) in out.iter_mut().enumerate() {
                *o = self.code(j, b * BLOCK + i) as f32 * d;
            }
        }
    }

    /// The packed codes and scales, as laid out (the tests' view).
    #[cfg(test)]
    pub fn raw(&self) -> &[u8] {
        &self.q
    }

    pub fn bytes(&self) -> usize {
        self.q.len()
    }

    #[cfg(test)]
    pub fn matmul(&self, x: &[f32], epi: Epilogue, out: &mut [f32]) {
        self.matmul_with(Isa::detect(), x, epi, out)
    }

    /// `out (m, n) = epi(x (m, k) · Wᵀ)`, split over panels across threads.
    pub fn matmul_with(&self, isa: Isa, x: &[f32], epi: Epilogue, out: &mut [f32]) {
        self.with_acts(isa, x, |isa, acts, m| {
            #[cfg(target_arch = "x86_64")]
            if m == 1 && isa.level() == Level::Avx512 {
                let wide = wide_groups(self.n.div_ceil(PANEL), pool::threads());
                // SAFETY: `effective` left Avx512 only where the CPU has VNNI too.
                return unsafe { self.gemv_grouped(acts, epi, out, wide) };
            }
            #[cfg(target_arch = "x86_64")]
            if m == 1 && isa.level() == Level::Avx2 {
                // SAFETY: an `Isa` of level Avx2 proves the features.
                return unsafe {
                    match self.min_code {
                        false => self.gemv256::<false>(acts, epi, out),
                        true => self.gemv256::<true>(acts, epi, out),
                    }
                };
            }
            for_panels(m, self.n, self.k, epi, out, self.panel_task(isa, acts, m));
        })
    }

    /// `visit(panel, row, acc)` with each row's 32 outputs of each panel of `x (m, k) · Wᵀ` (no
    /// bias): the accumulators bit for bit as [`Q8::matmul_with`] gets them for many rows.
    pub fn matmul_visit(&self, isa: Isa, x: &[f32], visit: &Visit) {
        self.with_acts(isa, x, |isa, acts, m| {
            for_panels_visit(m, self.n, self.k, visit, self.panel_task(isa, acts, m))
        })
    }

    /// `visit(row, acc)` with each row's 32 outputs of one panel, `panel(row)`, rows across the
    /// pool: [`Q8::matmul_visit`]'s accumulators for that (panel, row), bit for bit (a row's
    /// activations are quantized alone).
    pub fn visit_row_panels(
        &self,
        isa: Isa,
        x: &[f32],
        panel: &(dyn Fn(usize) -> usize + Sync),
        visit: &RowVisit,
    ) {
        let k = self.k;
        assert!(k > 0 && x.len().is_multiple_of(k));
        parallel_for(x.len() / k, &|i| {
            let p = panel(i);
            assert!(p < self.n.div_ceil(PANEL));
            self.with_acts(isa, &x[i * k..(i + 1) * k], |isa, acts, m| {
                self.panel_task(isa, acts, m)(p, &mut |_, acc| visit(i, acc))
            })
        });
    }

    /// `f(isa, acts, m)` with `x (m, k)` quantized into this thread's activation buffers.
    fn with_acts<R>(&self, isa: Isa, x: &[f32], f: impl FnOnce(Isa, &Acts, usize) -> R) -> R {
        let k = self.k;
        assert!(k > 0 && x.len().is_multiple_of(k));
        let m = x.len() / k;
        let isa = effective(isa);
        ACTS.with(|cell| {
            // Reentrant only if a stolen task runs another product while this one waits; then
            // that one gets its own buffers.
            let mut own = Acts::default();
            let mut guard = cell.try_borrow_mut();
            let acts = match guard.as_deref_mut() {
                Ok(a) => a,
                Err(_) => &mut own,
            };
            acts.quantize(isa, x, m, k);
            f(isa, acts, m)
        })
    }

    /// One panel's task of a many-row product.
    fn panel_task<'a>(
        &'a self,
        isa: Isa,
        acts: &'a Acts,
        m: usize,
    ) -> impl Fn(usize, &mut Store) + Sync + Send + 'a {
        let kb = self.blocks();
        move |p, store| {
            let q = &self.q[p * kb * STRIDE..(p + 1) * kb * STRIDE];
            match isa.level() {
                // SAFETY: an `Isa` of this level proves the CPU has its features, and
                // `effective` left Avx512 only where it has VNNI too; `q` is a checked slice.
                #[cfg(target_arch = "x86_64")]
                Level::Avx512 => unsafe { x86::panel512(acts, q, kb, m, store) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 => unsafe { x86::panel256(acts, q, kb, m, self.min_code, store) },
                Level::Portable => panel_portable(acts, q, kb, m, store),
            }
        }
    }
}

impl Q8 {
    /// One row (decoding) on AVX-512 through [`x86::group512`].
    ///
    /// # Safety
    /// The CPU has AVX-512 F, VL and VNNI, and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn gemv_grouped(&self, acts: &Acts, epi: Epilogue, out: &mut [f32], wide: bool) {
        let kb = self.blocks();
        let q = |p: usize| self.q[p * kb * STRIDE..].as_ptr();
        // SAFETY: the caller promised the features; `for_panel_groups` asks only for panels (and
        // whole groups of them) inside the matrix.
        let one = |p| unsafe { x86::row512(acts, 0, q(p), kb) };
        if wide {
            // SAFETY: as above.
            let group = |p0| unsafe { x86::group512::<GEMV_GROUP>(acts, q(p0), kb) };
            for_panel_groups(self.n, epi, out, group, one);
        } else {
            // SAFETY: as above.
            let group = |p0| unsafe { x86::group512::<GEMV_GROUP_NARROW>(acts, q(p0), kb) };
            for_panel_groups(self.n, epi, out, group, one);
        }
    }
}

impl Q8 {
    /// One row (decoding) on AVX2 through [`x86::row256`] (its exact form for a matrix holding a
    /// code of -128).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn gemv256<const MIN_CODE: bool>(&self, acts: &Acts, epi: Epilogue, out: &mut [f32]) {
        let kb = self.blocks();
        let q = |p: usize| self.q[p * kb * STRIDE..(p + 1) * kb * STRIDE].as_ptr();
        // SAFETY: the caller promised the features; each panel is a checked slice of `kb` blocks.
        let one = |p| unsafe { x86::row256::<MIN_CODE>(acts, 0, q(p), kb) };
        for_panel_groups::<1>(self.n, epi, out, |p| [one(p)], one)
    }
}

/// The activations of one product, quantized: per row, `blocks × 32` codes (zero-padded), and per
/// block its scale and `128 · Σ codes` (what the unsigned weight offset adds to a block's sum).
#[derive(Default)]
struct Acts {
    q: Vec<i8>,
    d: Vec<f32>,
    offset: Vec<i32>,
    kp: usize,
    kb: usize,
}

impl Acts {
    fn quantize(&mut self, isa: Isa, x: &[f32], m: usize, k: usize) {
        let kb = k.div_ceil(BLOCK);
        let kp = kb * BLOCK;
        (self.kb, self.kp) = (kb, kp);
        self.q.clear();
        self.q.resize(m * kp, 0);
        self.d.resize(m * kb, 0.0);
        self.offset.resize(m * kb, 0);
        let (q, d, offset) = (
            Disjoint::new(&mut self.q),
            Disjoint::new(&mut self.d),
            Disjoint::new(&mut self.offset),
        );
        // Rows in tasks of 16 (a prompt's rows would otherwise be quantized on one thread).
        parallel_for(m.div_ceil(16), &|t| {
            for i in 16 * t..(16 * t + 16).min(m) {
                // SAFETY: row `i`'s codes, scales and offsets belong to this task alone.
                let (q, d, offset) = unsafe {
                    (
                        q.slice(i * kp, kp),
                        d.slice(i * kb, kb),
                        offset.slice(i * kb, kb),
                    )
                };
                quantize_row(isa, &x[i * k..(i + 1) * k], q, d, offset);
            }
        });
    }
}

/// One row of activations into its per-block codes, scales and offsets.
fn quantize_row(isa: Isa, x: &[f32], q: &mut [i8], d: &mut [f32], offset: &mut [i32]) {
    for (b, ((q, d), offset)) in q.chunks_exact_mut(BLOCK).zip(d).zip(offset).enumerate() {
        let src = &x[b * BLOCK..((b + 1) * BLOCK).min(x.len())];
        let q = &mut q[..src.len()];
        let (scale, sum) = match isa.level() {
            // SAFETY: the AVX2 kernels run only where the CPU has AVX2.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 | Level::Avx2 if src.len() == BLOCK => unsafe {
                x86::quantize_block(src, q)
            },
            _ => {
                let scale = quantize_activations(src, q);
                (scale, q.iter().map(|&v| v as i32).sum::<i32>())
            }
        };
        *d = scale;
        *offset = 128 * sum;
    }
}

thread_local! {
    static ACTS: RefCell<Acts> = RefCell::new(Acts::default());
}

/// Which 8-bit kernels run with `isa`, for reports.
pub fn kernel_name(isa: Isa) -> &'static str {
    match effective(isa).level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => "avx512-vnni",
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => "avx2",
        Level::Portable => "portable",
    }
}

/// The 8-bit kernels' ISA: AVX-512 needs VNNI besides what its token proves.
fn effective(isa: Isa) -> Isa {
    #[cfg(target_arch = "x86_64")]
    if isa.level() == Level::Avx512 && !is_x86_feature_detected!("avx512vnni") {
        return isa.at_most(Level::Avx2);
    }
    isa
}

fn panel_portable(
    a: &Acts,
    q: &[u8],
    kb: usize,
    m: usize,
    store: &mut dyn FnMut(usize, &[f32; PANEL]),
) {
    for i in 0..m {
        let mut acc = [0f32; PANEL];
        for b in 0..kb {
            let xq = &a.q[i * a.kp + b * BLOCK..][..BLOCK];
            let dx = a.d[i * kb + b];
            let (wq, ds) = q[b * STRIDE..(b + 1) * STRIDE].split_at(BLOCK_BYTES);
            for (c, av) in acc.iter_mut().enumerate() {
                let mut s = 0i32;
                for (kk, &xv) in xq.iter().enumerate() {
                    let w = wq[(kk / GROUP) * PANEL * GROUP + c * GROUP + kk % GROUP];
                    s += (w as i32 - 128) * xv as i32;
                }
                let dw = f16::from_bits(u16::from_le_bytes([ds[2 * c], ds[2 * c + 1]]));
                *av = (s as f32).mul_add(dw.to_f32() * dx, *av);
            }
        }
        store(i, &acc);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::packed::PREFETCH;
    use super::{Acts, BLOCK, BLOCK_BYTES, GROUP, PANEL, STRIDE};

    /// [`super::quantize_activations`] of a whole block, and the codes' sum: the same codes (the
    /// conversion rounds to nearest even, as `round_ties_even`).
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        assert!(x.len() == BLOCK && q.len() == BLOCK);
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let v: [__m256; 4] = std::array::from_fn(|h| _mm256_loadu_ps(x.as_ptr().add(8 * h)));
        let mut m = _mm256_and_ps(v[0], abs);
        for h in 1..4 {
            m = _mm256_max_ps(m, _mm256_and_ps(v[h], abs));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let amax = lanes.iter().fold(0f32, |a, &b| a.max(b));
        let id = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        let mut sum = _mm256_setzero_si256();
        let mut codes = [0i32; BLOCK];
        for h in 0..4 {
            let c = _mm256_cvtps_epi32(_mm256_mul_ps(v[h], id));
            sum = _mm256_add_epi32(sum, c);
            _mm256_storeu_si256(codes.as_mut_ptr().add(8 * h) as *mut __m256i, c);
        }
        for (o, c) in q.iter_mut().zip(codes) {
            *o = c as i8;
        }
        let mut s = [0i32; 8];
        _mm256_storeu_si256(s.as_mut_ptr() as *mut __m256i, sum);
        (amax / 127.0, s.iter().sum())
    }

    /// `MR` rows × 32 outputs: per block, integer sums with `vpdpbusd` (unsigned weights × signed
    /// activations, started at minus the offset), then one FMA per output.
    #[target_feature(enable = "avx512f,avx512vnni,f16c")]
    #[inline]
    unsafe fn micro512<const MR: usize>(
        a: &Acts,
        i0: usize,
        q: *const u8,
        kb: usize,
        out: &mut [[f32; PANEL]; MR],
    ) {
        let mut facc = [[_mm512_setzero_ps(); 2]; MR];
        let xq = a.q.as_ptr().add(i0 * a.kp);
        for b in 0..kb {
            let mut iacc = [[_mm512_setzero_si512(); 2]; MR];
            for r in 0..MR {
                let off = _mm512_set1_epi32(-a.offset[(i0 + r) * kb + b]);
                iacc[r] = [off, off];
            }
            let wb = q.add(b * STRIDE);
            for g in 0..BLOCK / GROUP {
                let w0 = _mm512_loadu_si512(wb.add(g * PANEL * GROUP) as *const _);
                let w1 = _mm512_loadu_si512(wb.add(g * PANEL * GROUP + 64) as *const _);
                for r in 0..MR {
                    let xv =
                        (xq.add(r * a.kp + b * BLOCK + g * GROUP) as *const i32).read_unaligned();
                    let xb = _mm512_set1_epi32(xv);
                    iacc[r][0] = _mm512_dpbusd_epi32(iacc[r][0], w0, xb);
                    iacc[r][1] = _mm512_dpbusd_epi32(iacc[r][1], w1, xb);
                }
            }
            let dp = wb.add(BLOCK_BYTES) as *const __m256i;
            let dw = [
                _mm512_cvtph_ps(_mm256_loadu_si256(dp)),
                _mm512_cvtph_ps(_mm256_loadu_si256(dp.add(1))),
            ];
            for r in 0..MR {
                let dx = _mm512_set1_ps(a.d[(i0 + r) * kb + b]);
                for h in 0..2 {
                    let s = _mm512_mul_ps(dw[h], dx);
                    facc[r][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][h]), s, facc[r][h]);
                }
            }
        }
        for r in 0..MR {
            _mm512_storeu_ps(out[r].as_mut_ptr(), facc[r][0]);
            _mm512_storeu_ps(out[r].as_mut_ptr().add(16), facc[r][1]);
        }
    }

    /// One row × 32 outputs (decoding): as [`micro512`] with two chains of integer sums per output
    /// half (even and odd groups), so that `vpdpbusd`'s latency does not bound the weight stream.
    /// Integer sums are exact, so the result is the same.
    #[target_feature(enable = "avx512f,avx512vnni,f16c")]
    #[inline]
    pub unsafe fn row512(a: &Acts, i: usize, q: *const u8, kb: usize) -> [f32; PANEL] {
        let mut facc = [_mm512_setzero_ps(); 2];
        let xq = a.q.as_ptr().add(i * a.kp);
        for b in 0..kb {
            let off = _mm512_set1_epi32(-a.offset[i * kb + b]);
            let mut even = [off, off];
            let mut odd = [_mm512_setzero_si512(); 2];
            let wb = q.add(b * STRIDE);
            for g in (0..BLOCK / GROUP).step_by(2) {
                for (acc, g) in [(&mut even, g), (&mut odd, g + 1)] {
                    let w0 = _mm512_loadu_si512(wb.add(g * PANEL * GROUP) as *const _);
                    let w1 = _mm512_loadu_si512(wb.add(g * PANEL * GROUP + 64) as *const _);
                    let xv = (xq.add(b * BLOCK + g * GROUP) as *const i32).read_unaligned();
                    let xb = _mm512_set1_epi32(xv);
                    acc[0] = _mm512_dpbusd_epi32(acc[0], w0, xb);
                    acc[1] = _mm512_dpbusd_epi32(acc[1], w1, xb);
                }
            }
            let dp = wb.add(BLOCK_BYTES) as *const __m256i;
            let dx = _mm512_set1_ps(a.d[i * kb + b]);
            for h in 0..2 {
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(dp.add(h)));
                let isum = _mm512_add_epi32(even[h], odd[h]);
                let s = _mm512_mul_ps(dw, dx);
                facc[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, facc[h]);
            }
        }
        let mut out = [0f32; PANEL];
        _mm512_storeu_ps(out.as_mut_ptr(), facc[0]);
        _mm512_storeu_ps(out.as_mut_ptr().add(16), facc[1]);
        out
    }

    /// One row against `G` adjacent panels (decoding): `2G` independent chains of integer sums.
    #[target_feature(enable = "avx512f,avx512vnni,f16c")]
    pub unsafe fn group512<const G: usize>(a: &Acts, q: *const u8, kb: usize) -> [[f32; PANEL]; G] {
        let mut facc = [[_mm512_setzero_ps(); 2]; G];
        let xq = a.q.as_ptr();
        for b in 0..kb {
            let off = _mm512_set1_epi32(-a.offset[b]);
            let mut iacc = [[off; 2]; G];
            for g in 0..BLOCK / GROUP {
                let xv = (xq.add(b * BLOCK + g * GROUP) as *const i32).read_unaligned();
                let xb = _mm512_set1_epi32(xv);
                for p in 0..G {
                    let w = q.add((p * kb + b) * STRIDE + g * PANEL * GROUP);
                    // `wrapping_add`: the hint may point past the buffer (it never faults).
                    let ahead = w.wrapping_add(PREFETCH) as *const i8;
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                    let w0 = _mm512_loadu_si512(w as *const _);
                    let w1 = _mm512_loadu_si512(w.add(64) as *const _);
                    iacc[p][0] = _mm512_dpbusd_epi32(iacc[p][0], w0, xb);
                    iacc[p][1] = _mm512_dpbusd_epi32(iacc[p][1], w1, xb);
                }
            }
            let dx = _mm512_set1_ps(a.d[b]);
            for p in 0..G {
                let wb = q.add((p * kb + b) * STRIDE);
                // The 17th line of the block (the prefetches above cover 16 per block).
                _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(PREFETCH + BLOCK_BYTES) as *const i8);
                let dp = wb.add(BLOCK_BYTES) as *const __m256i;
                for h in 0..2 {
                    let dw = _mm512_cvtph_ps(_mm256_loadu_si256(dp.add(h)));
                    let s = _mm512_mul_ps(dw, dx);
                    facc[p][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[p][h]), s, facc[p][h]);
                }
            }
        }
        let mut out = [[0f32; PANEL]; G];
        for p in 0..G {
            _mm512_storeu_ps(out[p].as_mut_ptr(), facc[p][0]);
            _mm512_storeu_ps(out[p].as_mut_ptr().add(16), facc[p][1]);
        }
        out
    }

    /// One row × 32 outputs with AVX2: the signed weights (`q + 128` with its top bit flipped) take
    /// the activation's sign so that `vpmaddubsw` multiplies |x| (unsigned) by them without
    /// saturating. That is wrong for a code of -128 (its negation wraps), so `MIN_CODE` (a matrix
    /// holding one) turns it around as [`micro256`] does: the activations take the weights' signs
    /// and |q| (128 fits unsigned) is the unsigned operand, at an absolute value per weight load.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn row256<const MIN_CODE: bool>(
        a: &Acts,
        i: usize,
        q: *const u8,
        kb: usize,
    ) -> [f32; PANEL] {
        let mut facc = [_mm256_setzero_ps(); 4];
        let xq = a.q.as_ptr().add(i * a.kp);
        let (flip, ones) = (_mm256_set1_epi8(-128), _mm256_set1_epi16(1));
        for b in 0..kb {
            let mut iacc = [_mm256_setzero_si256(); 4];
            let wb = q.add(b * STRIDE);
            // The panel is one stream: fetch ahead of it (a hint; past the end it never faults).
            for l in 0..STRIDE / 64 {
                _mm_prefetch::<_MM_HINT_T0>(wb.wrapping_add(PREFETCH + 64 * l) as *const i8);
            }
            for g in 0..BLOCK / GROUP {
                let xv = (xq.add(b * BLOCK + g * GROUP) as *const i32).read_unaligned();
                let xb = _mm256_set1_epi32(xv);
                let ax = _mm256_abs_epi8(xb);
                for h in 0..4 {
                    let w = _mm256_loadu_si256(wb.add(g * PANEL * GROUP + 32 * h) as *const _);
                    let w = _mm256_xor_si256(w, flip);
                    let p = if MIN_CODE {
                        _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xb, w))
                    } else {
                        _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, xb))
                    };
                    iacc[h] = _mm256_add_epi32(iacc[h], _mm256_madd_epi16(p, ones));
                }
            }
            let dx = _mm256_set1_ps(a.d[i * kb + b]);
            for h in 0..4 {
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(wb.add(BLOCK_BYTES + 16 * h) as *const _));
                let s = _mm256_mul_ps(dw, dx);
                facc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[h]), s, facc[h]);
            }
        }
        let mut out = [0f32; PANEL];
        for h in 0..4 {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), facc[h]);
        }
        out
    }

    #[target_feature(enable = "avx512f,avx512vnni,f16c")]
    pub unsafe fn panel512(
        a: &Acts,
        q: &[u8],
        kb: usize,
        m: usize,
        store: &mut dyn FnMut(usize, &[f32; PANEL]),
    ) {
        const MR: usize = 6;
        let mut i = 0;
        while i + MR <= m {
            let mut acc = [[0.0; PANEL]; MR];
            micro512::<MR>(a, i, q.as_ptr(), kb, &mut acc);
            for (r, v) in acc.iter().enumerate() {
                store(i + r, v);
            }
            i += MR;
        }
        // The leftover rows in groups of 4, 2, then 1.
        macro_rules! tail {
            ($r:literal) => {
                if m - i >= $r {
                    let mut acc = [[0.0; PANEL]; $r];
                    micro512::<$r>(a, i, q.as_ptr(), kb, &mut acc);
                    for (r, v) in acc.iter().enumerate() {
                        store(i + r, v);
                    }
                    i += $r;
                }
            };
        }
        tail!(4);
        tail!(2);
        if i < m {
            store(i, &row512(a, i, q.as_ptr(), kb));
        }
    }

    /// Bytes ahead of its block that the first row block of a panel prefetches (see [`micro256`]):
    /// four blocks.
    const MICRO_AHEAD_BYTES: usize = 4 * STRIDE;

    /// `MR` rows × 32 outputs with AVX2 (prompts, batched decoding): [`row256`]'s products, with
    /// each weight load, sign flip and absolute value shared by the rows (the activations take
    /// the weights' signs, so that `vpmaddubsw` multiplies |q| by them). For each block, the two
    /// half panels in turn (16 outputs: `2·MR` integer accumulators of 16 registers), so that a
    /// block's lines are used as they arrive; the f32 accumulators live in `out`, updated once per
    /// block in the order `row256` does, so the bits are the same. With `PF` (the first row block
    /// of a panel) each block prefetches the one [`MICRO_AHEAD_BYTES`] ahead: with few rows the
    /// products per weight are too few to hide the misses of a panel streamed from memory.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn micro256<const MR: usize, const PF: bool>(
        a: &Acts,
        i0: usize,
        q: *const u8,
        kb: usize,
        out: &mut [[f32; PANEL]; MR],
    ) {
        let xq = a.q.as_ptr().add(i0 * a.kp);
        let (flip, ones) = (_mm256_set1_epi8(-128), _mm256_set1_epi16(1));
        for r in 0..MR {
            out[r] = [0.0; PANEL];
        }
        for b in 0..kb {
            let wb = q.add(b * STRIDE);
            if PF {
                for l in 0..STRIDE / 64 {
                    // A hint: past the end of the buffer it never faults.
                    let ahead = wb.wrapping_add(MICRO_AHEAD_BYTES + 64 * l) as *const i8;
                    _mm_prefetch::<_MM_HINT_T0>(ahead);
                }
            }
            for half in 0..2 {
                let mut iacc = [[_mm256_setzero_si256(); 2]; MR];
                for g in 0..BLOCK / GROUP {
                    let wg = wb.add(g * PANEL * GROUP + 64 * half);
                    let w = [
                        _mm256_xor_si256(_mm256_loadu_si256(wg as *const _), flip),
                        _mm256_xor_si256(_mm256_loadu_si256(wg.add(32) as *const _), flip),
                    ];
                    let aw = [_mm256_abs_epi8(w[0]), _mm256_abs_epi8(w[1])];
                    for r in 0..MR {
                        let xv = (xq.add(r * a.kp + b * BLOCK + g * GROUP) as *const i32)
                            .read_unaligned();
                        let xb = _mm256_set1_epi32(xv);
                        for j in 0..2 {
                            let sx = _mm256_sign_epi8(xb, w[j]);
                            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[j], sx), ones);
                            iacc[r][j] = _mm256_add_epi32(iacc[r][j], p);
                        }
                    }
                }
                for j in 0..2 {
                    let h = 2 * half + j;
                    let dw =
                        _mm256_cvtph_ps(_mm_loadu_si128(wb.add(BLOCK_BYTES + 16 * h) as *const _));
                    for r in 0..MR {
                        let dx = _mm256_set1_ps(a.d[(i0 + r) * kb + b]);
                        let s = _mm256_mul_ps(dw, dx);
                        let o = out[r].as_mut_ptr().add(8 * h);
                        let f =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r][j]), s, _mm256_loadu_ps(o));
                        _mm256_storeu_ps(o, f);
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn panel256(
        a: &Acts,
        q: &[u8],
        kb: usize,
        m: usize,
        min_code: bool,
        store: &mut dyn FnMut(usize, &[f32; PANEL]),
    ) {
        const MR: usize = 4;
        let mut i = 0;
        while i + MR <= m {
            let mut acc = [[0.0; PANEL]; MR];
            if i == 0 {
                micro256::<MR, true>(a, i, q.as_ptr(), kb, &mut acc);
            } else {
                micro256::<MR, false>(a, i, q.as_ptr(), kb, &mut acc);
            }
            for (r, v) in acc.iter().enumerate() {
                store(i + r, v);
            }
            i += MR;
        }
        if m - i >= 2 {
            let mut acc = [[0.0; PANEL]; 2];
            if i == 0 {
                micro256::<2, true>(a, i, q.as_ptr(), kb, &mut acc);
            } else {
                micro256::<2, false>(a, i, q.as_ptr(), kb, &mut acc);
            }
            for (r, v) in acc.iter().enumerate() {
                store(i + r, v);
            }
            i += 2;
        }
        if i < m {
            let one = match min_code {
                false => row256::<false>(a, i, q.as_ptr(), kb),
                true => row256::<true>(a, i, q.as_ptr(), kb),
            };
            store(i, &one);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{reference, test_data as data};
    use super::*;

    #[test]
    fn quantized_weights_are_within_half_a_step() {
        let (n, k) = (40, 70);
        let w = data(n * k, 1);
        let m = Q8::pack(&w, n, k);
        let mut r = vec![0.0; k];
        for j in 0..n {
            m.row(j, &mut r);
            let (q, d) = m.output(j);
            for (kk, (a, b)) in r.iter().zip(&w[j * k..]).enumerate() {
                assert_eq!(*a, q[kk] as f32 * d[kk / BLOCK], "{j},{kk}");
                // ggml rounds against the f32 scale, then stores it as f16 (relative error
                // ≤ 2⁻¹¹): up to 127 · 2⁻¹¹ of a step more than half a step of the stored scale.
                assert!(
                    (a - b).abs() <= d[kk / BLOCK] * (0.5 + 127.0 / 2048.0) + 1e-7,
                    "{j},{kk}: {a} vs {b}"
                );
            }
        }
    }

    /// Every output's codes and scales, one output after another: the reference's operands.
    fn codes_and_scales(mat: &Q8) -> (Vec<i8>, Vec<f32>) {
        let (mut qs, mut ds) = (Vec::new(), Vec::new());
        for j in 0..mat.n {
            let (q, d) = mat.output(j);
            qs.extend(q);
            ds.extend(d);
        }
        (qs, ds)
    }

    /// A q8_0 file may hold the code -128, which ggml's quantizer never writes: every kernel
    /// still gives the reference's bits, alone, in a batch and split across threads.
    #[test]
    fn q8_0_codes_of_minus_128_are_exact_on_every_isa() {
        let (n, k) = (70, 96);
        let mut blocks = Vec::new();
        for j in 0..n {
            for b in 0..k / BLOCK {
                let d = f16::from_f32(0.01 + 0.001 * ((j + b) % 7) as f32);
                blocks.extend(d.to_bits().to_le_bytes());
                // Two codes in five -128, one in five 127, the rest spread over the range.
                blocks.extend((0..BLOCK).map(|i| match (j + b + i) % 5 {
                    0 | 2 => -128i8,
                    1 => 127,
                    _ => ((j * 31 + i * 7) % 255) as i8,
                } as u8));
            }
        }
        let mat = Q8::from_q8_0(&blocks, n, k);
        let (qs, ds) = codes_and_scales(&mat);
        assert!(qs.contains(&-128));
        let pool = pool::Pool::new(3).expect("a pool");
        for m in [1, 5, 8] {
            // Negative activations at full scale meet the -128 codes.
            let mut x = data(m * k, 5);
            x.iter_mut().step_by(3).for_each(|v| *v = -1.0);
            let mut want = vec![0.0; m * n];
            reference::matmul_q8(&x, &qs, &ds, None, k, &mut want);
            for isa in Isa::available() {
                for threaded in [false, true] {
                    let mut got = vec![f32::NAN; m * n];
                    let mut run = || mat.matmul_with(isa, &x, Epilogue::bias(None), &mut got);
                    if threaded {
                        pool.install(run);
                    } else {
                        run();
                    }
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "{isa:?} m {m} at {i}: {a} vs {b}");
                    }
                }
            }
        }
    }

    /// Every ISA gives exactly the scalar reference's bits, and a row alone its bits in the batch.
    #[test]
    fn q8_products_equal_the_reference_bit_for_bit_on_every_isa() {
        for &(m, k, n) in &[
            (1, 768, 2304),
            // One task of GEMV_GROUP panels and three left over, the last one partial.
            (1, 100, 330),
            (5, 37, 13),
            (7, 64, 96),
            (13, 129, 33),
            // Batched decoding: two row blocks, the first prefetching.
            (8, 300, 200),
            (128, 96, 200),
            (3, 1, 2),
        ] {
            let (mut x, w, bias) = (data(m * k, 2), data(n * k, 3), data(n, 4));
            // A block of zeros and a tiny block exercise the zero scale and the extremes.
            x[..k.min(BLOCK)].fill(0.0);
            if m > 1 {
                x[k] = 1e-30;
            }
            let mat = Q8::pack(&w, n, k);
            let (qs, ds) = codes_and_scales(&mat);
            let mut want = vec![0.0; m * n];
            reference::matmul_q8(&x, &qs, &ds, Some(&bias), k, &mut want);
            let mut exact = vec![0.0; m * n];
            reference::matmul(&x, &w, Some(&bias), k, &mut exact);
            let err = want
                .iter()
                .zip(&exact)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                err < 0.02 * (k as f32).sqrt(),
                "{m}x{k}x{n}: quantization error {err}"
            );
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; m * n];
                mat.matmul_with(isa, &x, Epilogue::bias(Some(&bias)), &mut got);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{isa:?} {m}x{k}x{n} at {i}: {a} vs {b}"
                    );
                }
            }
            for i in 0..m {
                let mut one = vec![0.0; n];
                mat.matmul(
                    &x[i * k..(i + 1) * k],
                    Epilogue::bias(Some(&bias)),
                    &mut one,
                );
                assert_eq!(one, want[i * n..(i + 1) * n]);
            }
            // Both task widths of the decode kernel, whichever this machine's thread count picks.
            #[cfg(target_arch = "x86_64")]
            if m == 1 && Isa::new(Level::Avx512).is_some_and(|i| effective(i) == i) {
                let mut acts = Acts::default();
                acts.quantize(Isa::new(Level::Avx512).unwrap(), &x, 1, k);
                for wide in [false, true] {
                    let mut got = vec![f32::NAN; n];
                    // SAFETY: the condition above checked the features.
                    unsafe { mat.gemv_grouped(&acts, Epilogue::bias(Some(&bias)), &mut got, wide) };
                    assert_eq!(got, want, "{m}x{k}x{n}, wide {wide}");
                }
            }
        }
    }
}
