//! The CPU backend. `model` runs GPT-2's forward pass here over `layers` (matrices packed for the
//! kernels) and a `kv_cache`; `pool` (threads) and `huge_buf` (huge-page memory) are its runtime.
//! Kernels: `reference` is the plain scalar version of every op, kept as the oracle that the fast
//! kernels (`kernels`, `attention`, and the products in `matrix` over `packed` and `q8`) are tested
//! against on every instruction set the machine has.

pub mod attention;
pub mod huge_buf;
pub mod kernels;
pub(crate) mod kv_cache;
mod layers;
pub mod matrix;
mod model;
pub mod packed;
pub mod pool;
pub mod q8;
// The oracle: compiled for the tests that hold each fast kernel to it (kernels.rs uses its
// activation functions at run time too).
#[cfg_attr(not(test), allow(dead_code))]
pub mod reference;

pub(crate) use model::{CpuModel, CpuState};

/// Deterministic values in [-1, 1) for the kernel tests.
#[cfg(test)]
pub(crate) fn test_data(n: usize, seed: u64) -> Vec<f32> {
    let mut r = crate::numerics::Rng::new(seed);
    (0..n).map(|_| r.next_f64() as f32 * 2.0 - 1.0).collect()
}
