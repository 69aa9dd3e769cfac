// The new rows' keys and values into the cache, `[slot][head][position][head_dim]` per layer.
// One workgroup per row. dims: a = n_embd, b = head_dim, c = capacity.
@group(0) @binding(2) var<storage, read> qkv: array<f32>;
@group(0) @binding(3) var<storage, read_write> kc: array<f32>;
@group(0) @binding(4) var<storage, read_write> vc: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let r = wg.x;
    if r >= n_rows() { return; }
    let e = dims.a;
    let hd = dims.b;
    let cap = dims.c;
    let base = slot_of(r) * e * cap + position_of(r) * hd;
    for (var i = t; i < e; i += WG) {
        let dst = base + (i / hd) * cap * hd + i % hd;
        kc[dst] = qkv[r * 3u * e + e + i];
        vc[dst] = qkv[r * 3u * e + 2u * e + i];
    }
}
