//! Fast f32 CPU kernels for everything but the matrix products (`packed`, `q8`) and attention
//! (`attention`): layer norm, activations, softmax, residual adds; and the instruction-set token
//! ([`Isa`]) every SIMD kernel takes. Sums run in one fixed order (8 lanes, then a fixed lane reduction, then
//! the tail), so a row's result never depends on the other rows in the batch. The scalar oracle for
//! each op is in `reference`.

use super::pool::{parallel_for, Disjoint};
use crate::config::Activation;
pub use crate::numerics::lse::{
    chunk_diag_of_outputs, chunk_stats_of_outputs, log_sum_exp_of_chunks, lse_entropy_of_chunks,
    LSE_CHUNK,
};
use crate::numerics::simd::{exp_fast, max, multiversion};
pub use crate::numerics::simd::{Isa, Level};

use super::reference;

const LANES: usize = 8;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::lse::tests::data;

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
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
