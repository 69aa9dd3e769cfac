// LayerNorm of each row as `reference::layer_norm`: mean, then the biased variance of the
// deviations, eps inside the square root. One workgroup per output row.
// dims: a = n_embd, b = 1 to read the picked rows (the final norm), x = eps.
@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;
@group(0) @binding(5) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let r = wg.x;
    let picked = dims.b == 1u;
    if r >= select(n_rows(), n_picked(), picked) { return; }
    let e = dims.a;
    let s = select(r, picked_row(r), picked) * e;
    var sum = 0.0;
    for (var i = t; i < e; i += WG) { sum += src[s + i]; }
    let mean = reduce_sum(sum, t) / f32(e);
    var sq = 0.0;
    for (var i = t; i < e; i += WG) {
        let d = src[s + i] - mean;
        sq += d * d;
    }
    let inv = 1.0 / sqrt(reduce_sum(sq, t) / f32(e) + dims.x);
    for (var i = t; i < e; i += WG) {
        dst[r * e + i] = (src[s + i] - mean) * inv * gamma[i] + beta[i];
    }
}
