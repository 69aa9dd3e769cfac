//! Compute backends. `cpu` holds the scalar reference ops (the test oracle) and the fast kernels.

pub mod cpu;
