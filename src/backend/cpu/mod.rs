//! CPU kernels: `reference` is the plain scalar version of every op, kept as the oracle that the
//! fast kernels in `kernels` are tested against.

pub mod kernels;
pub mod matrix;
pub mod packed;
pub mod pool;
pub mod q8;
pub mod reference;
