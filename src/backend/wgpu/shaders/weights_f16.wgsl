// Weights stored as IEEE half floats, two to a 32-bit word (element i in the low half when i is
// even): unpacked in the shader, so no `shader-f16` feature is needed; arithmetic stays f32.
alias Word = u32;
fn wload(i: u32) -> f32 {
    let p = unpack2x16float(w[i >> 1u]);
    return select(p.x, p.y, (i & 1u) == 1u);
}
