//! The CUDA backend (feature `cuda`): weights uploaded once in f32, f16 or bf16; cuBLAS (`GemmEx`, f32
//! compute) for every matrix product; NVRTC-compiled kernels for embedding, layernorm, bias+GELU,
//! residual adds, the KV cache and attention; the decode step captured once per batch size as a CUDA
//! graph and replayed per token. The CUDA libraries are loaded at run time, so the crate builds and
//! its CPU tests run on machines without them.
//!
//! The model is uploaded from GPT-2's parameters as the checkpoint holds them (one tensor at a time,
//! converted to the dtype on the way), and computes the same function as the CPU: the residual
//! stream and all statistics in f32, logits returned in f32.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    sys as drv, CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr,
    DevicePtrMut, LaunchConfig, PushKernelArg,
};

use super::slots::SlotLens;
use crate::config::{Activation, GPT2Config};
use crate::error::{Error, Result};
use crate::model::batch::Checked;
use crate::model::params::{Dense, Norm, Params};
use crate::model::Logits;

const SOURCE: &str = include_str!("kernels.cu");
/// Batches of at most this many rows use the fused GEMV kernel (`GEMV_ROWS` in kernels.cu).
const GEMV_ROWS: usize = 8;
/// Warps per output column in the GEMV kernel (`GEMV_WARPS` in kernels.cu).
const GEMV_WARPS: u32 = 4;
/// Keys per block of the split-K attention.
const ATTN_CHUNK: usize = 32;

use crate::dtype::DType;

/// Bytes per element of a GPU buffer in `d`.
fn bytes(d: DType) -> usize {
    if d == DType::F32 {
        4
    } else {
        2
    }
}

fn blas_type(d: DType) -> blas_sys::cudaDataType {
    match d {
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        DType::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
        DType::Q8 => unreachable!("CudaModel::build refuses q8"),
    }
}

fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Device {
        backend: "cuda",
        msg: format!("{what}: {e}"),
    }
}

fn blas_err(e: cudarc::cublas::result::CublasError) -> Error {
    Error::Device {
        backend: "cublas",
        msg: e.to_string(),
    }
}

fn device_err(msg: impl Into<String>) -> Error {
    Error::Device {
        backend: "cuda",
        msg: msg.into(),
    }
}

/// Device memory of one storage type: raw 16-bit words for f16/bf16, floats for f32.
enum Buf {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>),
}

impl Buf {
    fn ptr(&self, s: &CudaStream) -> u64 {
        match self {
            Buf::F32(b) => b.device_ptr(s).0,
            Buf::Half(b) => b.device_ptr(s).0,
        }
    }
}

struct Layer {
    ln_1: (CudaSlice<f32>, CudaSlice<f32>),
    c_attn: (Buf, Buf),
    c_proj: (Buf, Buf),
    ln_2: (CudaSlice<f32>, CudaSlice<f32>),
    c_fc: (Buf, Buf),
    mlp_proj: (Buf, Buf),
    scale: f32,
}

struct Kernels {
    _module: Arc<CudaModule>,
    embed: CudaFunction,
    layer_norm: CudaFunction,
    bias_act: CudaFunction,
    residual: CudaFunction,
    kv_write: CudaFunction,
    argmax: CudaFunction,
    gemv: CudaFunction,
    unpack_best: CudaFunction,
    attention_split: CudaFunction,
    attention_combine: CudaFunction,
    attention_prefill: CudaFunction,
}

/// GPT-2 on one GPU.
pub(crate) struct CudaModel {
    pub config: GPT2Config,
    pub dtype: DType,
    pub ordinal: usize,
    pub device_name: String,
    weight_bytes: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _blas_workspace: CudaSlice<u8>,
    k: Kernels,
    wte: Buf,
    wpe: Buf,
    unembed: Option<Buf>,
    layers: Vec<Layer>,
    ln_f: (CudaSlice<f32>, CudaSlice<f32>),
}

/// Open device `ordinal`, with clear errors when there is no driver or no such device.
fn open(ordinal: usize) -> Result<Arc<CudaContext>> {
    // SAFETY: only probes whether the shared library can be loaded.
    if !unsafe { drv::is_culib_present() } {
        return Err(device_err(
            "no CUDA driver found (libcuda.so could not be loaded): is an NVIDIA driver installed?",
        ));
    }
    let count = CudaContext::device_count().map_err(cuda_err("device count"))?;
    if ordinal >= count as usize {
        return Err(device_err(format!(
            "no CUDA device {ordinal}: this machine has {count} (use --device cuda:0{})",
            if count > 1 {
                format!("..{}", count - 1)
            } else {
                String::new()
            }
        )));
    }
    // SAFETY: both only probe whether a shared library can be loaded.
    if !unsafe { cudarc::cublas::sys::is_culib_present() }
        // SAFETY: as above.
        || !unsafe { cudarc::nvrtc::sys::is_culib_present() }
    {
        return Err(device_err("the CUDA driver is there but cuBLAS or NVRTC (libcublas, libnvrtc) could not be loaded"));
    }
    CudaContext::new(ordinal).map_err(cuda_err("context"))
}

impl CudaModel {
    /// Upload GPT-2's parameters to GPU `ordinal`, stored as `dtype` (f32, f16 or bf16).
    pub fn build(params: &Params, ordinal: usize, dtype: DType) -> Result<Self> {
        if dtype == DType::Q8 {
            return Err(Error::Input(
                "dtype q8 runs on the CPU only; on the GPU use f32, f16 or bf16".into(),
            ));
        }
        let ctx = open(ordinal)?;
        // One stream for everything: no cross-stream events needed (and none inside graph capture).
        // SAFETY: every operation runs on the one stream made below, so no buffer needs an event
        // to order its uses across streams.
        unsafe { ctx.disable_event_tracking() };
        // A created stream: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(cuda_err("stream"))?;
        let device_name = ctx.name().map_err(cuda_err("device name"))?;
        let cfg = params.config().clone();

        let (free, _) = ctx.mem_get_info().map_err(cuda_err("memory info"))?;
        // An untied lm_head adds a vocabulary-sized matrix; counted as if present.
        let need = (cfg.parameter_count() + cfg.vocab_size * cfg.n_embd) * bytes(dtype);
        if need > free {
            return Err(Error::Resource(format!(
                "out of GPU memory: the weights need {:.2} GiB in {dtype:?}, {:.2} GiB is free on {device_name}",
                need as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            )));
        }

        let (major, minor) = ctx
            .compute_capability()
            .map_err(cuda_err("compute capability"))?;
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let src = format!("#define DTYPE {}\n{SOURCE}", dtype as u8);
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| Error::Device {
            backend: "nvrtc",
            msg: format!("compiling the CUDA kernels: {e}"),
        })?;
        let module = ctx.load_module(ptx).map_err(cuda_err("module"))?;
        let f = |n: &str| module.load_function(n).map_err(cuda_err("kernel"));
        let k = Kernels {
            embed: f("embed")?,
            layer_norm: f("layer_norm")?,
            bias_act: f("bias_act")?,
            residual: f("residual")?,
            kv_write: f("kv_write")?,
            argmax: f("argmax")?,
            gemv: f("gemv")?,
            unpack_best: f("unpack_best")?,
            attention_split: f("attention_split")?,
            attention_combine: f("attention_combine")?,
            attention_prefill: f("attention_prefill")?,
            _module: module,
        };

        let blas = CudaBlas::new(stream.clone()).map_err(blas_err)?;
        // cuBLAS must not allocate while a graph is captured: give it its workspace up front.
        let ws_bytes = 32 << 20;
        let mut workspace = stream
            .alloc_zeros::<u8>(ws_bytes)
            .map_err(cuda_err("alloc"))?;
        let ws_ptr = workspace.device_ptr_mut(&stream).0;
        // SAFETY: the workspace is `ws_bytes` of device memory that the model keeps as long as its
        // cuBLAS handle.
        unsafe { blas_sys::cublasSetWorkspace_v2(*blas.handle(), ws_ptr as *mut _, ws_bytes) }
            .result()
            .map_err(blas_err)?;

        let up = |v: &[f32]| -> Result<Buf> {
            Ok(match dtype {
                DType::F32 => Buf::F32(stream.clone_htod(v).map_err(cuda_err("upload"))?),
                DType::F16 => {
                    let h: Vec<u16> = v
                        .iter()
                        .map(|x| half::f16::from_f32(*x).to_bits())
                        .collect();
                    Buf::Half(stream.clone_htod(&h).map_err(cuda_err("upload"))?)
                }
                DType::Bf16 => {
                    let h: Vec<u16> = v
                        .iter()
                        .map(|x| half::bf16::from_f32(*x).to_bits())
                        .collect();
                    Buf::Half(stream.clone_htod(&h).map_err(cuda_err("upload"))?)
                }
                DType::Q8 => unreachable!("refused above"),
            })
        };
        let up32 = |v: &[f32]| stream.clone_htod(v).map_err(cuda_err("upload"));
        let norm = |n: Norm| -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
            let (w, b) = params.norm(n)?;
            Ok((up32(&w)?, up32(&b)?))
        };
        let mut weight_bytes = 0;
        let mut dense = |l: usize, p: Dense| -> Result<(Buf, Buf)> {
            let d = params.dense(l, p)?;
            weight_bytes += (d.rows.len() + d.bias.len()) * bytes(dtype);
            Ok((up(&d.rows)?, up(&d.bias)?))
        };
        // The order the parameters are read in (random weights depend on it): wte, wpe, lm_head,
        // then block by block.
        let wte = up(&params.wte()?)?;
        let wpe = up(&params.wpe()?)?;
        let unembed = params.lm_head()?.map(|w| up(&w)).transpose()?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let ln_1 = norm(Norm::Ln1(l))?;
            let c_attn = dense(l, Dense::CAttn)?;
            let c_proj = dense(l, Dense::AttnProj)?;
            let ln_2 = norm(Norm::Ln2(l))?;
            let c_fc = dense(l, Dense::CFc)?;
            let mlp_proj = dense(l, Dense::MlpProj)?;
            layers.push(Layer {
                ln_1,
                c_attn,
                c_proj,
                ln_2,
                c_fc,
                mlp_proj,
                scale: params.attention_scale(l),
            });
        }
        weight_bytes +=
            (1 + unembed.is_some() as usize) * cfg.vocab_size * cfg.n_embd * bytes(dtype);
        Ok(CudaModel {
            wte,
            wpe,
            unembed,
            ln_f: norm(Norm::LnF)?,
            layers,
            config: cfg,
            dtype,
            ordinal,
            device_name,
            weight_bytes,
            ctx,
            stream,
            blas,
            _blas_workspace: workspace,
            k,
        })
    }

    /// Bytes of weights one decode step reads.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    fn alloc(&self, n: usize) -> Result<Buf> {
        Ok(match self.dtype {
            DType::F32 => Buf::F32(
                self.stream
                    .alloc_zeros::<f32>(n.max(1))
                    .map_err(cuda_err("alloc"))?,
            ),
            _ => Buf::Half(
                self.stream
                    .alloc_zeros::<u16>(n.max(1))
                    .map_err(cuda_err("alloc"))?,
            ),
        })
    }

    /// A state for `slots` sequences of up to `capacity` tokens, batches of up to `max_rows` new
    /// tokens at once, and logits for up to `max(slots, logit_rows)` rows a step.
    pub fn new_state(
        &self,
        slots: usize,
        capacity: usize,
        max_rows: usize,
        logit_rows: usize,
    ) -> Result<CudaState> {
        let c = &self.config;
        let capacity = capacity.min(c.n_positions);
        let per_layer = slots * c.n_embd * capacity;
        let (free, _) = self.ctx.mem_get_info().map_err(cuda_err("memory info"))?;
        let b = bytes(self.dtype);
        let need = 2 * c.n_layer * per_layer * b
            + max_rows * (c.n_embd * (4 + 4 * b) + 3 * c.n_embd * b + c.n_inner * b)
            + slots.max(logit_rows) * c.vocab_size * 4;
        if need > free {
            return Err(Error::Resource(format!(
                "out of GPU memory: the KV cache and buffers for {slots} sequences of {capacity} tokens need {:.2} GiB, {:.2} GiB is free",
                need as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            )));
        }
        let ints = |n: usize| {
            self.stream
                .alloc_zeros::<i32>(n.max(1))
                .map_err(cuda_err("alloc"))
        };
        let f32s = |n: usize| {
            self.stream
                .alloc_zeros::<f32>(n.max(1))
                .map_err(cuda_err("alloc"))
        };
        Ok(CudaState {
            k: (0..c.n_layer)
                .map(|_| self.alloc(per_layer))
                .collect::<Result<_>>()?,
            v: (0..c.n_layer)
                .map(|_| self.alloc(per_layer))
                .collect::<Result<_>>()?,
            lens: SlotLens::new(slots, capacity),
            max_rows,
            x: f32s(max_rows * c.n_embd)?,
            ln: self.alloc(max_rows * c.n_embd)?,
            qkv: self.alloc(max_rows * 3 * c.n_embd)?,
            attn: self.alloc(max_rows * c.n_embd)?,
            proj: self.alloc(max_rows * c.n_embd)?,
            fc: self.alloc(max_rows * c.n_inner)?,
            rowinfo: ints(4 * max_rows)?,
            ids: ints(max_rows)?,
            best: self
                .stream
                .alloc_zeros::<u64>(max_rows.max(1))
                .map_err(cuda_err("alloc"))?,
            part_acc: f32s(max_rows * c.n_head * capacity.div_ceil(ATTN_CHUNK) * c.head_dim())?,
            part_ml: f32s(max_rows * c.n_head * capacity.div_ceil(ATTN_CHUNK) * 2)?,
            tiles: ints(2 * max_rows)?,
            n_tiles: 0,
            logit_rows: slots.max(logit_rows),
            logits: f32s(slots.max(logit_rows) * c.vocab_size)?,
            graphs: HashMap::new(),
            region: c.n_embd * capacity,
            elem: bytes(self.dtype),
            stream: self.stream.clone(),
        })
    }

    fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32),
        block: u32,
        shared: u32,
        args: &[u64],
    ) -> Result<()> {
        self.launch_3d(f, (grid.0, grid.1, 1), block, shared, args)
    }

    fn launch_3d(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[u64],
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: shared,
        };
        let mut b = self.stream.launch_builder(f);
        for a in args {
            b.arg(a);
        }
        // SAFETY: each kernel's arguments are the device pointers and sizes its signature in
        // kernels.cu takes, into buffers sized for the state's rows, slots and capacity.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(cuda_err("launch"))
    }

    /// `c (rows, n) = a (rows, k) · wᵀ`, `w` stored `(n, k)`; f32 compute. `c_f32` writes f32 output.
    #[allow(clippy::too_many_arguments)] // one cuBLAS call's operands
    fn gemm(
        &self,
        a: u64,
        w: u64,
        c: u64,
        rows: usize,
        k: usize,
        n: usize,
        c_f32: bool,
    ) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let t = blas_type(self.dtype);
        let ct = if c_f32 {
            blas_sys::cudaDataType::CUDA_R_32F
        } else {
            t
        };
        // SAFETY: `a`, `w` and `c` are device buffers of at least rows·k, n·k and rows·n elements of
        // the types given.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                rows as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                w as *const _,
                t,
                k as i32,
                a as *const _,
                t,
                k as i32,
                &beta as *const f32 as *const _,
                c as *mut _,
                ct,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_err)
    }

    /// Enqueue the whole forward pass for `rows` rows whose tokens/slots/positions are already on the
    /// device, final-normalising the `picked` rows (listed in `st.pick`) and unembedding them into
    /// `st.logits` (f32). With `argmax`, also writes each picked row's best id into `st.ids`.
    fn enqueue(
        &self,
        st: &CudaState,
        rows: usize,
        picked: usize,
        logits: u64,
        argmax: bool,
    ) -> Result<()> {
        let c = &self.config;
        let (e, f, s) = (c.n_embd, c.n_inner, &*self.stream);
        let p = |b: &Buf| b.ptr(s);
        let (x, ln, qkv, attn, proj, fc) = (
            st.x.device_ptr(s).0,
            p(&st.ln),
            p(&st.qkv),
            p(&st.attn),
            p(&st.proj),
            p(&st.fc),
        );
        let info = st.rowinfo.device_ptr(s).0;
        let m4 = (st.max_rows * 4) as u64;
        let (tokens, slot, pos, pick) = (info, info + m4, info + 2 * m4, info + 3 * m4);
        let best = st.best.device_ptr(s).0;
        let r = rows as u32;
        let elems = |n: usize| ((n as u32).div_ceil(256), 1);
        let i = |v: usize| v as u64;
        let fl = |v: f32| v.to_bits() as u64;
        let eps = fl(c.layer_norm_epsilon as f32);
        let act = match c.activation_function {
            Activation::GeluNew => 1,
            Activation::Gelu => 2,
            Activation::Relu => 3,
            Activation::Silu => 4,
            Activation::QuickGelu => 5,
        };
        let (h, hd) = (c.n_head, c.head_dim());
        self.launch(
            &self.k.embed,
            (r, 1),
            256,
            0,
            &[tokens, pos, p(&self.wte), p(&self.wpe), x, i(e), best],
        )?;
        // Few rows (decoding): fused warp-per-output products that stream the weights at bandwidth.
        let small = rows <= GEMV_ROWS;
        let gemv = |x_in: u64,
                    w: &Buf,
                    b: u64,
                    k: usize,
                    n: usize,
                    mode: u64,
                    y: u64,
                    yf: u64,
                    kv: (u64, u64)| {
            self.launch(
                &self.k.gemv,
                (n as u32, 1),
                32 * GEMV_WARPS,
                0,
                &[
                    x_in,
                    p(w),
                    b,
                    i(rows),
                    i(k),
                    i(n),
                    mode,
                    act,
                    y,
                    yf,
                    kv.0,
                    kv.1,
                    slot,
                    pos,
                    i(h),
                    i(hd),
                    i(st.lens.capacity()),
                    0,
                ],
            )
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let (kc, vc) = (p(&st.k[l]), p(&st.v[l]));
            let (ln1w, ln1b) = (layer.ln_1.0.device_ptr(s).0, layer.ln_1.1.device_ptr(s).0);
            let (ln2w, ln2b) = (layer.ln_2.0.device_ptr(s).0, layer.ln_2.1.device_ptr(s).0);
            self.launch(
                &self.k.layer_norm,
                (r, 1),
                256,
                0,
                &[x, 0, ln1w, ln1b, ln, i(e), eps],
            )?;
            if small {
                gemv(
                    ln,
                    &layer.c_attn.0,
                    p(&layer.c_attn.1),
                    e,
                    3 * e,
                    0,
                    qkv,
                    0,
                    (kc, vc),
                )?;
            } else {
                self.gemm(ln, p(&layer.c_attn.0), qkv, rows, e, 3 * e, false)?;
                self.launch(
                    &self.k.bias_act,
                    elems(rows * 3 * e),
                    256,
                    0,
                    &[qkv, p(&layer.c_attn.1), i(3 * e), i(rows * 3 * e), 0],
                )?;
                self.launch(
                    &self.k.kv_write,
                    (r, 1),
                    256,
                    0,
                    &[qkv, kc, vc, slot, pos, i(h), i(hd), i(st.lens.capacity())],
                )?;
            }
            if !small && hd == 64 {
                // Prefill: tiles of query rows share key/value tiles.
                let tiles = st.tiles.device_ptr(s).0;
                self.launch(
                    &self.k.attention_prefill,
                    (st.n_tiles as u32, h as u32),
                    256,
                    0,
                    &[
                        qkv,
                        kc,
                        vc,
                        attn,
                        slot,
                        pos,
                        tiles,
                        i(h),
                        i(st.lens.capacity()),
                        fl(layer.scale),
                    ],
                )?;
            } else {
                // Split-K attention: blocks of ATTN_CHUNK keys, then one merge per (row, head).
                let splits = st.lens.capacity().div_ceil(ATTN_CHUNK);
                let shared = ((hd + ATTN_CHUNK + 128) * 4) as u32;
                let (pa, pm) = (st.part_acc.device_ptr(s).0, st.part_ml.device_ptr(s).0);
                self.launch_3d(
                    &self.k.attention_split,
                    (r, h as u32, splits as u32),
                    128,
                    shared,
                    &[
                        qkv,
                        kc,
                        vc,
                        pa,
                        pm,
                        slot,
                        pos,
                        i(h),
                        i(hd),
                        i(st.lens.capacity()),
                        fl(layer.scale),
                        i(ATTN_CHUNK),
                    ],
                )?;
                self.launch(
                    &self.k.attention_combine,
                    (r, h as u32),
                    hd as u32,
                    0,
                    &[pa, pm, attn, i(h), i(hd), i(splits)],
                )?;
            }
            if small {
                gemv(
                    attn,
                    &layer.c_proj.0,
                    p(&layer.c_proj.1),
                    e,
                    e,
                    2,
                    0,
                    x,
                    (0, 0),
                )?;
            } else {
                self.gemm(attn, p(&layer.c_proj.0), proj, rows, e, e, false)?;
                self.launch(
                    &self.k.residual,
                    elems(rows * e),
                    256,
                    0,
                    &[x, proj, p(&layer.c_proj.1), i(e), i(rows * e)],
                )?;
            }
            self.launch(
                &self.k.layer_norm,
                (r, 1),
                256,
                0,
                &[x, 0, ln2w, ln2b, ln, i(e), eps],
            )?;
            if small {
                gemv(ln, &layer.c_fc.0, p(&layer.c_fc.1), e, f, 1, fc, 0, (0, 0))?;
                gemv(
                    fc,
                    &layer.mlp_proj.0,
                    p(&layer.mlp_proj.1),
                    f,
                    e,
                    2,
                    0,
                    x,
                    (0, 0),
                )?;
            } else {
                self.gemm(ln, p(&layer.c_fc.0), fc, rows, e, f, false)?;
                self.launch(
                    &self.k.bias_act,
                    elems(rows * f),
                    256,
                    0,
                    &[fc, p(&layer.c_fc.1), i(f), i(rows * f), act],
                )?;
                self.gemm(fc, p(&layer.mlp_proj.0), proj, rows, f, e, false)?;
                self.launch(
                    &self.k.residual,
                    elems(rows * e),
                    256,
                    0,
                    &[x, proj, p(&layer.mlp_proj.1), i(e), i(rows * e)],
                )?;
            }
        }
        self.launch(
            &self.k.layer_norm,
            (picked as u32, 1),
            256,
            0,
            &[
                x,
                pick,
                self.ln_f.0.device_ptr(s).0,
                self.ln_f.1.device_ptr(s).0,
                ln,
                i(e),
                eps,
            ],
        )?;
        let unembed = self.unembed.as_ref().unwrap_or(&self.wte);
        let ids = st.ids.device_ptr(s).0;
        if picked <= GEMV_ROWS {
            // The argmax rides along with the unembedding.
            self.launch(
                &self.k.gemv,
                (c.vocab_size as u32, 1),
                32 * GEMV_WARPS,
                0,
                &[
                    ln,
                    p(unembed),
                    0,
                    i(picked),
                    i(e),
                    i(c.vocab_size),
                    3,
                    act,
                    0,
                    logits,
                    0,
                    0,
                    slot,
                    pos,
                    i(h),
                    i(hd),
                    i(st.lens.capacity()),
                    best,
                ],
            )?;
            if argmax {
                self.launch(&self.k.unpack_best, (1, 1), 32, 0, &[best, ids, i(picked)])?;
            }
        } else {
            self.gemm(ln, p(unembed), logits, picked, e, c.vocab_size, true)?;
            if argmax {
                self.launch(
                    &self.k.argmax,
                    (picked as u32, 1),
                    1024,
                    0,
                    &[logits, i(c.vocab_size), ids],
                )?;
            }
        }
        Ok(())
    }

    /// Upload a batch's rows; returns (rows, picked rows).
    fn upload(&self, st: &mut CudaState, batch: Checked, which: Logits) -> Result<(usize, usize)> {
        let (mut tokens, mut slots, mut pos, mut pick) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let batch = batch.seqs();
        for s in batch {
            let start = st.lens.len(s.slot);
            for (j, &t) in s.tokens.iter().enumerate() {
                if which == Logits::All || j + 1 == s.tokens.len() {
                    pick.push(tokens.len() as i32);
                }
                tokens.push(t as i32);
                slots.push(s.slot as i32);
                pos.push((start + j) as i32);
            }
        }
        if tokens.len() > st.max_rows {
            return Err(Error::Input(format!(
                "{} new tokens exceed the state's {} rows per step",
                tokens.len(),
                st.max_rows
            )));
        }
        if pick.len() > st.logit_rows {
            return Err(Error::Input(format!(
                "{} rows of logits exceed the state's {} per step",
                pick.len(),
                st.logit_rows
            )));
        }
        // One copy: the four arrays at their offsets in `rowinfo`.
        let m = st.max_rows;
        let mut info = vec![0i32; 4 * m];
        info[..tokens.len()].copy_from_slice(&tokens);
        info[m..m + slots.len()].copy_from_slice(&slots);
        info[2 * m..2 * m + pos.len()].copy_from_slice(&pos);
        info[3 * m..3 * m + pick.len()].copy_from_slice(&pick);
        let used = 3 * m + pick.len();
        self.stream
            .memcpy_htod(&info[..used], &mut st.rowinfo.slice_mut(..used))
            .map_err(cuda_err("copy"))?;
        if tokens.len() > GEMV_ROWS {
            let mut tiles = Vec::new();
            let mut row = 0;
            for s in batch {
                for start in (0..s.tokens.len()).step_by(8) {
                    tiles.push((row + start) as i32);
                    tiles.push((s.tokens.len() - start).min(8) as i32);
                }
                row += s.tokens.len();
            }
            st.n_tiles = tiles.len() / 2;
            self.stream
                .memcpy_htod(&tiles, &mut st.tiles.slice_mut(..tiles.len()))
                .map_err(cuda_err("copy"))?;
        }
        for s in batch {
            st.lens.advance(s.slot, s.tokens.len());
        }
        Ok((tokens.len(), pick.len()))
    }

    /// The forward pass; returns the logits of the last token of each sequence, or of every token,
    /// (f32, on the host).
    pub fn forward(&self, st: &mut CudaState, batch: Checked, which: Logits) -> Result<Vec<f32>> {
        let (rows, picked) = self.upload(st, batch, which)?;
        self.run(st, rows, picked, false)?;
        let mut out = vec![0f32; picked * self.config.vocab_size];
        self.stream
            .memcpy_dtoh(&st.logits.slice(..out.len()), &mut out)
            .map_err(cuda_err("copy"))?;
        Ok(out)
    }

    /// The forward pass with greedy choice on the GPU: only the chosen ids come back.
    pub fn forward_argmax(&self, st: &mut CudaState, batch: Checked) -> Result<Vec<u32>> {
        let (rows, picked) = self.upload(st, batch, Logits::Last)?;
        self.run(st, rows, picked, true)?;
        let mut ids = vec![0i32; picked];
        self.stream
            .memcpy_dtoh(&st.ids.slice(..picked), &mut ids)
            .map_err(cuda_err("copy"))?;
        Ok(ids.into_iter().map(|i| i as u32).collect())
    }

    /// Decode steps (one token per sequence) replay a graph captured for that batch size; other
    /// shapes run the kernels directly.
    fn run(&self, st: &mut CudaState, rows: usize, picked: usize, argmax: bool) -> Result<()> {
        let logits = st.logits.device_ptr(&self.stream).0;
        if rows != picked {
            return self.enqueue(st, rows, picked, logits, argmax);
        }
        let key = rows * 2 + argmax as usize;
        if !st.graphs.contains_key(&key) {
            self.stream
                .begin_capture(drv::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(cuda_err("graph capture"))?;
            let captured = self.enqueue(st, rows, picked, logits, argmax);
            let graph = self
                .stream
                .end_capture(drv::CUgraphInstantiate_flags(0))
                .map_err(cuda_err("graph capture"))?;
            captured?;
            let graph = graph.ok_or_else(|| device_err("graph capture produced no graph"))?;
            st.graphs.insert(key, graph);
        }
        st.graphs[&key].launch().map_err(cuda_err("graph launch"))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }
}

/// KV cache and work buffers on the GPU, and the decode graphs captured for them.
pub(crate) struct CudaState {
    k: Vec<Buf>,
    v: Vec<Buf>,
    /// Positions held per slot.
    pub(super) lens: SlotLens,
    max_rows: usize,
    x: CudaSlice<f32>,
    ln: Buf,
    qkv: Buf,
    attn: Buf,
    proj: Buf,
    fc: Buf,
    /// `[tokens | slots | positions | picked rows]`, `max_rows` each: one upload per step.
    rowinfo: CudaSlice<i32>,
    ids: CudaSlice<i32>,
    /// Per picked row, the packed (value, index) maximum of the fused argmax.
    best: CudaSlice<u64>,
    /// Split-K attention partials: per (row, head, split), hd exp-weighted sums, and (max, sum).
    part_acc: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    /// Prefill attention tiles: (first row, rows) of at most 8 consecutive rows of one sequence.
    tiles: CudaSlice<i32>,
    n_tiles: usize,
    /// Rows `logits` holds.
    logit_rows: usize,
    logits: CudaSlice<f32>,
    graphs: HashMap<usize, CudaGraph>,
    /// Elements of one slot's keys (or values) in a layer: `[slot][head][position][head_dim]`.
    region: usize,
    /// Bytes per cache element.
    elem: usize,
    stream: Arc<CudaStream>,
}

impl CudaState {
    /// Make slot `dst` a copy of slot `src`: its whole region in every layer, keys and values.
    pub fn copy_slot(&mut self, src: usize, dst: usize) -> Result<()> {
        assert!(src < self.lens.slots() && dst < self.lens.slots() && src != dst);
        let bytes = self.region * self.elem;
        for b in self.k.iter().chain(&self.v) {
            let base = b.ptr(&self.stream);
            // SAFETY: both ranges lie inside this layer's buffer (`slots · region` elements), are
            // disjoint (src != dst), and the buffer lives until the stream's work is done (it is
            // freed only with the state, after the stream synchronises).
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    base + (dst * bytes) as u64,
                    base + (src * bytes) as u64,
                    bytes,
                    self.stream.cu_stream(),
                )
            }
            .map_err(cuda_err("copying a cache slot"))?;
        }
        self.lens.copy(src, dst);
        Ok(())
    }
}
