// matmul.wgsl's product for at most 4 rows (decoding): each workgroup computes 4 output columns
// for every row, 16 invocations per column striding k (consecutive invocations read consecutive
// weights), then a tree sum; each weight is read once per step. Same bindings and dims as matmul.
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<Word>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const LANES: u32 = 16u;
const MAX_ROWS: u32 = 4u;
var<workgroup> part: array<array<f32, 4>, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let k = dims.a;
    let n = dims.b;
    let rows = min(select(n_rows(), n_picked(), dims.e == 1u), MAX_ROWS);
    let c = wg.x * (WG / LANES) + t / LANES;
    let lane = t % LANES;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    if c < n {
        for (var i = lane; i < k; i += LANES) {
            let wv = wload(c * k + i);
            for (var r = 0u; r < rows; r++) {
                acc[r] = fma(a[r * k + i], wv, acc[r]);
            }
        }
    }
    part[t] = acc;
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s = s >> 1u) {
        if lane < s {
            for (var r = 0u; r < MAX_ROWS; r++) { part[t][r] += part[t + s][r]; }
        }
        workgroupBarrier();
    }
    if lane == 0u && c < n {
        for (var r = 0u; r < rows; r++) { store(r * dims.f + dims.g + c, c, part[t][r]); }
    }
}
