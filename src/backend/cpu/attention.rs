//! Attention of a few queries of one head over its cached keys and values, stored as f32 or f16
//! ([`Elem`]). Keys are tiled, `[position / 16][head_dim][16]`: the 16 scores of a tile are 16
//! vertical FMA chains over the head dimension that stay in registers, and a head's keys are one
//! sequential stream (a transposed `[head_dim][capacity]` layout made every dimension its own short
//! stream, which the hardware prefetchers follow badly). Values are rows, `[position][head_dim]`.
//!
//! Every score is one FMA chain over the head dimension in order and every output one FMA chain
//! over the positions in order, so each instruction set gives the scalar version's bits.

use super::kernels::{self, Isa, Level};
use super::packed::Elem;

/// Positions per key tile.
pub const TILE: usize = 16;

/// Where dimension `d` of position `pos` lives in a head's tiled keys.
pub fn key_index(pos: usize, d: usize, hd: usize) -> usize {
    (pos / TILE) * TILE * hd + d * TILE + pos % TILE
}

/// Causal attention of `count` consecutive queries of one sequence, `qs` (`count × hd`), the first
/// of which sees `len0` positions: raw scores, scaled softmax, weighted values, into `out`
/// (`count × hd`). `keys` and `values` hold at least `len0 + count - 1` positions; `scores` is
/// scratch of at least `count × (len0 + count - 1)` rounded up to whole tiles.
#[allow(clippy::too_many_arguments)]
pub fn attend<T: Elem>(
    qs: &[f32],
    hd: usize,
    keys: &[T],
    values: &[T],
    len0: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let count = qs.len() / hd;
    let len = len0 + count - 1;
    let stride = len.next_multiple_of(TILE);
    let isa = Isa::detect();
    attention_scores(isa, qs, hd, keys, len, &mut scores[..count * stride]);
    for i in 0..count {
        kernels::softmax_scaled(&mut scores[i * stride..i * stride + len0 + i], scale);
    }
    #[cfg(target_arch = "x86_64")]
    if isa.level() == Level::Avx512 && hd == x86::JOINT_HD && (2..=4).contains(&count) {
        let w = |i: usize| &scores[i * stride..i * stride + len0 + i];
        assert!(values.len() >= len * hd && out.len() >= count * hd);
        // SAFETY: an `Isa` of level Avx512 proves the features; the assert bounds every access
        // (row i reads `len0 + i ≤ len` value rows and writes `out[i·hd..][..hd]`).
        return unsafe {
            match count {
                2 => x86::weighted_rows512::<2, T>(std::array::from_fn(w), values, out),
                3 => x86::weighted_rows512::<3, T>(std::array::from_fn(w), values, out),
                _ => x86::weighted_rows512::<4, T>(std::array::from_fn(w), values, out),
            }
        };
    }
    for (i, o) in out.chunks_exact_mut(hd).enumerate().take(count) {
        let s = &scores[i * stride..i * stride + len0 + i];
        weighted_sum(isa, s, &values[..s.len() * hd], o);
    }
}

/// Raw scores `q·k` of the queries `qs` (`rows × hd`) against the first `len` positions of the tiled
/// `keys`, into `scores` (`rows × stride`, `stride` = `len` rounded up to a tile; the scores of the
/// padding positions are meaningless).
pub fn attention_scores<T: Elem>(
    isa: Isa,
    qs: &[f32],
    hd: usize,
    keys: &[T],
    len: usize,
    scores: &mut [f32],
) {
    let rows = qs.len() / hd;
    let tiles = len.div_ceil(TILE);
    let stride = tiles * TILE;
    assert!(keys.len() >= tiles * TILE * hd && scores.len() >= rows * stride);
    let mut r = 0;
    while r < rows {
        let mr = (rows - r).min(4);
        let (q, s) = (&qs[r * hd..(r + mr) * hd], &mut scores[r * stride..]);
        match isa.level() {
            // SAFETY: an `Isa` of this level proves the CPU has its features; the asserts above bound every access.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe {
                match mr {
                    1 => x86::scores512::<1, T>(q, hd, keys, tiles, s, stride),
                    2 => x86::scores512::<2, T>(q, hd, keys, tiles, s, stride),
                    3 => x86::scores512::<3, T>(q, hd, keys, tiles, s, stride),
                    _ => x86::scores512::<4, T>(q, hd, keys, tiles, s, stride),
                }
            },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe {
                for i in 0..mr {
                    x86::scores256(&q[i * hd..(i + 1) * hd], keys, tiles, &mut s[i * stride..]);
                }
            },
            Level::Portable => {
                for i in 0..mr {
                    scores_portable(&q[i * hd..(i + 1) * hd], keys, tiles, &mut s[i * stride..]);
                }
            }
        }
        r += mr;
    }
}

fn scores_portable<T: Elem>(q: &[f32], keys: &[T], tiles: usize, scores: &mut [f32]) {
    let hd = q.len();
    for t in 0..tiles {
        for l in 0..TILE {
            let mut s = 0f32;
            for (d, &qd) in q.iter().enumerate() {
                s = qd.mul_add(keys[t * TILE * hd + d * TILE + l].to_f32(), s);
            }
            scores[t * TILE + l] = s;
        }
    }
}

/// `out = Σ_p w[p] · values[p]` over the positions of `w` (`values`: `(w.len(), hd)` rows).
pub fn weighted_sum<T: Elem>(isa: Isa, w: &[f32], values: &[T], out: &mut [f32]) {
    let hd = out.len();
    assert!(values.len() >= w.len() * hd);
    let done = match isa.level() {
        // SAFETY: an `Isa` of this level proves the CPU has its features; the assert above bounds
        // every access.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { x86::weighted_sum512(w, values, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { x86::weighted_sum256(w, values, out) },
        Level::Portable => 0,
    };
    // Dimensions the SIMD version left (all of them without it): the same chains, one at a time.
    for (d, o) in out.iter_mut().enumerate().skip(done) {
        let mut acc = 0f32;
        for (p, &wp) in w.iter().enumerate() {
            acc = wp.mul_add(values[p * hd + d].to_f32(), acc);
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::packed::x86::{load16, load8};
    use super::{Elem, TILE};

    /// `MR` queries against every tile, four tiles at a time (`4·MR` independent chains).
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn scores512<const MR: usize, T: Elem>(
        q: &[f32],
        hd: usize,
        keys: &[T],
        tiles: usize,
        scores: &mut [f32],
        stride: usize,
    ) {
        let (q, k, s) = (q.as_ptr(), keys.as_ptr(), scores.as_mut_ptr());
        let mut t = 0;
        // Tiles past the last are never prefetched: the rest of the region is unused context, and
        // reading it (the prefetch, then the hardware prefetcher following it) costs bandwidth.
        while t + 4 <= tiles {
            let (kt, st) = (k.add(t * TILE * hd), s.add(t * TILE));
            block512::<MR, 4, T>(q, hd, kt, tiles - t - 4, st, stride);
            t += 4;
        }
        while t < tiles {
            let (kt, st) = (k.add(t * TILE * hd), s.add(t * TILE));
            block512::<MR, 1, T>(q, hd, kt, tiles - t - 1, st, stride);
            t += 1;
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    unsafe fn block512<const MR: usize, const NT: usize, T: Elem>(
        q: *const f32,
        hd: usize,
        k: *const T,
        later: usize,
        s: *mut f32,
        stride: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NT]; MR];
        for d in 0..hd {
            let kv: [__m512; NT] = std::array::from_fn(|j| {
                let p = k.add(j * TILE * hd + d * TILE);
                // The next tiles' same line (a head's keys are read front to back), of the `later`
                // tiles that hold keys.
                if j < later {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(NT * TILE * hd) as *const i8);
                }
                load16(p)
            });
            for r in 0..MR {
                let qb = _mm512_set1_ps(*q.add(r * hd + d));
                for j in 0..NT {
                    acc[r][j] = _mm512_fmadd_ps(qb, kv[j], acc[r][j]);
                }
            }
        }
        for r in 0..MR {
            for j in 0..NT {
                _mm512_storeu_ps(s.add(r * stride + j * TILE), acc[r][j]);
            }
        }
    }

    /// One query against every tile, a tile (two registers) at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores256<T: Elem>(q: &[f32], keys: &[T], tiles: usize, scores: &mut [f32]) {
        let hd = q.len();
        for t in 0..tiles {
            let k = keys.as_ptr().add(t * TILE * hd);
            let mut acc = [_mm256_setzero_ps(); 2];
            for d in 0..hd {
                let qb = _mm256_set1_ps(q[d]);
                for h in 0..2 {
                    acc[h] = _mm256_fmadd_ps(qb, load8(k.add(d * TILE + 8 * h)), acc[h]);
                }
            }
            for h in 0..2 {
                _mm256_storeu_ps(scores.as_mut_ptr().add(t * TILE + 8 * h), acc[h]);
            }
        }
    }

    /// The whole 16-wide chunks of the head dimension, four at a time where they fit; returns how
    /// many dimensions it did.
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn weighted_sum512<T: Elem>(w: &[f32], values: &[T], out: &mut [f32]) -> usize {
        let hd = out.len();
        let v = values.as_ptr();
        let mut c = 0;
        while c + 64 <= hd {
            chunk512::<4, T>(w, v.add(c), hd, out.as_mut_ptr().add(c));
            c += 64;
        }
        while c + 16 <= hd {
            chunk512::<1, T>(w, v.add(c), hd, out.as_mut_ptr().add(c));
            c += 16;
        }
        c
    }

    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    unsafe fn chunk512<const N: usize, T: Elem>(w: &[f32], v: *const T, hd: usize, out: *mut f32) {
        let mut acc = [_mm512_setzero_ps(); N];
        for (p, &wp) in w.iter().enumerate() {
            let wb = _mm512_set1_ps(wp);
            let row = v.add(p * hd);
            if p + 8 < w.len() {
                _mm_prefetch::<_MM_HINT_T0>(row.add(8 * hd) as *const i8);
            }
            for j in 0..N {
                acc[j] = _mm512_fmadd_ps(wb, load16(row.add(16 * j)), acc[j]);
            }
        }
        for j in 0..N {
            _mm512_storeu_ps(out.add(16 * j), acc[j]);
        }
    }

    /// The head dimension [`weighted_rows512`] handles (every GPT-2 size has it).
    pub const JOINT_HD: usize = 64;

    /// [`weighted_sum512`] for `R` consecutive queries of a block at once (weights `w[r]`, one
    /// position more per row): each value row is loaded and widened once for all the queries that
    /// see it, and `4R` chains run side by side. Row r's outputs go to `out[r·64..][..64]`, each the
    /// same FMA chain over the positions in order as [`weighted_sum512`].
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn weighted_rows512<const R: usize, T: Elem>(
        w: [&[f32]; R],
        values: &[T],
        out: &mut [f32],
    ) {
        const HD: usize = JOINT_HD;
        assert!(w.windows(2).all(|p| p[0].len() <= p[1].len()));
        assert!(values.len() >= w[R - 1].len() * HD && out.len() >= R * HD);
        let v = values.as_ptr();
        let shared = w[0].len();
        let mut acc = [[_mm512_setzero_ps(); HD / 16]; R];
        for p in 0..shared {
            let row = v.add(p * HD);
            if p + 8 < shared {
                _mm_prefetch::<_MM_HINT_T0>(row.add(8 * HD) as *const i8);
            }
            let mut vals = [_mm512_setzero_ps(); HD / 16];
            for j in 0..HD / 16 {
                vals[j] = load16(row.add(16 * j));
            }
            for r in 0..R {
                let wb = _mm512_set1_ps(*w[r].get_unchecked(p));
                for j in 0..HD / 16 {
                    acc[r][j] = _mm512_fmadd_ps(wb, vals[j], acc[r][j]);
                }
            }
        }
        // The later rows' own last positions, in order.
        for r in 1..R {
            for p in shared..w[r].len() {
                let (wb, row) = (_mm512_set1_ps(w[r][p]), v.add(p * HD));
                for j in 0..HD / 16 {
                    acc[r][j] = _mm512_fmadd_ps(wb, load16(row.add(16 * j)), acc[r][j]);
                }
            }
        }
        for r in 0..R {
            for j in 0..HD / 16 {
                _mm512_storeu_ps(out.as_mut_ptr().add(r * HD + 16 * j), acc[r][j]);
            }
        }
    }

    /// [`weighted_sum512`] with 8-wide registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum256<T: Elem>(w: &[f32], values: &[T], out: &mut [f32]) -> usize {
        let hd = out.len();
        let v = values.as_ptr();
        let mut c = 0;
        while c + 32 <= hd {
            chunk256::<4, T>(w, v.add(c), hd, out.as_mut_ptr().add(c));
            c += 32;
        }
        while c + 8 <= hd {
            chunk256::<1, T>(w, v.add(c), hd, out.as_mut_ptr().add(c));
            c += 8;
        }
        c
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn chunk256<const N: usize, T: Elem>(w: &[f32], v: *const T, hd: usize, out: *mut f32) {
        let mut acc = [_mm256_setzero_ps(); N];
        for (p, &wp) in w.iter().enumerate() {
            let wb = _mm256_set1_ps(wp);
            let row = v.add(p * hd);
            for j in 0..N {
                acc[j] = _mm256_fmadd_ps(wb, load8(row.add(8 * j)), acc[j]);
            }
        }
        for j in 0..N {
            _mm256_storeu_ps(out.add(8 * j), acc[j]);
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::super::{reference, test_data as data};
    use super::*;

    fn tiled<T: Elem>(k: &[f32], hd: usize, cap: usize) -> Vec<T> {
        // Padding holds NaN: no score that is used may read it.
        let mut out = vec![T::from_f32(f32::NAN); cap.next_multiple_of(TILE) * hd];
        for (p, row) in k.chunks_exact(hd).enumerate() {
            for (d, &x) in row.iter().enumerate() {
                out[key_index(p, d, hd)] = T::from_f32(x);
            }
        }
        out
    }

    /// Each query of a block against the scalar reference on the same (rounded) keys and values,
    /// and every ISA the machine has bit for bit against the portable version.
    fn check<T: Elem>(tol: f32) {
        for hd in [8, 24, 64, 80] {
            for (len0, count) in [(1, 1), (2, 1), (17, 1), (100, 4), (5, 3), (63, 2)] {
                let len = len0 + count - 1;
                let round = |v: Vec<f32>| -> Vec<f32> {
                    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
                };
                let qs = data(count * hd, 9);
                let k = round(data(len * hd, 10).iter().map(|v| v * 3.0).collect());
                let v = round(data(len * hd, 11));
                let keys = tiled::<T>(&k, hd, len + 5);
                let values: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
                let mut scores = vec![0.0; count * len.next_multiple_of(TILE)];
                let mut got = vec![0.0; count * hd];
                attend(&qs, hd, &keys, &values, len0, 0.2, &mut scores, &mut got);
                for i in 0..count {
                    let n = len0 + i;
                    let mut want = vec![0.0; hd];
                    let q = &qs[i * hd..(i + 1) * hd];
                    reference::attention(q, &k[..n * hd], &v[..n * hd], 0.2, &mut want);
                    for (a, b) in got[i * hd..(i + 1) * hd].iter().zip(&want) {
                        assert!(
                            (a - b).abs() < tol,
                            "hd {hd} len0 {len0} row {i}: {a} vs {b}"
                        );
                    }
                }
                let stride = len.next_multiple_of(TILE);
                let mut base = vec![0.0; count * stride];
                attention_scores(Isa::portable(), &qs, hd, &keys, len, &mut base);
                for isa in Isa::available() {
                    let mut s = vec![0.0; count * stride];
                    attention_scores(isa, &qs, hd, &keys, len, &mut s);
                    for i in 0..count {
                        let (a, b) = (&s[i * stride..][..len], &base[i * stride..][..len]);
                        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(a), bits(b), "{isa:?} scores, hd {hd} len {len}");
                    }
                    #[cfg(target_arch = "x86_64")]
                    if isa.level() == Level::Avx512 && hd == x86::JOINT_HD && count >= 2 {
                        // Each query of the block sees one position more than the one before.
                        let w: Vec<&[f32]> = (0..count)
                            .map(|i| &base[i * stride..][..len0 + i])
                            .collect();
                        let mut joint = vec![0.0; count * hd];
                        // SAFETY: the CPU has AVX-512 (the isa says so); the kernel asserts bounds.
                        unsafe {
                            match count {
                                2 => x86::weighted_rows512::<2, T>(
                                    w.clone().try_into().unwrap(),
                                    &values,
                                    &mut joint,
                                ),
                                3 => x86::weighted_rows512::<3, T>(
                                    w.clone().try_into().unwrap(),
                                    &values,
                                    &mut joint,
                                ),
                                _ => x86::weighted_rows512::<4, T>(
                                    w.clone().try_into().unwrap(),
                                    &values,
                                    &mut joint,
                                ),
                            }
                        }
                        for (i, wi) in w.iter().enumerate() {
                            let mut one = vec![0.0; hd];
                            weighted_sum(Isa::portable(), wi, &values, &mut one);
                            assert_eq!(
                                joint[i * hd..(i + 1) * hd],
                                one,
                                "joint row {i}, len0 {len0}"
                            );
                        }
                    }
                    let w = &base[..len];
                    let (mut a, mut b) = (vec![0.0; hd], vec![0.0; hd]);
                    weighted_sum(isa, w, &values, &mut a);
                    weighted_sum(Isa::portable(), w, &values, &mut b);
                    assert_eq!(a, b, "{isa:?} weighted sum, hd {hd} len {len}");
                }
            }
        }
    }

    #[test]
    fn f32_cache_attention_matches_the_reference() {
        check::<f32>(1e-5);
    }

    #[test]
    fn f16_cache_attention_matches_the_reference_on_the_rounded_cache() {
        check::<f16>(1e-5);
    }
}
