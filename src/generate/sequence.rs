//! One sequence being generated: its settings ([`GenerationConfig`]), its prompt, sampler, stop
//! strings and text so far ([`Sequence`]), and what it produces ([`TokenEvent`], [`Generation`]).
//! A decoding loop ([`super::engine`]) runs the model on a sequence's pending ids and hands it the
//! logits of the last of them.

use serde::Serialize;

use crate::config::GPT2Config;
use crate::error::{Error, Result};
use crate::generate::constraint::{self, Constraint};
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
    /// More tokens that end a sequence as the end-of-sequence token does (vLLM's
    /// `stop_token_ids`): finish reason `Stop`, not part of the text. Not with beam search.
    pub stop_token_ids: Vec<u32>,
    /// Nothing ends a sequence before it has this many tokens (vLLM's `min_tokens`): the
    /// end-of-sequence and stop tokens are banned until then, and stop strings not looked for.
    pub min_tokens: usize,
    /// Keep the stop string that ended a sequence at the end of its text.
    pub include_stop_str_in_output: bool,
    /// Leave special tokens (`<|endoftext|>` generated under `ignore_eos`) out of the text.
    pub skip_special_tokens: bool,
    /// Structured output: only tokens the constraint allows are chosen, the end-of-sequence
    /// token only where it accepts, and the sequence finishes (`Stop`) once it is complete. Not
    /// with beam search.
    pub constraint: Option<Constraint>,
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
            stop_token_ids: Vec::new(),
            min_tokens: 0,
            include_stop_str_in_output: false,
            skip_special_tokens: false,
            constraint: None,
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
        if let (Some(c), true) = (&self.constraint, self.num_beams > 1) {
            return bad(format!(
                "a {} constraint (structured output) does not work with beam search",
                c.kind()
            ));
        }
        if self.min_tokens > self.max_new_tokens {
            return bad(format!(
                "min tokens {} is more than max tokens {}",
                self.min_tokens, self.max_new_tokens
            ));
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
pub(crate) fn prepare_prompt(
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

/// One sequence being generated: its ids, sampler and text so far. A decoding loop runs the model
/// on [`Sequence::pending`] and hands the logits of the last of those tokens to
/// [`Sequence::advance`], which chooses the next token exactly as a sequence generated alone would:
/// [`super::engine::Engine`] runs a batch of them, each with its own settings.
pub struct Sequence {
    cfg: GenerationConfig,
    eos: u32,
    prompt_len: usize,
    /// Prompt and generated ids.
    context: Vec<u32>,
    /// Ids of `context` already in the model's cache.
    fed: usize,
    logprobs: Vec<f32>,
    rng: Rng,
    decoder: StreamDecoder,
    /// Text decoded so far (ends at a stop string once one is found).
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    finished: Option<FinishReason>,
    /// Where the sequence is in its constraint, if it has one.
    constraint: Option<constraint::State>,
}

impl Sequence {
    /// A sequence for `prompt` (token ids) under `cfg`, for a model of `config`. Beam search is not a
    /// single sequence: `cfg.num_beams` must be 1.
    pub fn new(config: &GPT2Config, prompt: Vec<u32>, cfg: GenerationConfig) -> Result<Sequence> {
        cfg.validate()?;
        if cfg.num_beams > 1 {
            return Err(Error::Input(
                "use generate::beam::beam_search for num_beams > 1".into(),
            ));
        }
        let context = prepare_prompt(config, prompt, &cfg)?;
        if let Some(&t) = cfg
            .stop_token_ids
            .iter()
            .find(|&&t| t as usize >= config.vocab_size)
        {
            return Err(Error::Input(format!(
                "stop token {t} is beyond the vocabulary of {}",
                config.vocab_size
            )));
        }
        Ok(Sequence {
            eos: cfg.eos_token_id.unwrap_or(config.eos_token_id),
            prompt_len: context.len(),
            context,
            fed: 0,
            logprobs: Vec::new(),
            // Seeded per sequence: each samples as it would alone.
            rng: Rng::new(cfg.sampling.seed),
            decoder: StreamDecoder::new(),
            text: String::new(),
            emitted: 0,
            finished: None,
            constraint: cfg.constraint.as_ref().map(Constraint::start),
            cfg,
        })
    }

    /// The prompt as it runs (after any truncation).
    pub fn prompt(&self) -> &[u32] {
        &self.context[..self.prompt_len]
    }

    /// Generated ids so far.
    pub fn generated(&self) -> &[u32] {
        &self.context[self.prompt_len..]
    }

    /// Positions the sequence will need in a KV cache at most.
    pub fn capacity(&self) -> usize {
        self.prompt_len + self.cfg.max_new_tokens
    }

    /// Ids the model has not seen yet: the prompt at first, then the last chosen token.
    pub fn pending(&self) -> &[u32] {
        &self.context[self.fed..]
    }

    /// The model has run the first `n` pending ids without their logits being needed (a long
    /// prompt's prefill in chunks).
    pub fn feed(&mut self, n: usize) {
        self.fed = (self.fed + n).min(self.context.len());
    }

    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    pub fn config(&self) -> &GenerationConfig {
        &self.cfg
    }

    /// Choose the next token from `logits`, the model's output after the last pending id (which
    /// are all fed by then), with `bias` added to them for the choice (OpenAI's `logit_bias`;
    /// the token's log-prob stays the raw model's); `work` is scratch of any size. Returns what
    /// this step produced.
    pub fn advance(
        &mut self,
        tok: &Tokenizer,
        logits: &[f32],
        bias: &[(u32, f32)],
        work: &mut Vec<f32>,
    ) -> Result<TokenEvent> {
        if self.finished.is_some() {
            return Err(Error::Input("the sequence has finished".into()));
        }
        self.fed = self.context.len();
        work.clear();
        work.extend_from_slice(logits);
        for &(t, b) in bias {
            if let Some(l) = work.get_mut(t as usize) {
                *l += b;
            }
        }
        let step = self.context.len() - self.prompt_len + 1;
        let mut bans = Vec::new();
        // Under a constraint with ignore_eos the end-of-sequence token is not chosen: the
        // constraint's completion (or max tokens) ends the sequence instead.
        if self.constraint.is_some() && self.cfg.ignore_eos {
            bans.push(self.eos);
        }
        if step <= self.cfg.min_tokens {
            // Too early to end: the tokens that would end the sequence cannot be chosen.
            bans.extend((!self.cfg.ignore_eos).then_some(self.eos));
            bans.extend_from_slice(&self.cfg.stop_token_ids);
        }
        // Whether the bans gave way to the constraint (see below).
        let mut lifted = false;
        if let Some(c) = &mut self.constraint {
            // Before the processors, as vLLM applies its grammar mask: top-k, top-p and min-p then
            // choose among the allowed tokens (the penalties keep −∞ at −∞).
            let others = c
                .mask(work, &bans)
                .map_err(|e| Error::Input(format!("generating token {step}: {e}")))?;
            // The constraint wins: where it allows only tokens that ignore_eos or min_tokens ban
            // (`[""]` under ignore_eos, a choice whose one token is a stop token before
            // min_tokens), the bans give way, and the end or stop token ends the sequence.
            lifted = !others;
        }
        if !lifted {
            // Before the processors too, so that top-k and the like choose among the others.
            for &t in &bans {
                if let Some(l) = work.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let generated = &self.context[self.prompt_len..];
        // no_repeat_ngram_size can ban every token a constraint allows; it gives way too.
        let unbanned = (self.constraint.is_some() && self.cfg.sampling.no_repeat_ngram_size > 0)
            .then(|| work.clone());
        sampling::process(&self.cfg.sampling, work, &self.context, generated);
        if let Some(unbanned) = unbanned {
            if work.iter().all(|&l| l == f32::NEG_INFINITY) {
                *work = unbanned;
                let params = SamplingParams {
                    no_repeat_ngram_size: 0,
                    ..self.cfg.sampling.clone()
                };
                sampling::process(&params, work, &self.context, generated);
            }
        }
        let token = sampling::try_choose(&self.cfg.sampling, work, &mut self.rng).map_err(|e| {
            Error::Input(format!(
                "generating token {} of the sequence: {e}",
                self.context.len() - self.prompt_len + 1
            ))
        })?;
        let ends = token == self.eos && (!self.cfg.ignore_eos || lifted);
        let complete = match &mut self.constraint {
            // The end-of-sequence token ends the sequence; the constraint has no more to check.
            Some(c) if !ends => c
                .consume(token)
                .map_err(|e| Error::Input(format!("generating token {step}: {e}")))?,
            _ => false,
        };
        let logprob = crate::numerics::logprob_of(logits, token) as f32;
        self.context.push(token);
        self.logprobs.push(logprob);
        self.apply(tok, token, logprob, ends, complete)
    }

    /// Apply one chosen token: stopping rules, then the text it makes final. `ends`: the token is
    /// the end-of-sequence token and ends the sequence; `complete`: the sequence's constraint can
    /// take nothing more.
    fn apply(
        &mut self,
        tok: &Tokenizer,
        token: u32,
        logprob: f32,
        ends: bool,
        complete: bool,
    ) -> Result<TokenEvent> {
        let cfg = &self.cfg;
        let generated = self.context.len() - self.prompt_len;
        let mut flush = false;
        if ends {
            self.finished = Some(FinishReason::Eos);
        } else if cfg.stop_token_ids.contains(&token) {
            self.finished = Some(FinishReason::Stop);
        } else {
            let before = self.text.len();
            if !(cfg.skip_special_tokens && tok.is_special(token)) {
                self.text
                    .push_str(&self.decoder.push(tok.token_bytes(token)?));
            }
            if !cfg.stop.is_empty() && generated >= cfg.min_tokens {
                // Only text near the new part can complete a stop string.
                let longest = cfg.stop.iter().map(String::len).max().unwrap_or(0);
                let mut from = before.saturating_sub(longest);
                while !self.text.is_char_boundary(from) {
                    from -= 1;
                }
                if let Some((at, len)) = cfg
                    .stop
                    .iter()
                    .filter_map(|st| {
                        self.text[from..]
                            .find(st.as_str())
                            .map(|i| (from + i, st.len()))
                    })
                    .min()
                {
                    let end = if cfg.include_stop_str_in_output {
                        at + len
                    } else {
                        at
                    };
                    self.text.truncate(end);
                    self.finished = Some(FinishReason::Stop);
                }
            }
            if self.finished.is_none() && complete {
                self.finished = Some(FinishReason::Stop);
                flush = true;
            }
            if self.finished.is_none() && self.context.len() - self.prompt_len >= cfg.max_new_tokens
            {
                self.finished = Some(FinishReason::Length);
            }
        }
        // What the decoder holds back is text, unless a stop string cut the text before it.
        if flush
            || matches!(
                self.finished,
                Some(FinishReason::Eos | FinishReason::Length)
            )
        {
            self.text.push_str(&self.decoder.finish());
        }
        let end = if self.finished.is_some() {
            self.text.len()
        } else {
            self.text.len() - stop_prefix_len(&self.text, &cfg.stop)
        };
        let text = self.text[self.emitted.min(end)..end].to_owned();
        self.emitted = self.emitted.max(end);
        Ok(TokenEvent {
            seq: 0,
            token,
            logprob,
            text,
            finished: self.finished,
        })
    }

    /// The result; `finish_reason` is `Length` if the sequence was stopped before it finished.
    pub fn into_generation(self) -> Generation {
        Generation {
            prompt_tokens: self.context[..self.prompt_len].to_vec(),
            tokens: self.context[self.prompt_len..].to_vec(),
            text: self.text,
            logprobs: self.logprobs,
            finish_reason: self.finished.unwrap_or(FinishReason::Length),
            score: None,
        }
    }
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
