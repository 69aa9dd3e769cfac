//! `gpt2 top`, `gpt2 score`, `gpt2 perplexity`: what the model expects, and how likely a text is.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use gpt2::eval;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use serde_json::json;

use super::{escape, print_json, read_text, DeviceArgs, ModelArg};

#[derive(Args)]
pub struct TopArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    dev: DeviceArgs,
    /// The prompt (else standard input). An empty prompt starts from <|endoftext|>.
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    /// How many tokens to show.
    #[arg(short = 'k', long = "top-k", default_value_t = 10, value_parser = super::positive)]
    k: u64,
    /// Print one JSON object: ids, tokens, logprobs, probs.
    #[arg(long)]
    json: bool,
}

/// A horizontal bar of `frac` (0..=1) of `width` cells, in eighths.
fn bar(frac: f64, width: usize) -> String {
    const PARTS: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    let eighths = (frac.clamp(0.0, 1.0) * (width * 8) as f64).round() as usize;
    let mut s = "█".repeat(eighths / 8);
    if !eighths.is_multiple_of(8) {
        s.push(PARTS[eighths % 8]);
    }
    s
}

pub fn top(a: TopArgs) -> Result<()> {
    let (model, tok) = a.dev.load(&a.model)?;
    let prompt = read_text(a.prompt, None)?;
    let mut ids = tok.encode(&prompt);
    if ids.is_empty() {
        ids.push(model.config().bos_token_id);
    }
    let best = eval::top_k(&model, &ids, a.k as usize)?;
    let tokens = tok.token_texts(&best.iter().map(|b| b.0).collect::<Vec<_>>())?;
    if a.json {
        return print_json(&json!({
            "prompt_tokens": ids.len(),
            "ids": best.iter().map(|b| b.0).collect::<Vec<_>>(),
            "tokens": tokens,
            "logprobs": best.iter().map(|b| b.1).collect::<Vec<_>>(),
            "probs": best.iter().map(|b| (b.1 as f64).exp()).collect::<Vec<_>>(),
        }));
    }
    outln!("next token after {} prompt tokens:", ids.len());
    let shown: Vec<String> = tokens
        .iter()
        .map(|t| format!("\"{}\"", escape(t)))
        .collect();
    let w = shown.iter().map(|s| s.chars().count()).max().unwrap_or(0);
    let top_p = (best[0].1 as f64).exp();
    for (i, ((id, lp), t)) in best.iter().zip(&shown).enumerate() {
        let p = (*lp as f64).exp();
        let pad = w - t.chars().count();
        outln!(
            "{:>3}  {id:>6}  {t}{}  {:>6.2}%  {:>8.4}  {}",
            i + 1,
            " ".repeat(pad),
            100.0 * p,
            lp,
            bar(p / top_p, 40)
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    dev: DeviceArgs,
    /// The text to score (else --file, else standard input).
    #[arg(long, short = 't')]
    text: Option<String>,
    /// Read the text from this file.
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
    /// How many of the least likely tokens to highlight.
    #[arg(long, default_value_t = 5)]
    highlight: usize,
    /// Print one JSON object: ids, tokens, logprobs, ranks (1 + how many tokens have a larger
    /// logit), entropies (of each next-token distribution, nats), total, mean.
    #[arg(long)]
    json: bool,
}

pub fn score(a: ScoreArgs) -> Result<()> {
    let (model, tok) = a.dev.load(&a.model)?;
    let text = read_text(a.text, a.file)?;
    let ids = tok.encode(&text);
    if a.json {
        // The diagnostics cost one more 32-logit panel per token (docs/BENCHMARKS.md).
        let d = eval::score_diagnostics(&model, std::slice::from_ref(&ids))?.remove(0);
        let total: f64 = d.logprobs.iter().map(|&l| l as f64).sum();
        return print_json(&json!({
            "ids": ids, "tokens": tok.token_texts(&ids)?, "logprobs": d.logprobs,
            "ranks": d.ranks, "entropies": d.entropies,
            "total": total, "mean": total / d.logprobs.len() as f64,
        }));
    }
    let lps = eval::score(&model, &ids)?;
    let tokens = tok.token_texts(&ids)?;
    let total: f64 = lps.iter().map(|&l| l as f64).sum();
    let mean = total / lps.len() as f64;
    // The least likely tokens, by rank.
    let mut order: Vec<usize> = (0..lps.len()).collect();
    order.sort_by(|&i, &j| lps[i].total_cmp(&lps[j]));
    let mut rank = vec![None; lps.len()];
    for (r, &i) in order.iter().take(a.highlight).enumerate() {
        rank[i] = Some(r + 1);
    }
    let color = std::io::stdout().is_terminal();
    outln!("{:>5}  {:>6}  {:>9}  token", "pos", "id", "logprob");
    outln!(
        "{:>5}  {:>6}  {:>9}  \"{}\"",
        0,
        ids[0],
        "-",
        escape(&tokens[0])
    );
    for (i, lp) in lps.iter().enumerate() {
        let t = format!("\"{}\"", escape(&tokens[i + 1]));
        let line = format!("{:>5}  {:>6}  {lp:>9.4}  {t}", i + 1, ids[i + 1]);
        match rank[i] {
            Some(r) if color => outln!("\x1b[1;31m{line}  ← least likely #{r}\x1b[0m"),
            Some(r) => outln!("{line}  ← least likely #{r}"),
            None => outln!("{line}"),
        }
    }
    outln!(
        "{} tokens, {} scored: total {total:.4}, mean {mean:.4} nats/token (perplexity {:.3})",
        ids.len(),
        lps.len(),
        (-mean).exp()
    );
    Ok(())
}

#[derive(Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    dev: DeviceArgs,
    /// The text file to evaluate (`-` reads standard input).
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Window length in tokens (default: the model's context).
    #[arg(long)]
    context: Option<usize>,
    /// How far each window advances (default: the context).
    #[arg(long)]
    stride: Option<usize>,
    /// Windows evaluated together (default: about 2048 tokens' worth).
    #[arg(long, value_parser = super::positive)]
    batch: Option<u64>,
    /// Print one JSON object: perplexity, nll, tokens, scored.
    #[arg(long)]
    json: bool,
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let (model, tok) = a.dev.load(&a.model)?;
    let text = read_text(None, Some(a.file))?;
    let ids = tok.encode(&text);
    let context = a.context.unwrap_or(model.config().n_positions);
    let stride = a.stride.unwrap_or(context);
    let batch = match a.batch {
        Some(b) => usize::try_from(b).context("--batch does not fit this machine's addresses")?,
        None => (2048 / context.max(1)).max(1),
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} tokens scored, {rate} tokens/s, ETA {eta}",
        )
        .expect("valid template")
        .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0}", s.per_sec());
        }),
    );
    let start = std::time::Instant::now();
    let r = eval::perplexity(&model, &ids, context, stride, batch, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        return print_json(&json!({
            "perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens, "scored": r.scored,
            "context": context, "stride": stride, "seconds": secs,
        }));
    }
    outln!("perplexity {:.4}", r.perplexity);
    outln!(
        "nll        {:.4} nats over {} scored tokens ({:.4} per token)",
        r.nll,
        r.scored,
        r.nll / r.scored as f64
    );
    outln!(
        "tokens     {} (context {context}, stride {stride})",
        r.tokens
    );
    note!("{:.1} s, {:.0} tokens/s", secs, r.scored as f64 / secs);
    Ok(())
}
