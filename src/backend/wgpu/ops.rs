//! One kernel at a time on host data, for the backend-ops tests (`tests/wgpu.rs`): each runs the
//! same pipeline the model dispatches, through the same binding and row table, so that it can be
//! compared with `cpu::reference` on its own (as llama.cpp's test-backend-ops does).

use super::kernels::{activation_code, Dims, Epilogue, Grid, Kernel, Kernels};
use super::{bind, encode, row_stats, Gpu, NO_TARGET};
use crate::config::Activation;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::numerics::TargetStats;

/// An opened adapter and its kernels, for running them one by one.
pub struct KernelRunner {
    gpu: Gpu,
    f32: Kernels,
}

impl KernelRunner {
    /// Adapter `index` (`gpu:N`).
    pub fn open(index: usize) -> Result<KernelRunner> {
        let gpu = Gpu::open(index)?;
        let f32 = gpu.checked("compiling the WGSL kernels", || {
            Ok(Kernels::new(&gpu.device, DType::F32))
        })?;
        Ok(KernelRunner { gpu, f32 })
    }

    /// The adapter's description.
    pub fn adapter(&self) -> &str {
        &self.gpu.name
    }

    /// Run `ops` (kernel, dims, bindings after the first two, grid) for a step of `rows`
    /// (`[token, slot, position]`), `pick` and `targets` (none, or one per picked row), and read
    /// `out` back.
    fn run(
        &self,
        k: &Kernels,
        (rows, pick, targets): (&[[u32; 3]], &[usize], &[u32]),
        ops: &[(Kernel, Dims, Vec<&wgpu::Buffer>, Grid)],
        out: &wgpu::Buffer,
    ) -> Result<Vec<f32>> {
        let m = rows.len().max(pick.len()).max(1);
        let gpu = &self.gpu;
        gpu.checked("running a kernel", || {
            let step = gpu.zeros(
                "step",
                4 * (4 + 5 * m),
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            )?;
            let program: Vec<_> = ops
                .iter()
                .map(|(kernel, dims, bufs, grid)| bind(gpu, k, *kernel, &step, *dims, bufs, *grid))
                .collect();
            let enc = encode(gpu, k, &step, m, rows, pick, targets, &program);
            let staging = gpu.zeros(
                "read-back",
                out.size() as usize,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            )?;
            gpu.read_f32(enc, out, &staging, out.size())
        })
    }

    fn out(&self, n: usize) -> Result<wgpu::Buffer> {
        self.gpu.zeros(
            "out",
            4 * n,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        )
    }

    /// LayerNorm of each row of `x` (rows of `weight.len()`), as `reference::layer_norm`.
    pub fn layer_norm(
        &self,
        x: &[f32],
        weight: &[f32],
        bias: &[f32],
        eps: f32,
    ) -> Result<Vec<f32>> {
        let e = weight.len();
        if e == 0 || !x.len().is_multiple_of(e) || bias.len() != e {
            return Err(Error::Input(
                "layer_norm: x must be rows of weight's length".into(),
            ));
        }
        let rows: Vec<[u32; 3]> = (0..x.len() / e).map(|_| [0, 0, 0]).collect();
        let g = &self.gpu;
        let (xb, wb, bb, out) = (
            g.upload_f32("x", x)?,
            g.upload_f32("w", weight)?,
            g.upload_f32("b", bias)?,
            self.out(x.len())?,
        );
        let dims = Dims::ints(&[e as u32, 0]).float(eps);
        let ops = [(
            Kernel::LayerNorm,
            dims,
            vec![&xb, &wb, &bb, &out],
            Grid::Rows,
        )];
        let mut y = self.run(&self.f32, (&rows, &[], &[]), &ops, &out)?;
        y.truncate(x.len());
        Ok(y)
    }

    /// `x (m, k) · wᵀ` with `w` stored `(n, k)` as `dtype`, then the bias, the activation, or the
    /// residual add `residual + ·` (each optional): `reference::matmul` and the epilogue.
    #[allow(clippy::too_many_arguments)] // one kernel's operands
    pub fn matmul(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        k: usize,
        dtype: DType,
        act: Option<Activation>,
        residual: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        if k == 0 || !x.len().is_multiple_of(k) || !w.len().is_multiple_of(k) || dtype == DType::Q8
        {
            return Err(Error::Input(
                "matmul: x (m, k), w (n, k), f32/f16/bf16".into(),
            ));
        }
        let (m, n) = (x.len() / k, w.len() / k);
        let epi = match (bias, act, residual) {
            (None, None, None) => Epilogue::None,
            (Some(_), None, None) => Epilogue::Bias,
            (Some(_), Some(_), None) => Epilogue::BiasAct,
            (Some(_), None, Some(r)) if r.len() == m * n => Epilogue::BiasResidual,
            _ => return Err(Error::Input("matmul: an unsupported epilogue".into())),
        };
        let owned;
        let kernels = if dtype == DType::F32 {
            &self.f32
        } else {
            owned = self.gpu.checked("compiling the WGSL kernels", || {
                Ok(Kernels::new(&self.gpu.device, dtype))
            })?;
            &owned
        };
        let g = &self.gpu;
        let out = match residual {
            Some(r) => g.upload_f32("out", r)?,
            None => self.out(m * n)?,
        };
        let (xb, wb, bb) = (
            g.upload_f32("x", x)?,
            g.upload("w", &super::stored(w, dtype))?,
            g.upload_f32("bias", bias.unwrap_or(&[0.0]))?,
        );
        let act = activation_code(act.unwrap_or(Activation::GeluNew));
        let (k32, n32) = (k as u32, n as u32);
        let dims = Dims::product(k32, n32, epi, act, false, n32, 0);
        let rows: Vec<[u32; 3]> = (0..m).map(|_| [0, 0, 0]).collect();
        let grid = Grid::Tiles {
            n: n as u32,
            picked: false,
        };
        let ops = [(Kernel::Matmul, dims, vec![&xb, &wb, &bb, &out], grid)];
        let mut y = self.run(kernels, (&rows, &[], &[]), &ops, &out)?;
        y.truncate(m * n);
        Ok(y)
    }

    /// Causal attention of rows `qkv` (`(rows, 3·n_embd)`: q | k | v, heads contiguous), row `r`
    /// at `positions[r]` of slot `slots[r]`: writes every row's key and value into a cache of
    /// `capacity` positions, then attends (`reference::attention` per row and head, over positions
    /// 0..=p of the row's slot, all of which must be among the rows).
    #[allow(clippy::too_many_arguments)] // one kernel's operands
    pub fn attention(
        &self,
        qkv: &[f32],
        n_embd: usize,
        n_head: usize,
        slots: &[usize],
        positions: &[usize],
        capacity: usize,
        scale: f32,
    ) -> Result<Vec<f32>> {
        let rows = slots.len();
        if n_head == 0
            || !n_embd.is_multiple_of(n_head)
            || qkv.len() != rows * 3 * n_embd
            || positions.len() != rows
            || positions.iter().any(|&p| p >= capacity)
        {
            return Err(Error::Input("attention: inconsistent shapes".into()));
        }
        let n_slots = slots.iter().max().map_or(1, |s| s + 1);
        let g = &self.gpu;
        let st = wgpu::BufferUsages::STORAGE;
        let (qb, kc, vc, scores, out) = (
            g.upload_f32("qkv", qkv)?,
            g.zeros("keys", 4 * n_slots * n_embd * capacity, st)?,
            g.zeros("values", 4 * n_slots * n_embd * capacity, st)?,
            g.zeros("scores", 4 * rows * n_head * capacity, st)?,
            self.out(rows * n_embd)?,
        );
        let (e, hd, cap) = (n_embd as u32, (n_embd / n_head) as u32, capacity as u32);
        let table: Vec<[u32; 3]> = (slots.iter().zip(positions))
            .map(|(&s, &p)| [0, s as u32, p as u32])
            .collect();
        let ops = [
            (
                Kernel::KvWrite,
                Dims::ints(&[e, hd, cap]),
                vec![&qb, &kc, &vc],
                Grid::Rows,
            ),
            (
                Kernel::Attention,
                Dims::ints(&[e, hd, cap, n_head as u32]).float(scale),
                vec![&qb, &kc, &vc, &scores, &out],
                Grid::RowHeads(n_head as u32),
            ),
        ];
        let mut y = self.run(&self.f32, (&table, &[], &[]), &ops, &out)?;
        y.truncate(rows * n_embd);
        Ok(y)
    }

    /// Each row of `logits` (rows of `vocab`) that has a target reduced by the scoring kernel to
    /// its log-prob, rank and entropy (`numerics::target_stats` of the row), in row order; rows
    /// whose target is `None` are skipped.
    pub fn score(
        &self,
        logits: &[f32],
        vocab: usize,
        targets: &[Option<u32>],
    ) -> Result<Vec<TargetStats>> {
        let n = targets.len();
        if vocab == 0
            || logits.len() != n * vocab
            || targets.iter().flatten().any(|&t| t as usize >= vocab)
        {
            return Err(Error::Input(
                "score: logits must be one row of vocab per target, each below vocab".into(),
            ));
        }
        let g = &self.gpu;
        let (lb, out) = (g.upload_f32("logits", logits)?, self.out(4 * n)?);
        let pick: Vec<usize> = (0..n).collect();
        let t: Vec<u32> = targets.iter().map(|t| t.unwrap_or(NO_TARGET)).collect();
        let ops = [(
            Kernel::Score,
            Dims::ints(&[vocab as u32]),
            vec![&lb, &out],
            Grid::Scored,
        )];
        let y = self.run(&self.f32, (&[], &pick, &t), &ops, &out)?;
        Ok((y.chunks_exact(4).zip(&t))
            .filter(|(_, &t)| t != NO_TARGET)
            .map(|(s, _)| row_stats([s[0], s[1], s[2], s[3]]))
            .collect())
    }
}
