// Weights stored as bfloat16, two to a 32-bit word (element i in the low half when i is even): a
// bf16 is the top half of an f32.
alias Word = u32;
fn wload(i: u32) -> f32 {
    let u = w[i >> 1u];
    return bitcast<f32>(select(u << 16u, u & 0xffff0000u, (i & 1u) == 1u));
}
