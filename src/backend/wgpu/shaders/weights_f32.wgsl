// Weights stored as f32.
alias Word = f32;
fn wload(i: u32) -> f32 { return w[i]; }
