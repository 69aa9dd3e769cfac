//! The GPT-2 model: typed parameters and the forward pass over a batch of sequences with a KV cache.
//!
//! A batch is ragged: each sequence brings its own new tokens and continues from its own cache
//! length, and all new tokens are stacked into one `(rows, n_embd)` matrix so that every linear
//! layer is one matrix product. No padding, so no masks: each row's result is the same as when its
//! sequence runs alone.

mod kv_cache;
pub mod layers;

use std::path::Path;

pub use kv_cache::{KvCache, KvHead, KvType};
pub use layers::{Attention, Block, LayerNorm, Linear, Mlp};

use crate::backend::cpu::attention::{self, TILE};
use crate::backend::cpu::kernels;
use crate::backend::cpu::matrix::Matrix;
use crate::backend::cpu::pool::{self, Disjoint};
use crate::config::GPT2Config;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::weights::Checkpoint;

pub struct Model {
    pub config: GPT2Config,
    /// `wte`: `(vocab_size, n_embd)`, packed as the unembedding (vocab outputs of n_embd inputs);
    /// an embedding lookup reads one output's weights.
    pub wte: Matrix,
    /// `wpe`: `(n_positions, n_embd)`.
    pub wpe: Vec<f32>,
    pub blocks: Vec<Block>,
    pub ln_f: LayerNorm,
    /// `lm_head.weight` when the checkpoint has one that differs from `wte`.
    pub lm_head: Option<Matrix>,
}

/// New tokens for one sequence of a batch, continuing the cache slot `slot`.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
}

/// Which rows get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// The last new token of each sequence (what decoding needs).
    Last,
    /// Every new token (what scoring needs).
    All,
}

/// The mutable half of inference: the KV cache and the reused work buffers.
pub struct State {
    pub cache: KvCache,
    ws: Workspace,
}

/// Buffers sized for the largest batch seen so far; reused, so a decode step allocates nothing.
#[derive(Default)]
struct Workspace {
    rows: Vec<(usize, usize)>, // (slot, position) of each stacked row
    /// (first row, rows) of each attention block: up to ATTN_ROWS consecutive rows of one sequence.
    blocks: Vec<(usize, usize)>,
    x: Buf,
    ln: Buf,
    qkv: Buf,
    attn: Buf,
    proj: Buf,
    fc: Buf,
    scores: Buf,
    hidden: Buf,
    logits: Buf,
}

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

/// Resize without shrinking capacity: after the first use of a shape this never allocates.
fn fit(buf: &mut Buf, len: usize) -> &mut [f32] {
    let lines = len.div_ceil(16);
    if buf.0.len() < lines {
        buf.0.resize(lines, Line([0.0; 16]));
    }
    &mut buf[..len]
}

impl Model {
    /// Load `config.json` and the safetensors weights of a model directory, in f32.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_as(dir, DType::F32)
    }

    /// Load a model directory or checkpoint file (any format [`crate::weights::open`] reads) with
    /// its matrices stored as `dtype` (converted from whatever the checkpoint holds).
    pub fn load_as(dir: &Path, dtype: DType) -> Result<Self> {
        let opened = crate::weights::open(dir)?;
        Self::from_checkpoint(opened.config, &opened.checkpoint, dtype)
    }

    /// Build the typed parameters from an opened checkpoint; every tensor must be used.
    pub fn from_checkpoint(config: GPT2Config, ck: &Checkpoint, dtype: DType) -> Result<Self> {
        config.validate().map_err(|msg| Error::Config {
            path: "config".into(),
            msg,
        })?;
        let (v, c) = (config.vocab_size, config.n_embd);
        // Each matrix is packed as soon as it is read, so loading peaks near the model's own size.
        let wte = ck.matrix("wte.weight", v, c, false, dtype)?;
        let lm_head =
            if ck.contains("lm_head.weight") && !ck.same_data("lm_head.weight", "wte.weight") {
                Some(ck.matrix("lm_head.weight", v, c, false, dtype)?)
            } else {
                ck.mark_used("lm_head.weight"); // absent, or the same bytes as wte
                None
            };
        let wpe = ck.f32("wpe.weight", &[config.n_positions, c])?;
        let blocks = (0..config.n_layer)
            .map(|i| Block::load(ck, &config, i, dtype))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(ck, "ln_f", c, config.layer_norm_epsilon)?;
        ck.finish()?;
        Ok(Model {
            config,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
        })
    }

    /// A model of the given shape with random weights (for benchmarks: they run at exactly the speed
    /// of real ones), its matrices stored as `dtype`. Deterministic for a seed.
    pub fn random(config: GPT2Config, seed: u64, dtype: DType) -> Result<Self> {
        config.validate().map_err(|msg| Error::Config {
            path: "config".into(),
            msg,
        })?;
        let (c, f, v) = (config.n_embd, config.n_inner, config.vocab_size);
        let mut rng = crate::sampling::Rng::new(seed ^ 0x5EED);
        let mut fill = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale)
                .collect()
        };
        // First, and its own statement: its f32 rows (the biggest matrix) are freed before the
        // rest is built, so they never add to the model's size.
        let wte = Matrix::pack(&fill(v * c, 0.1), v, c, dtype);
        let wpe = fill(config.n_positions * c, 0.02);
        let mut rng = crate::sampling::Rng::new(seed);
        let mut fill = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale)
                .collect()
        };
        let mut linear = |n_in: usize, n_out: usize| {
            let rows = fill(n_in * n_out, 0.04);
            Linear::from_rows(&rows, Some(fill(n_out, 0.02)), n_in, n_out, dtype)
        };
        let mut blocks = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let mut scale = 1.0 / ((c / config.n_head) as f32).sqrt();
            if config.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f32;
            }
            let attn = Attention {
                c_attn: linear(c, 3 * c),
                c_proj: linear(c, c),
                n_head: config.n_head,
                head_dim: c / config.n_head,
                scale,
            };
            let mlp = Mlp {
                c_fc: linear(c, f),
                c_proj: linear(f, c),
                act: config.activation_function,
            };
            let ln = |eps: f64| LayerNorm {
                weight: vec![1.0; c],
                bias: vec![0.0; c],
                eps: eps as f32,
            };
            blocks.push(Block {
                ln_1: ln(config.layer_norm_epsilon),
                attn,
                ln_2: ln(config.layer_norm_epsilon),
                mlp,
            });
        }
        Ok(Model {
            wte,
            wpe,
            ln_f: LayerNorm {
                weight: vec![1.0; c],
                bias: vec![0.0; c],
                eps: config.layer_norm_epsilon as f32,
            },
            lm_head: None,
            blocks,
            config,
        })
    }

    /// The same model with its matrices stored as `dtype` (exact from f32 to any; from a lower
    /// precision the values stay as rounded).
    pub fn to_dtype(&self, dtype: DType) -> Model {
        let repack = |m: &Matrix| Matrix::pack(&m.to_rows(), m.n, m.k, dtype);
        Model {
            config: self.config.clone(),
            wte: repack(&self.wte),
            wpe: self.wpe.clone(),
            blocks: self.blocks.iter().map(|b| b.to_dtype(dtype)).collect(),
            ln_f: self.ln_f.clone(),
            lm_head: self.lm_head.as_ref().map(repack),
        }
    }

    /// How the matrices are stored.
    pub fn dtype(&self) -> DType {
        self.wte.dtype()
    }

    /// How the KV cache stores keys and values: f32 for f32 weights (exact parity), f16 with
    /// 16- and 8-bit weights (as llama.cpp does by default), halving the cache's reads.
    pub fn kv_type(&self) -> KvType {
        match self.dtype() {
            DType::F32 => KvType::F32,
            DType::F16 | DType::Bf16 | DType::Q8 => KvType::F16,
        }
    }

    /// Bytes of weights one decode step reads (every matrix once, the unembedding included).
    pub fn weight_bytes(&self) -> usize {
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

    /// A fresh state with `slots` sequences, each able to hold the full context.
    pub fn new_state(&self, slots: usize) -> State {
        self.new_state_with_capacity(slots, self.config.n_positions)
    }

    pub fn new_state_with_capacity(&self, slots: usize, capacity: usize) -> State {
        State {
            cache: KvCache::new(&self.config, slots, capacity, self.kv_type()),
            ws: Workspace::default(),
        }
    }

    fn unembedding(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.wte)
    }

    /// Check a batch before touching the cache, so that a bad input leaves the state as it was.
    fn check(&self, cache: &KvCache, batch: &[SeqInput]) -> Result<()> {
        for (i, s) in batch.iter().enumerate() {
            if s.slot >= cache.slots() {
                return Err(Error::Input(format!(
                    "batch entry {i}: slot {} does not exist (the state has {} slots)",
                    s.slot,
                    cache.slots()
                )));
            }
            // Quadratic, but batches are small and this allocates nothing per token.
            if batch[..i].iter().any(|o| o.slot == s.slot) {
                return Err(Error::Input(format!(
                    "batch entry {i}: slot {} appears twice",
                    s.slot
                )));
            }
            if s.tokens.is_empty() {
                return Err(Error::Input(format!("batch entry {i}: no tokens")));
            }
            if let Some(&t) = s
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.config.vocab_size)
            {
                return Err(Error::Input(format!(
                    "token id {t} is out of range: the vocabulary has {} tokens",
                    self.config.vocab_size
                )));
            }
            let end = cache.len(s.slot) + s.tokens.len();
            if end > cache.capacity() {
                return Err(Error::Input(format!(
                    "sequence of {end} tokens does not fit the context of {} positions{}",
                    cache.capacity(),
                    if cache.len(s.slot) > 0 {
                        format!(" ({} cached + {} new)", cache.len(s.slot), s.tokens.len())
                    } else {
                        String::new()
                    }
                )));
            }
        }
        Ok(())
    }

    /// Run the new tokens of each sequence through the model, appending them to the cache, and
    /// return the logits `(rows, vocab_size)`: with [`Logits::Last`] one row per sequence, with
    /// [`Logits::All`] one per new token, in batch order.
    pub fn forward<'s>(
        &self,
        state: &'s mut State,
        batch: &[SeqInput],
        which: Logits,
    ) -> Result<&'s [f32]> {
        self.forward_hidden(state, batch)?;
        let c = self.config.n_embd;
        let ws = &mut state.ws;
        let rows = match which {
            Logits::All => ws.rows.len(),
            Logits::Last => {
                // Gather each sequence's last row to the front of the hidden buffer.
                let mut end = 0;
                for (i, s) in batch.iter().enumerate() {
                    end += s.tokens.len();
                    ws.hidden.copy_within((end - 1) * c..end * c, i * c);
                }
                batch.len()
            }
        };
        let logits = fit(&mut ws.logits, rows * self.config.vocab_size);
        self.unembed(&ws.hidden[..rows * c], logits);
        Ok(logits)
    }

    /// Logits `(rows, vocab_size)` of final hidden states `(rows, n_embd)` (as [`Model::forward_hidden`]
    /// returns them): the product with the tied embedding matrix.
    pub fn unembed(&self, hidden: &[f32], logits: &mut [f32]) {
        self.unembedding().matmul(hidden, None, logits);
    }

    /// Run the new tokens of each sequence through the transformer, appending them to the cache, and
    /// return every new token's final hidden state after `ln_f`, `(rows, n_embd)` in batch order.
    /// Callers that need logits for many rows unembed them a block at a time.
    pub fn forward_hidden<'s>(
        &self,
        state: &'s mut State,
        batch: &[SeqInput],
    ) -> Result<&'s [f32]> {
        self.check(&state.cache, batch)?;
        let cfg = &self.config;
        let (c, f) = (cfg.n_embd, cfg.n_inner);
        let State { cache, ws } = state;

        // Embeddings: x = wte[token] + wpe[position].
        ws.rows.clear();
        for s in batch {
            let start = cache.len(s.slot);
            ws.rows
                .extend((0..s.tokens.len()).map(|t| (s.slot, start + t)));
        }
        let n = ws.rows.len();
        let x = fit(&mut ws.x, n * c);
        let tokens = batch.iter().flat_map(|s| s.tokens.iter());
        for ((xr, &tok), &(_, pos)) in x.chunks_exact_mut(c).zip(tokens).zip(&ws.rows) {
            self.wte.row(tok as usize, xr);
            for (o, p) in xr.iter_mut().zip(&self.wpe[pos * c..][..c]) {
                *o += p;
            }
        }

        ws.blocks.clear();
        let mut r0 = 0;
        for s in batch {
            let end = r0 + s.tokens.len();
            while r0 < end {
                let count = ATTN_ROWS.min(end - r0);
                ws.blocks.push((r0, count));
                r0 += count;
            }
        }
        for (l, block) in self.blocks.iter().enumerate() {
            let a = &block.attn;
            let hd = a.head_dim;
            // x += c_proj(attention(c_attn(ln_1(x))))
            let ln = fit(&mut ws.ln, n * c);
            kernels::layer_norm(
                &ws.x[..n * c],
                &block.ln_1.weight,
                &block.ln_1.bias,
                block.ln_1.eps,
                ln,
            );
            let qkv = fit(&mut ws.qkv, n * 3 * c);
            a.c_attn.forward(ln, qkv);
            // Each sequence's new rows one block (decoding): a unit stores its block's keys and
            // values of its head itself, just before it reads them. Otherwise (a prompt's later
            // blocks read the earlier ones' keys) all are stored first.
            let own_rows = ws.blocks.len() == batch.len();
            if !own_rows {
                cache.write_rows(l, &ws.rows, qkv);
            }
            // Attention per (block of up to 4 consecutive rows of one sequence, head): the block's
            // queries share each key load. Units go to tasks in contiguous runs; each task has
            // scratch for its queries and scores.
            let attn = fit(&mut ws.attn, n * c);
            let units = ws.blocks.len() * a.n_head;
            let tasks = units.min(4 * pool::threads());
            let per_task = units.div_ceil(tasks);
            // Sized for the whole context, not the longest sequence so far: the buffer then
            // grows once, not every TILE positions of a decode.
            let scratch = ATTN_ROWS * (cache.capacity().next_multiple_of(TILE) + 2 * hd);
            let scratch_all = Disjoint::new(fit(&mut ws.scores, tasks * scratch));
            let out = Disjoint::new(attn);
            let layer = cache.layer(l);
            let (rows, blocks) = (&ws.rows, &ws.blocks);
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
                    // SAFETY: `check` made the batch's slots distinct, so with a block per
                    // sequence this unit alone touches (slot, h); otherwise nothing writes.
                    if own_rows {
                        let new = &qkv[r0 * 3 * c..(r0 + count) * 3 * c];
                        unsafe { layer.write_head(slot, h, first, new) };
                    }
                    match unsafe { layer.head(slot, h) } {
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
            let proj = fit(&mut ws.proj, n * c);
            a.c_proj.forward(attn, proj);
            kernels::add_in_place(&mut ws.x[..n * c], proj);

            // x += mlp_c_proj(act(c_fc(ln_2(x))))
            let m = &block.mlp;
            let ln = fit(&mut ws.ln, n * c);
            kernels::layer_norm(
                &ws.x[..n * c],
                &block.ln_2.weight,
                &block.ln_2.bias,
                block.ln_2.eps,
                ln,
            );
            let fc = fit(&mut ws.fc, n * f);
            m.c_fc.forward_act(ln, m.act, fc);
            let proj = fit(&mut ws.proj, n * c);
            m.c_proj.forward(fc, proj);
            kernels::add_in_place(&mut ws.x[..n * c], proj);
        }

        for s in batch {
            let len = cache.len(s.slot) + s.tokens.len();
            cache.set_len(s.slot, len);
        }
        let hidden = fit(&mut ws.hidden, n * c);
        kernels::layer_norm(
            &ws.x[..n * c],
            &self.ln_f.weight,
            &self.ln_f.bias,
            self.ln_f.eps,
            hidden,
        );
        Ok(hidden)
    }
}
