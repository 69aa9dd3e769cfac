//! The backends behind [`crate::Model`]: one enum over the CPU, (feature `cuda`) an NVIDIA GPU and
//! (feature `wgpu`) any GPU that Vulkan, Metal or DirectX 12 drives, built by one [`load`] from
//! GPT-2's parameters. Everything backend-specific — thread pools,
//! buffers, cache layouts, device handles — lives below this module; the rest of the crate sees
//! only [`Backend`] through [`Model`].

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod model;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod slots;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

pub use model::{Model, State};

use crate::config::GPT2Config;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::batch::Checked;
use crate::model::params::Params;
use crate::model::sites::HookPlan;
use crate::model::{Device, LoadOptions, Logits, Rows};
use crate::numerics::TargetStats;

/// Rows of logits a GPU computes at once for many rows: bounds memory at `SCORE_ROWS · vocab`.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
const SCORE_ROWS: usize = 64;

/// A loaded model on one backend.
// One per model, made once: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Backend {
    Cpu(cpu::CpuModel),
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaModel),
    #[cfg(feature = "wgpu")]
    Wgpu(wgpu::WgpuModel),
}

/// A backend's KV cache and buffers.
pub(crate) enum BackendState {
    Cpu(Box<cpu::CpuState>),
    /// The GPU's state, and the host copy of the last logits.
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda::CudaState>, Vec<f32>),
    /// The adapter's state, and the host copy of the last logits.
    #[cfg(feature = "wgpu")]
    Wgpu(Box<wgpu::WgpuState>, Vec<f32>),
}

/// Build the model for `opts.device`, reading the parameters one tensor at a time.
pub(crate) fn load(params: &Params, opts: &LoadOptions) -> Result<Backend> {
    opts.check("")?;
    match opts.device {
        Device::Cpu => Ok(Backend::Cpu(cpu::CpuModel::build(
            params,
            opts.dtype,
            opts.threads,
        )?)),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => Ok(Backend::Cuda(cuda::CudaModel::build(
            params, ordinal, opts.dtype,
        )?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(Error::Device {
            backend: "cuda",
            msg: "this build has no CUDA support; rebuild with `--features cuda`".into(),
        }),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(index) => Ok(Backend::Wgpu(wgpu::WgpuModel::build(
            params, index, opts.dtype,
        )?)),
        #[cfg(not(feature = "wgpu"))]
        Device::Wgpu(_) => Err(Error::Device {
            backend: "wgpu",
            msg: "this build has no wgpu support; rebuild with `--features wgpu`".into(),
        }),
    }
}

/// Refuses, before any weights are read or built, a state of `slots` sequences of `capacity`
/// positions that cannot fit the memory available for a model loaded with `opts` (what
/// [`Model::new_state`] checks once the model exists). A GPU checks its own memory at that point.
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) fn check_state_fits(
    config: &GPT2Config,
    opts: &LoadOptions,
    slots: usize,
    capacity: usize,
) -> Result<()> {
    match opts.device {
        Device::Cpu => cpu::kv_cache::KvCache::check_fits(
            config,
            slots,
            capacity,
            cpu::kv_cache::KvType::for_weights(opts.dtype),
        ),
        Device::Cuda(_) | Device::Wgpu(_) => Ok(()),
    }
}

/// One line per wgpu adapter, as `gpu:N` numbers them (`gpt2 inspect --devices`); an error when
/// this build has no wgpu support.
pub fn wgpu_adapters() -> Result<Vec<String>> {
    #[cfg(feature = "wgpu")]
    return Ok(wgpu::adapter_descriptions());
    #[cfg(not(feature = "wgpu"))]
    Err(Error::Device {
        backend: "wgpu",
        msg: "this build has no wgpu support; rebuild with `--features wgpu`".into(),
    })
}

/// A state used with a model of another backend: a programming error, reported as one.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn mismatch<T>() -> Result<T> {
    Err(Error::Input(
        "this state belongs to a model on another device".into(),
    ))
}

impl Backend {
    pub(crate) fn config(&self) -> &GPT2Config {
        match self {
            Backend::Cpu(m) => m.config(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => &m.config,
            #[cfg(feature = "wgpu")]
            Backend::Wgpu(m) => &m.config,
        }
    }

    pub(crate) fn dtype(&self) -> DType {
        match self {
            Backend::Cpu(m) => m.dtype(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => m.dtype,
            #[cfg(feature = "wgpu")]
            Backend::Wgpu(m) => m.dtype,
        }
    }

    pub(crate) fn device(&self) -> Device {
        match self {
            Backend::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => Device::Cuda(m.ordinal),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu(m) => Device::Wgpu(m.index),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Backend::Cpu(m) => m.describe(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => format!("cuda:{} ({})", m.ordinal, m.device_name),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu(m) => format!("gpu:{} ({})", m.index, m.adapter),
        }
    }

    pub(crate) fn weight_bytes(&self) -> usize {
        match self {
            Backend::Cpu(m) => m.weight_bytes(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => m.weight_bytes(),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu(m) => m.weight_bytes(),
        }
    }

    pub(crate) fn to_dtype(&self, dtype: DType) -> Result<Backend> {
        match self {
            Backend::Cpu(m) => Ok(Backend::Cpu(m.to_dtype(dtype)?)),
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            _ => Err(Error::Input(
                "to_dtype converts CPU models; load a GPU model in the dtype wanted".into(),
            )),
        }
    }

    pub(crate) fn new_state(&self, slots: usize, capacity: usize) -> Result<BackendState> {
        match self {
            Backend::Cpu(m) => Ok(BackendState::Cpu(Box::new(m.new_state(slots, capacity)?))),
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => {
                // A step may bring every slot's whole capacity (a prefill of full prompts).
                let rows = slots.saturating_mul(capacity);
                Ok(BackendState::Cuda(
                    Box::new(m.new_state(slots, capacity, rows, SCORE_ROWS)?),
                    Vec::new(),
                ))
            }
            #[cfg(feature = "wgpu")]
            Backend::Wgpu(m) => Ok(BackendState::Wgpu(
                Box::new(m.new_state(slots, capacity)?),
                Vec::new(),
            )),
        }
    }

    pub(crate) fn forward<'s>(
        &self,
        st: &'s mut BackendState,
        batch: Checked,
        which: Logits,
    ) -> Result<&'s [f32]> {
        match (self, st) {
            (Backend::Cpu(m), BackendState::Cpu(s)) => Ok(m.forward(s, batch, which)),
            #[cfg(feature = "cuda")]
            (Backend::Cuda(m), BackendState::Cuda(s, host)) => {
                gpu_host::forward(batch, which, host, &mut |c, w| m.forward(s, c, w))
            }
            #[cfg(feature = "wgpu")]
            (Backend::Wgpu(m), BackendState::Wgpu(s, host)) => {
                gpu_host::forward(batch, which, host, &mut |c, w| m.forward(s, c, w))
            }
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            _ => mismatch(),
        }
    }

    /// A forward pass reading and replacing named sites (`Model::run_with_hooks`).
    pub(crate) fn run_hooked(
        &self,
        st: &mut BackendState,
        batch: Checked,
        hooks: &mut HookPlan,
        logits: bool,
    ) -> Result<Option<Vec<f32>>> {
        match (self, st) {
            (Backend::Cpu(m), BackendState::Cpu(s)) => Ok(m.run_hooked(s, batch, hooks, logits)),
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            (Backend::Cpu(_), _) => mismatch(),
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            (gpu, _) => Err(Error::Device {
                backend: if cfg!(feature = "cuda") && matches!(gpu.device(), Device::Cuda(_)) {
                    "cuda"
                } else {
                    "wgpu"
                },
                msg: "activation sites and patching run on the CPU backend; load the model with device \"cpu\" for them".into(),
            }),
        }
    }

    /// The logits of the rows `rows` selects and the log-probabilities of its targets, one entry
    /// per sequence ([`Model::forward_rows`]).
    pub(crate) fn forward_rows<'s>(
        &self,
        st: &'s mut BackendState,
        batch: Checked,
        rows: &[Rows],
    ) -> Result<(&'s [f32], Vec<f64>)> {
        match (self, st) {
            (Backend::Cpu(m), BackendState::Cpu(s)) => Ok(m.forward_rows(s, batch, rows)),
            #[cfg(feature = "cuda")]
            (Backend::Cuda(m), BackendState::Cuda(s, host)) => {
                let v = m.config.vocab_size;
                gpu_host::forward_rows(v, batch, rows, host, &mut |c, w| m.forward(s, c, w))
            }
            #[cfg(feature = "wgpu")]
            (Backend::Wgpu(m), BackendState::Wgpu(s, host)) => {
                let (logits, logprobs) = m.forward_rows(s, batch, rows)?;
                *host = logits;
                Ok((host, logprobs))
            }
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            _ => mismatch(),
        }
    }

    pub(crate) fn forward_argmax(&self, st: &mut BackendState, batch: Checked) -> Result<Vec<u32>> {
        match (self, st) {
            (Backend::Cpu(m), BackendState::Cpu(s)) => Ok(m.forward_argmax(s, batch)),
            #[cfg(feature = "cuda")]
            (Backend::Cuda(m), BackendState::Cuda(s, _)) => m.forward_argmax(s, batch),
            #[cfg(feature = "wgpu")]
            (Backend::Wgpu(m), BackendState::Wgpu(s, _)) => m.forward_argmax(s, batch),
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            _ => mismatch(),
        }
    }

    pub(crate) fn forward_logprobs(
        &self,
        st: &mut BackendState,
        batch: Checked,
        targets: &[Option<u32>],
    ) -> Result<Vec<f64>> {
        match (self, st) {
            (Backend::Cpu(m), BackendState::Cpu(s)) => Ok(m.forward_logprobs(s, batch, targets)),
            #[cfg(feature = "cuda")]
            (Backend::Cuda(m), BackendState::Cuda(s, _)) => {
                let v = m.config.vocab_size;
                gpu_host::reduce_rows(v, batch, targets, crate::numerics::logprob_of, &mut |c| {
                    m.forward(s, c, Logits::All)
                })
            }
            #[cfg(feature = "wgpu")]
            (Backend::Wgpu(m), BackendState::Wgpu(s, _)) => Ok(m
                .forward_scores(s, batch, targets)?
                .iter()
                .map(|t| t.logprob)
                .collect()),
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            _ => mismatch(),
        }
    }

    /// [`Backend::forward_logprobs`] with each target's rank and its row's entropy. CUDA computes
    /// the logits 64 rows at a time and the host reduces each scored row as the CPU reduces its
    /// panels ([`crate::numerics::target_stats`]): the same values from the same logits. wgpu
    /// reduces each scored row on the adapter (`wgpu/shaders/score.wgsl`, in f32) and reads back
    /// only the results: the same ranks, log-probs and entropies within float rounding.
    pub(crate) fn forward_diagnostics(
        &self,
        st: &mut BackendState,
        batch: Checked,
        targets: &[Option<u32>],
    ) -> Result<Vec<TargetStats>> {
        match (self, st) {
            (Backend::Cpu(m), BackendState::Cpu(s)) => Ok(m.forward_diagnostics(s, batch, targets)),
            #[cfg(feature = "cuda")]
            (Backend::Cuda(m), BackendState::Cuda(s, _)) => {
                let v = m.config.vocab_size;
                gpu_host::reduce_rows(v, batch, targets, crate::numerics::target_stats, &mut |c| {
                    m.forward(s, c, Logits::All)
                })
            }
            #[cfg(feature = "wgpu")]
            (Backend::Wgpu(m), BackendState::Wgpu(s, _)) => m.forward_scores(s, batch, targets),
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            _ => mismatch(),
        }
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        match self {
            Backend::Cpu(_) => Ok(()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(m) => m.synchronize(),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu(m) => m.synchronize(),
        }
    }
}

/// What the GPU backends share on the host: they compute logits (at most [`SCORE_ROWS`] rows at a
/// time where many are wanted). For CUDA the host also picks rows and reduces them with the CPU's
/// own routines (`numerics::logprob_of`, `numerics::target_stats`), so its scores are those of the
/// CPU's reductions over the GPU's logits. wgpu scores on the adapter instead (log-prob, rank and
/// entropy of each scored row by `wgpu/shaders/score.wgsl`, four numbers a row read back, not the
/// row) and uses only `forward` here.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod gpu_host {
    use super::SCORE_ROWS;
    use crate::error::Result;
    use crate::model::batch::Checked;
    use crate::model::Logits;
    #[cfg(feature = "cuda")]
    use crate::model::Rows;

    /// A backend's forward pass: a batch (already checked) and which rows, to host logits.
    pub(super) type Forward<'f> = dyn FnMut(Checked, Logits) -> Result<Vec<f32>> + 'f;

    /// [`super::Backend::forward`]: the last rows at once, every row [`SCORE_ROWS`] at a time.
    pub(super) fn forward<'s>(
        batch: Checked,
        which: Logits,
        host: &'s mut Vec<f32>,
        fwd: &mut Forward,
    ) -> Result<&'s [f32]> {
        host.clear();
        match which {
            Logits::Last => host.extend(fwd(batch, Logits::Last)?),
            Logits::All => batch.for_each_chunk(SCORE_ROWS, &mut |chunk| {
                host.extend(fwd(chunk, Logits::All)?);
                Ok(())
            })?,
        }
        Ok(host)
    }

    /// [`super::Backend::forward_rows`].
    #[cfg(feature = "cuda")]
    pub(super) fn forward_rows<'s>(
        v: usize,
        batch: Checked,
        rows: &[Rows],
        host: &'s mut Vec<f32>,
        fwd: &mut Forward,
    ) -> Result<(&'s [f32], Vec<f64>)> {
        host.clear();
        if rows.iter().all(|r| *r == Rows::Last) {
            host.extend(fwd(batch, Logits::Last)?);
            return Ok((host, Vec::new()));
        }
        // Every row on the device, 64 at a time: the selected ones kept on the host, the
        // targets' log-probs taken from theirs.
        let picked: Vec<usize> = batch.selected(|i| rows[i]).collect();
        let mut targets: Vec<Option<u32>> = Vec::with_capacity(batch.rows());
        for (sq, r) in batch.seqs().iter().zip(rows) {
            match r {
                Rows::Targets(t) => targets.extend_from_slice(t),
                _ => targets.extend(std::iter::repeat_n(None, sq.tokens.len())),
            }
        }
        let (mut row, mut next, mut logprobs) = (0, 0, Vec::new());
        batch.for_each_chunk(SCORE_ROWS, &mut |chunk| {
            let logits = fwd(chunk, Logits::All)?;
            while next < picked.len() && picked[next] < row + chunk.rows() {
                let r = picked[next] - row;
                host.extend_from_slice(&logits[r * v..(r + 1) * v]);
                next += 1;
            }
            for (l, t) in logits.chunks_exact(v).zip(&targets[row..]) {
                if let Some(t) = *t {
                    logprobs.push(crate::numerics::logprob_of(l, t));
                }
            }
            row += chunk.rows();
            Ok(())
        })?;
        Ok((host, logprobs))
    }

    /// `reduce` of each row's logits that has a target, in row order, spread over rayon's pool:
    /// [`super::Backend::forward_logprobs`] and [`super::Backend::forward_diagnostics`].
    #[cfg(feature = "cuda")]
    pub(super) fn reduce_rows<T: Send>(
        v: usize,
        batch: Checked,
        targets: &[Option<u32>],
        reduce: fn(&[f32], u32) -> T,
        fwd: &mut dyn FnMut(Checked) -> Result<Vec<f32>>,
    ) -> Result<Vec<T>> {
        use rayon::prelude::*;
        let (mut row, mut out) = (0, Vec::new());
        batch.for_each_chunk(SCORE_ROWS, &mut |chunk| {
            let logits = fwd(chunk)?;
            let rows = &targets[row..row + chunk.rows()];
            let r: Vec<T> = (logits.par_chunks_exact(v).zip(rows))
                .filter_map(|(l, t)| t.map(|t| reduce(l, t)))
                .collect();
            out.extend(r);
            row += chunk.rows();
            Ok(())
        })?;
        Ok(out)
    }
}

impl BackendState {
    pub(crate) fn slots(&self) -> usize {
        match self {
            BackendState::Cpu(s) => s.cache.slots(),
            #[cfg(feature = "cuda")]
            BackendState::Cuda(s, _) => s.lens.slots(),
            #[cfg(feature = "wgpu")]
            BackendState::Wgpu(s, _) => s.lens.slots(),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        match self {
            BackendState::Cpu(s) => s.cache.capacity(),
            #[cfg(feature = "cuda")]
            BackendState::Cuda(s, _) => s.lens.capacity(),
            #[cfg(feature = "wgpu")]
            BackendState::Wgpu(s, _) => s.lens.capacity(),
        }
    }

    pub(crate) fn len(&self, slot: usize) -> usize {
        match self {
            BackendState::Cpu(s) => s.cache.len(slot),
            #[cfg(feature = "cuda")]
            BackendState::Cuda(s, _) => s.lens.len(slot),
            #[cfg(feature = "wgpu")]
            BackendState::Wgpu(s, _) => s.lens.len(slot),
        }
    }

    pub(crate) fn truncate(&mut self, slot: usize, len: usize) {
        match self {
            BackendState::Cpu(s) => s.cache.truncate(slot, len),
            #[cfg(feature = "cuda")]
            BackendState::Cuda(s, _) => s.lens.truncate(slot, len),
            #[cfg(feature = "wgpu")]
            BackendState::Wgpu(s, _) => s.lens.truncate(slot, len),
        }
    }

    pub(crate) fn prefault(&mut self) {
        match self {
            BackendState::Cpu(s) => s.cache.prefault(),
            // Device memory is resident once allocated.
            #[cfg(feature = "cuda")]
            BackendState::Cuda(..) => {}
            #[cfg(feature = "wgpu")]
            BackendState::Wgpu(..) => {}
        }
    }

    pub(crate) fn clear(&mut self) {
        match self {
            BackendState::Cpu(s) => s.cache.clear(),
            #[cfg(feature = "cuda")]
            BackendState::Cuda(s, _) => s.lens.clear(),
            #[cfg(feature = "wgpu")]
            BackendState::Wgpu(s, _) => s.lens.clear(),
        }
    }

    pub(crate) fn copy_slot(&mut self, src: usize, dst: usize) -> Result<()> {
        match self {
            BackendState::Cpu(s) => {
                s.cache.copy_slot(src, dst);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            BackendState::Cuda(s, _) => s.copy_slot(src, dst),
            #[cfg(feature = "wgpu")]
            BackendState::Wgpu(s, _) => s.copy_slot(src, dst),
        }
    }
}
