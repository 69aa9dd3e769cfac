//! GPT-2 on the CPU: its layers packed for the kernels, a KV cache per state, buffers reused from
//! step to step (a decode step allocates nothing), and a thread pool of its own. The order of the
//! operations is [`crate::model::forward`]'s; this file says how each runs here.

use super::attention::{self, TILE};
use super::kernels::{self, Isa, Level};
use super::kv_cache::{KvCache, KvHead, KvType};
use super::layers::{self, Block, LayerNorm, Linear};
use super::matrix::Matrix;
use super::packed::PANEL;
use super::pool::{self, Disjoint, Pool};
use crate::config::GPT2Config;
use crate::dtype::DType;
use crate::error::Result;
use crate::model::batch::Checked;
use crate::model::forward::{self, Act, Ops};
use crate::model::params::{Dense, Norm, Params};
use crate::model::sites::{BlockSite, HookPlan, Layout, Site};
use crate::model::{Logits, Rows};
use crate::numerics::TargetStats;

pub(crate) struct CpuModel {
    config: GPT2Config,
    /// `wte`: `(vocab_size, n_embd)`, packed as the unembedding (vocab outputs of n_embd inputs);
    /// an embedding lookup reads one output's weights.
    wte: Matrix,
    /// `wpe`: `(n_positions, n_embd)`.
    wpe: Vec<f32>,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// `lm_head.weight` when the checkpoint has one that differs from `wte`.
    lm_head: Option<Matrix>,
    pool: Pool,
}

/// A CPU model's KV cache and work buffers.
pub(crate) struct CpuState {
    pub(crate) cache: KvCache,
    ws: Workspace,
}

/// Buffers sized for the largest batch seen so far; reused, so a decode step allocates nothing.
#[derive(Default)]
struct Workspace {
    rows: Vec<(usize, usize)>, // (slot, position) of each stacked row
    /// (first row, rows) of each attention block: up to ATTN_ROWS consecutive rows of one sequence.
    blocks: Vec<(usize, usize)>,
    /// One buffer per [`Act`].
    acts: [Buf; 7],
    scores: Buf,
    logits: Buf,
    /// Each row's [`kernels::chunk_stats_of_outputs`] per panel of the unembedding
    /// (log-probabilities only).
    lse: Vec<[f32; 2]>,
    /// Each row's logit of its target (log-probabilities only).
    chosen: Vec<f32>,
    /// Each row's [`kernels::chunk_diag_of_outputs`] per panel of the unembedding, panel-major
    /// (a panel's rows side by side), diagnostics only: a panel's task writes lines of its own,
    /// where row-major entries would put neighbouring panels, run by other threads at the same
    /// time, on shared cache lines.
    diag: Vec<([f32; 3], u32)>,
    /// Each row's logit of its target as the whole product computes it (diagnostics only).
    seen: Vec<f32>,
}

/// Rows unembedded at once when only log-probabilities are wanted: a panel's weights then serve
/// this many rows while in cache, and the rows keep 2 floats per panel instead of 32 logits.
const LOGPROB_ROWS: usize = 256;

const _: () = assert!(
    PANEL == kernels::LSE_CHUNK,
    "a panel is a chunk of the log-sum-exp"
);

/// Queries of one sequence that attend together (sharing each key load).
const ATTN_ROWS: usize = 4;

/// One cache line of floats.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A float buffer starting on a cache line: the threads of a matrix product write whole lines of
/// it (32 columns of a row whose width is a multiple of 16), so no line is shared between them.
#[derive(Default)]
struct Buf(Vec<Line>);

impl std::ops::Deref for Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `Line` is 16 f32 with no padding.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const f32, self.0.len() * 16) }
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`.
        unsafe {
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut f32, self.0.len() * 16)
        }
    }
}

/// Rows of a batch that go through an MLP of 8-bit weights together ([`Ops::mlp`]): their hidden
/// activation (128 × 3072 floats, 1.5 MiB for gpt2) fits a core's L2.
const Q8_MLP_ROWS: usize = 128;

/// Resize without shrinking capacity: after the first use of a shape this never allocates.
fn fit(buf: &mut Buf, len: usize) -> &mut [f32] {
    let lines = len.div_ceil(16);
    if buf.0.len() < lines {
        buf.0.resize(lines, Line([0.0; 16]));
    }
    &mut buf[..len]
}

impl CpuModel {
    /// Build from the parameters, each matrix packed as soon as it is read (so loading peaks near
    /// the model's own size), with a pool of `threads` threads (default one per core).
    pub(crate) fn build(params: &Params, dtype: DType, threads: Option<usize>) -> Result<Self> {
        let pool = Pool::new(threads.unwrap_or_else(pool::default_threads))?;
        let config = params.config().clone();
        let (v, c) = (config.vocab_size, config.n_embd);
        // Its own statement: the f32 rows (the biggest matrix) are freed before the rest is read.
        let wte = layers::matrix(params.wte_weights()?, v, c, dtype)?;
        let wpe = params.wpe()?;
        let lm_head = match params.lm_head_weights()? {
            Some(w) => Some(layers::matrix(w, v, c, dtype)?),
            None => None,
        };
        let blocks = (0..config.n_layer)
            .map(|i| Block::load(params, i, dtype))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(params, Norm::LnF)?;
        Ok(CpuModel {
            config,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            pool,
        })
    }

    /// The same model with its matrices stored as `dtype`.
    pub(crate) fn to_dtype(&self, dtype: DType) -> Result<CpuModel> {
        let repack = |m: &Matrix| Matrix::pack(&m.to_rows(), m.n, m.k, dtype);
        Ok(CpuModel {
            config: self.config.clone(),
            wte: repack(&self.wte),
            wpe: self.wpe.clone(),
            blocks: self.blocks.iter().map(|b| b.to_dtype(dtype)).collect(),
            ln_f: self.ln_f.clone(),
            lm_head: self.lm_head.as_ref().map(repack),
            pool: Pool::new(self.pool.threads())?,
        })
    }

    pub(crate) fn config(&self) -> &GPT2Config {
        &self.config
    }

    pub(crate) fn dtype(&self) -> DType {
        self.wte.dtype()
    }

    /// The kernel path, for reports: instruction set, prompt tile, threads.
    pub(crate) fn describe(&self) -> String {
        let isa = Isa::detect();
        let tile = match isa.level() {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => "8x32",
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => "6x16",
            Level::Portable => "4x32",
        };
        let q8 = match self.dtype() {
            DType::Q8 => format!(", q8 {}", super::q8::kernel_name(isa)),
            _ => String::new(),
        };
        format!(
            "cpu ({} kernels, prompt tile {tile}{q8}), {} threads",
            isa.level().name(),
            self.pool.threads()
        )
    }

    fn kv_type(&self) -> KvType {
        KvType::for_weights(self.dtype())
    }

    pub(crate) fn weight_bytes(&self) -> usize {
        let f = std::mem::size_of::<f32>();
        let mut n = self.unembedding().bytes() + self.ln_f.weight.len() * 2 * f;
        for b in &self.blocks {
            for l in [&b.attn.c_attn, &b.attn.c_proj, &b.mlp.c_fc, &b.mlp.c_proj] {
                n += l.weight.bytes() + l.bias.as_ref().map_or(0, Vec::len) * f;
            }
            n += 4 * b.ln_1.weight.len() * f;
        }
        n
    }

    pub(crate) fn new_state(&self, slots: usize, capacity: usize) -> Result<CpuState> {
        Ok(CpuState {
            cache: KvCache::new(&self.config, slots, capacity, self.kv_type())?,
            ws: Workspace::default(),
        })
    }

    fn unembedding(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// The logits `(rows, vocab_size)`: with [`Logits::Last`] one row per sequence, with
    /// [`Logits::All`] one per new token, in batch order.
    pub(crate) fn forward<'s>(
        &self,
        state: &'s mut CpuState,
        batch: Checked,
        which: Logits,
    ) -> &'s [f32] {
        let rows = match which {
            Logits::Last => Rows::Last,
            Logits::All => Rows::All,
        };
        self.forward_with(state, batch, |_| rows).0
    }

    /// The logits of the rows `rows` selects (one entry per sequence), `(selected, vocab_size)` in
    /// batch order, and the log-probabilities of the targets [`Rows::Targets`] gives, in row order.
    /// Only those rows are unembedded (targets without storing their logits); each row's values
    /// are the same bits whatever else is selected.
    pub(crate) fn forward_rows<'s>(
        &self,
        state: &'s mut CpuState,
        batch: Checked,
        rows: &[Rows],
    ) -> (&'s [f32], Vec<f64>) {
        self.forward_with(state, batch, |i| rows[i])
    }

    /// [`CpuModel::forward_rows`] with each sequence's selection from `rows` (sequence index →
    /// selection); a decode step allocates nothing here.
    fn forward_with<'s, 'r>(
        &self,
        state: &'s mut CpuState,
        batch: Checked,
        rows: impl Fn(usize) -> Rows<'r> + Sync,
    ) -> (&'s [f32], Vec<f64>) {
        self.pool.install(|| {
            self.forward_hidden(state, batch);
            let c = self.config.n_embd;
            let ws = &mut state.ws;
            let mut logprobs = Vec::new();
            let n_seqs = batch.seqs().len();
            if (0..n_seqs).any(|i| matches!(rows(i), Rows::Targets(_))) {
                // The target rows' hidden states, copied out before the logits rows are gathered
                // in place, then reduced as `forward_logprobs` reduces them.
                let (mut x, mut tg) = (Vec::new(), Vec::new());
                let hidden = &ws.acts[Act::Hidden as usize];
                let mut start = 0;
                for (i, sq) in batch.seqs().iter().enumerate() {
                    if let Rows::Targets(t) = rows(i) {
                        for (j, t) in t.iter().enumerate() {
                            if let Some(t) = *t {
                                x.extend_from_slice(&hidden[(start + j) * c..(start + j + 1) * c]);
                                tg.push(t as usize);
                            }
                        }
                    }
                    start += sq.tokens.len();
                }
                logprobs = self.target_logprobs(ws, &x, &tg);
            }
            let hidden = &mut ws.acts[Act::Hidden as usize];
            // The selected rows to the front, in order (each moves to a place at or before its
            // own, so none is overwritten before it moves).
            let mut n = 0;
            for r in batch.selected(&rows) {
                if n != r {
                    hidden.copy_within(r * c..(r + 1) * c, n * c);
                }
                n += 1;
            }
            let logits = fit(&mut ws.logits, n * self.config.vocab_size);
            if n > 0 {
                self.unembedding().matmul(&hidden[..n * c], None, logits);
            }
            (&*logits, logprobs)
        })
    }

    pub(crate) fn forward_argmax(&self, state: &mut CpuState, batch: Checked) -> Vec<u32> {
        let v = self.config.vocab_size;
        self.forward(state, batch, Logits::Last)
            .chunks_exact(v)
            .map(crate::numerics::argmax)
            .collect()
    }

    /// For each row with a target, in row order, the log-probability of its target: the
    /// unembedding reduces its outputs panel by panel ([`kernels::chunk_stats_of_outputs`]) as it
    /// computes them, so no row's logits are stored, and rows without a target are not unembedded.
    /// The values are [`crate::numerics::logprob_of`]'s on the logits [`CpuModel::forward`] returns,
    /// bit for bit.
    pub(crate) fn forward_logprobs(
        &self,
        state: &mut CpuState,
        batch: Checked,
        targets: &[Option<u32>],
    ) -> Vec<f64> {
        self.forward_targets(state, batch, targets, |ws, x, t| {
            self.target_logprobs(ws, x, t)
        })
    }

    /// [`CpuModel::forward_logprobs`] (the same bits) with each target's rank and its row's entropy,
    /// reduced in the same streamed unembedding ([`CpuModel::target_diagnostics`]).
    pub(crate) fn forward_diagnostics(
        &self,
        state: &mut CpuState,
        batch: Checked,
        targets: &[Option<u32>],
    ) -> Vec<TargetStats> {
        self.forward_targets(state, batch, targets, |ws, x, t| {
            self.target_diagnostics(ws, x, t)
        })
    }

    /// Run the batch and hand `reduce` the final hidden states of the rows with a target,
    /// `(targets, n_embd)` in row order, and those targets.
    fn forward_targets<R>(
        &self,
        state: &mut CpuState,
        batch: Checked,
        targets: &[Option<u32>],
        reduce: impl FnOnce(&mut Workspace, &[f32], &[usize]) -> R,
    ) -> R {
        assert_eq!(targets.len(), batch.rows());
        let c = self.config.n_embd;
        self.pool.install(|| {
            self.forward_hidden(state, batch);
            let ws = &mut state.ws;
            let mut hidden = std::mem::take(&mut ws.acts[Act::Hidden as usize]);
            // The rows with a target to the front, in order (each moves to a place at or before its
            // own, so none is overwritten before it moves).
            let mut picked = Vec::with_capacity(targets.len());
            for (i, t) in targets.iter().enumerate() {
                if let Some(t) = *t {
                    hidden.copy_within(i * c..(i + 1) * c, picked.len() * c);
                    picked.push(t as usize);
                }
            }
            let out = reduce(ws, &hidden[..picked.len() * c], &picked);
            ws.acts[Act::Hidden as usize] = hidden;
            out
        })
    }

    /// For each row of final hidden states `x` (`(targets, n_embd)`), the log-probability of its
    /// target: the unembedding reduces its outputs panel by panel
    /// ([`kernels::chunk_stats_of_outputs`]) as it computes them, so no row's logits are stored.
    fn target_logprobs(&self, ws: &mut Workspace, x: &[f32], targets: &[usize]) -> Vec<f64> {
        let (c, v) = (self.config.n_embd, self.config.vocab_size);
        let panels = v.div_ceil(PANEL);
        let isa = Isa::detect();
        let mut out = Vec::with_capacity(targets.len());
        for (b, tg) in targets.chunks(LOGPROB_ROWS).enumerate() {
            let rows = tg.len();
            ws.lse.resize(rows * panels, [0.0; 2]);
            ws.chosen.resize(rows, 0.0);
            let (lse, chosen) = (Disjoint::new(&mut ws.lse), Disjoint::new(&mut ws.chosen));
            let x = &x[b * LOGPROB_ROWS * c..(b * LOGPROB_ROWS + rows) * c];
            self.unembedding().matmul_visit(isa, x, &|p, i, acc| {
                let cols = PANEL.min(v - p * PANEL);
                // SAFETY: the product visits each (panel, row) once, so each entry has one
                // writer; the buffers outlive the loop.
                let entry = unsafe { lse.slice(i * panels + p, 1) };
                entry[0] = kernels::chunk_stats_of_outputs(acc, cols);
                if tg[i] / PANEL == p {
                    // SAFETY: only the panel holding row i's target writes its entry.
                    let entry = unsafe { chosen.slice(i, 1) };
                    // `+ 0.0`: the logit as `forward` stores it (no bias).
                    entry[0] = acc[tg[i] % PANEL] + 0.0;
                }
            });
            let start = out.len();
            out.resize(start + rows, 0.0);
            let o = Disjoint::new(&mut out[start..]);
            pool::parallel_for(rows, &|i| {
                // SAFETY: the product that wrote these entries is over; tasks only read them.
                let (stats, l) = unsafe { (lse.get(i * panels, panels), chosen.get(i, 1)[0]) };
                // SAFETY: each task writes its own row's output.
                let entry = unsafe { o.slice(i, 1) };
                entry[0] = l as f64 - kernels::log_sum_exp_of_chunks(stats);
            });
        }
        out
    }

    /// [`CpuModel::target_logprobs`] (the same bits) with each target's rank (1 + how many logits
    /// are strictly above its own) and its row's entropy, still without storing any row's logits.
    /// The rank needs the target's logit before the product counts, so each row's own panel runs
    /// first, alone ([`Matrix::visit_row_panels`]: 1/1571 of gpt2's unembedding); a product's
    /// outputs are the same bits whatever else it computes, and the whole product checks that its
    /// target logits are those bits. Then one product reduces each (row, panel) to
    /// [`kernels::chunk_diag_of_outputs`], merged per row by [`kernels::lse_entropy_of_chunks`].
    fn target_diagnostics(
        &self,
        ws: &mut Workspace,
        x: &[f32],
        targets: &[usize],
    ) -> Vec<TargetStats> {
        let (c, v) = (self.config.n_embd, self.config.vocab_size);
        let panels = v.div_ceil(PANEL);
        let isa = Isa::detect();
        let unembedding = self.unembedding();
        let mut out = Vec::with_capacity(targets.len());
        for (b, tg) in targets.chunks(LOGPROB_ROWS).enumerate() {
            let rows = tg.len();
            let x = &x[b * LOGPROB_ROWS * c..(b * LOGPROB_ROWS + rows) * c];
            ws.chosen.resize(rows, 0.0);
            let chosen = Disjoint::new(&mut ws.chosen);
            unembedding.visit_row_panels(isa, x, &|i| tg[i] / PANEL, &|i, acc| {
                // SAFETY: each row is visited once; the buffer outlives the loop.
                let entry = unsafe { chosen.slice(i, 1) };
                // `+ 0.0`: the logit as `forward` stores it (no bias).
                entry[0] = acc[tg[i] % PANEL] + 0.0;
            });
            ws.diag.resize(rows * panels, ([0.0; 3], 0));
            ws.seen.resize(rows, f32::NAN);
            let (diag, seen) = (Disjoint::new(&mut ws.diag), Disjoint::new(&mut ws.seen));
            unembedding.matmul_visit(isa, x, &|p, i, acc| {
                let cols = PANEL.min(v - p * PANEL);
                // SAFETY: the loop that wrote `chosen` is over; tasks only read it.
                let target = unsafe { chosen.get(i, 1)[0] };
                let d = kernels::chunk_diag_of_outputs(acc, cols, target);
                // SAFETY: the product visits each (panel, row) once, so each entry has one
                // writer; the buffer outlives the loop.
                unsafe { diag.slice(p * rows + i, 1)[0] = d };
                if tg[i] / PANEL == p {
                    // SAFETY: only the panel holding row i's target writes its entry.
                    unsafe { seen.slice(i, 1)[0] = acc[tg[i] % PANEL] + 0.0 };
                }
            });
            let same =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same(&ws.chosen[..rows], &ws.seen[..rows]),
                "a row's own panel gave other bits than the whole unembedding: ranks would be wrong"
            );
            let start = out.len();
            out.resize(
                start + rows,
                TargetStats {
                    logprob: 0.0,
                    rank: 0,
                    entropy: 0.0,
                },
            );
            let o = Disjoint::new(&mut out[start..]);
            pool::parallel_for(rows, &|i| {
                // SAFETY: the product that wrote these entries is over; tasks only read them.
                let (d, l) = unsafe { (diag.get(0, rows * panels), chosen.get(i, 1)[0]) };
                let mut above = 0;
                let stats: Vec<[f32; 3]> = (0..panels)
                    .map(|p| {
                        let (s, n) = d[p * rows + i];
                        above += n;
                        s
                    })
                    .collect();
                let [lse, entropy] = kernels::lse_entropy_of_chunks(&stats);
                let row = TargetStats {
                    logprob: l as f64 - lse,
                    rank: 1 + above,
                    entropy,
                };
                // SAFETY: each task writes its own row's output.
                unsafe { o.slice(i, 1)[0] = row };
            });
        }
        out
    }

    /// Every new token's final hidden state (after `ln_f`), `(rows, n_embd)` in batch order, in
    /// the workspace's [`Act::Hidden`]; the new tokens join the cache.
    fn forward_hidden(&self, state: &mut CpuState, batch: Checked) {
        self.forward_hooked(state, batch, None);
    }

    /// A forward pass that reads and replaces the sites `hooks` names (on fresh slots: the
    /// attention sites are computed over the batch's own tokens), going only as far as they need;
    /// with `logits`, every row's logits `(rows, vocab_size)` in batch order.
    pub(crate) fn run_hooked(
        &self,
        state: &mut CpuState,
        batch: Checked,
        hooks: &mut HookPlan,
        logits: bool,
    ) -> Option<Vec<f32>> {
        self.pool.install(|| {
            self.forward_hooked(state, batch, Some(hooks));
            if !logits {
                return None;
            }
            let (c, n) = (self.config.n_embd, batch.rows());
            let hidden = &state.ws.acts[Act::Hidden as usize];
            let mut out = vec![0.0; n * self.config.vocab_size];
            self.unembedding().matmul(&hidden[..n * c], None, &mut out);
            Some(out)
        })
    }

    fn forward_hooked(&self, state: &mut CpuState, batch: Checked, hooks: Option<&mut HookPlan>) {
        let CpuState { cache, ws } = state;
        ws.rows.clear();
        ws.blocks.clear();
        for s in batch.seqs() {
            let start = cache.len(s.slot);
            let r0 = ws.rows.len();
            ws.rows
                .extend((0..s.tokens.len()).map(|t| (s.slot, start + t)));
            for b in (r0..ws.rows.len()).step_by(ATTN_ROWS) {
                ws.blocks.push((b, ATTN_ROWS.min(ws.rows.len() - b)));
            }
        }
        let (layers, final_norm) = hooks
            .as_ref()
            .map_or((self.config.n_layer, true), |h| (h.layers, h.final_norm));
        let mut pass = Pass {
            model: self,
            cache,
            ws,
            batch,
            hooks,
        };
        forward::forward_until(&mut pass, layers, final_norm);
        for s in batch.seqs() {
            let len = cache.len(s.slot) + s.tokens.len();
            cache.set_len(s.slot, len);
        }
    }
}

/// One forward pass on the CPU: the model's operations over one state's buffers.
struct Pass<'p, 'b, 'a, 'h> {
    model: &'p CpuModel,
    cache: &'p mut KvCache,
    ws: &'p mut Workspace,
    batch: Checked<'b, 'a>,
    /// Sites to read and replace (research runs only).
    hooks: Option<&'p mut HookPlan<'h>>,
}

impl Pass<'_, '_, '_, '_> {
    /// `src` to read (its first `n_src` values) and `dst` to write (sized to `n_dst`).
    fn io(&mut self, src: Act, n_src: usize, dst: Act, n_dst: usize) -> (&[f32], &mut [f32]) {
        let [s, d] = self
            .ws
            .acts
            .get_disjoint_mut([src as usize, dst as usize])
            .expect("an operation reads and writes different activations");
        (&s[..n_src], fit(d, n_dst))
    }

    fn rows(&self) -> usize {
        self.ws.rows.len()
    }

    /// Each sequence's first row and token count.
    fn spans(&self) -> Vec<(usize, usize)> {
        let mut at = 0;
        self.batch
            .seqs()
            .iter()
            .map(|s| {
                at += s.tokens.len();
                (at - s.tokens.len(), s.tokens.len())
            })
            .collect()
    }

    /// A row site held in columns `off..off + width` of `act`'s rows (`stride` wide): replace each
    /// sequence's rows where it is patched, then capture what flows on.
    fn row_site(&mut self, site: Site, act: Act, stride: usize, off: usize, width: usize) {
        let spans = self.spans();
        let Some(h) = self.hooks.as_deref_mut() else {
            return;
        };
        let x =
            &mut self.ws.acts[act as usize][..spans.iter().map(|s| s.1).sum::<usize>() * stride];
        for (i, &(r0, t)) in spans.iter().enumerate() {
            if let Some(v) = h.patch(i, site) {
                for (r, src) in v.chunks_exact(width).enumerate().take(t) {
                    x[(r0 + r) * stride + off..][..width].copy_from_slice(src);
                }
            }
        }
        for (i, &(r0, t)) in spans.iter().enumerate() {
            let Some(d) = h.dest(i, site) else {
                break;
            };
            let rows = x[r0 * stride..(r0 + t) * stride].chunks_exact(stride);
            for (o, row) in d.chunks_exact_mut(width).zip(rows) {
                o.copy_from_slice(&row[off..off + width]);
            }
        }
    }

    /// `hook_embed` and `hook_pos_embed` together: the two terms of the residual stream's start,
    /// recomputed from the weights; where either is patched, the stream is their sum again (in
    /// `embed`'s order: token, then position).
    fn embed_sites(&mut self) {
        let c = self.model.config.n_embd;
        let spans = self.spans();
        let Some(h) = self.hooks.as_deref_mut() else {
            return;
        };
        let n = self.ws.rows.len();
        let (mut e, mut p) = (vec![0.0; n * c], vec![0.0; n * c]);
        let tokens = self.batch.seqs().iter().flat_map(|s| s.tokens.iter());
        for (((er, pr), &tok), &(_, pos)) in e
            .chunks_exact_mut(c)
            .zip(p.chunks_exact_mut(c))
            .zip(tokens)
            .zip(self.ws.rows.iter())
        {
            self.model.wte.row(tok as usize, er);
            pr.copy_from_slice(&self.model.wpe[pos * c..][..c]);
        }
        let x = &mut self.ws.acts[Act::X as usize][..n * c];
        for (i, &(r0, t)) in spans.iter().enumerate() {
            let (pe, pp) = (h.patch(i, Site::Embed), h.patch(i, Site::PosEmbed));
            if pe.is_none() && pp.is_none() {
                continue;
            }
            let rows = r0 * c..(r0 + t) * c;
            if let Some(v) = pe {
                e[rows.clone()].copy_from_slice(v);
            }
            if let Some(v) = pp {
                p[rows.clone()].copy_from_slice(v);
            }
            for ((o, a), b) in x[rows.clone()]
                .iter_mut()
                .zip(&e[rows.clone()])
                .zip(&p[rows])
            {
                *o = *a;
                *o += b;
            }
        }
        h.store(Site::Embed, &e);
        h.store(Site::PosEmbed, &p);
    }

    /// Block `l`'s attention scores and pattern, computed plainly from this pass's q, k, v (the
    /// slots are fresh, so a sequence attends only to its own rows): captured, patched, and where
    /// a sequence patches either, its `z` recomputed from the pattern into `attn`.
    fn attention_sites(&mut self, l: usize, qkv: Act, dst: Act) {
        let (scores_site, pattern_site) = (
            Site::Block(l, BlockSite::AttnScores),
            Site::Block(l, BlockSite::Pattern),
        );
        let spans = self.spans();
        let a = &self.model.blocks[l].attn;
        let (c, hd, nh, scale) = (self.model.config.n_embd, a.head_dim, a.n_head, a.scale);
        let Some(h) = self.hooks.as_deref_mut() else {
            return;
        };
        if !(h.touches(scores_site) || h.touches(pattern_site)) {
            return;
        }
        let [qkv, attn] = self
            .ws
            .acts
            .get_disjoint_mut([qkv as usize, dst as usize])
            .expect("attention reads and writes different activations");
        for (i, &(r0, t)) in spans.iter().enumerate() {
            let row = |r: usize, part: usize, head: usize| {
                &qkv[(r0 + r) * 3 * c + part * c + head * hd..][..hd]
            };
            let mut scores = vec![f32::NEG_INFINITY; nh * t * t];
            for head in 0..nh {
                for q in 0..t {
                    for k in 0..=q {
                        let dot: f32 = row(q, 0, head)
                            .iter()
                            .zip(row(k, 1, head))
                            .map(|(a, b)| a * b)
                            .sum();
                        scores[(head * t + q) * t + k] = dot * scale;
                    }
                }
            }
            // A patch that equals what was computed changes nothing: the kernel's `z` stays, bit
            // for bit (the plain recomputation below rounds differently).
            let same =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            let patched_scores = h.patch(i, scores_site).filter(|v| !same(v, &scores));
            if let Some(v) = patched_scores {
                scores.copy_from_slice(v);
            }
            let mut pattern = scores.clone();
            for r in pattern.chunks_exact_mut(t) {
                let m = r.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0.0;
                for x in r.iter_mut() {
                    *x = (*x - m).exp();
                    sum += *x;
                }
                for x in r.iter_mut() {
                    *x /= sum;
                }
            }
            let patched_pattern = h.patch(i, pattern_site).filter(|v| !same(v, &pattern));
            if let Some(v) = patched_pattern {
                pattern.copy_from_slice(v);
            }
            if patched_scores.is_some() || patched_pattern.is_some() {
                for head in 0..nh {
                    for q in 0..t {
                        let z = &mut attn[(r0 + q) * c + head * hd..][..hd];
                        z.fill(0.0);
                        for k in 0..t {
                            let w = pattern[(head * t + q) * t + k];
                            if w != 0.0 {
                                for (o, v) in z.iter_mut().zip(row(k, 2, head)) {
                                    *o += w * v;
                                }
                            }
                        }
                    }
                }
            }
            for (site, v) in [(scores_site, &scores), (pattern_site, &pattern)] {
                if let Some(d) = h.dest(i, site) {
                    d.copy_from_slice(v);
                }
            }
        }
    }
}

impl Ops for Pass<'_, '_, '_, '_> {
    fn hooked(&self, site: Site) -> bool {
        self.hooks.as_ref().is_some_and(|h| h.touches(site))
    }

    fn site(&mut self, site: Site, act: Act) {
        let model = self.model;
        let cfg = &model.config;
        let c = cfg.n_embd;
        match site {
            Site::Embed => self.embed_sites(),
            // Done with `hook_embed` when that is hooked too.
            Site::PosEmbed if self.hooked(Site::Embed) => {}
            Site::PosEmbed => self.embed_sites(),
            Site::Block(_, s @ (BlockSite::Q | BlockSite::K | BlockSite::V)) => {
                let part = match s {
                    BlockSite::Q => 0,
                    BlockSite::K => 1,
                    _ => 2,
                };
                self.row_site(site, act, 3 * c, part * c, c);
            }
            _ => {
                let Layout::Rows(w) = site.layout(cfg) else {
                    unreachable!("the attention sites are read inside `attention`")
                };
                self.row_site(site, act, w, 0, w);
            }
        }
    }

    fn dense_pre(&mut self, src: Act, layer: usize, dst: Act) {
        let lin = &self.model.blocks[layer].mlp.c_fc;
        let n = self.rows();
        let (x, out) = self.io(src, n * lin.n_in, dst, n * lin.n_out);
        lin.forward(x, out);
    }

    fn activate(&mut self, layer: usize, dst: Act) {
        let mlp = &self.model.blocks[layer].mlp;
        let n = self.rows() * mlp.c_fc.n_out;
        kernels::activation(mlp.act, &mut self.ws.acts[dst as usize][..n]);
    }

    fn embed(&mut self) {
        let c = self.model.config.n_embd;
        let n = self.rows();
        let (wte, wpe) = (&self.model.wte, &self.model.wpe);
        let Workspace { acts, rows, .. } = &mut *self.ws;
        let x = fit(&mut acts[Act::X as usize], n * c);
        let tokens = self.batch.seqs().iter().flat_map(|s| s.tokens.iter());
        for ((xr, &tok), &(_, pos)) in x.chunks_exact_mut(c).zip(tokens).zip(rows.iter()) {
            wte.row(tok as usize, xr);
            for (o, p) in xr.iter_mut().zip(&wpe[pos * c..][..c]) {
                *o += p;
            }
        }
    }

    fn layer_norm(&mut self, src: Act, norm: Norm, dst: Act) {
        let n = self.rows() * self.model.config.n_embd;
        let ln = match norm {
            Norm::Ln1(l) => &self.model.blocks[l].ln_1,
            Norm::Ln2(l) => &self.model.blocks[l].ln_2,
            Norm::LnF => &self.model.ln_f,
        };
        let (x, out) = self.io(src, n, dst, n);
        kernels::layer_norm(x, &ln.weight, &ln.bias, ln.eps, out);
    }

    fn dense(&mut self, src: Act, layer: usize, proj: Dense, dst: Act) {
        let b = &self.model.blocks[layer];
        let lin: &Linear = match proj {
            Dense::CAttn => &b.attn.c_attn,
            Dense::AttnProj => &b.attn.c_proj,
            Dense::CFc => &b.mlp.c_fc,
            Dense::MlpProj => &b.mlp.c_proj,
        };
        let n = self.rows();
        let (x, out) = self.io(src, n * lin.n_in, dst, n * lin.n_out);
        if proj == Dense::CFc {
            lin.forward_act(x, b.mlp.act, out);
        } else {
            lin.forward(x, out);
        }
    }

    /// With 8-bit weights a batch's rows go through the MLP [`Q8_MLP_ROWS`] at a time, each
    /// chunk's hidden activation (`n_inner` wide, 4× the residual) in the same scratch rows: it
    /// stays in cache between the two products instead of a round trip through memory, for a
    /// re-read of the block's weights per chunk. Wider weights cost more to re-read than that
    /// saves, so they take all rows at once. Rows are independent, so the bits are the same.
    fn mlp(&mut self, layer: usize, src: Act, hidden: Act, dst: Act) {
        let model = self.model;
        let mlp = &model.blocks[layer].mlp;
        let (c_fc, c_proj) = (&mlp.c_fc, &mlp.c_proj);
        let n = self.rows();
        let chunk = match c_fc.weight.dtype() {
            DType::Q8 => n.clamp(1, Q8_MLP_ROWS),
            _ => n.max(1),
        };
        let [s, h, d] = self
            .ws
            .acts
            .get_disjoint_mut([src as usize, hidden as usize, dst as usize])
            .expect("the MLP reads, uses and writes different activations");
        let h = fit(h, chunk * c_fc.n_out);
        let d = fit(d, n * c_proj.n_out);
        for r0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - r0);
            let h = &mut h[..rows * c_fc.n_out];
            c_fc.forward_act(&s[r0 * c_fc.n_in..(r0 + rows) * c_fc.n_in], mlp.act, h);
            c_proj.forward(h, &mut d[r0 * c_proj.n_out..(r0 + rows) * c_proj.n_out]);
        }
    }

    fn attention(&mut self, l: usize, qkv: Act, dst: Act) {
        let hooked_acts = (qkv, dst);
        let a = &self.model.blocks[l].attn;
        let (c, hd) = (self.model.config.n_embd, a.head_dim);
        let n = self.rows();
        let own_rows = self.ws.blocks.len() == self.batch.seqs().len();
        let Pass { cache, ws, .. } = self;
        let Workspace {
            rows,
            blocks,
            acts,
            scores,
            ..
        } = &mut **ws;
        // Each sequence's new rows one block (decoding): a unit stores its block's keys and
        // values of its head itself, just before it reads them. Otherwise (a prompt's later
        // blocks read the earlier ones' keys) all are stored first.
        let [qkv, attn] = acts
            .get_disjoint_mut([qkv as usize, dst as usize])
            .expect("attention reads and writes different activations");
        let qkv = &qkv[..n * 3 * c];
        if !own_rows {
            cache.write_rows(l, rows, qkv);
        }
        // Attention per (block of up to 4 consecutive rows of one sequence, head): the block's
        // queries share each key load. Units go to tasks in contiguous runs; each task has
        // scratch for its queries and scores.
        let attn = fit(attn, n * c);
        let units = blocks.len() * a.n_head;
        let tasks = units.min(4 * pool::threads()).max(1);
        let per_task = units.div_ceil(tasks);
        // Sized for the whole context, not the longest sequence so far: the buffer then
        // grows once, not every TILE positions of a decode.
        let scratch = ATTN_ROWS * (cache.capacity().next_multiple_of(TILE) + 2 * hd);
        let scratch_all = Disjoint::new(fit(scores, tasks * scratch));
        let out = Disjoint::new(attn);
        let layer = cache.layer(l);
        let (rows, blocks) = (&*rows, &*blocks);
        pool::parallel_for(tasks, &|t| {
            // SAFETY: task `t` owns its scratch and its units' rows × head outputs.
            let sc = unsafe { scratch_all.slice(t * scratch, scratch) };
            let (qs, rest) = sc.split_at_mut(ATTN_ROWS * hd);
            let (res, scores) = rest.split_at_mut(ATTN_ROWS * hd);
            for u in t * per_task..((t + 1) * per_task).min(units) {
                let ((r0, count), h) = (blocks[u / a.n_head], u % a.n_head);
                let (slot, first) = rows[r0];
                for i in 0..count {
                    let q = &qkv[(r0 + i) * 3 * c + h * hd..][..hd];
                    qs[i * hd..(i + 1) * hd].copy_from_slice(q);
                }
                let (qs, res) = (&qs[..count * hd], &mut res[..count * hd]);
                if own_rows {
                    let new = &qkv[r0 * 3 * c..(r0 + count) * 3 * c];
                    // SAFETY: the batch is `Checked`, so its slots are distinct; with a block per
                    // sequence this unit alone touches (slot, h).
                    unsafe { layer.write_head(slot, h, first, new) };
                }
                // SAFETY: no unit writes (slot, h) but this one, which has finished writing.
                let head = unsafe { layer.head(slot, h) };
                match head {
                    KvHead::F32 { keys, values } => {
                        attention::attend(qs, hd, keys, values, first + 1, a.scale, scores, res)
                    }
                    KvHead::F16 { keys, values } => {
                        attention::attend(qs, hd, keys, values, first + 1, a.scale, scores, res)
                    }
                }
                for (i, r) in res.chunks_exact(hd).enumerate() {
                    // SAFETY: row r0 + i's columns of head h belong to this unit alone.
                    unsafe { out.slice((r0 + i) * c + h * hd, hd) }.copy_from_slice(r);
                }
            }
        });
        if self.hooks.is_some() {
            self.attention_sites(l, hooked_acts.0, hooked_acts.1);
        }
    }

    fn add(&mut self, dst: Act, src: Act) {
        let n = self.rows() * self.model.config.n_embd;
        let [d, s] = self
            .ws
            .acts
            .get_disjoint_mut([dst as usize, src as usize])
            .expect("a residual add reads and writes different activations");
        kernels::add_in_place(&mut d[..n], &s[..n]);
    }
}
