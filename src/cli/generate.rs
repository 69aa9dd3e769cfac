//! `gpt2 generate`: stream a continuation to the terminal, or print one JSON object.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use gpt2::generate::{
    beam::beam_search, ConstraintSpec, EarlyStopping, Generation, GenerationConfig, Generator,
    Grammars,
};
use gpt2::sampling::SamplingParams;
use serde_json::json;

use super::{print_json, read_text, stdout_error, DeviceArgs, ModelArg};

#[derive(Clone, Copy, ValueEnum)]
enum Early {
    True,
    False,
    Never,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The prompt (else --prompt-file, --prompts, or standard input). An empty prompt starts from
    /// <|endoftext|>.
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(long, conflicts_with = "prompt")]
    prompt_file: Option<PathBuf>,
    /// Several prompts generated together: one per line, or JSON lines with a "prompt" field.
    #[arg(long, conflicts_with_all = ["prompt", "prompt_file"])]
    prompts: Option<PathBuf>,
    /// Tokens to generate at most.
    #[arg(long, short = 'n', default_value_t = 50, value_parser = super::positive)]
    max_tokens: u64,
    /// Always take the most likely token (same as --temperature 0).
    #[arg(long, conflicts_with = "temperature")]
    greedy: bool,
    /// Sampling temperature (0 is greedy).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample only among the k most likely tokens (0: off, as in transformers and llama.cpp).
    #[arg(long)]
    top_k: Option<u64>,
    /// Sample only among the most likely tokens whose probability adds up to p, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Drop tokens less likely than min-p × the most likely token's probability.
    #[arg(long, allow_negative_numbers = true)]
    min_p: Option<f32>,
    /// transformers' repetition penalty (>1 discourages repeats; 1 is off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    /// OpenAI's frequency penalty: logit −= count × this, over generated tokens.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// OpenAI's presence penalty: logit −= this for every token generated already.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Never repeat an n-gram of this size.
    #[arg(long, default_value_t = 0)]
    no_repeat_ngram_size: usize,
    /// Random seed (default: random; the one used is printed).
    #[arg(long, allow_negative_numbers = true, value_parser = super::seed)]
    seed: Option<u64>,
    /// Stop when this string appears (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Beam search with this many beams.
    #[arg(long, default_value_t = 1, value_parser = super::positive)]
    num_beams: u64,
    /// Beam scores are divided by length^this.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    length_penalty: f32,
    /// transformers' early_stopping for beam search.
    #[arg(long, value_enum, default_value = "false")]
    early_stopping: Early,
    /// How many beams to return.
    #[arg(long, default_value_t = 1, value_parser = super::positive)]
    num_return_sequences: u64,
    /// Keep generating after <|endoftext|>.
    #[arg(long)]
    ignore_eos: bool,
    /// Drop the prompt's oldest tokens when prompt + max tokens exceed the context.
    #[arg(long)]
    truncate_prompt: bool,
    /// Structured output: JSON valid under the JSON schema in this file.
    #[arg(long, group = "constraint")]
    json_schema: Option<PathBuf>,
    /// Structured output: any JSON object.
    #[arg(long, group = "constraint")]
    json_object: bool,
    /// Structured output: text matching this regular expression (Rust regex syntax), whole.
    #[arg(long, group = "constraint")]
    regex: Option<String>,
    /// Structured output: exactly one of these strings (repeatable).
    #[arg(long, group = "constraint")]
    choice: Vec<String>,
    /// Structured output: text of the Lark grammar (llguidance's syntax) in this file.
    #[arg(long, group = "constraint")]
    grammar: Option<PathBuf>,
    #[command(flatten)]
    dev: DeviceArgs,
    /// Print one JSON object: prompt_tokens, tokens, text, logprobs, finish_reason.
    #[arg(long)]
    json: bool,
}

/// The prompts: one, or a file of them.
fn prompts(a: &GenerateArgs) -> Result<Vec<String>> {
    if let Some(f) = &a.prompts {
        let text = read_text(None, Some(f.clone()))?;
        let mut out = Vec::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            if line.trim_start().starts_with('{') {
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}: line {}: not valid JSON", f.display(), n + 1))?;
                match v.get("prompt").and_then(|p| p.as_str()) {
                    Some(p) => out.push(p.to_owned()),
                    None => bail!(
                        "{}: line {}: expected an object with a string \"prompt\" field",
                        f.display(),
                        n + 1
                    ),
                }
            } else {
                out.push(line.to_owned());
            }
        }
        if out.is_empty() {
            bail!("{}: no prompts in the file", f.display());
        }
        return Ok(out);
    }
    Ok(vec![read_text(a.prompt.clone(), a.prompt_file.clone())?])
}

fn config(a: &GenerateArgs) -> GenerationConfig {
    let seed = a.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        t.as_nanos() as u64 ^ std::process::id() as u64
    });
    GenerationConfig {
        max_new_tokens: a.max_tokens as usize,
        sampling: SamplingParams {
            temperature: if a.greedy { 0.0 } else { a.temperature },
            top_k: a.top_k.unwrap_or(0) as usize,
            top_p: a.top_p.unwrap_or(1.0),
            min_p: a.min_p.unwrap_or(0.0),
            repetition_penalty: a.repetition_penalty,
            frequency_penalty: a.frequency_penalty,
            presence_penalty: a.presence_penalty,
            no_repeat_ngram_size: a.no_repeat_ngram_size,
            seed,
        },
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        eos_token_id: None,
        truncate_prompt: a.truncate_prompt,
        num_beams: a.num_beams as usize,
        length_penalty: a.length_penalty,
        early_stopping: match a.early_stopping {
            Early::True => EarlyStopping::True,
            Early::False => EarlyStopping::False,
            Early::Never => EarlyStopping::Never,
        },
        num_return_sequences: a.num_return_sequences as usize,
        ..GenerationConfig::default()
    }
}

/// The constraint the flags ask for, read (files) but not yet compiled.
fn constraint(a: &GenerateArgs) -> Result<Option<ConstraintSpec>> {
    let read = |f: &PathBuf| {
        std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))
    };
    Ok(if let Some(f) = &a.json_schema {
        let schema = serde_json::from_str(&read(f)?)
            .with_context(|| format!("{}: not a JSON schema (not valid JSON)", f.display()))?;
        Some(ConstraintSpec::JsonSchema(schema))
    } else if a.json_object {
        Some(ConstraintSpec::JsonObject)
    } else if let Some(r) = &a.regex {
        Some(ConstraintSpec::Regex(r.clone()))
    } else if !a.choice.is_empty() {
        Some(ConstraintSpec::Choice(a.choice.clone()))
    } else if let Some(f) = &a.grammar {
        Some(ConstraintSpec::Grammar(read(f)?))
    } else {
        None
    })
}

/// One result. `prompt` is the text the model was given: with `--truncate-prompt`, when tokens were
/// dropped, the text of the tokens kept, and `prompt_dropped_tokens` says how many went.
fn to_json(
    prompt: &str,
    encoded: &[u32],
    g: &Generation,
    tok: &gpt2::Tokenizer,
) -> Result<serde_json::Value> {
    let dropped = encoded.len().saturating_sub(g.prompt_tokens.len());
    let used = if dropped > 0 {
        tok.decode(&g.prompt_tokens)?
    } else {
        prompt.to_owned()
    };
    let mut v = json!({
        "prompt": used,
        "prompt_dropped_tokens": dropped,
        "prompt_tokens": g.prompt_tokens.len(),
        "prompt_ids": g.prompt_tokens,
        "tokens": g.tokens,
        "text": g.text,
        "logprobs": g.logprobs,
        "finish_reason": g.finish_reason,
    });
    if let Some(s) = g.score {
        v["score"] = json!(s);
    }
    Ok(v)
}

/// Prompts of a `--prompts` file run this many at a time: each result equals generating its prompt
/// alone, so groups change nothing but the memory (a KV cache per prompt of the group; 5,000 prompts
/// at once needed 23.6 GB on gpt2).
const PROMPT_GROUP: usize = 32;

pub fn run(a: GenerateArgs) -> Result<()> {
    let mut cfg = config(&a);
    cfg.validate()?;
    let spec = constraint(&a)?;
    if spec.is_some() && cfg.num_beams > 1 {
        bail!("structured output (--json-schema, --json-object, --regex, --choice, --grammar) does not work with beam search (--num-beams)");
    }
    let texts = prompts(&a)?;
    let (model, tok) = a.dev.load(&a.model)?;
    if let Some(spec) = spec {
        let grammars = Grammars::new(&tok, model.config().eos_token_id)?;
        cfg.constraint = Some(grammars.compile(&spec)?);
    }
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t)).collect();
    let start = Instant::now();
    let mut first_step = None;
    let results: Vec<(usize, Generation)> = if cfg.num_beams > 1 {
        let mut out = Vec::new();
        for (i, p) in ids.iter().enumerate() {
            out.extend(
                beam_search(&model, &tok, p, &cfg)?
                    .into_iter()
                    .map(|g| (i, g)),
            );
        }
        out
    } else {
        let mut out = Vec::new();
        for (n, group) in ids.chunks(PROMPT_GROUP).enumerate() {
            let mut generator = Generator::new(&model, &tok, group, &cfg)?;
            // One prompt in human mode streams to the terminal as tokens arrive.
            let stream = !a.json && texts.len() == 1;
            let mut stdout = std::io::stdout().lock();
            if stream {
                write!(stdout, "{}", texts[0]).map_err(stdout_error)?;
                stdout.flush().map_err(stdout_error)?;
            }
            while !generator.is_done() {
                let events = generator.step()?;
                first_step.get_or_insert_with(|| start.elapsed());
                if stream {
                    for e in &events {
                        write!(stdout, "{}", e.text).map_err(stdout_error)?;
                    }
                    stdout.flush().map_err(stdout_error)?;
                }
            }
            if stream {
                writeln!(stdout).map_err(stdout_error)?;
            }
            let first = n * PROMPT_GROUP;
            out.extend(
                generator
                    .run(|_| {})?
                    .into_iter()
                    .enumerate()
                    .map(|(i, g)| (first + i, g)),
            );
        }
        out
    };
    let secs = start.elapsed().as_secs_f64();
    let generated: usize = results.iter().map(|(_, g)| g.tokens.len()).sum();

    if a.json {
        let mut v = if results.len() == 1 {
            to_json(&texts[0], &ids[0], &results[0].1, &tok)?
        } else {
            let all: Vec<_> = results
                .iter()
                .map(|(i, g)| to_json(&texts[*i], &ids[*i], g, &tok))
                .collect::<Result<_>>()?;
            json!({ "results": all })
        };
        v["seed"] = json!(cfg.sampling.seed);
        v["seconds"] = json!(secs);
        return print_json(&v);
    }
    if cfg.num_beams > 1 || texts.len() > 1 {
        for (n, (i, g)) in results.iter().enumerate() {
            let score = g
                .score
                .map(|s| format!(", score {s:.4}"))
                .unwrap_or_default();
            outln!(
                "--- [{n}] prompt {i}{score}, finish: {}",
                serde_json::to_value(g.finish_reason)?
                    .as_str()
                    .unwrap_or("")
            );
            outln!("{}{}", texts[*i], g.text);
        }
    }
    let reasons: Vec<String> = results
        .iter()
        .map(|(_, g)| {
            serde_json::to_value(g.finish_reason).map(|v| v.as_str().unwrap_or("").to_owned())
        })
        .collect::<Result<_, _>>()?;
    let prompt_tokens: usize = results.iter().map(|(_, g)| g.prompt_tokens.len()).sum();
    match first_step {
        // Decode speed excludes the prompt's prefill (and the first token chosen with it).
        Some(prefill) if generated > results.len() => {
            let decode = secs - prefill.as_secs_f64();
            note!(
                "[{generated} tokens in {secs:.2} s: prompt {prompt_tokens} tokens in {:.0} ms, then {:.1} tokens/s; finish: {}; seed {}]",
                prefill.as_secs_f64() * 1e3,
                (generated - results.len()) as f64 / decode,
                reasons.join(", "),
                cfg.sampling.seed
            );
        }
        _ => note!(
            "[{generated} tokens in {secs:.2} s ({:.1} tokens/s); finish: {}; seed {}]",
            generated as f64 / secs,
            reasons.join(", "),
            cfg.sampling.seed
        ),
    }
    Ok(())
}
