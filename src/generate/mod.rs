//! Text generation over a KV cache, for one prompt or a batch, streaming text as it is produced.
//! [`sequence`] is one sequence's settings, sampler and text; [`engine`] the one batch engine every
//! decoding loop drives (the [`Generator`] here, Python's streams, the server); [`beam`] is beam
//! search.
//!
//! ```no_run
//! use gpt2::generate::{generate, GenerationConfig};
//! use gpt2::sampling::SamplingParams;
//! use gpt2::{Model, Tokenizer};
//!
//! let dir = std::path::Path::new("gpt2-weights");
//! let (model, tok) = (Model::load(dir)?, Tokenizer::from_dir(dir)?);
//! let cfg = GenerationConfig {
//!     max_new_tokens: 20,
//!     sampling: SamplingParams { temperature: 0.8, top_p: 0.95, seed: 42, ..Default::default() },
//!     ..Default::default()
//! };
//! let out = generate(&model, &tok, "The dog", &cfg)?;
//! println!("{}{}", "The dog", out.text);
//!
//! // Or token by token, as text arrives:
//! let prompt = tok.encode("The dog");
//! for event in gpt2::generate::Generator::new(&model, &tok, &[prompt], &cfg)? {
//!     print!("{}", event?.text);
//! }
//! # Ok::<(), gpt2::Error>(())
//! ```

pub mod beam;
pub mod constraint;
pub mod engine;
mod prefix_cache;
pub mod sequence;

use std::collections::VecDeque;

use crate::backend::Model;
use crate::error::{Error, Result};
use crate::generate::engine::{Engine, Request, Update};
use crate::tokenizer::Tokenizer;

pub use constraint::{Constraint, ConstraintSpec, Grammars};
pub use sequence::{
    EarlyStopping, FinishReason, Generation, GenerationConfig, Sequence, TokenEvent,
};

/// A batch of prompts being generated together, one step at a time, on the [`engine`]. Each
/// sequence runs exactly as it would alone (the batch is ragged: no padding).
pub struct Generator<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    engine: Engine<usize>,
    /// Finished sequences, by prompt.
    done: Vec<Option<Sequence>>,
    pending: VecDeque<TokenEvent>,
}

impl<'a> Generator<'a> {
    /// Start generating from `prompts` (token ids) on `model`, whatever its device.
    pub fn new(
        model: &'a Model,
        tok: &'a Tokenizer,
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        if prompts.is_empty() {
            return Err(Error::Input("no prompts".into()));
        }
        let seqs = prompts
            .iter()
            .map(|p| Sequence::new(model.config(), p.clone(), cfg.clone()))
            .collect::<Result<Vec<_>>>()?;
        let capacity = seqs.iter().map(Sequence::capacity).max().unwrap_or(1);
        let state = model.new_state(seqs.len(), capacity)?;
        // Every prompt has a slot and runs whole in the first step.
        let mut engine = Engine::new(state, usize::MAX);
        for (i, seq) in seqs.into_iter().enumerate() {
            engine.submit(Request::generate(i, seq))?;
        }
        Ok(Generator {
            model,
            tok,
            engine,
            done: (0..prompts.len()).map(|_| None).collect(),
            pending: VecDeque::new(),
        })
    }

    pub fn is_done(&self) -> bool {
        self.engine.is_idle()
    }

    /// Run one forward pass (the prompts' prefill on the first call) and choose one token for every
    /// unfinished sequence.
    pub fn step(&mut self) -> Result<Vec<TokenEvent>> {
        let mut events = Vec::new();
        for u in self.engine.step(self.model, self.tok) {
            match u {
                Update::Token { tag, mut event, .. } => {
                    event.seq = tag;
                    events.push(event);
                }
                Update::Retired { tag, seq } => self.done[tag] = seq,
                Update::Failed { error, .. } => return Err(error),
                Update::Prefilled { .. } => {}
            }
        }
        Ok(events)
    }

    /// Run to the end and return every sequence, in prompt order.
    pub fn run(mut self, mut on_event: impl FnMut(&TokenEvent)) -> Result<Vec<Generation>> {
        while !self.is_done() {
            for e in self.step()? {
                on_event(&e);
            }
        }
        self.done
            .into_iter()
            .map(|s| {
                s.map(Sequence::into_generation)
                    .ok_or_else(|| Error::Input("a sequence did not finish".into()))
            })
            .collect()
    }
}

impl Iterator for Generator<'_> {
    type Item = Result<TokenEvent>;

    fn next(&mut self) -> Option<Result<TokenEvent>> {
        while self.pending.is_empty() && !self.is_done() {
            match self.step() {
                Ok(events) => self.pending.extend(events),
                Err(e) => return Some(Err(e)),
            }
        }
        self.pending.pop_front().map(Ok)
    }
}

/// Generate from one text prompt (no BOS is added; an empty prompt starts from `<|endoftext|>`).
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    prompt: &str,
    cfg: &GenerationConfig,
) -> Result<Generation> {
    let ids = tok.encode(prompt);
    if cfg.num_beams > 1 {
        return beam::beam_search(model, tok, &ids, cfg).map(|mut v| v.swap_remove(0));
    }
    Ok(Generator::new(model, tok, &[ids], cfg)?
        .run(|_| {})?
        .swap_remove(0))
}

/// Generate from several prompts together; each result equals generating that prompt alone.
pub fn generate_batch(
    model: &Model,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<Vec<Generation>> {
    if cfg.num_beams > 1 {
        let mut out = Vec::new();
        for p in prompts {
            out.extend(beam::beam_search(model, tok, p, cfg)?);
        }
        return Ok(out);
    }
    Generator::new(model, tok, prompts, cfg)?.run(|_| {})
}
