//! The model every consumer uses — generation, beam search, evaluation, the server, the CLI —
//! whichever backend runs it. [`Model`] is GPT-2 loaded for a [`Device`] and [`DType`]; a [`State`]
//! holds the KV cache of some sequences; [`Model::forward`] runs new tokens of those sequences,
//! checked once here ([`crate::model::batch`]) for every backend.

use std::path::Path;

use super::{Backend, BackendState};
use crate::config::GPT2Config;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::batch;
use crate::model::params::Params;
use crate::model::sites::{Activations, Captures, HookPlan, Hooked, Site};
use crate::model::{Device, LoadOptions, Logits, Rows, SeqInput};
use crate::numerics::TargetStats;
use crate::weights::Checkpoint;

/// GPT-2 on a device: its config and weights, ready to run.
pub struct Model {
    backend: Backend,
}

/// The mutable half of inference: the KV cache of `slots` sequences of up to `capacity` tokens,
/// and the buffers a forward pass reuses. Made by [`Model::new_state`], used with that model only.
pub struct State {
    inner: BackendState,
}

impl Model {
    /// Load a checkpoint directory (`config.json` and safetensors weights) on the CPU in f32.
    pub fn load(dir: &Path) -> Result<Model> {
        Model::load_with(dir, &LoadOptions::default())
    }

    /// Load a checkpoint directory or file in any format [`crate::weights::open`] reads
    /// (safetensors, PyTorch, TensorFlow, GGUF) for a device, its matrices stored as `opts.dtype`
    /// (converted from whatever the checkpoint holds).
    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Model> {
        let opened = crate::weights::open(path)?;
        Model::from_checkpoint(opened.config, &opened.checkpoint, opts)
    }

    /// Build from an opened checkpoint; every tensor must be used.
    pub fn from_checkpoint(
        config: GPT2Config,
        ck: &Checkpoint,
        opts: &LoadOptions,
    ) -> Result<Model> {
        let params = Params::from_checkpoint(config, ck)?;
        let backend = super::load(&params, opts)?;
        params.finish()?;
        Ok(Model { backend })
    }

    /// A model of the given shape with random weights (for benchmarks: they run at exactly the speed
    /// of real ones). Deterministic for a seed.
    pub fn random(config: GPT2Config, seed: u64, opts: &LoadOptions) -> Result<Model> {
        let params = Params::random(config, seed)?;
        Ok(Model {
            backend: super::load(&params, opts)?,
        })
    }

    /// The same model with its matrices stored as `dtype` (exact from f32 to any; from a lower
    /// precision the values stay as rounded). CPU models only.
    pub fn to_dtype(&self, dtype: DType) -> Result<Model> {
        Ok(Model {
            backend: self.backend.to_dtype(dtype)?,
        })
    }

    pub fn config(&self) -> &GPT2Config {
        self.backend.config()
    }

    /// How the weight matrices are stored.
    pub fn dtype(&self) -> DType {
        self.backend.dtype()
    }

    pub fn device(&self) -> Device {
        self.backend.device()
    }

    /// What runs the model, for reports: the device, and on the CPU the instruction set, kernel
    /// shapes and threads.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Bytes of weights one decode step reads (every matrix once, the unembedding included).
    pub fn weight_bytes(&self) -> usize {
        self.backend.weight_bytes()
    }

    /// A state for `slots` sequences of up to `capacity` tokens each (at most the model's context).
    /// Its memory is checked before it is taken: too little is an error saying how much is needed.
    pub fn new_state(&self, slots: usize, capacity: usize) -> Result<State> {
        let n_pos = self.config().n_positions;
        if slots == 0 || capacity == 0 || capacity > n_pos {
            return Err(Error::Input(format!(
                "a state needs at least 1 slot and a capacity between 1 and the context of {n_pos} positions; asked for {slots} slots of {capacity}"
            )));
        }
        Ok(State {
            inner: self.backend.new_state(slots, capacity)?,
        })
    }

    /// Run the new tokens of each sequence through the model, appending them to the state, and
    /// return the logits `(rows, vocab_size)`: with [`Logits::Last`] one row per sequence, with
    /// [`Logits::All`] one per new token, in batch order. A bad batch is an error that leaves the
    /// state as it was.
    pub fn forward<'s>(
        &self,
        state: &'s mut State,
        batch: &[SeqInput],
        which: Logits,
    ) -> Result<&'s [f32]> {
        let batch = self.check(state, batch)?;
        self.backend.forward(&mut state.inner, batch, which)
    }

    /// Run the batch like [`Model::forward`], each sequence saying what it needs back (`rows`, one
    /// entry per sequence): a prompt chunk that only fills the cache [`Rows::None`], a decode step
    /// [`Rows::Last`], a prompt whose log-probs and alternatives are wanted [`Rows::All`], a prompt
    /// whose log-probs alone are wanted [`Rows::Targets`]. Returns the selected rows' logits,
    /// `(rows, vocab_size)` in batch order, and the targets' log-probabilities in row order. Each
    /// value is the same bits whatever the other sequences ask for.
    pub fn forward_rows<'s>(
        &self,
        state: &'s mut State,
        batch: &[SeqInput],
        rows: &[Rows],
    ) -> Result<(&'s [f32], Vec<f64>)> {
        let batch = self.check(state, batch)?;
        if rows.len() != batch.seqs().len() {
            return Err(Error::Input(format!(
                "forward_rows: {} row selections for a batch of {} sequences (one per sequence)",
                rows.len(),
                batch.seqs().len()
            )));
        }
        let v = self.config().vocab_size;
        for (i, (sq, r)) in batch.seqs().iter().zip(rows).enumerate() {
            if let Rows::Targets(t) = r {
                if t.len() != sq.tokens.len() {
                    return Err(Error::Input(format!(
                        "forward_rows: sequence {i} has {} targets for {} new tokens (one per token)",
                        t.len(),
                        sq.tokens.len()
                    )));
                }
                if let Some(bad) = t.iter().flatten().find(|&&t| t as usize >= v) {
                    return Err(Error::Input(format!(
                        "forward_rows: target {bad} of sequence {i} is beyond the vocabulary of {v}"
                    )));
                }
            }
        }
        self.backend.forward_rows(&mut state.inner, batch, rows)
    }

    /// Run each sequence from the start, reading the activation sites in `capture` and replacing
    /// those each sequence patches ([`crate::Site`] names them, as TransformerLens does), with
    /// every position's logits `(T, vocab_size)` when `logits` is set. Only the sites asked for are
    /// kept, and without logits the pass stops after the last block a captured site is in (a
    /// layer-2 probe does not pay for the layers above). Patching a site with the value captured
    /// there changes nothing, bit for bit. CPU only.
    ///
    /// ```no_run
    /// # fn main() -> gpt2::Result<()> {
    /// use gpt2::{Hooked, Model, Site};
    /// let model = Model::load("gpt2".as_ref())?;
    /// let ids = [15496, 11, 314, 1101];
    /// let sites = Site::select(&["blocks.*.hook_resid_post"], model.config())?;
    /// let out = model.run_with_hooks(&[Hooked { ids: &ids, patches: &[] }], &sites, false)?;
    /// let (shape, values) = out[0].get(sites[0]).unwrap();
    /// assert_eq!(shape, &[4, 768]);
    /// # let _ = values; Ok(()) }
    /// ```
    pub fn run_with_hooks(
        &self,
        seqs: &[Hooked],
        capture: &[Site],
        logits: bool,
    ) -> Result<Vec<Activations>> {
        self.run_with_hooks_reusing(&mut None, seqs, capture, logits)
    }

    /// [`Model::run_with_hooks`] in `state`'s KV cache and buffers, made (or remade) when it is
    /// `None`, too small for this batch, or more than twice the size the batch needs; a loop over
    /// many batches of one shape then reuses one state's memory instead of faulting in a fresh
    /// cache and buffers for each. The results are the same bits.
    pub fn run_with_hooks_reusing(
        &self,
        state: &mut Option<State>,
        seqs: &[Hooked],
        capture: &[Site],
        logits: bool,
    ) -> Result<Vec<Activations>> {
        let (plan, all_logits) = self.run_plan(state, seqs, capture, logits, Captures::PerSite)?;
        let lens: Vec<usize> = seqs.iter().map(|q| q.ids.len()).collect();
        let v = self.config().vocab_size;
        let mut at = 0;
        Ok(plan
            .into_sites(self.config(), &lens)
            .into_iter()
            .zip(&lens)
            .map(|(sites, &t)| {
                let logits = all_logits
                    .as_ref()
                    .map(|l| l[at * v..(at + t) * v].to_vec());
                at += t;
                Activations { logits, sites }
            })
            .collect())
    }

    /// [`Model::run_with_hooks_reusing`] without patches or logits, each sequence's captured sites
    /// in one buffer: the sites one after another in `capture`'s order (each of its
    /// [`Site::shape`], a site named twice kept once), written there as the pass makes them, with
    /// no copy per site. The stacked arrays of Python's `hidden_states` and `attentions`.
    pub fn capture_stacked(
        &self,
        state: &mut Option<State>,
        seqs: &[&[u32]],
        capture: &[Site],
    ) -> Result<Vec<Vec<f32>>> {
        let seqs: Vec<Hooked> = seqs
            .iter()
            .map(|ids| Hooked { ids, patches: &[] })
            .collect();
        let (plan, _) = self.run_plan(state, &seqs, capture, false, Captures::Stacked)?;
        Ok(plan.into_stacked())
    }

    /// A checked hooked run in `state` (see [`Model::run_with_hooks_reusing`]): the plan holding
    /// the captured values, and the logits of every position when asked for.
    fn run_plan<'a>(
        &self,
        state: &mut Option<State>,
        seqs: &[Hooked<'a>],
        capture: &[Site],
        logits: bool,
        captures: Captures,
    ) -> Result<(HookPlan<'a>, Option<Vec<f32>>)> {
        let config = self.config();
        if let Some(i) = seqs.iter().position(|q| q.ids.is_empty()) {
            return Err(Error::Input(format!(
                "run_with_hooks: sequence {i} has no tokens"
            )));
        }
        let mut plan = HookPlan::new(config, seqs, capture, logits)?;
        if seqs.is_empty() {
            return Ok((plan, None));
        }
        let longest = seqs.iter().map(|q| q.ids.len()).max().unwrap_or(1);
        let (slots, capacity) = (seqs.len(), longest.min(config.n_positions));
        let fits = |s: &State| {
            s.slots() >= slots
                && s.capacity() >= capacity
                && s.slots() * s.capacity() <= 2 * slots * capacity
        };
        let state = match state {
            Some(s) if fits(s) => {
                s.clear();
                s
            }
            _ => {
                // The old state goes before the new one is made, so the two never coexist.
                *state = None;
                state.insert(self.new_state(slots, capacity)?)
            }
        };
        let batch: Vec<SeqInput> = seqs
            .iter()
            .enumerate()
            .map(|(slot, q)| SeqInput {
                slot,
                tokens: q.ids,
            })
            .collect();
        let checked = self.check(state, &batch)?;
        let lens: Vec<usize> = seqs.iter().map(|q| q.ids.len()).collect();
        plan.allocate(config, &lens, captures);
        let all_logits = self
            .backend
            .run_hooked(&mut state.inner, checked, &mut plan, logits)?;
        Ok((plan, all_logits))
    }

    /// The most likely next token of each sequence (greedy decoding; on a GPU only the ids come
    /// back).
    pub fn forward_argmax(&self, state: &mut State, batch: &[SeqInput]) -> Result<Vec<u32>> {
        let batch = self.check(state, batch)?;
        self.backend.forward_argmax(&mut state.inner, batch)
    }

    /// Run the batch like [`Model::forward`] and return, for each new token (row, in batch order)
    /// given a target in `targets` (one entry per row), the log-probability of that target under
    /// the row's next-token distribution, in row order. Scoring needs no logits: on the CPU the
    /// unembedding reduces them as it computes them and skips rows without a target. The values
    /// are those of `log_softmax` over [`Model::forward`]'s logits, bit for bit (on the CPU and
    /// CUDA; wgpu reduces the rows on the adapter in f32, within float rounding of those).
    pub fn forward_logprobs(
        &self,
        state: &mut State,
        batch: &[SeqInput],
        targets: &[Option<u32>],
    ) -> Result<Vec<f64>> {
        let batch = self.check_targets(state, batch, targets)?;
        self.backend
            .forward_logprobs(&mut state.inner, batch, targets)
    }

    /// [`Model::forward_logprobs`] (the same log-probabilities, bit for bit) with each target's
    /// rank and its row's entropy ([`crate::eval::score_diagnostics`]).
    pub(crate) fn forward_diagnostics(
        &self,
        state: &mut State,
        batch: &[SeqInput],
        targets: &[Option<u32>],
    ) -> Result<Vec<TargetStats>> {
        let batch = self.check_targets(state, batch, targets)?;
        self.backend
            .forward_diagnostics(&mut state.inner, batch, targets)
    }

    /// [`Model::check`] and one target per row, each in the vocabulary.
    fn check_targets<'b, 'a>(
        &self,
        state: &State,
        batch: &'b [SeqInput<'a>],
        targets: &[Option<u32>],
    ) -> Result<batch::Checked<'b, 'a>> {
        let batch = self.check(state, batch)?;
        if targets.len() != batch.rows() {
            return Err(Error::Input(format!(
                "forward_logprobs: {} targets for a batch of {} new tokens (one per token, None where there is none)",
                targets.len(),
                batch.rows()
            )));
        }
        let v = self.config().vocab_size;
        if let Some(i) = targets
            .iter()
            .position(|t| t.is_some_and(|t| t as usize >= v))
        {
            return Err(Error::Input(format!(
                "forward_logprobs: target {i} is {}, beyond the vocabulary of {v}",
                targets[i].unwrap_or_default()
            )));
        }
        Ok(batch)
    }

    /// Wait for queued device work (for timing); nothing to wait for on the CPU.
    pub fn synchronize(&self) -> Result<()> {
        self.backend.synchronize()
    }

    fn check<'b, 'a>(
        &self,
        state: &State,
        batch: &'b [SeqInput<'a>],
    ) -> Result<batch::Checked<'b, 'a>> {
        let s = &state.inner;
        batch::check(
            batch,
            self.config().vocab_size,
            s.slots(),
            s.capacity(),
            |slot| s.len(slot),
        )
    }
}

impl State {
    /// Sequence slots.
    pub fn slots(&self) -> usize {
        self.inner.slots()
    }

    /// Positions each slot holds.
    pub fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    /// Tokens cached in `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.inner.len(slot)
    }

    pub fn is_empty(&self, slot: usize) -> bool {
        self.len(slot) == 0
    }

    /// Forget the last tokens of `slot`, keeping its first `len` (a rewind).
    pub fn truncate(&mut self, slot: usize, len: usize) -> Result<()> {
        if slot >= self.slots() {
            return Err(Error::Input(format!(
                "truncate: slot {slot} does not exist (the state has {} slots)",
                self.slots()
            )));
        }
        self.inner.truncate(slot, len);
        Ok(())
    }

    /// Make the whole cache resident now, so that the first sequences do not pay its page faults
    /// (on Linux with transparent huge pages a first touch may wait for memory to be compacted).
    /// A long-running server does this once at start; what the state holds is unchanged.
    pub fn prefault(&mut self) {
        self.inner.prefault()
    }

    /// Empty every slot (the memory stays).
    pub fn clear(&mut self) {
        self.inner.clear()
    }

    /// Make slot `dst` a copy of slot `src` (beam search moves a beam's cache this way).
    pub fn copy_slot(&mut self, src: usize, dst: usize) -> Result<()> {
        let slots = self.slots();
        if src >= slots || dst >= slots {
            return Err(Error::Input(format!(
                "copy_slot({src}, {dst}): the state has {slots} slots"
            )));
        }
        if src != dst {
            self.inner.copy_slot(src, dst)?;
        }
        Ok(())
    }
}
