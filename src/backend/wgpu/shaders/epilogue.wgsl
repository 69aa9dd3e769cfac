// The products' epilogue: out[o] = acc (0), + bias (1), activation(+ bias) (2), out[o] + acc +
// bias (3), by `dims.c`; `dims.d` picks the activation.
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

fn store(o: u32, c: u32, acc: f32) {
    switch dims.c {
        case 0u: { out[o] = acc; }
        case 1u: { out[o] = acc + bias[c]; }
        case 2u: { out[o] = activation(acc + bias[c]); }
        default: { out[o] = out[o] + acc + bias[c]; }
    }
}
