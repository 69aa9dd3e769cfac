//! Where a model runs and how it is stored.

use std::fmt;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// The most threads a model may run on: far beyond any machine's cores, far below what exhausts
/// the process (each thread reserves a stack).
pub const MAX_THREADS: usize = 1024;

/// The device a model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal (builds with the `cuda` feature).
    Cuda(usize),
    /// A GPU (or software rasterizer) through wgpu — Vulkan, Metal or DirectX 12 — by its index in
    /// `gpt2 inspect --devices` (builds with the `wgpu` feature).
    Wgpu(usize),
}

impl Device {
    /// `cpu`, `cuda` (GPU 0), `cuda:N`, `wgpu` or `gpu` (adapter 0), `wgpu:N` or `gpu:N`.
    pub fn parse(s: &str) -> Result<Device> {
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        // `name` alone is index 0, `name:N` index N.
        let index = |name: &str| {
            s.strip_prefix(name).and_then(|r| {
                if r.is_empty() {
                    Some(0)
                } else {
                    r.strip_prefix(':')?.parse().ok()
                }
            })
        };
        if let Some(n) = index("cuda") {
            return if cfg!(feature = "cuda") {
                Ok(Device::Cuda(n))
            } else {
                Err(Error::Device {
                    backend: "cuda",
                    msg: format!("device {s}: this build has no CUDA support; rebuild with `cargo build --release --features cuda`"),
                })
            };
        }
        if let Some(n) = index("wgpu").or_else(|| index("gpu")) {
            return if cfg!(feature = "wgpu") {
                Ok(Device::Wgpu(n))
            } else {
                Err(Error::Device {
                    backend: "wgpu",
                    msg: format!("device {s}: this build has no wgpu support; rebuild with `cargo build --release --features wgpu`"),
                })
            };
        }
        Err(Error::Input(format!(
            "device {s}: expected cpu, cuda, cuda:N, gpu, gpu:N, wgpu or wgpu:N"
        )))
    }

    /// Whether the device can store weights as `dtype`.
    pub fn supports(self, dtype: DType) -> bool {
        self == Device::Cpu || dtype != DType::Q8
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Wgpu(n) => write!(f, "gpu:{n}"),
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

    /// Options from their names, as a front end takes them (the CLI's `--device`, `--dtype`,
    /// `--threads`; Python's arguments), checked here once for all of them. `prefix` goes before
    /// each setting's name in messages (`"--"` for flags).
    pub fn parse(
        device: &str,
        dtype: &str,
        threads: Option<i128>,
        prefix: &str,
    ) -> Result<LoadOptions> {
        let dtype = DType::parse(dtype).ok_or_else(|| {
            Error::Input(format!(
                "{prefix}dtype {dtype}: expected f32, f16, bf16 or q8"
            ))
        })?;
        let device = Device::parse(device).map_err(|e| match e {
            Error::Input(m) => Error::Input(format!("{prefix}{m}")),
            e => e,
        })?;
        let threads = match threads {
            None => None,
            Some(n) => Some(
                usize::try_from(n)
                    .ok()
                    .filter(|n| (1..=MAX_THREADS).contains(n))
                    .ok_or_else(|| {
                        Error::Input(format!("{prefix}threads {n}: expected 1 to {MAX_THREADS}"))
                    })?,
            ),
        };
        let opts = LoadOptions {
            device,
            dtype,
            threads,
        };
        opts.check(prefix)?;
        Ok(opts)
    }

    /// That the device can store the dtype and the thread count is in range; `prefix` as in
    /// [`LoadOptions::parse`].
    pub fn check(&self, prefix: &str) -> Result<()> {
        if !self.device.supports(self.dtype) {
            return Err(Error::Input(format!(
                "{prefix}dtype {} runs on the CPU only; on {} use f32, f16 or bf16",
                self.dtype, self.device
            )));
        }
        if let Some(n) = self.threads.filter(|n| !(1..=MAX_THREADS).contains(n)) {
            return Err(Error::Input(format!(
                "{prefix}threads {n}: expected 1 to {MAX_THREADS}"
            )));
        }
        Ok(())
    }
}
