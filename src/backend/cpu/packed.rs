//! Matrix products against weights packed once at load into panels of 32 output columns,
//! `[n/32][k][32]`: each step over k reads 32 consecutive weights, so the FMA micro-kernels stream a
//! panel while broadcasting the inputs. Every output is one FMA chain over k in order, then the bias
//! is added: the same bits on every instruction set, for any batch shape.

use rayon::prelude::*;

use super::kernels::Isa;

/// Output columns per panel.
pub const PANEL: usize = 32;

/// Pack a row-major `(n, k)` matrix (one output per row) into panels; the last one is zero-padded.
pub fn pack(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert_eq!(w.len(), n * k);
    let panels = n.div_ceil(PANEL);
    let mut out = vec![0.0; panels * k * PANEL];
    for j in 0..n {
        let (p, c) = (j / PANEL, j % PANEL);
        for kk in 0..k {
            out[(p * k + kk) * PANEL + c] = w[j * k + kk];
        }
    }
    out
}

/// The row-major `(n, k)` matrix back from its panels.
pub fn unpack(wp: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0; n * k];
    for j in 0..n {
        let (p, c) = (j / PANEL, j % PANEL);
        for kk in 0..k {
            out[j * k + kk] = wp[(p * k + kk) * PANEL + c];
        }
    }
    out
}

#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// `i` is in bounds and no other task writes it.
    unsafe fn write(&self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }
}

/// One panel's columns `[j0, j0 + cols)` for rows `[i0, i0 + MR)` (portable: `mul_add` is one FMA).
#[inline(always)]
fn micro_portable<const MR: usize>(
    x: &[f32],
    wp: &[f32],
    k: usize,
    i0: usize,
    acc: &mut [[f32; PANEL]; MR],
) {
    for kk in 0..k {
        let w = &wp[kk * PANEL..(kk + 1) * PANEL];
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = x[(i0 + r) * k + kk];
            for (c, av) in a.iter_mut().enumerate() {
                *av = xv.mul_add(w[c], *av);
            }
        }
    }
}

fn panel_portable(
    x: &[f32],
    wp: &[f32],
    k: usize,
    m: usize,
    mut store: impl FnMut(usize, &[f32; PANEL]),
) {
    let mut i = 0;
    while i + 4 <= m {
        let mut acc = [[0.0; PANEL]; 4];
        micro_portable::<4>(x, wp, k, i, &mut acc);
        for (r, a) in acc.iter().enumerate() {
            store(i + r, a);
        }
        i += 4;
    }
    for i in i..m {
        let mut acc = [[0.0; PANEL]; 1];
        micro_portable::<1>(x, wp, k, i, &mut acc);
        store(i, &acc[0]);
    }
}

#[cfg(target_arch = "x86_64")]
// Indexing the accumulator arrays keeps each register's role visible.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::PANEL;

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn micro512<const MR: usize>(
        x: *const f32,
        wp: *const f32,
        k: usize,
        out: &mut [[f32; PANEL]; MR],
    ) {
        let mut lo = [_mm512_setzero_ps(); MR];
        let mut hi = [_mm512_setzero_ps(); MR];
        for kk in 0..k {
            let w0 = _mm512_loadu_ps(wp.add(kk * PANEL));
            let w1 = _mm512_loadu_ps(wp.add(kk * PANEL + 16));
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

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn micro256<const MR: usize>(
        x: *const f32,
        wp: *const f32,
        k: usize,
        out: &mut [[f32; PANEL]; MR],
    ) {
        let mut acc = [[_mm256_setzero_ps(); 4]; MR];
        for kk in 0..k {
            let w = [
                _mm256_loadu_ps(wp.add(kk * PANEL)),
                _mm256_loadu_ps(wp.add(kk * PANEL + 8)),
                _mm256_loadu_ps(wp.add(kk * PANEL + 16)),
                _mm256_loadu_ps(wp.add(kk * PANEL + 24)),
            ];
            for r in 0..MR {
                let b = _mm256_set1_ps(*x.add(r * k + kk));
                for q in 0..4 {
                    acc[r][q] = _mm256_fmadd_ps(b, w[q], acc[r][q]);
                }
            }
        }
        for r in 0..MR {
            for q in 0..4 {
                _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * q), acc[r][q]);
            }
        }
    }

    /// A driver running all rows of `x` against one panel: `MR` rows at a time through the
    /// micro-kernel, then the leftover rows one by one.
    macro_rules! rows {
        ($name:ident, $features:literal, $micro:ident, $mr:literal) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name(
                x: &[f32],
                wp: &[f32],
                k: usize,
                m: usize,
                store: &mut dyn FnMut(usize, &[f32; PANEL]),
            ) {
                let mut i = 0;
                let (xp, w) = (x.as_ptr(), wp.as_ptr());
                while i + $mr <= m {
                    let mut acc = [[0.0; PANEL]; $mr];
                    $micro::<$mr>(xp.add(i * k), w, k, &mut acc);
                    for (r, a) in acc.iter().enumerate() {
                        store(i + r, a);
                    }
                    i += $mr;
                }
                for i in i..m {
                    let mut acc = [[0.0; PANEL]; 1];
                    $micro::<1>(xp.add(i * k), w, k, &mut acc);
                    store(i, &acc[0]);
                }
            }
        };
    }

    // 6 × 32 with AVX-512 and 3 × 32 with AVX2: 12 accumulator registers each.
    rows!(panel512, "avx512f", micro512, 6);
    rows!(panel256, "avx2,fma", micro256, 3);
}

/// Which packed kernels run: the ISA's, with FMA (plain AVX2 without FMA uses the portable loop).
fn effective(isa: Isa) -> Isa {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && !is_x86_feature_detected!("fma") {
        return Isa::Portable;
    }
    isa
}

/// `out (m, n) = x (m, k) · Wᵀ + bias` with `W` packed by [`pack`]; split over panels across threads.
pub fn matmul(x: &[f32], wp: &[f32], bias: Option<&[f32]>, k: usize, n: usize, out: &mut [f32]) {
    matmul_with(Isa::detect(), x, wp, bias, k, n, out)
}

pub fn matmul_with(
    isa: Isa,
    x: &[f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    assert!(k > 0 && x.len().is_multiple_of(k));
    let m = x.len() / k;
    let panels = n.div_ceil(PANEL);
    assert_eq!(wp.len(), panels * k * PANEL);
    assert_eq!(out.len(), m * n);
    let isa = effective(isa);
    let o = Out(out.as_mut_ptr());
    let run = move |p: usize| {
        let panel = &wp[p * k * PANEL..(p + 1) * k * PANEL];
        let (j0, cols) = (p * PANEL, PANEL.min(n - p * PANEL));
        let mut store = |i: usize, acc: &[f32; PANEL]| {
            for c in 0..cols {
                let b = bias.map_or(0.0, |b| b[j0 + c]);
                // SAFETY: each task writes only its panel's columns of `out`, which outlives the loop.
                unsafe { o.write(i * n + j0 + c, acc[c] + b) };
            }
        };
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::panel512(x, panel, k, m, &mut store) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::panel256(x, panel, k, m, &mut store) },
            Isa::Portable => panel_portable(x, panel, k, m, store),
        }
    };
    if m * n * k < 1 << 15 || panels == 1 {
        (0..panels).for_each(run);
    } else {
        (0..panels).into_par_iter().for_each(run);
    }
}

#[cfg(test)]
mod tests {
    use super::super::reference;
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::sampling::Rng::new(seed);
        (0..n).map(|_| r.next_f64() as f32 * 2.0 - 1.0).collect()
    }

    #[test]
    fn packing_round_trips() {
        let w = data(70 * 9, 1);
        assert_eq!(unpack(&pack(&w, 70, 9), 70, 9), w);
    }

    #[test]
    fn packed_matmul_matches_reference_with_identical_bits_on_every_isa() {
        for &(m, k, n) in &[
            (1, 768, 2304),
            (5, 37, 13),
            (7, 64, 96),
            (13, 129, 33),
            (128, 96, 200),
            (3, 1, 2),
        ] {
            let (x, w, b) = (data(m * k, 2), data(n * k, 3), data(n, 4));
            let mut want = vec![0.0; m * n];
            reference::matmul(&x, &w, Some(&b), k, &mut want);
            let wp = pack(&w, n, k);
            let mut first: Option<Vec<f32>> = None;
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; m * n];
                matmul_with(isa, &x, &wp, Some(&b), k, n, &mut got);
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
            // Each row alone gives the same bits as inside the batch.
            let mut all = vec![0.0; m * n];
            matmul(&x, &wp, Some(&b), k, n, &mut all);
            for i in 0..m {
                let mut one = vec![0.0; n];
                matmul(&x[i * k..(i + 1) * k], &wp, Some(&b), k, n, &mut one);
                assert_eq!(one, all[i * n..(i + 1) * n]);
            }
        }
    }
}
