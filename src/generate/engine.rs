//! Where the decoding loop runs its forward passes: the CPU model, or (feature `cuda`) a GPU copy.

use std::borrow::Cow;

use crate::config::GPT2Config;
use crate::error::Result;
use crate::model::{Logits, Model, SeqInput, State};

/// A model to decode with.
#[derive(Clone, Copy)]
pub enum Engine<'a> {
    Cpu(&'a Model),
    #[cfg(feature = "cuda")]
    Cuda(&'a crate::backend::cuda::CudaModel),
}

/// The KV cache and buffers of an [`Engine`].
pub enum EngineState {
    Cpu(Box<State>),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::backend::cuda::CudaState>),
}

impl EngineState {
    /// Empty every sequence.
    pub fn clear(&mut self) {
        match self {
            EngineState::Cpu(s) => s.cache.clear(),
            #[cfg(feature = "cuda")]
            EngineState::Cuda(s) => s.clear(),
        }
    }
}

impl<'a> Engine<'a> {
    pub fn config(&self) -> &'a GPT2Config {
        match *self {
            Engine::Cpu(m) => &m.config,
            #[cfg(feature = "cuda")]
            Engine::Cuda(m) => &m.config,
        }
    }

    /// A state for `slots` sequences of up to `capacity` tokens, with up to `max_rows` new tokens a step.
    pub fn new_state(&self, slots: usize, capacity: usize, max_rows: usize) -> Result<EngineState> {
        match *self {
            Engine::Cpu(m) => {
                let _ = max_rows;
                Ok(EngineState::Cpu(Box::new(
                    m.new_state_with_capacity(slots, capacity),
                )))
            }
            #[cfg(feature = "cuda")]
            Engine::Cuda(m) => Ok(EngineState::Cuda(Box::new(
                m.new_state(slots, capacity, max_rows)?,
            ))),
        }
    }

    /// The most likely next token of each sequence (greedy decoding; on the GPU no logits are copied).
    pub fn forward_argmax(&self, st: &mut EngineState, batch: &[SeqInput]) -> Result<Vec<u32>> {
        match (*self, st) {
            (Engine::Cpu(m), EngineState::Cpu(s)) => {
                let v = m.config.vocab_size;
                let logits = m.forward(s, batch, Logits::Last)?;
                Ok(logits
                    .chunks_exact(v)
                    .map(crate::sampling::argmax)
                    .collect())
            }
            #[cfg(feature = "cuda")]
            (Engine::Cuda(m), EngineState::Cuda(s)) => m.forward_argmax(s, batch),
            #[cfg(feature = "cuda")]
            _ => unreachable!("a state is only made by its own engine"),
        }
    }

    /// Wait for queued device work (timing); nothing to wait for on the CPU.
    pub fn synchronize(&self) -> Result<()> {
        match *self {
            Engine::Cpu(_) => Ok(()),
            #[cfg(feature = "cuda")]
            Engine::Cuda(m) => m.synchronize(),
        }
    }

    /// The logits of each sequence's last new token, `(batch, vocab_size)`.
    pub fn forward_last<'s>(
        &self,
        st: &'s mut EngineState,
        batch: &[SeqInput],
    ) -> Result<Cow<'s, [f32]>> {
        match (*self, st) {
            (Engine::Cpu(m), EngineState::Cpu(s)) => {
                Ok(Cow::Borrowed(m.forward(s, batch, Logits::Last)?))
            }
            #[cfg(feature = "cuda")]
            (Engine::Cuda(m), EngineState::Cuda(s)) => Ok(Cow::Owned(m.forward(s, batch)?)),
            #[cfg(feature = "cuda")]
            _ => unreachable!("a state is only made by its own engine"),
        }
    }
}
