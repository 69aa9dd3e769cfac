// x[r] = wte[token r] + wpe[position r]; one workgroup per row. `w` holds the embedding's rows
// b..c (an adapter may bind less than the whole of it; each part is a dispatch, and a row is
// written by the one holding its token). dims: a = n_embd, b = first row, c = end row.
@group(0) @binding(2) var<storage, read> w: array<Word>;
@group(0) @binding(3) var<storage, read> wpe: array<f32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let r = wg.x;
    if r >= n_rows() { return; }
    let e = dims.a;
    let t_id = token_of(r);
    if t_id < dims.b || t_id >= dims.c { return; }
    let tok = (t_id - dims.b) * e;
    let pos = position_of(r) * e;
    for (var i = t; i < e; i += WG) {
        x[r * e + i] = wload(tok + i) + wpe[pos + i];
    }
}
