//! Compute backends. `cpu` holds the scalar reference ops (the test oracle) and the fast kernels;
//! `cuda` (feature `cuda`) runs the model on an NVIDIA GPU.

pub mod cpu;

#[cfg(feature = "cuda")]
pub mod cuda;
