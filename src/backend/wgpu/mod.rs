//! The wgpu backend (feature `wgpu`): GPT-2 on any GPU that Vulkan, Metal or DirectX 12 drives, and
//! on Mesa's software Vulkan driver (lavapipe), with WGSL compute shaders (`shaders/`).
//!
//! Weights are uploaded once, matrices and the token embedding in f32, f16 or bf16 (16-bit values
//! packed two to a word and unpacked in the shader, so every adapter takes them); biases, norms,
//! activations, the KV cache and all arithmetic are f32, so an f32 model computes the CPU's function
//! to float rounding. A step is at most `max_rows` new tokens (longer batches are cut into such
//! steps); each step is one upload of its row table, one command buffer of every dispatch — their
//! bind groups made once per state, in [`WgpuState::program`] — one submission and one read-back.
//! wgpu cannot replay a recorded compute command buffer, so a decode step re-encodes the prepared
//! dispatches (no pipeline or bind group is made per step).
//!
//! What comes back: the picked rows' logits for [`WgpuModel::forward`] (the host takes greedy
//! argmaxes from them); for scoring ([`WgpuModel::forward_scores`], and the targets of
//! [`WgpuModel::forward_rows`]) only the rows with a target are unembedded and `shaders/score.wgsl`
//! reduces each on the adapter to its target's log-prob, rank and the row's entropy, four numbers a
//! row read back instead of its `vocab_size` logits. They are the host's `numerics::target_stats`
//! of the same logits within f32 rounding (the host sums in f64 lanes): ranks equal, log-probs and
//! entropies within ~1e-7 relative. A NaN logit (told by its bits: a shader may assume there are
//! none) counts as on the host: none in the rank, and a NaN log-prob and entropy, as a +inf gives
//! too. With a -inf logit ranks and log-probs agree, but entropies do not: it adds nothing here,
//! while the host's `exp_fast` clamps e^-inf to e^-87, whose product with -inf makes its entropy
//! +inf.
//!
//! Adapters are numbered in a fixed order (discrete GPUs first, then integrated, virtual, other and
//! CPU-based ones such as lavapipe): `gpu` is adapter 0, `gpu:N` adapter N, as
//! [`adapter_descriptions`] lists them.

mod kernels;
pub(crate) mod ops;

use std::sync::mpsc;

use wgpu::util::DeviceExt;

use self::kernels::{activation_code, Dims, Epilogue, Grid, Kernel, Kernels};
use super::slots::SlotLens;
use crate::config::GPT2Config;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::batch::Checked;
use crate::model::params::{Dense, Norm, Params};
use crate::model::Logits;
use crate::numerics::TargetStats;

/// Rows a step carries when the state has fewer slots: bounds the attention scratch
/// (`rows · heads · capacity`) and the logits buffer (`rows · vocab`).
const STEP_ROWS: usize = 64;

pub(crate) fn device_err(msg: impl Into<String>) -> Error {
    Error::Device {
        backend: "wgpu",
        msg: msg.into(),
    }
}

/// What to do when no adapter is found.
const NO_ADAPTER: &str = "no wgpu adapter found (no Vulkan, Metal or DirectX 12 device): install a GPU driver, or for a software one Mesa's lavapipe (Debian/Ubuntu: apt-get install mesa-vulkan-drivers libvulkan1)";

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// This machine's adapters in the order `gpu:N` numbers them. `WGPU_BACKEND` (e.g. `vulkan`)
/// narrows the backends searched, as in every wgpu program.
fn adapters() -> Vec<wgpu::Adapter> {
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
    let mut all = pollster::block_on(instance.enumerate_adapters(backends));
    // A stable sort: the driver's order within a kind.
    all.sort_by_key(|a| rank(a.get_info().device_type));
    all
}

fn describe_info(i: &wgpu::AdapterInfo) -> String {
    let driver = [i.driver.as_str(), i.driver_info.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "{} ({:?}, {:?}{})",
        i.name,
        i.device_type,
        i.backend,
        if driver.is_empty() {
            String::new()
        } else {
            format!(", {driver}")
        }
    )
}

/// One line per adapter, `gpu:N  name (type, backend, driver)`; empty without any.
pub(crate) fn adapter_descriptions() -> Vec<String> {
    adapters()
        .iter()
        .enumerate()
        .map(|(n, a)| format!("gpu:{n}  {}", describe_info(&a.get_info())))
        .collect()
}

/// An opened adapter: its device and queue, and the limits they were opened with.
pub(crate) struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub name: String,
    pub limits: wgpu::Limits,
}

impl Gpu {
    /// Open adapter `index`, with clear errors when there is none or no such one.
    pub(crate) fn open(index: usize) -> Result<Gpu> {
        let all = adapters();
        if all.is_empty() {
            return Err(device_err(NO_ADAPTER));
        }
        let Some(adapter) = all.get(index) else {
            let list: Vec<String> = all
                .iter()
                .enumerate()
                .map(|(n, a)| format!("gpu:{n} {}", a.get_info().name))
                .collect();
            return Err(device_err(format!(
                "no wgpu adapter {index}: this machine has {} ({})",
                all.len(),
                list.join(", ")
            )));
        };
        let info = adapter.get_info();
        // Everything the adapter offers: GPT-2's embedding alone is 147 MiB in f32, beyond
        // WebGPU's default 128 MiB binding.
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("gpt2"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| device_err(format!("opening {}: {e}", info.name)))?;
        Ok(Gpu {
            device,
            queue,
            name: describe_info(&info),
            limits,
        })
    }

    /// Refuses a buffer of `bytes` beyond what this adapter can allocate or bind.
    pub(crate) fn check_size(&self, what: &str, bytes: u64) -> Result<()> {
        let max = self
            .limits
            .max_buffer_size
            .min(self.limits.max_storage_buffer_binding_size);
        if bytes > max {
            return Err(Error::Resource(format!(
                "{what} needs a buffer of {:.1} MiB; {} binds at most {:.1} MiB",
                bytes as f64 / (1u64 << 20) as f64,
                self.name,
                max as f64 / (1u64 << 20) as f64
            )));
        }
        Ok(())
    }

    /// A storage buffer holding `bytes` (at least 4).
    pub(crate) fn upload(&self, what: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
        self.check_size(what, bytes.len() as u64)?;
        let pad = [0u8; 4];
        let contents: std::borrow::Cow<[u8]> = if bytes.len().is_multiple_of(4) && !bytes.is_empty()
        {
            bytes.into()
        } else {
            [bytes, &pad[..4 - bytes.len() % 4]].concat().into()
        };
        Ok(self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(what),
                contents: &contents,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            }))
    }

    pub(crate) fn upload_f32(&self, what: &str, v: &[f32]) -> Result<wgpu::Buffer> {
        self.upload(what, bytemuck::cast_slice(v))
    }

    /// A zeroed buffer of `bytes` (at least 4) with `usage`.
    pub(crate) fn zeros(
        &self,
        what: &str,
        bytes: usize,
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        let size = (bytes.max(4) as u64).next_multiple_of(4);
        self.check_size(what, size)?;
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            size,
            usage,
            mapped_at_creation: false,
        }))
    }

    /// A uniform buffer of one dispatch's [`Dims`].
    pub(crate) fn dims(&self, d: Dims) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("dims"),
                contents: &d.bytes(),
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }

    /// Run `f` (allocations, pipeline creation), turning what the device reports (out of memory, a
    /// shader the driver refuses) into an error rather than wgpu's default panic.
    pub(crate) fn checked<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let invalid = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let invalid = pollster::block_on(invalid.pop());
        let oom = pollster::block_on(oom.pop());
        if let Some(e) = oom {
            return Err(Error::Resource(format!("{what} on {}: {e}", self.name)));
        }
        if let Some(e) = invalid {
            return Err(device_err(format!("{what} on {}: {e}", self.name)));
        }
        out
    }

    /// Copy the first `bytes` of `src` to the host as floats (one submission, waited for).
    pub(crate) fn read_f32(
        &self,
        enc: wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        staging: &wgpu::Buffer,
        bytes: u64,
    ) -> Result<Vec<f32>> {
        self.read_parts(enc, &[(src, 0, bytes)], staging)
    }

    /// Copy `parts` (buffer, byte offset, bytes) one after another to the host as floats (one
    /// submission, waited for).
    pub(crate) fn read_parts(
        &self,
        mut enc: wgpu::CommandEncoder,
        parts: &[(&wgpu::Buffer, u64, u64)],
        staging: &wgpu::Buffer,
    ) -> Result<Vec<f32>> {
        let mut bytes = 0;
        for &(src, offset, n) in parts.iter().filter(|p| p.2 > 0) {
            enc.copy_buffer_to_buffer(src, offset, staging, bytes, n);
            bytes += n;
        }
        self.queue.submit([enc.finish()]);
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let slice = staging.slice(..bytes);
        let (tx, rx) = mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| device_err(format!("waiting for the GPU: {e}")))?;
        rx.recv()
            .map_err(|_| device_err("the read-back was dropped"))?
            .map_err(|e| device_err(format!("reading back: {e}")))?;
        let out = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| device_err(format!("reading back: {e}")))?;
            view.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        staging.unmap();
        Ok(out)
    }
}

/// The bytes of `v` stored as `dtype` (f32, or 16-bit values two to a word).
fn stored(v: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
            .collect(),
        DType::Bf16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect(),
        _ => bytemuck::cast_slice(v).to_vec(),
    }
}

fn elem_bytes(dtype: DType) -> usize {
    if dtype == DType::F32 {
        4
    } else {
        2
    }
}

/// Rows `first..first + rows` of a matrix, in a buffer of their own.
struct Rows {
    first: usize,
    rows: usize,
    buf: wgpu::Buffer,
}

/// The `(rows, cols)` matrix `v` stored as `dtype`, in as few parts as the adapter's largest
/// binding allows (GPT-2's embedding, 147 MiB in f32, exceeds lavapipe's and WebGPU's 128 MiB).
fn upload_rows(gpu: &Gpu, what: &str, v: &[f32], cols: usize, dtype: DType) -> Result<Vec<Rows>> {
    let total = v.len() / cols.max(1);
    let max = gpu
        .limits
        .max_buffer_size
        .min(gpu.limits.max_storage_buffer_binding_size) as usize;
    // An even count: a 16-bit part then starts on a word.
    let per = (max / (cols * elem_bytes(dtype)).max(1)) & !1;
    if per == 0 {
        return Err(Error::Resource(format!(
            "{what}: one row of {cols} does not fit a binding of {}",
            gpu.name
        )));
    }
    (0..total)
        .step_by(per)
        .map(|first| {
            let rows = per.min(total - first);
            let part = &v[first * cols..(first + rows) * cols];
            Ok(Rows {
                first,
                rows,
                buf: gpu.upload(what, &stored(part, dtype))?,
            })
        })
        .collect()
}

struct Layer {
    ln_1: (wgpu::Buffer, wgpu::Buffer),
    c_attn: (wgpu::Buffer, wgpu::Buffer),
    c_proj: (wgpu::Buffer, wgpu::Buffer),
    ln_2: (wgpu::Buffer, wgpu::Buffer),
    c_fc: (wgpu::Buffer, wgpu::Buffer),
    mlp_proj: (wgpu::Buffer, wgpu::Buffer),
    scale: f32,
}

/// GPT-2 on one wgpu adapter.
pub(crate) struct WgpuModel {
    pub config: GPT2Config,
    pub dtype: DType,
    pub index: usize,
    pub adapter: String,
    weight_bytes: usize,
    gpu: Gpu,
    k: Kernels,
    /// The token embedding, in parts that each fit one binding (one part on most GPUs).
    wte: Vec<Rows>,
    wpe: wgpu::Buffer,
    unembed: Option<Vec<Rows>>,
    layers: Vec<Layer>,
    ln_f: (wgpu::Buffer, wgpu::Buffer),
    /// Four zero bytes bound where a kernel's bias goes unused (the unembedding).
    zero: wgpu::Buffer,
}

impl WgpuModel {
    /// Upload GPT-2's parameters to adapter `index`, matrices stored as `dtype` (f32, f16, bf16).
    pub fn build(params: &Params, index: usize, dtype: DType) -> Result<Self> {
        if dtype == DType::Q8 {
            return Err(Error::Input(
                "dtype q8 runs on the CPU only; on a wgpu device use f32, f16 or bf16".into(),
            ));
        }
        let gpu = Gpu::open(index)?;
        let cfg = params.config().clone();
        // The matvec kernel's workgroups for the unembedding, in one dimension.
        let tiles = (cfg.vocab_size as u32).div_ceil(kernels::MATVEC_COLUMNS);
        if tiles > gpu.limits.max_compute_workgroups_per_dimension {
            return Err(Error::Resource(format!(
                "a vocabulary of {} needs {tiles} workgroups in a row; {} allows {}",
                cfg.vocab_size, gpu.name, gpu.limits.max_compute_workgroups_per_dimension
            )));
        }
        let k = gpu.checked("compiling the WGSL kernels", || {
            Ok(Kernels::new(&gpu.device, dtype))
        })?;
        let (wte, wpe, unembed, layers, ln_f, weight_bytes) =
            gpu.checked("uploading the weights", || {
                let up = |what: &str, v: &[f32]| gpu.upload(what, &stored(v, dtype));
                let norm = |n: Norm| -> Result<(wgpu::Buffer, wgpu::Buffer)> {
                    let (w, b) = params.norm(n)?;
                    Ok((gpu.upload_f32("norm", &w)?, gpu.upload_f32("norm", &b)?))
                };
                let mut weight_bytes = 0;
                let mut dense = |l: usize, p: Dense| -> Result<(wgpu::Buffer, wgpu::Buffer)> {
                    let d = params.dense(l, p)?;
                    weight_bytes += d.rows.len() * elem_bytes(dtype) + d.bias.len() * 4;
                    Ok((up("dense", &d.rows)?, gpu.upload_f32("bias", &d.bias)?))
                };
                // The order the parameters are read in (random weights depend on it): wte, wpe,
                // lm_head, then block by block.
                let (e, d) = (cfg.n_embd, dtype);
                let wte = upload_rows(&gpu, "wte", &params.wte()?, e, d)?;
                let wpe = gpu.upload_f32("wpe", &params.wpe()?)?;
                let unembed = (params.lm_head()?)
                    .map(|w| upload_rows(&gpu, "lm_head", &w, e, d))
                    .transpose()?;
                let mut layers = Vec::with_capacity(cfg.n_layer);
                for l in 0..cfg.n_layer {
                    layers.push(Layer {
                        ln_1: norm(Norm::Ln1(l))?,
                        c_attn: dense(l, Dense::CAttn)?,
                        c_proj: dense(l, Dense::AttnProj)?,
                        ln_2: norm(Norm::Ln2(l))?,
                        c_fc: dense(l, Dense::CFc)?,
                        mlp_proj: dense(l, Dense::MlpProj)?,
                        scale: params.attention_scale(l),
                    });
                }
                let ln_f = norm(Norm::LnF)?;
                weight_bytes += (1 + unembed.is_some() as usize)
                    * cfg.vocab_size
                    * cfg.n_embd
                    * elem_bytes(dtype);
                Ok((wte, wpe, unembed, layers, ln_f, weight_bytes))
            })?;
        let zero = gpu.upload("zero", &[0; 4])?;
        Ok(WgpuModel {
            config: cfg,
            dtype,
            index,
            adapter: gpu.name.clone(),
            weight_bytes,
            gpu,
            k,
            wte,
            wpe,
            unembed,
            layers,
            ln_f,
            zero,
        })
    }

    /// Bytes of weights one decode step reads.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// A state for `slots` sequences of up to `capacity` tokens; steps of up to
    /// `max(slots, STEP_ROWS)` rows.
    pub fn new_state(&self, slots: usize, capacity: usize) -> Result<WgpuState> {
        let c = &self.config;
        let capacity = capacity.min(c.n_positions);
        let max_rows = slots.max(STEP_ROWS);
        let (e, f, v, h) = (c.n_embd, c.n_inner, c.vocab_size, c.n_head);
        let region = e * capacity;
        let gpu = &self.gpu;
        use wgpu::BufferUsages as U;
        let work = U::STORAGE;
        self.gpu.checked("allocating the KV cache and buffers", || {
            let cache = |what| {
                (0..c.n_layer)
                    .map(|_| gpu.zeros(what, 4 * slots * region, work | U::COPY_SRC | U::COPY_DST))
                    .collect::<Result<Vec<_>>>()
            };
            let (kc, vc) = (cache("key cache")?, cache("value cache")?);
            let step = gpu.zeros("step", 4 * (4 + 5 * max_rows), work | U::COPY_DST)?;
            let x = gpu.zeros("x", 4 * max_rows * e, work)?;
            let ln = gpu.zeros("ln", 4 * max_rows * e, work)?;
            let qkv = gpu.zeros("qkv", 4 * max_rows * 3 * e, work)?;
            let attn = gpu.zeros("attn", 4 * max_rows * e, work)?;
            let fc = gpu.zeros("fc", 4 * max_rows * f, work)?;
            let scores = gpu.zeros("attention scores", 4 * max_rows * h * capacity, work)?;
            let logits = gpu.zeros("logits", 4 * max_rows * v, work | U::COPY_SRC)?;
            let stats = gpu.zeros("row stats", 4 * max_rows * 4, work | U::COPY_SRC)?;
            let staging = gpu.zeros(
                "read-back",
                4 * max_rows * (v + 4),
                U::MAP_READ | U::COPY_DST,
            )?;
            let slot_copy = gpu.zeros("slot copy", 4 * region, U::COPY_SRC | U::COPY_DST)?;
            let program = self.program(
                &step,
                &kc,
                &vc,
                [&x, &ln, &qkv, &attn, &fc, &scores, &logits, &stats],
                capacity,
            );
            Ok(WgpuState {
                lens: SlotLens::new(slots, capacity),
                max_rows,
                region_bytes: 4 * region as u64,
                k: kc,
                v: vc,
                step,
                logits,
                stats,
                staging,
                slot_copy,
                program,
                device: gpu.device.clone(),
                queue: gpu.queue.clone(),
            })
        })
    }

    /// Every dispatch of a forward pass over a state's buffers, bound once.
    fn program(
        &self,
        step: &wgpu::Buffer,
        kc: &[wgpu::Buffer],
        vc: &[wgpu::Buffer],
        [x, ln, qkv, attn, fc, scores, logits, stats]: [&wgpu::Buffer; 8],
        capacity: usize,
    ) -> Vec<Op> {
        let c = &self.config;
        let (e, f, v) = (c.n_embd as u32, c.n_inner as u32, c.vocab_size as u32);
        let (h, hd, cap) = (c.n_head as u32, c.head_dim() as u32, capacity as u32);
        let eps = c.layer_norm_epsilon as f32;
        let act = activation_code(c.activation_function);
        let mut ops = Vec::new();
        let mut op = |kernel: Kernel, dims: Dims, bufs: &[&wgpu::Buffer], grid: Grid| {
            ops.push(bind(&self.gpu, &self.k, kernel, step, dims, bufs, grid));
        };
        for part in &self.wte {
            let (lo, hi) = (part.first as u32, (part.first + part.rows) as u32);
            let dims = Dims::ints(&[e, lo, hi]);
            op(Kernel::Embed, dims, &[&part.buf, &self.wpe, x], Grid::Rows);
        }
        let matmul = |k: u32, n: u32, epi: Epilogue| Dims::product(k, n, epi, act, false, n, 0);
        for (l, layer) in self.layers.iter().enumerate() {
            let norm = Dims::ints(&[e, 0]).float(eps);
            op(
                Kernel::LayerNorm,
                norm,
                &[x, &layer.ln_1.0, &layer.ln_1.1, ln],
                Grid::Rows,
            );
            let (w, b) = &layer.c_attn;
            op(
                Kernel::Matmul,
                matmul(e, 3 * e, Epilogue::Bias),
                &[ln, w, b, qkv],
                Grid::Tiles {
                    n: 3 * e,
                    picked: false,
                },
            );
            op(
                Kernel::KvWrite,
                Dims::ints(&[e, hd, cap]),
                &[qkv, &kc[l], &vc[l]],
                Grid::Rows,
            );
            let ad = Dims::ints(&[e, hd, cap, h]).float(layer.scale);
            op(
                Kernel::Attention,
                ad,
                &[qkv, &kc[l], &vc[l], scores, attn],
                Grid::RowHeads(h),
            );
            let (w, b) = &layer.c_proj;
            op(
                Kernel::Matmul,
                matmul(e, e, Epilogue::BiasResidual),
                &[attn, w, b, x],
                Grid::Tiles {
                    n: e,
                    picked: false,
                },
            );
            op(
                Kernel::LayerNorm,
                norm,
                &[x, &layer.ln_2.0, &layer.ln_2.1, ln],
                Grid::Rows,
            );
            let (w, b) = &layer.c_fc;
            op(
                Kernel::Matmul,
                matmul(e, f, Epilogue::BiasAct),
                &[ln, w, b, fc],
                Grid::Tiles {
                    n: f,
                    picked: false,
                },
            );
            let (w, b) = &layer.mlp_proj;
            op(
                Kernel::Matmul,
                matmul(f, e, Epilogue::BiasResidual),
                &[fc, w, b, x],
                Grid::Tiles {
                    n: e,
                    picked: false,
                },
            );
        }
        let norm = Dims::ints(&[e, 1]).float(eps);
        op(
            Kernel::LayerNorm,
            norm,
            &[x, &self.ln_f.0, &self.ln_f.1, ln],
            Grid::Picked,
        );
        for part in self.unembed.as_ref().unwrap_or(&self.wte) {
            let (n, off) = (part.rows as u32, part.first as u32);
            let dims = Dims::product(e, n, Epilogue::None, act, true, v, off);
            let grid = Grid::Tiles { n, picked: true };
            op(
                Kernel::Matmul,
                dims,
                &[ln, &part.buf, &self.zero, logits],
                grid,
            );
        }
        op(
            Kernel::Score,
            Dims::ints(&[v]),
            &[logits, stats],
            Grid::Scored,
        );
        ops
    }

    /// The forward pass; returns the logits of the last token of each sequence, or of every token
    /// (f32, on the host). Batches beyond the state's rows per step run as several steps.
    pub fn forward(&self, st: &mut WgpuState, batch: Checked, which: Logits) -> Result<Vec<f32>> {
        // Tokens of each slot not yet run: a sequence's last row is picked in the step that ends it.
        let mut left = vec![0usize; st.lens.slots()];
        for s in batch.seqs() {
            left[s.slot] = s.tokens.len();
        }
        let mut out = Vec::new();
        batch.for_each_chunk(st.max_rows, &mut |chunk| {
            let (mut pick, mut row) = (Vec::new(), 0);
            for s in chunk.seqs() {
                let n = s.tokens.len();
                left[s.slot] -= n;
                match which {
                    Logits::All => pick.extend(row..row + n),
                    Logits::Last if left[s.slot] == 0 => pick.push(row + n - 1),
                    Logits::Last => {}
                }
                row += n;
            }
            let back: Vec<usize> = (0..pick.len()).collect();
            out.extend(self.step(st, chunk, &pick, &[], &back)?.0);
            Ok(())
        })?;
        Ok(out)
    }

    /// Each target's log-prob, rank and entropy (rows without a target skipped), reduced on the
    /// adapter (`score.wgsl`): only the rows with a target are unembedded, and their logits never
    /// come back, only four numbers a row ([`Backend::forward_logprobs`] and
    /// [`Backend::forward_diagnostics`]).
    ///
    /// [`Backend::forward_logprobs`]: super::Backend::forward_logprobs
    /// [`Backend::forward_diagnostics`]: super::Backend::forward_diagnostics
    pub fn forward_scores(
        &self,
        st: &mut WgpuState,
        batch: Checked,
        targets: &[Option<u32>],
    ) -> Result<Vec<TargetStats>> {
        let (mut row, mut out) = (0, Vec::new());
        batch.for_each_chunk(st.max_rows, &mut |chunk| {
            let n = chunk.rows();
            let (pick, t): (Vec<usize>, Vec<u32>) = (targets[row..row + n].iter().enumerate())
                .filter_map(|(i, t)| t.map(|t| (i, t)))
                .unzip();
            let (_, stats) = self.step(st, chunk, &pick, &t, &[])?;
            out.extend(stats.into_iter().map(row_stats));
            row += n;
            Ok(())
        })?;
        Ok(out)
    }

    /// [`Backend::forward_rows`]: the selected rows' logits come back; the targets' log-probs are
    /// reduced on the adapter as [`WgpuModel::forward_scores`] reduces them, in row order.
    ///
    /// [`Backend::forward_rows`]: super::Backend::forward_rows
    pub fn forward_rows(
        &self,
        st: &mut WgpuState,
        batch: Checked,
        rows: &[crate::model::Rows],
    ) -> Result<(Vec<f32>, Vec<f64>)> {
        let mut selected = vec![false; batch.rows()];
        for r in batch.selected(|i| rows[i]) {
            selected[r] = true;
        }
        let mut targets: Vec<Option<u32>> = Vec::with_capacity(batch.rows());
        for (sq, r) in batch.seqs().iter().zip(rows) {
            match r {
                crate::model::Rows::Targets(t) => targets.extend_from_slice(t),
                _ => targets.extend(std::iter::repeat_n(None, sq.tokens.len())),
            }
        }
        let (mut row, mut logits, mut logprobs) = (0, Vec::new(), Vec::new());
        batch.for_each_chunk(st.max_rows, &mut |chunk| {
            // The chunk's rows that are selected or have a target are unembedded; the selected
            // ones come back, the others are scored.
            let (mut pick, mut t, mut back) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..chunk.rows() {
                let (sel, target) = (selected[row + i], targets[row + i]);
                if sel || target.is_some() {
                    if sel {
                        back.push(pick.len());
                    }
                    pick.push(i);
                    t.push(target.unwrap_or(NO_TARGET));
                }
            }
            if t.iter().all(|&t| t == NO_TARGET) {
                t.clear();
            }
            let (l, stats) = self.step(st, chunk, &pick, &t, &back)?;
            logits.extend(l);
            logprobs.extend(
                (stats.into_iter().zip(&t))
                    .filter(|(_, &t)| t != NO_TARGET)
                    .map(|(s, _)| row_stats(s).logprob),
            );
            row += chunk.rows();
            Ok(())
        })?;
        Ok((logits, logprobs))
    }

    /// One step of at most `max_rows` rows: upload the row table (with `targets`, one per picked
    /// row or none), dispatch the program, and read back the logits of the picked rows `back`
    /// lists (indices into `pick`, ascending) and, when there are targets, each picked row's
    /// `score.wgsl` statistics.
    fn step(
        &self,
        st: &mut WgpuState,
        batch: Checked,
        pick: &[usize],
        targets: &[u32],
        back: &[usize],
    ) -> Result<(Vec<f32>, Vec<[f32; 4]>)> {
        let rows: Vec<[u32; 3]> = batch
            .seqs()
            .iter()
            .flat_map(|s| {
                let start = st.lens.len(s.slot);
                (s.tokens.iter().enumerate())
                    .map(move |(j, &t)| [t, s.slot as u32, (start + j) as u32])
            })
            .collect();
        let enc = encode(
            &self.gpu,
            &self.k,
            &st.step,
            st.max_rows,
            &rows,
            pick,
            targets,
            &st.program,
        );
        // The statistics first, then each run of consecutive picked rows in one copy.
        let row = (self.config.vocab_size * 4) as u64;
        let mut parts = vec![(&st.stats, 0, 16 * targets.len() as u64)];
        for run in back.chunk_by(|a, b| b == &(a + 1)) {
            parts.push((&st.logits, run[0] as u64 * row, run.len() as u64 * row));
        }
        let mut logits = self.gpu.read_parts(enc, &parts, &st.staging)?;
        let n = 4 * targets.len();
        let stats = logits[..n].chunks_exact(4);
        let stats = stats.map(|s| [s[0], s[1], s[2], s[3]]).collect();
        logits.drain(..n);
        for s in batch.seqs() {
            st.lens.advance(s.slot, s.tokens.len());
        }
        Ok((logits, stats))
    }

    /// Greedy choice: the last rows' logits come back and the host takes each argmax (the CPU's
    /// `numerics::argmax`, so ties break the same way).
    pub fn forward_argmax(&self, st: &mut WgpuState, batch: Checked) -> Result<Vec<u32>> {
        let logits = self.forward(st, batch, Logits::Last)?;
        Ok(logits
            .chunks_exact(self.config.vocab_size)
            .map(crate::numerics::argmax)
            .collect())
    }

    /// Wait for all submitted work.
    pub fn synchronize(&self) -> Result<()> {
        self.gpu
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| device_err(format!("waiting for the GPU: {e}")))
    }
}

/// One dispatch: `kernel` over bindings 0 (the step's rows), 1 (`dims`), then `bufs` in order.
fn bind(
    gpu: &Gpu,
    k: &Kernels,
    kernel: Kernel,
    step: &wgpu::Buffer,
    dims: Dims,
    bufs: &[&wgpu::Buffer],
    grid: Grid,
) -> Op {
    let dims = gpu.dims(dims);
    let mut entries = vec![
        wgpu::BindGroupEntry {
            binding: 0,
            resource: step.as_entire_binding(),
        },
        wgpu::BindGroupEntry {
            binding: 1,
            resource: dims.as_entire_binding(),
        },
    ];
    for (i, b) in bufs.iter().enumerate() {
        entries.push(wgpu::BindGroupEntry {
            binding: 2 + i as u32,
            resource: b.as_entire_binding(),
        });
    }
    let bind = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &k.layout(kernel),
        entries: &entries,
    });
    Op { kernel, bind, grid }
}

/// Write a step's row table (`[token, slot, position]` per row, the picked rows, and `targets`:
/// none, or one per picked row) to `step` and encode `program`'s dispatches for it, in one compute
/// pass: wgpu orders the dispatches' reads after the writes before them.
#[allow(clippy::too_many_arguments)] // one step's operands
fn encode(
    gpu: &Gpu,
    k: &Kernels,
    step: &wgpu::Buffer,
    max_rows: usize,
    rows: &[[u32; 3]],
    pick: &[usize],
    targets: &[u32],
    program: &[Op],
) -> wgpu::CommandEncoder {
    let m = max_rows;
    debug_assert!(rows.len() <= m && pick.len() <= m);
    debug_assert!(targets.is_empty() || targets.len() == pick.len());
    let mut info = vec![0u32; 4 + 5 * m];
    info[0] = rows.len() as u32;
    info[1] = pick.len() as u32;
    info[2] = m as u32;
    info[3] = targets.len() as u32;
    for (r, [t, s, p]) in rows.iter().enumerate() {
        info[4 + r] = *t;
        info[4 + m + r] = *s;
        info[4 + 2 * m + r] = *p;
    }
    for (i, &p) in pick.iter().enumerate() {
        info[4 + 3 * m + i] = p as u32;
    }
    info[4 + 4 * m..4 + 4 * m + targets.len()].copy_from_slice(targets);
    gpu.queue.write_buffer(step, 0, bytemuck::cast_slice(&info));
    let mut enc = gpu
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("step"),
        });
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        for op in program {
            let counts = [rows.len(), pick.len(), targets.len()].map(|n| n as u32);
            let (pipeline, (x, y, z)) = k.dispatch(op.kernel, op.grid, counts);
            if x * y * z == 0 {
                continue;
            }
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &op.bind, &[]);
            pass.dispatch_workgroups(x, y, z);
        }
    }
    enc
}

/// The target of a picked row that has none (`NO_TARGET` in `score.wgsl`).
pub(crate) const NO_TARGET: u32 = u32::MAX;

/// A scored row's statistics from `score.wgsl` (`[log-prob, logits above the target, entropy,
/// NaNs and +infs]`): any NaN or +inf in the row makes the log-prob and entropy NaN, as on the
/// host.
pub(crate) fn row_stats([logprob, above, entropy, poisoned]: [f32; 4]) -> TargetStats {
    let nan = poisoned > 0.0;
    TargetStats {
        logprob: if nan { f64::NAN } else { logprob as f64 },
        rank: 1 + above as u32,
        entropy: if nan { f64::NAN } else { entropy as f64 },
    }
}

/// One prepared dispatch of the forward pass.
struct Op {
    kernel: Kernel,
    bind: wgpu::BindGroup,
    grid: Grid,
}

/// KV cache and work buffers on the adapter, and the forward pass's dispatches bound to them.
pub(crate) struct WgpuState {
    /// Positions held per slot.
    pub(super) lens: SlotLens,
    /// Rows per step.
    max_rows: usize,
    /// Bytes of one slot's keys (or values) in a layer: `[slot][head][position][head_dim]` f32.
    region_bytes: u64,
    k: Vec<wgpu::Buffer>,
    v: Vec<wgpu::Buffer>,
    step: wgpu::Buffer,
    logits: wgpu::Buffer,
    /// `score.wgsl`'s four numbers per picked row.
    stats: wgpu::Buffer,
    staging: wgpu::Buffer,
    slot_copy: wgpu::Buffer,
    program: Vec<Op>,
    device: wgpu::Device,
    queue: wgpu::Queue,
}

impl WgpuState {
    /// Make `dst` a copy of `src` in every layer's cache (through a staging region: a wgpu copy
    /// never stays within one buffer).
    pub fn copy_slot(&mut self, src: usize, dst: usize) -> Result<()> {
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("copy slot"),
            });
        let n = self.region_bytes;
        for b in self.k.iter().chain(&self.v) {
            enc.copy_buffer_to_buffer(b, src as u64 * n, &self.slot_copy, 0, n);
            enc.copy_buffer_to_buffer(&self.slot_copy, 0, b, dst as u64 * n, n);
        }
        self.queue.submit([enc.finish()]);
        self.lens.copy(src, dst);
        Ok(())
    }
}
