// out (rows, n) = a (rows, k) · Wᵀ (W stored (n, k), one output per row) with a fused epilogue, as
// `reference::matmul` then the bias, activation or residual add. 16×16 output tiles, k in steps of
// 16 through workgroup memory; f32 accumulation whatever the weights' storage.
// dims: a = k, b = n, c = epilogue (0 none, 1 + bias, 2 + bias then activation, 3 out += · + bias),
// d = activation, e = 1 when the rows are the picked ones (the unembedding).
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<Word>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const T: u32 = 16u;
var<workgroup> ta: array<array<f32, 16>, 16>;
// One column of padding keeps the transposed reads off a single memory bank.
var<workgroup> tw: array<array<f32, 17>, 16>;

// tanh without overflow: exp of a non-positive argument only.
fn tanh_stable(x: f32) -> f32 {
    let t = exp(-2.0 * abs(x));
    return sign(x) * (1.0 - t) / (1.0 + t);
}

// erf by Abramowitz & Stegun 7.1.26 refined: |error| < 1.2e-7 (WGSL has no erf).
fn erf_approx(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let y = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277)))))))));
    return sign(x) * (1.0 - y);
}

// `reference::activation`, by the codes of `Activation` the host passes.
fn activation(x: f32) -> f32 {
    switch dims.d {
        case 1u: { return 0.5 * x * (1.0 + tanh_stable(0.7978846 * (x + 0.044715 * x * x * x))); }
        case 2u: { return 0.5 * x * (1.0 + erf_approx(x * 0.70710678)); }
        case 3u: { return max(x, 0.0); }
        case 4u: { return x / (1.0 + exp(-x)); }
        default: { return x / (1.0 + exp(-1.702 * x)); }
    }
}

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
    let o = r * n + c;
    switch dims.c {
        case 0u: { out[o] = acc; }
        case 1u: { out[o] = acc + bias[c]; }
        case 2u: { out[o] = activation(acc + bias[c]); }
        default: { out[o] = out[o] + acc + bias[c]; }
    }
}
