// Log-softmax statistics of each scored row, so that scoring reads back four numbers per row
// rather than its logits. One workgroup per picked row r (the first `n_scored` of them) whose
// target `target_of(r)` is not NO_TARGET: with m the row's largest logit, S = Σ e^{x - m} and
// A = Σ e^{x - m}·(x - m) (each thread's share in order, then the tree), it writes
// [x_t - m - ln S, the count of logits strictly above x_t, ln S - A / S, the count of NaNs and
// +infs]. NaN and infinity are told by their bits (a shader may assume there are none): a NaN
// counts for nothing in the rank, as on the host, where a NaN or +inf anywhere in the row makes
// the log-prob and entropy NaN (the host does that from the last field); neither enters m or the
// sums here.
// dims: a = vocab.
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read_write> stats: array<f32>;

const NO_TARGET: u32 = 0xffffffffu;

fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// NaN or +inf: what makes the host's log-sum-exp NaN.
fn poisons(x: f32) -> bool {
    return is_nan(x) || bitcast<u32>(x) == 0x7f800000u;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let r = wg.x;
    if r >= n_scored() { return; }
    let tgt = target_of(r);
    if tgt == NO_TARGET { return; }
    let v = dims.a;
    let s = r * v;
    let xt = logits[s + tgt];
    let t_nan = is_nan(xt);
    var m = -3.0e38;
    var above = 0.0;
    var bad = 0.0;
    for (var i = t; i < v; i += WG) {
        let x = logits[s + i];
        if !t_nan && !is_nan(x) && x > xt { above += 1.0; }
        if poisons(x) {
            bad += 1.0;
        } else {
            m = max(m, x);
        }
    }
    m = reduce_max(m, t);
    // Counts below 2^24 add exactly in f32.
    above = reduce_sum(above, t);
    bad = reduce_sum(bad, t);
    var sum = 0.0;
    var acc = 0.0;
    for (var i = t; i < v; i += WG) {
        let x = logits[s + i];
        if !poisons(x) {
            let d = x - m;
            let e = exp(d);
            sum += e;
            // e^d underflows to 0 long before d·e^d stops being 0 in f32 (and -inf · 0 is NaN).
            if e > 0.0 { acc += e * d; }
        }
    }
    sum = reduce_sum(sum, t);
    acc = reduce_sum(acc, t);
    if t == 0u {
        let ln_s = log(sum);
        stats[4u * r] = xt - m - ln_s;
        stats[4u * r + 1u] = above;
        stats[4u * r + 2u] = ln_s - acc / sum;
        stats[4u * r + 3u] = bad;
    }
}
