//! Scalar reference ops, written for clarity: the oracle for the fast kernels. Shapes follow
//! llm.c's comments: `(rows, cols)` row-major.

use crate::config::Activation;

/// LayerNorm over one row: biased variance, `eps` inside the square root (as torch).
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for i in 0..x.len() {
        out[i] = (x[i] - mean) * inv * weight[i] + bias[i];
    }
}

/// `gelu_new`: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
pub fn gelu_new(x: f32) -> f32 {
    const S: f32 = 0.797_884_6; // √(2/π)
    0.5 * x * (1.0 + (S * (x + 0.044715 * x * x * x)).tanh())
}

pub fn activation(act: Activation, x: f32) -> f32 {
    match act {
        Activation::GeluNew => gelu_new(x),
        Activation::Gelu => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::Relu => x.max(0.0),
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
    }
}

/// In-place softmax, max-subtracted.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// `out (m, n) = x (m, k) · wᵀ + bias`, with `w` stored `(n, k)`.
pub fn matmul(x: &[f32], w: &[f32], bias: Option<&[f32]>, k: usize, out: &mut [f32]) {
    let n = w.len() / k;
    for (xr, or) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
        for j in 0..n {
            let mut acc = bias.map_or(0.0, |b| b[j]);
            for i in 0..k {
                acc += xr[i] * w[j * k + i];
            }
            or[j] = acc;
        }
    }
}

/// One query head attending causally over `keys`/`values` (`(len, head_dim)` each, all visible).
pub fn attention(q: &[f32], keys: &[f32], values: &[f32], scale: f32, out: &mut [f32]) {
    let hd = q.len();
    let mut scores: Vec<f32> = keys
        .chunks_exact(hd)
        .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale)
        .collect();
    softmax(&mut scores);
    out.fill(0.0);
    for (w, v) in scores.iter().zip(values.chunks_exact(hd)) {
        for d in 0..hd {
            out[d] += w * v[d];
        }
    }
}

/// The 8-bit product (`q8`'s scheme): `w` as codes `q (n, k)` with one scale per output and block
/// of 32 inputs, `d (n, ⌈k/32⌉)`; each row of `x` is quantized per block to codes in [-127, 127]
/// with scale `max|x| / 127`; each block's integer dot product is scaled by `d_w · d_x` and added.
pub fn matmul_q8(x: &[f32], q: &[i8], d: &[f32], bias: Option<&[f32]>, k: usize, out: &mut [f32]) {
    let n = q.len() / k;
    let blocks = k.div_ceil(32);
    for (xr, or) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
        let mut xq = vec![0i32; k];
        let mut xd = vec![0f32; blocks];
        for (b, xd) in xd.iter_mut().enumerate() {
            let r = b * 32..((b + 1) * 32).min(k);
            let amax = xr[r.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
            for i in r {
                xq[i] = if amax > 0.0 {
                    (xr[i] * (127.0 / amax)).round_ties_even() as i32
                } else {
                    0
                };
            }
            *xd = amax / 127.0;
        }
        for j in 0..n {
            let mut acc = 0f32;
            for b in 0..blocks {
                let s: i32 = (b * 32..((b + 1) * 32).min(k))
                    .map(|i| q[j * k + i] as i32 * xq[i])
                    .sum();
                acc = (s as f32).mul_add(d[j * blocks + b] * xd[b], acc);
            }
            or[j] = acc + bias.map_or(0.0, |b| b[j]);
        }
    }
}
