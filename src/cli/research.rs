//! `gpt2 activations` (activation sites of a corpus into sharded safetensors, resumable) and
//! `gpt2 embed` (embeddings as JSON lines).

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use gpt2::embed::{embed, Pooling};
use gpt2::{Hooked, Site, Tokenizer};
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use super::{print_json, DeviceArgs, ModelArg};

#[derive(Args)]
pub struct ActivationsArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    dev: DeviceArgs,
    /// A text file read as one document, cut into windows of --context tokens.
    #[arg(
        long,
        short = 'f',
        conflicts_with = "prompts",
        required_unless_present = "prompts"
    )]
    file: Option<PathBuf>,
    /// Documents one per line (plain text, or JSON lines with a "text" or "prompt" field); each
    /// cut into windows of --context tokens.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Site names or glob patterns, comma-separated or repeated (TransformerLens's names:
    /// blocks.5.hook_resid_post, blocks.*.attn.hook_z, ln_final.hook_normalized, ...).
    #[arg(long, required = true, value_delimiter = ',')]
    sites: Vec<String>,
    /// Tokens per window (default: the model's context).
    #[arg(long, value_parser = super::positive)]
    context: Option<u64>,
    /// The stored values' type.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    dtype_out: String,
    /// Bytes of activations per shard, in MiB (a shard holds whole windows; memory stays near one
    /// shard whatever the corpus).
    #[arg(long, default_value_t = 256.0, value_parser = mib)]
    shard_mib: f64,
    /// The output directory: shard-NNNNN.safetensors files and manifest.json. A directory holding
    /// an unfinished run with the same settings is resumed after its last complete shard.
    #[arg(long)]
    out: PathBuf,
    /// Print one JSON object at the end: out, shards, windows, tokens, seconds.
    #[arg(long)]
    json: bool,
}

/// `--shard-mib`: a size above zero, at most a terabyte.
fn mib(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 1048576.0 => Ok(x),
        _ => Err("expected a size in MiB above 0 and at most 1048576".into()),
    }
}

/// Positions run per forward pass.
const BATCH_POSITIONS: usize = 2048;

const FORMAT: &str = "gpt2-activations/1";

/// One window of a document: its tokens and where they come from.
struct Window {
    doc: usize,
    start: usize,
    ids: Vec<u32>,
}

/// Documents as (index, text), read lazily.
type Docs = Box<dyn Iterator<Item = Result<(usize, String)>>>;

/// The windows of the input, produced lazily (a `--prompts` file is read line by line).
struct Windows {
    docs: Docs,
    tok: Tokenizer,
    context: usize,
    pending: std::collections::VecDeque<Window>,
}

impl Iterator for Windows {
    type Item = Result<Window>;
    fn next(&mut self) -> Option<Result<Window>> {
        while self.pending.is_empty() {
            let (doc, text) = match self.docs.next()? {
                Ok(d) => d,
                Err(e) => return Some(Err(e)),
            };
            let ids = self.tok.encode(&text);
            for (k, chunk) in ids.chunks(self.context).enumerate() {
                self.pending.push_back(Window {
                    doc,
                    start: k * self.context,
                    ids: chunk.to_vec(),
                });
            }
        }
        self.pending.pop_front().map(Ok)
    }
}

/// A `--prompts` line's text: the line, or a JSON object's "text" (or "prompt") field.
fn line_text(line: &str, path: &Path, n: usize) -> Result<String> {
    if !line.trim_start().starts_with('{') {
        return Ok(line.to_owned());
    }
    let v: Value = serde_json::from_str(line)
        .with_context(|| format!("{}: line {}: not valid JSON", path.display(), n + 1))?;
    match v
        .get("text")
        .or_else(|| v.get("prompt"))
        .and_then(Value::as_str)
    {
        Some(t) => Ok(t.to_owned()),
        None => bail!(
            "{}: line {}: expected an object with a string \"text\" (or \"prompt\") field",
            path.display(),
            n + 1
        ),
    }
}

/// The input as (document index, text), with its description for the manifest.
fn documents(a: &ActivationsArgs) -> Result<(Docs, Value)> {
    let (path, kind) = match (&a.file, &a.prompts) {
        (Some(f), None) => (f.clone(), "file"),
        (None, Some(p)) => (p.clone(), "prompts"),
        _ => bail!("give the corpus with --file or --prompts"),
    };
    let meta = fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
    let described = json!({
        "kind": kind,
        "path": fs::canonicalize(&path).unwrap_or(path.clone()).display().to_string(),
        "bytes": meta.len(),
    });
    if kind == "file" {
        let text = super::read_text(None, Some(path))?;
        return Ok((Box::new(std::iter::once(Ok((0, text)))), described));
    }
    let reader = BufReader::new(
        fs::File::open(&path).with_context(|| format!("reading {}", path.display()))?,
    );
    let lines = reader
        .lines()
        .enumerate()
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(move |(n, l)| {
            let l = l.with_context(|| format!("{}: line {}", path.display(), n + 1))?;
            Ok((n, line_text(&l, &path, n)?))
        });
    Ok((Box::new(lines), described))
}

/// Values converted to the output type, as little-endian bytes.
fn encode(values: &[f32], dtype: Dtype, out: &mut Vec<u8>) {
    match dtype {
        Dtype::F16 => out.extend(
            values
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes()),
        ),
        Dtype::BF16 => out.extend(
            values
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()),
        ),
        _ => out.extend(values.iter().flat_map(|x| x.to_le_bytes())),
    }
}

/// One shard being filled.
#[derive(Default)]
struct Shard {
    tokens: Vec<i64>,
    docs: Vec<i64>,
    positions: Vec<i64>,
    sites: Vec<Vec<u8>>,
    windows: usize,
}

impl Shard {
    fn bytes(&self) -> usize {
        self.sites.iter().map(Vec::len).sum::<usize>() + self.tokens.len() * 24
    }

    /// Write to `dir/name` (through a temporary file, renamed once complete).
    fn write(
        &self,
        dir: &Path,
        name: &str,
        sites: &[Site],
        per_token: &[Vec<usize>],
        dtype: Dtype,
    ) -> Result<()> {
        let ids = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (t, d, p) = (ids(&self.tokens), ids(&self.docs), ids(&self.positions));
        let n = self.tokens.len();
        let mut views = Vec::new();
        for (k, bytes) in [("tokens", &t), ("doc", &d), ("position", &p)] {
            views.push((k.to_string(), TensorView::new(Dtype::I64, vec![n], bytes)?));
        }
        for ((site, shape), bytes) in sites.iter().zip(per_token).zip(&self.sites) {
            let mut full = vec![n];
            full.extend_from_slice(shape);
            views.push((site.to_string(), TensorView::new(dtype, full, bytes)?));
        }
        let tmp = dir.join(format!("{name}.tmp"));
        safetensors::tensor::serialize_to_file(views, None, &tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming {}", tmp.display()))?;
        Ok(())
    }
}

/// Write `manifest` as `dir/manifest.json`, replacing the old one only once complete.
fn write_manifest(dir: &Path, manifest: &Value) -> Result<()> {
    let tmp = dir.join("manifest.json.tmp");
    fs::write(&tmp, serde_json::to_string_pretty(manifest)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, dir.join("manifest.json")).context("renaming manifest.json.tmp")?;
    Ok(())
}

pub fn activations(a: ActivationsArgs) -> Result<()> {
    let started = Instant::now();
    let (model, tok) = a.dev.load(&a.model)?;
    let config = model.config().clone();
    let sites = Site::select(&a.sites, &config)?;
    if let Some(s) = sites.iter().find(|s| !s.per_token()) {
        bail!(
            "{s}: attention scores and patterns are (n_head, T, T) per window, not a row per token; gpt2 activations writes row sites (read patterns with Python's Model.attentions or run_with_cache)"
        );
    }
    let context = match a.context {
        Some(c) if c as usize > config.n_positions => bail!(
            "--context {c}: this model's context is {} tokens",
            config.n_positions
        ),
        Some(c) => c as usize,
        None => config.n_positions,
    };
    let dtype = match a.dtype_out.as_str() {
        "f16" => Dtype::F16,
        "bf16" => Dtype::BF16,
        _ => Dtype::F32,
    };
    let per_token: Vec<Vec<usize>> = sites
        .iter()
        .map(|s| s.shape(&config, 1)[1..].to_vec())
        .collect();
    let (docs, input) = documents(&a)?;
    let settings = json!({
        "format": FORMAT,
        "model": a.model.model,
        "revision": a.model.revision,
        "weights_dtype": a.dev.dtype,
        "sites": sites.iter().zip(&per_token).map(|(s, shape)| json!({"name": s.to_string(), "shape_per_token": shape})).collect::<Vec<_>>(),
        "dtype_out": a.dtype_out,
        "context": context,
        "input": input,
    });

    // A new directory, or the unfinished run of the same settings in it.
    fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let manifest_path = a.out.join("manifest.json");
    let mut shards: Vec<Value> = Vec::new();
    let mut skip = 0usize;
    if manifest_path.exists() {
        let old: Value = serde_json::from_str(&fs::read_to_string(&manifest_path)?)
            .with_context(|| format!("{}: not a manifest", manifest_path.display()))?;
        let differs: Vec<&str> = [
            "format",
            "model",
            "revision",
            "weights_dtype",
            "sites",
            "dtype_out",
            "context",
            "input",
        ]
        .into_iter()
        .filter(|k| old.get(*k) != settings.get(*k))
        .collect();
        if !differs.is_empty() {
            bail!(
                "{} holds activations of another run (its {} differ); give another --out",
                a.out.display(),
                differs.join(", ")
            );
        }
        shards = old["shards"].as_array().cloned().unwrap_or_default();
        skip = old["windows"].as_u64().unwrap_or(0) as usize;
        if old["complete"] == true {
            note!(
                "{}: already complete ({} shards)",
                a.out.display(),
                shards.len()
            );
            return finish(
                &a,
                shards.len(),
                skip,
                old["tokens"].as_u64().unwrap_or(0),
                started,
            );
        }
        note!("resuming after {} shards ({skip} windows)", shards.len());
    } else if fs::read_dir(&a.out)?.next().is_some() {
        bail!(
            "{} is not empty and holds no manifest.json: give an empty or new directory",
            a.out.display()
        );
    }
    let mut tokens_done: u64 = shards
        .iter()
        .map(|s| s["tokens"].as_u64().unwrap_or(0))
        .sum();

    let mut windows = Windows {
        docs,
        tok,
        context,
        pending: Default::default(),
    }
    .skip(skip)
    .peekable();
    let bar = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {pos} tokens, {rate} tokens/s, {msg}")
            .expect("valid template")
            .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}", s.per_sec());
            }),
    );
    let budget = (a.shard_mib * (1u64 << 20) as f64) as usize;
    let mut shard = Shard {
        sites: vec![Vec::new(); sites.len()],
        ..Default::default()
    };
    let mut windows_done = skip;
    let flush = |shard: &mut Shard,
                 shards: &mut Vec<Value>,
                 windows_done: usize,
                 tokens_done: u64,
                 complete: bool|
     -> Result<()> {
        if shard.windows > 0 {
            let name = format!("shard-{:05}.safetensors", shards.len());
            shard.write(&a.out, &name, &sites, &per_token, dtype)?;
            shards.push(
                json!({"file": name, "windows": shard.windows, "tokens": shard.tokens.len()}),
            );
            *shard = Shard {
                sites: vec![Vec::new(); sites.len()],
                ..Default::default()
            };
        }
        let mut m = settings.clone();
        m["shards"] = json!(shards);
        m["windows"] = json!(windows_done);
        m["tokens"] = json!(tokens_done);
        m["complete"] = json!(complete);
        write_manifest(&a.out, &m)
    };
    let mut state = None;
    while windows.peek().is_some() {
        let mut batch = Vec::new();
        let mut positions = 0;
        while let Some(w) = windows.next_if(|w| {
            positions == 0
                || w.as_ref()
                    .map_or(true, |w| positions + w.ids.len() <= BATCH_POSITIONS)
        }) {
            let w = w?;
            positions += w.ids.len();
            batch.push(w);
        }
        let hooked: Vec<Hooked> = batch
            .iter()
            .map(|w| Hooked {
                ids: &w.ids,
                patches: &[],
            })
            .collect();
        let out = model.run_with_hooks_reusing(&mut state, &hooked, &sites, false)?;
        for (w, act) in batch.iter().zip(out) {
            shard.tokens.extend(w.ids.iter().map(|&t| t as i64));
            shard
                .docs
                .extend(std::iter::repeat_n(w.doc as i64, w.ids.len()));
            shard
                .positions
                .extend((w.start..w.start + w.ids.len()).map(|p| p as i64));
            for (buf, (_, _, values)) in shard.sites.iter_mut().zip(act.sites) {
                encode(&values, dtype, buf);
            }
            shard.windows += 1;
        }
        windows_done += batch.len();
        tokens_done += positions as u64;
        bar.inc(positions as u64);
        bar.set_message(format!("{} shards", shards.len()));
        if shard.bytes() >= budget {
            flush(&mut shard, &mut shards, windows_done, tokens_done, false)?;
        }
    }
    flush(&mut shard, &mut shards, windows_done, tokens_done, true)?;
    bar.finish_and_clear();
    finish(&a, shards.len(), windows_done, tokens_done, started)
}

fn finish(
    a: &ActivationsArgs,
    shards: usize,
    windows: usize,
    tokens: u64,
    started: Instant,
) -> Result<()> {
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        return print_json(&json!({
            "out": a.out.display().to_string(), "shards": shards, "windows": windows,
            "tokens": tokens, "seconds": secs,
        }));
    }
    note!(
        "{} tokens in {windows} windows, {shards} shards in {} ({secs:.1} s)",
        tokens,
        a.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    dev: DeviceArgs,
    /// Texts to embed (else --prompts, else standard input's lines).
    texts: Vec<String>,
    /// Texts one per line (plain, or JSON lines with a "text" or "prompt" field).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// How a text's final hidden states become one vector: mean, or last (the last token's).
    #[arg(long, default_value = "mean", value_parser = ["mean", "last"])]
    pooling: String,
    /// Keep the pooled vector's length (default: unit length, as OpenAI's embeddings).
    #[arg(long)]
    no_normalize: bool,
}

/// Print one JSON line per text: index, tokens, embedding.
pub fn embed_cmd(a: EmbedArgs) -> Result<()> {
    let texts: Vec<String> = if !a.texts.is_empty() {
        a.texts.clone()
    } else {
        let (reader, path): (Box<dyn BufRead>, PathBuf) = match &a.prompts {
            Some(p) => (
                Box::new(BufReader::new(
                    fs::File::open(p).with_context(|| format!("reading {}", p.display()))?,
                )),
                p.clone(),
            ),
            None => (
                Box::new(BufReader::new(std::io::stdin())),
                PathBuf::from("<stdin>"),
            ),
        };
        let mut out = Vec::new();
        for (n, l) in reader.lines().enumerate() {
            let l = l.with_context(|| format!("{}: line {}", path.display(), n + 1))?;
            if !l.trim().is_empty() {
                out.push(line_text(&l, &path, n)?);
            }
        }
        out
    };
    if texts.is_empty() {
        bail!("no texts to embed: give them as arguments, with --prompts, or on standard input");
    }
    let (model, tok) = a.dev.load(&a.model)?;
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t)).collect();
    let pooling = Pooling::parse(&a.pooling)?;
    // In slices, so that output starts early and memory stays small.
    let mut index = 0;
    for slice in ids.chunks(64) {
        for (e, t) in embed(&model, slice, pooling, !a.no_normalize)?
            .into_iter()
            .zip(slice)
        {
            outln!(
                "{}",
                json!({"index": index, "tokens": t.len(), "embedding": e})
            );
            index += 1;
        }
    }
    Ok(())
}
