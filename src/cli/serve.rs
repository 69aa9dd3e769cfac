//! `gpt2 serve` (the OpenAI-compatible server) and `gpt2 serve-bench` (closed-loop streaming load
//! against any OpenAI-compatible `/v1/completions`).

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use gpt2::server::{ChatTemplate, ServerOptions};
use gpt2::{GPT2Config, Model, Tokenizer};
use serde_json::json;

use super::{print_json, DeviceArgs, ModelArg};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Random weights at a released model's shape (for load tests, no download): gpt2,
    /// gpt2-medium, gpt2-large, gpt2-xl, distilgpt2.
    #[arg(long, conflicts_with = "model")]
    random: Option<String>,
    /// Address to bind (loopback by default; 0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free one; the address is printed as "listening on http://HOST:PORT").
    #[arg(long, default_value_t = 8080)]
    port: u16,
    #[command(flatten)]
    dev: DeviceArgs,
    /// Sequences run together (continuous batching over this many KV-cache slots).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    parallel: u64,
    /// Sequences that may wait for a slot; more get 429 with Retry-After (a request with more
    /// sequences than --parallel + --max-queue gets 400: it could never be taken).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    max_queue: u64,
    /// Require "Authorization: Bearer KEY" (all endpoints but /health and /metrics); repeatable.
    /// The command line is visible to other users (`ps`): prefer --api-key-file or the
    /// GPT2_API_KEY variable (several keys separated by commas).
    #[arg(long)]
    api_key: Vec<String>,
    /// A file of API keys, one per line (blank lines and lines starting with # are skipped).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Allow browsers on this origin to call the API (CORS); repeatable, `*` for any origin.
    #[arg(long)]
    cors_origin: Vec<String>,
    /// Append the access log (a JSON line per request) to this file instead of stderr.
    #[arg(long, conflicts_with = "no_access_log")]
    log_file: Option<PathBuf>,
    /// No access log.
    #[arg(long)]
    no_access_log: bool,
    /// The model name requests give and /v1/models lists (default: the hub id, the checkpoint
    /// directory's name, or the preset).
    #[arg(long)]
    served_model_name: Option<String>,
    /// A JSON chat template, e.g. the default: {"message": "{Role}: {content}\n",
    /// "generation_prompt": "Assistant:", "stop": ["\nUser:", "\nSystem:"]}.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Seconds a request may take, 1 to 86400; its sequences then end with finish_reason "length".
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=gpt2::server::MAX_TIMEOUT_SECS))]
    time_limit: u64,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 4 << 20)]
    max_body: usize,
    /// Prompt tokens prefilled per step at most, across requests (long prompts run in chunks
    /// between other requests' decode steps).
    #[arg(long, default_value_t = gpt2::server::PREFILL_CHUNK as u64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    prefill_chunk: u64,
    /// Prompt tokens that finished requests may leave in the prefix cache, for later requests
    /// sharing a prefix (KV-cache slots of the whole context beside the --parallel ones).
    #[arg(long, default_value_t = gpt2::server::CACHE_TOKENS as u64, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    cache_tokens: u64,
    /// Prefill every prompt in full: no reuse of running or finished requests' prefixes.
    #[arg(long)]
    no_prefix_cache: bool,
    /// Seconds a client has to send a request's headers (also how long an idle keep-alive
    /// connection stays open), 1 to 86400.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=gpt2::server::MAX_TIMEOUT_SECS))]
    header_timeout: u64,
    /// Seconds a client has to send a request's body once its headers are in (408 beyond), 1 to
    /// 86400.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=gpt2::server::MAX_TIMEOUT_SECS))]
    body_timeout: u64,
    /// Connections open at once; further ones wait to be accepted.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    max_connections: u64,
    /// After SIGINT/SIGTERM, seconds that generation requests in flight may go on (0 to 86400);
    /// they then end with finish_reason "length". Idle and half-sent connections close at once.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=gpt2::server::MAX_TIMEOUT_SECS))]
    drain_timeout: u64,
}

/// The name a model is served under: a hub id as given; for a local path, the hub id it is a
/// snapshot of (`.../models--owner--name/snapshots/REV` → `owner/name`), else its last component.
fn model_id(model: &str) -> String {
    let path = std::path::Path::new(model);
    if !gpt2::hub::is_local(model) {
        return model.to_owned();
    }
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(i) = parts.iter().rposition(|p| p.starts_with("models--")) {
        return parts[i]["models--".len()..].replacen("--", "/", 1);
    }
    parts
        .iter()
        .rev()
        .find(|p| !p.is_empty() && *p != "." && *p != "/")
        .cloned()
        .unwrap_or_else(|| model.to_owned())
}

/// The API keys: --api-key, --api-key-file, and GPT2_API_KEY (comma-separated).
fn api_keys(args: &[String], file: Option<&std::path::Path>) -> Result<Vec<String>> {
    let mut keys: Vec<String> = args.iter().map(|k| k.trim().to_owned()).collect();
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("--api-key-file {}", f.display()))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
        if keys.is_empty() {
            bail!("--api-key-file {}: no keys in the file", f.display());
        }
    }
    if let Ok(v) = std::env::var("GPT2_API_KEY") {
        keys.extend(
            v.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned),
        );
    }
    keys.retain(|k| !k.is_empty());
    if let Some(k) = keys
        .iter()
        .find(|k| k.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        bail!(
            "an API key holds whitespace or a control character ({} characters): keys go in a header",
            k.chars().count()
        );
    }
    Ok(keys)
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let opts = a.dev.options()?;
    let chat_template = match &a.chat_template {
        Some(p) => ChatTemplate::from_file(p)?,
        None => ChatTemplate::default(),
    };
    let parallel = a.parallel as usize;
    let cache_tokens = (!a.no_prefix_cache).then_some(a.cache_tokens as usize);
    // The KV cache's size is known from the config alone: refuse one that cannot fit before
    // building or reading any weights (gpt2-xl's take seconds and gigabytes).
    let (name, tok, load): (
        String,
        Tokenizer,
        Box<dyn FnOnce() -> gpt2::Result<Model> + Send>,
    ) = match &a.random {
        Some(preset) => {
            let Some(cfg) = GPT2Config::preset(preset) else {
                bail!(
                    "--random {preset}: expected one of {}",
                    gpt2::config::PRESETS.join(", ")
                );
            };
            gpt2::server::check_kv_budget(&cfg, parallel, cache_tokens, &opts)?;
            (
                preset.clone(),
                Tokenizer::gpt2(),
                Box::new(move || Model::random(cfg, 1, &opts)),
            )
        }
        None => {
            let dir = a.model.dir()?;
            let tok = Tokenizer::from_dir(&dir)?;
            let opened = gpt2::weights::open(&dir)?;
            gpt2::server::check_kv_budget(&opened.config, parallel, cache_tokens, &opts)?;
            (
                model_id(&a.model.model),
                tok,
                Box::new(move || Model::from_checkpoint(opened.config, &opened.checkpoint, &opts)),
            )
        }
    };
    let opts = ServerOptions {
        host: a.host,
        port: a.port,
        parallel,
        max_queue: a.max_queue as usize,
        api_keys: api_keys(&a.api_key, a.api_key_file.as_deref())?,
        access_log: if a.no_access_log {
            None
        } else {
            Some(a.log_file.clone().unwrap_or_else(|| "-".into()))
        },
        cors_origins: a.cors_origin.clone(),
        served_model_name: a.served_model_name.unwrap_or(name),
        chat_template,
        time_limit: Duration::from_secs(a.time_limit),
        body_limit: a.max_body,
        prefill_chunk: a.prefill_chunk as usize,
        prefix_cache: cache_tokens.is_some(),
        cache_tokens: cache_tokens.unwrap_or(0),
        header_timeout: Duration::from_secs(a.header_timeout),
        body_timeout: Duration::from_secs(a.body_timeout),
        max_connections: a.max_connections as usize,
        drain_timeout: Duration::from_secs(a.drain_timeout),
    };
    Ok(gpt2::server::serve(opts, tok, load)?)
}

#[derive(Args)]
pub struct ServeBenchArgs {
    /// The server's base URL, e.g. http://127.0.0.1:8080 (loopback only).
    #[arg(long)]
    url: String,
    /// Clients sending requests back to back.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    concurrency: u64,
    /// Requests in all.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// Prompt length, in words of about one token each.
    #[arg(long, default_value_t = 100)]
    prompt_tokens: usize,
    /// Tokens generated per request (ignore_eos, temperature 0).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    max_tokens: u64,
    /// The model name sent.
    #[arg(long)]
    model: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "his", "her", "an", "which", "or", "were", "are", "this", "be", "had", "it", "not",
    "but", "have", "they", "one", "their", "all", "also", "been", "has", "new", "more", "after",
    "first", "two", "time", "who", "its",
];

/// One request's timings: time to first token, whole time, tokens.
struct Sample {
    ttft: f64,
    total: f64,
    tokens: usize,
}

fn one_request(agent: &ureq::Agent, url: &str, body: &serde_json::Value) -> Result<Sample> {
    let t0 = Instant::now();
    let resp = agent
        .post(url)
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .map_err(|e| match e {
            ureq::Error::Status(code, r) => {
                anyhow::anyhow!("HTTP {code}: {}", r.into_string().unwrap_or_default())
            }
            e => anyhow::anyhow!("{e}"),
        })?;
    let reader = std::io::BufReader::new(resp.into_reader());
    let (mut ttft, mut tokens, mut chunks) = (None, 0, 0);
    for line in reader.lines() {
        let line = line.context("reading the stream")?;
        let Some(data) = line.strip_prefix("data:").map(str::trim) else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(data).context("a chunk is not JSON")?;
        if let Some(choices) = v["choices"].as_array() {
            for c in choices {
                if c["text"].as_str().is_some_and(|t| !t.is_empty()) {
                    chunks += 1;
                    ttft.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                }
            }
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
    }
    let total = t0.elapsed().as_secs_f64();
    Ok(Sample {
        ttft: ttft.unwrap_or(total),
        total,
        tokens: if tokens > 0 { tokens } else { chunks },
    })
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((p * v.len() as f64) as usize).min(v.len() - 1)]
}

pub fn bench(a: ServeBenchArgs) -> Result<()> {
    let base = a.url.trim_end_matches('/');
    let host = base
        .strip_prefix("http://")
        .and_then(|r| r.split(['/', ':']).next())
        .unwrap_or("");
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        bail!(
            "--url {}: expected a loopback http:// address (http://127.0.0.1:PORT)",
            a.url
        );
    }
    let url = format!("{base}/v1/completions");
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(900))
        .build();
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for k in 0..a.concurrency as usize {
            let (agent, url, next, results, errors) = (
                agent.clone(),
                &url,
                next.clone(),
                results.clone(),
                errors.clone(),
            );
            let a = &a;
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= a.requests as usize {
                    return;
                }
                let prompt: Vec<&str> = (0..a.prompt_tokens)
                    .map(|w| WORDS[(w * 7 + k * 1000 + i) % WORDS.len()])
                    .collect();
                let mut body = json!({
                    "prompt": prompt.join(" "), "max_tokens": a.max_tokens, "temperature": 0,
                    "stream": true, "ignore_eos": true, "stream_options": {"include_usage": true},
                });
                if let Some(m) = &a.model {
                    body["model"] = json!(m);
                }
                match one_request(&agent, url, &body) {
                    Ok(r) => results.lock().expect("no panics while held").push(r),
                    Err(e) => errors
                        .lock()
                        .expect("no panics while held")
                        .push(e.to_string()),
                }
            });
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    let results = std::mem::take(&mut *results.lock().expect("threads are done"));
    let errors = std::mem::take(&mut *errors.lock().expect("threads are done"));
    let tokens: usize = results.iter().map(|r| r.tokens).sum();
    let mut ttft: Vec<f64> = results.iter().map(|r| r.ttft).collect();
    let mut tpot: Vec<f64> = results
        .iter()
        .filter(|r| r.tokens > 1)
        .map(|r| (r.total - r.ttft) / (r.tokens - 1) as f64)
        .collect();
    ttft.sort_by(f64::total_cmp);
    tpot.sort_by(f64::total_cmp);
    let ms = |x: f64| (x * 1e4).round() / 10.0;
    let v = json!({
        "concurrency": a.concurrency, "requests": results.len(), "errors": errors.len(),
        "first_error": errors.first(), "tokens": tokens, "wall_s": (wall * 10.0).round() / 10.0,
        "tok_s": (tokens as f64 / wall * 10.0).round() / 10.0,
        "ttft_ms_p50": ms(pct(&ttft, 0.5)), "ttft_ms_p99": ms(pct(&ttft, 0.99)),
        "tpot_ms_p50": ms(pct(&tpot, 0.5)), "tpot_ms_p99": ms(pct(&tpot, 0.99)),
    });
    if a.json {
        print_json(&v)?;
    } else {
        println!(
            "C={} requests={} errors={} tokens={} in {:.1} s: {:.1} tok/s; TTFT p50 {} ms p99 {} ms; TPOT p50 {} ms p99 {} ms",
            a.concurrency, results.len(), errors.len(), tokens, wall, tokens as f64 / wall,
            v["ttft_ms_p50"], v["ttft_ms_p99"], v["tpot_ms_p50"], v["tpot_ms_p99"]
        );
        if let Some(e) = errors.first() {
            eprintln!("first error: {e}");
        }
    }
    if !errors.is_empty() {
        bail!("{} of {} requests failed", errors.len(), a.requests);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::model_id;

    #[test]
    fn served_names_are_model_ids() {
        assert_eq!(model_id("gpt2"), "gpt2");
        assert_eq!(model_id("openai-community/gpt2"), "openai-community/gpt2");
        assert_eq!(
            model_id(
                "/home/u/.cache/huggingface/hub/models--openai-community--gpt2/snapshots/abc123"
            ),
            "openai-community/gpt2"
        );
        assert_eq!(model_id("./checkpoints/my-finetune/"), "my-finetune");
    }
}
