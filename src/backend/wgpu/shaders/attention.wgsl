// Causal attention of each new row over its slot's cached positions 0..=position, one workgroup
// per (row, head), as `reference::attention`: scaled scores, max-subtracted softmax, weighted sum
// of values. The scores live in a scratch row per (row, head), `capacity` long.
// dims: a = n_embd, b = head_dim, c = capacity, d = n_head, x = scale.
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> kc: array<f32>;
@group(0) @binding(4) var<storage, read> vc: array<f32>;
@group(0) @binding(5) var<storage, read_write> scores: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let r = wg.x;
    let h = wg.y;
    if r >= n_rows() { return; }
    let e = dims.a;
    let hd = dims.b;
    let cap = dims.c;
    let len = position_of(r) + 1u;
    let q = r * 3u * e + h * hd;
    let base = slot_of(r) * e * cap + h * cap * hd;
    let s = (r * dims.d + h) * cap;
    var m = -3.4e38;
    for (var j = t; j < len; j += WG) {
        var dot = 0.0;
        for (var d = 0u; d < hd; d++) { dot = fma(qkv[q + d], kc[base + j * hd + d], dot); }
        let sc = dot * dims.x;
        scores[s + j] = sc;
        m = max(m, sc);
    }
    m = reduce_max(m, t);
    var sum = 0.0;
    for (var j = t; j < len; j += WG) {
        let p = exp(scores[s + j] - m);
        scores[s + j] = p;
        sum += p;
    }
    sum = reduce_sum(sum, t);
    // Each thread now reads every position's weight, written by the others.
    storageBarrier();
    for (var d = t; d < hd; d += WG) {
        var acc = 0.0;
        for (var j = 0u; j < len; j++) { acc = fma(scores[s + j], vc[base + j * hd + d], acc); }
        out[r * e + h * hd + d] = acc / sum;
    }
}
