//! CPU kernels: `reference` is the plain scalar version of every op, kept as the oracle that the
//! fast kernels (`kernels`, `attention`, and the products in `packed` and `q8`) are tested against.

pub mod attention;
pub mod huge_buf;
pub mod kernels;
pub mod matrix;
pub mod packed;
pub mod pool;
pub mod q8;
pub mod reference;

/// Deterministic values in [-1, 1) for the kernel tests.
#[cfg(test)]
pub(crate) fn test_data(n: usize, seed: u64) -> Vec<f32> {
    let mut r = crate::sampling::Rng::new(seed);
    (0..n).map(|_| r.next_f64() as f32 * 2.0 - 1.0).collect()
}
