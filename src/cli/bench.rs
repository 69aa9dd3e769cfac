//! `gpt2 bench`: prompt (prefill) and decode speed, as llama.cpp's pp128 / tg128 measure them.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use gpt2::{GPT2Config, Model, SeqInput, State};
use serde_json::json;

use super::{print_json, DeviceArgs, ModelArg};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Random weights at a released model's shape (no download): gpt2, gpt2-medium, gpt2-large,
    /// gpt2-xl, distilgpt2.
    #[arg(long, conflicts_with = "model")]
    random: Option<String>,
    /// Prompt tokens processed at once.
    #[arg(long, default_value_t = 128)]
    prompt: usize,
    /// Tokens decoded one at a time after the prompt.
    #[arg(long, default_value_t = 128)]
    decode: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1, value_parser = super::positive)]
    batch: u64,
    /// Runs; the median is reported (at most 1000).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    repeat: u64,
    #[command(flatten)]
    dev: DeviceArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Medians of the prefill and the whole decode, in seconds.
struct Timing {
    prefill: f64,
    decode: f64,
}

/// Greedy prefill then decode, `--repeat` times after one untimed run (kernel loading, graph
/// capture and first-touch page faults are start-up costs, not speed).
fn measure(model: &Model, mut state: State, a: &BenchArgs, prompts: &[Vec<u32>]) -> Result<Timing> {
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    let mut inputs = Vec::with_capacity(prompts.len());
    for run in 0..=a.repeat {
        state.clear();
        inputs.clear();
        inputs.extend(
            prompts
                .iter()
                .enumerate()
                .map(|(slot, p)| SeqInput { slot, tokens: p }),
        );
        model.synchronize()?;
        let t = Instant::now();
        let mut next: Vec<[u32; 1]> = model
            .forward_argmax(&mut state, &inputs)?
            .into_iter()
            .map(|i| [i])
            .collect();
        let p = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..a.decode {
            let inputs: Vec<SeqInput> = next
                .iter()
                .enumerate()
                .map(|(slot, n)| SeqInput { slot, tokens: n })
                .collect();
            let ids = model.forward_argmax(&mut state, &inputs)?;
            for (n, i) in next.iter_mut().zip(ids) {
                n[0] = i;
            }
        }
        if run > 0 {
            prefill.push(p);
            decode.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(Timing {
        prefill: median(prefill),
        decode: median(decode),
    })
}

/// A memory figure of this process from /proc/self/status (Linux), in bytes: `VmHWM` is the peak
/// resident size (loading included), `VmRSS` the current one.
fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: BenchArgs) -> Result<()> {
    let opts = a.dev.options()?;
    let load = Instant::now();
    let (model, name) = match &a.random {
        Some(preset) => match GPT2Config::preset(preset) {
            Some(cfg) => (Model::random(cfg, 1, &opts)?, format!("random {preset}")),
            None => bail!(
                "--random {preset}: expected one of {}",
                gpt2::config::PRESETS.join(", ")
            ),
        },
        None => (a.model.load(&opts)?.0, a.model.model.clone()),
    };
    let load_s = load.elapsed().as_secs_f64();
    let batch = a.batch as usize;
    let n_pos = model.config().n_positions;
    // Checked: `--decode 18446744073709551615` wrapped the sum into range.
    if a.prompt == 0 || a.prompt.checked_add(a.decode).is_none_or(|t| t > n_pos) {
        bail!(
            "--prompt {} + --decode {}: need at least 1 prompt token and at most the model's context of {n_pos} positions in all",
            a.prompt,
            a.decode
        );
    }
    // The state first: it checks that the batch's KV cache fits before anything is allocated.
    let state = model.new_state(batch, a.prompt + a.decode)?;
    let v = model.config().vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..a.prompt)
                .map(|i| ((i * 7919 + b * 104729) as u32) % v)
                .collect()
        })
        .collect();
    let timing = measure(&model, state, &a, &prompts)?;
    let (device, read_bytes, dtype) = (model.describe(), model.weight_bytes(), model.dtype());
    let (p, d) = (timing.prefill, timing.decode);
    let prefill_tok_s = (batch * a.prompt) as f64 / p;
    let decode_tok_s = if a.decode == 0 {
        0.0
    } else {
        (batch * a.decode) as f64 / d
    };
    let gb_s = if a.decode == 0 {
        0.0
    } else {
        read_bytes as f64 * a.decode as f64 / d / 1e9
    };
    let (rss, rss_now) = (status_bytes("VmHWM:"), status_bytes("VmRSS:"));
    if a.json {
        return print_json(&json!({
            "model": name, "dtype": dtype.name(), "device": model.device().to_string(), "backend": device,
            "threads": opts.threads, "batch": batch,
            "prompt_tokens": a.prompt, "decode_tokens": a.decode, "repeat": a.repeat,
            "prefill_tok_s": prefill_tok_s, "decode_tok_s": decode_tok_s, "weight_gb_s": gb_s,
            "prefill_s": p, "decode_s": d, "load_s": load_s, "peak_rss_bytes": rss, "rss_bytes": rss_now,
            "parameters": model.config().parameter_count(),
        }));
    }
    outln!(
        "{name}: {dtype} on {device}, batch {batch}, median of {}",
        a.repeat
    );
    outln!(
        "  prompt {:>4} tokens: {prefill_tok_s:>9.1} tok/s ({:.1} ms)",
        a.prompt,
        p * 1e3
    );
    // With --decode 0 there is no decode speed to show (it was `inf ms/token`).
    if a.decode > 0 {
        outln!("  decode {:>4} tokens: {decode_tok_s:>9.1} tok/s ({:.2} ms/token, weights read at {gb_s:.1} GB/s)", a.decode, d * 1e3 / a.decode as f64);
    }
    if let (Some(peak), Some(now)) = (rss, rss_now) {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        outln!(
            "  peak RSS {:.0} MiB (loading included), {:.0} MiB after the run",
            mib(peak),
            mib(now)
        );
    }
    Ok(())
}
