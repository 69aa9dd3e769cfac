// out (rows, n) = a (rows, k) · Wᵀ (W stored (n, k), one output per row) with a fused epilogue, as
// `reference::matmul` then the bias, activation or residual add. 16×16 output tiles, k in steps of
// 16 through workgroup memory; f32 accumulation whatever the weights' storage.
// dims: a = k, b = n, c = epilogue (0 none, 1 + bias, 2 + bias then activation, 3 out += · + bias),
// d = activation, e = 1 when the rows are the picked ones (the unembedding), f = out's row stride,
// g = out's first column (a part of a matrix too large for one binding writes its columns).
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<Word>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const T: u32 = 16u;
var<workgroup> ta: array<array<f32, 16>, 16>;
// One column of padding keeps the transposed reads off a single memory bank.
var<workgroup> tw: array<array<f32, 17>, 16>;

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let k = dims.a;
    let n = dims.b;
    let rows = select(n_rows(), n_picked(), dims.e == 1u);
    let r = wg.y * T + l.y;
    let c = wg.x * T + l.x;
    // The weight row this thread loads into the tile (its column of the output tile is l.x).
    let wr = wg.x * T + l.y;
    var acc = 0.0;
    for (var k0 = 0u; k0 < k; k0 += T) {
        let kk = k0 + l.x;
        var av = 0.0;
        if r < rows && kk < k { av = a[r * k + kk]; }
        ta[l.y][l.x] = av;
        var wv = 0.0;
        if wr < n && kk < k { wv = wload(wr * k + kk); }
        tw[l.y][l.x] = wv;
        workgroupBarrier();
        for (var i = 0u; i < T; i++) {
            acc = fma(ta[l.y][i], tw[l.x][i], acc);
        }
        workgroupBarrier();
    }
    if r >= rows || c >= n { return; }
    store(r * dims.f + dims.g + c, c, acc);
}
