//! Where a model runs and how it is stored.

use std::fmt;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// The device a model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal (builds with the `cuda` feature).
    Cuda(usize),
}

impl Device {
    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    pub fn parse(s: &str) -> Result<Device> {
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        let ordinal = s.strip_prefix("cuda").and_then(|r| {
            if r.is_empty() {
                Some(0)
            } else {
                r.strip_prefix(':')?.parse().ok()
            }
        });
        match ordinal {
            Some(n) if cfg!(feature = "cuda") => Ok(Device::Cuda(n)),
            Some(_) => Err(Error::Device {
                backend: "cuda",
                msg: format!("device {s}: this build has no CUDA support; rebuild with `cargo build --release --features cuda`"),
            }),
            None => Err(Error::Input(format!(
                "device {s}: expected cpu, cuda or cuda:N"
            ))),
        }
    }

    /// Whether the device can store weights as `dtype`.
    pub fn supports(self, dtype: DType) -> bool {
        !(matches!(self, Device::Cuda(_)) && dtype == DType::Q8)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    pub device: Device,
    /// How the weight matrices are stored (f32 by default; q8 on the CPU only).
    pub dtype: DType,
    /// CPU threads (the caller's included); default one per core.
    pub threads: Option<usize>,
}

impl LoadOptions {
    pub fn new(device: Device, dtype: DType) -> Self {
        LoadOptions {
            device,
            dtype,
            threads: None,
        }
    }

    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }
}
