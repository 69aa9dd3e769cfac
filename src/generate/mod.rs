//! Text generation: the decoding loop over a KV cache, for one prompt or a batch, streaming text as
//! it is produced. Beam search is in [`beam`].
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

use std::collections::VecDeque;

use serde::Serialize;

use crate::config::GPT2Config;
use crate::error::{Error, Result};
use crate::model::{Logits, Model, SeqInput, State};
use crate::sampling::{self, Rng, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// transformers' `early_stopping` for beam search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EarlyStopping {
    /// Stop as soon as `num_beams` hypotheses are finished.
    True,
    /// Stop when no running beam can beat the finished ones at its current length (the default).
    #[default]
    False,
    /// Stop only when no running beam can beat them at any length up to the maximum.
    Never,
}

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Tokens to generate at most (≥ 1).
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Strings that end the generation; they are matched on the text across token boundaries and
    /// are not part of the output.
    pub stop: Vec<String>,
    /// Keep going after the end-of-sequence token.
    pub ignore_eos: bool,
    /// The end-of-sequence token (default: the model config's, `<|endoftext|>` for GPT-2).
    pub eos_token_id: Option<u32>,
    /// When prompt + max_new_tokens exceed the context, drop the prompt's oldest tokens instead of
    /// refusing.
    pub truncate_prompt: bool,
    /// Beam search when > 1.
    pub num_beams: usize,
    /// Beam scores are divided by (generated length)^length_penalty.
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// Beams returned (≤ num_beams).
    pub num_return_sequences: usize,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 50,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            eos_token_id: None,
            truncate_prompt: false,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            num_return_sequences: 1,
        }
    }
}

impl GenerationConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Input(m));
        if self.max_new_tokens == 0 {
            return bad("max tokens must be at least 1".into());
        }
        self.sampling.validate().map_err(Error::Input)?;
        if self.stop.iter().any(String::is_empty) {
            return bad("a stop string must not be empty".into());
        }
        if self.num_beams == 0 {
            return bad("num beams must be at least 1".into());
        }
        if self.num_return_sequences == 0 || self.num_return_sequences > self.num_beams {
            return bad(format!(
                "num return sequences {} must be between 1 and num beams ({})",
                self.num_return_sequences, self.num_beams
            ));
        }
        if !self.length_penalty.is_finite() {
            return bad("length penalty must be a finite number".into());
        }
        Ok(())
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// max_new_tokens reached.
    Length,
    /// `<|endoftext|>` generated.
    Eos,
    /// A stop string appeared.
    Stop,
}

/// One finished sequence.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// The prompt as run (after any truncation).
    pub prompt_tokens: Vec<u32>,
    /// Generated ids, `<|endoftext|>` included when it ended the sequence.
    pub tokens: Vec<u32>,
    /// The generated text, without the stop string or `<|endoftext|>`.
    pub text: String,
    /// Log-softmax of the raw model logits at each chosen token.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    /// Beam search only: the beam's length-penalised score.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
}

/// What one decoding step produced for one sequence.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    /// Index of the prompt in the batch.
    pub seq: usize,
    pub token: u32,
    pub logprob: f32,
    /// Text that became final with this token (possibly empty: part of a character, or text that
    /// could still turn out to be a stop string).
    pub text: String,
    /// Set on the sequence's last event.
    pub finished: Option<FinishReason>,
}

/// The prompt as it will run: `<|endoftext|>` for an empty one, truncated from the left if allowed.
pub fn prepare_prompt(
    config: &GPT2Config,
    mut ids: Vec<u32>,
    cfg: &GenerationConfig,
) -> Result<Vec<u32>> {
    let n_pos = config.n_positions;
    if ids.is_empty() {
        ids.push(config.bos_token_id);
    }
    if cfg.max_new_tokens >= n_pos {
        return Err(Error::Input(format!(
            "max tokens {} leaves no room for a prompt in the context of {n_pos}",
            cfg.max_new_tokens
        )));
    }
    if ids.len() + cfg.max_new_tokens > n_pos {
        if !cfg.truncate_prompt {
            return Err(Error::Input(format!(
                "prompt ({} tokens) + max tokens ({}) exceed the context of {n_pos}; shorten them, or allow \
                 truncating the prompt from the left",
                ids.len(),
                cfg.max_new_tokens
            )));
        }
        ids.drain(..ids.len() + cfg.max_new_tokens - n_pos);
    }
    if let Some(&t) = ids.iter().find(|&&t| t as usize >= config.vocab_size) {
        return Err(Error::Input(format!(
            "prompt token {t} is beyond the vocabulary of {}",
            config.vocab_size
        )));
    }
    Ok(ids)
}

/// Log-probability of `token` under raw logits.
fn raw_logprob(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    (logits[token as usize] as f64 - max as f64 - sum.ln()) as f32
}

/// The length of the longest suffix of `text` that begins some stop string (held back from output).
fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > best && text.ends_with(&s[..i]) {
                best = i;
            }
        }
    }
    best
}

struct Seq {
    prompt_len: usize,
    /// Prompt and generated ids.
    context: Vec<u32>,
    logprobs: Vec<f32>,
    rng: Rng,
    decoder: StreamDecoder,
    /// Text decoded so far (ends at a stop string once one is found).
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    finished: Option<FinishReason>,
}

/// A batch of prompts being generated together, one step at a time. Each sequence runs exactly as
/// it would alone (the batch is ragged: no padding).
pub struct Generator<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    cfg: &'a GenerationConfig,
    state: State,
    seqs: Vec<Seq>,
    eos: u32,
    work: Vec<f32>,
    started: bool,
    pending: VecDeque<TokenEvent>,
}

impl<'a> Generator<'a> {
    /// Start generating from `prompts` (token ids) on `model`, whatever its device.
    pub fn new(
        model: &'a Model,
        tok: &'a Tokenizer,
        prompts: &[Vec<u32>],
        cfg: &'a GenerationConfig,
    ) -> Result<Self> {
        let config = model.config();
        cfg.validate()?;
        if cfg.num_beams > 1 {
            return Err(Error::Input(
                "use generate::beam::beam_search for num_beams > 1".into(),
            ));
        }
        if prompts.is_empty() {
            return Err(Error::Input("no prompts".into()));
        }
        let seqs = prompts
            .iter()
            .map(|p| {
                let context = prepare_prompt(config, p.clone(), cfg)?;
                Ok(Seq {
                    prompt_len: context.len(),
                    context,
                    logprobs: Vec::new(),
                    // The same seed for every sequence: each one samples as it would alone.
                    rng: Rng::new(cfg.sampling.seed),
                    decoder: StreamDecoder::new(),
                    text: String::new(),
                    emitted: 0,
                    finished: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let capacity = seqs
            .iter()
            .map(|s| s.prompt_len + cfg.max_new_tokens)
            .max()
            .unwrap_or(1);
        Ok(Generator {
            model,
            tok,
            cfg,
            state: model.new_state(seqs.len(), capacity)?,
            seqs,
            eos: cfg.eos_token_id.unwrap_or(config.eos_token_id),
            work: Vec::new(),
            started: false,
            pending: VecDeque::new(),
        })
    }

    pub fn is_done(&self) -> bool {
        self.seqs.iter().all(|s| s.finished.is_some())
    }

    /// Run one forward pass (the prompts' prefill on the first call) and choose one token for every
    /// unfinished sequence.
    pub fn step(&mut self) -> Result<Vec<TokenEvent>> {
        let active: Vec<usize> = (0..self.seqs.len())
            .filter(|&i| self.seqs[i].finished.is_none())
            .collect();
        if active.is_empty() {
            return Ok(Vec::new());
        }
        let inputs: Vec<SeqInput> = active
            .iter()
            .map(|&i| {
                let s = &self.seqs[i];
                let tokens = if self.started {
                    &s.context[s.context.len() - 1..]
                } else {
                    &s.context[..]
                };
                SeqInput { slot: i, tokens }
            })
            .collect();
        let logits = self.model.forward(&mut self.state, &inputs, Logits::Last)?;
        self.started = true;
        let v = self.model.config().vocab_size;
        let mut events = Vec::with_capacity(active.len());
        for (row, &i) in logits.chunks_exact(v).zip(&active) {
            let s = &mut self.seqs[i];
            self.work.clear();
            self.work.extend_from_slice(row);
            let generated = &s.context[s.prompt_len..];
            sampling::process(&self.cfg.sampling, &mut self.work, &s.context, generated);
            let token = sampling::choose(&self.cfg.sampling, &self.work, &mut s.rng);
            let logprob = raw_logprob(row, token);
            s.context.push(token);
            s.logprobs.push(logprob);
            events.push(advance(s, self.tok, self.cfg, self.eos, i, token, logprob)?);
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
        Ok(self.into_generations())
    }

    fn into_generations(self) -> Vec<Generation> {
        self.seqs
            .into_iter()
            .map(|s| Generation {
                prompt_tokens: s.context[..s.prompt_len].to_vec(),
                tokens: s.context[s.prompt_len..].to_vec(),
                text: s.text,
                logprobs: s.logprobs,
                finish_reason: s.finished.expect("run to the end"),
                score: None,
            })
            .collect()
    }
}

/// Apply one chosen token to a sequence: stopping rules, then the text it makes final.
fn advance(
    s: &mut Seq,
    tok: &Tokenizer,
    cfg: &GenerationConfig,
    eos: u32,
    seq: usize,
    token: u32,
    logprob: f32,
) -> Result<TokenEvent> {
    if token == eos && !cfg.ignore_eos {
        s.finished = Some(FinishReason::Eos);
    } else {
        let before = s.text.len();
        s.text.push_str(&s.decoder.push(tok.token_bytes(token)?));
        if !cfg.stop.is_empty() {
            // Only text near the new part can complete a stop string.
            let longest = cfg.stop.iter().map(String::len).max().unwrap_or(0);
            let mut from = before.saturating_sub(longest);
            while !s.text.is_char_boundary(from) {
                from -= 1;
            }
            if let Some(at) = cfg
                .stop
                .iter()
                .filter_map(|st| s.text[from..].find(st.as_str()).map(|i| from + i))
                .min()
            {
                s.text.truncate(at);
                s.finished = Some(FinishReason::Stop);
            }
        }
        if s.finished.is_none() && s.context.len() - s.prompt_len >= cfg.max_new_tokens {
            s.finished = Some(FinishReason::Length);
        }
    }
    if matches!(s.finished, Some(FinishReason::Eos | FinishReason::Length)) {
        s.text.push_str(&s.decoder.finish());
    }
    let end = if s.finished.is_some() {
        s.text.len()
    } else {
        s.text.len() - stop_prefix_len(&s.text, &cfg.stop)
    };
    let text = s.text[s.emitted.min(end)..end].to_owned();
    s.emitted = s.emitted.max(end);
    Ok(TokenEvent {
        seq,
        token,
        logprob,
        text,
        finished: s.finished,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_prefixes_are_held_back() {
        let stops = vec!["\n\n".to_owned(), "END".to_owned()];
        assert_eq!(stop_prefix_len("abc\n", &stops), 1);
        assert_eq!(stop_prefix_len("abcEN", &stops), 2);
        assert_eq!(stop_prefix_len("abc", &stops), 0);
        assert_eq!(stop_prefix_len("abcE", &["EEND".to_owned()]), 1);
    }
}
