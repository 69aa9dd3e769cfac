//! Subcommands and the arguments they share. `--json` prints exactly one JSON object on stdout.

/// `println!` that returns a failed write as an error (`println!` panics): stdout may be a closed
/// pipe (`| head -1`) or a full disk. [`run`] ends a closed pipe quietly.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::cli::stdout_error)?
    }};
}

/// `eprintln!` that never panics: a message on a broken stderr is dropped, not a crash.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

mod bench;
mod convert;
mod eval;
mod generate;
mod inspect;
mod research;
mod serve;
mod tokenize;

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use gpt2::{LoadOptions, Tokenizer};

#[derive(Parser)]
#[command(
    name = "gpt2",
    version,
    about = "Run OpenAI's GPT-2 models: inspect checkpoints, tokenize, and run the model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it as it comes.
    Generate(generate::GenerateArgs),
    /// Download a model from the Hugging Face Hub into the local cache.
    Download(DownloadArgs),
    /// Show a checkpoint's config, parameter count, and every tensor's name, dtype and shape.
    Inspect(inspect::InspectArgs),
    /// Turn text into token ids (and each token's text).
    Tokenize(tokenize::TokenizeArgs),
    /// Turn token ids back into text.
    Detokenize(tokenize::DetokenizeArgs),
    /// The most likely next tokens after a prompt, as a bar chart.
    Top(eval::TopArgs),
    /// Each token's log-probability given the text before it.
    Score(eval::ScoreArgs),
    /// Strided perplexity of a text file (transformers' method).
    Perplexity(eval::PerplexityArgs),
    /// Activation sites of a corpus (TransformerLens's names) into sharded safetensors files.
    Activations(research::ActivationsArgs),
    /// Embeddings of texts (the final hidden state pooled), one JSON line each.
    Embed(research::EmbedArgs),
    /// Prompt and decode speed (random weights at a real shape with --random).
    Bench(bench::BenchArgs),
    /// Write a checkpoint as safetensors (hub layout) or GGUF (llama.cpp's), in f32/f16/bf16/q8.
    Convert(convert::ConvertArgs),
    /// An OpenAI-compatible HTTP server with continuous batching.
    Serve(serve::ServeArgs),
    /// Closed-loop streaming load on an OpenAI-compatible /v1/completions.
    ServeBench(serve::ServeBenchArgs),
}

/// `--model`: a local checkpoint directory or a hub id.
#[derive(Args, Clone)]
pub struct ModelArg {
    /// A checkpoint directory or file (safetensors, PyTorch .bin, TensorFlow checkpoint, GGUF;
    /// recognised by content) or a hub id: gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2,
    /// owner/name (from the Hugging Face cache, downloaded if missing).
    #[arg(long, short = 'm', default_value = "gpt2")]
    pub model: String,
    /// Hub revision: a branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
}

#[derive(Args)]
struct DownloadArgs {
    /// A hub id: gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, owner/name.
    model: String,
    /// A branch, tag or commit.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Print one JSON object: path.
    #[arg(long)]
    json: bool,
}

fn download(a: DownloadArgs) -> Result<()> {
    if std::path::Path::new(&a.model).is_dir() {
        anyhow::bail!(
            "{} is a local directory; download takes a hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, owner/name)",
            a.model
        );
    }
    let dir = ModelArg {
        model: a.model,
        revision: a.revision,
    }
    .dir()?;
    if a.json {
        return print_json(&serde_json::json!({ "path": dir.display().to_string() }));
    }
    outln!("{}", dir.display());
    Ok(())
}

impl ModelArg {
    pub fn dir(&self) -> Result<PathBuf> {
        Ok(gpt2::hub::resolve(&self.model, &self.revision)?)
    }

    /// The model, loaded as `opts` say, and its tokenizer (from the same checkpoint: beside it, or
    /// inside a GGUF file).
    pub fn load(&self, opts: &LoadOptions) -> Result<(gpt2::Model, Tokenizer)> {
        let opened = gpt2::weights::open(&self.dir()?)?;
        let tok = opened.tokenizer()?;
        let model = gpt2::Model::from_checkpoint(opened.config, &opened.checkpoint, opts)?;
        Ok((model, tok))
    }

    /// The model's tokenizer; the released models' names need no download for it.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let path = std::path::Path::new(&self.model);
        let dir = if path.exists() {
            Some(path.to_path_buf())
        } else {
            gpt2::hub::find_cached(&self.model, &self.revision)
        };
        match dir {
            Some(d) => Ok(gpt2::weights::tokenizer_for(&d)?),
            None if gpt2::config::GPT2Config::preset(&self.model).is_some() => {
                Ok(Tokenizer::gpt2())
            }
            None => Ok(gpt2::weights::tokenizer_for(&self.dir()?)?),
        }
    }
}

/// `--device`, `--dtype` and `--threads`: where the model runs, how it is stored, how many cores
/// run it.
#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// cpu; cuda[:N] (builds with the `cuda` feature); gpu[:N] or wgpu[:N], any GPU through
    /// Vulkan, Metal or DirectX 12 (builds with the `wgpu` feature; `inspect --devices` lists them).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight type: f32, f16, bf16 or q8 (8-bit blocks of 32, CPU only); converted at load from
    /// whatever the checkpoint stores.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// CPU threads, 1 to 1024 (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=gpt2::MAX_THREADS as u64))]
    pub threads: Option<u64>,
}

impl DeviceArgs {
    /// What the flags ask for, checked: the device exists in this build and takes the dtype.
    pub fn options(&self) -> Result<LoadOptions> {
        let opts = LoadOptions::parse(
            &self.device,
            &self.dtype,
            self.threads.map(i128::from),
            "--",
        )?;
        if let Some(n) = opts.threads {
            // The model runs on its own pool; tokenizing batches (and CUDA scoring rows) on rayon's.
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()
                .context("starting the thread pool")?;
        }
        Ok(opts)
    }

    /// Load the model as the flags say, and its tokenizer.
    pub fn load(&self, m: &ModelArg) -> Result<(gpt2::Model, Tokenizer)> {
        m.load(&self.options()?)
    }
}

/// A count of at least one. clap's `range(1..)` would print its bound as `1..18446744073709551615`.
pub fn positive(s: &str) -> std::result::Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) if s.trim().starts_with('-') => Err("must be at least 1".into()),
        Err(_) => Err("expected a whole number from 1 to 2^64 - 1".into()),
    }
}

/// A random seed: any whole number that fits 64 bits unsigned. A negative one is an error about the
/// value (not clap's "unexpected argument", which a leading `-` otherwise gives).
pub fn seed(s: &str) -> std::result::Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .map_err(|_| "expected a whole number from 0 to 2^64 - 1".to_string())
}

/// Text from the argument, else `--file` (`-` is standard input), else standard input.
pub fn read_text(arg: Option<String>, file: Option<PathBuf>) -> Result<String> {
    match (arg, file) {
        (Some(t), None) => Ok(t),
        // `-f -`: standard input, as most tools read it.
        (None, Some(f)) if f.as_os_str() == "-" => read_text(None, None),
        (None, Some(f)) => {
            let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
            String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not UTF-8 text (invalid byte at offset {})",
                    f.display(),
                    e.utf8_error().valid_up_to()
                )
            })
        }
        (None, None) => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading standard input")?;
            Ok(s)
        }
        (Some(_), Some(_)) => {
            anyhow::bail!("give the text either as an argument or with --file, not both")
        }
    }
}

/// Print one JSON object on stdout.
pub fn print_json(v: &serde_json::Value) -> Result<()> {
    outln!("{}", serde_json::to_string(v)?);
    Ok(())
}

/// A failed write to stdout, said as such.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    anyhow::Error::new(e).context("writing to standard output")
}

/// Whether an error is stdout's reader going away (`gpt2 tokenize -f big.txt | head -1`): the
/// reader has what it wanted, so that ends the command quietly and successfully.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Token text with whitespace and control characters made visible.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    out
}

pub fn run() -> Result<()> {
    // rayon (tokenizing batches, CUDA scoring rows) reads this when it first starts its threads: refuse an
    // absurd value here rather than spawn thousands of threads later.
    if let Ok(v) = std::env::var("RAYON_NUM_THREADS") {
        if !v.parse::<usize>().is_ok_and(|n| n <= gpt2::MAX_THREADS) {
            anyhow::bail!(
                "RAYON_NUM_THREADS={v}: expected 0 (one per core) to {}",
                gpt2::MAX_THREADS
            );
        }
    }
    let result = match Cli::parse().command {
        Command::Generate(a) => generate::run(a),
        Command::Download(a) => download(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Tokenize(a) => tokenize::tokenize(a),
        Command::Detokenize(a) => tokenize::detokenize(a),
        Command::Top(a) => eval::top(a),
        Command::Score(a) => eval::score(a),
        Command::Perplexity(a) => eval::perplexity(a),
        Command::Activations(a) => research::activations(a),
        Command::Embed(a) => research::embed_cmd(a),
        Command::Bench(a) => bench::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Serve(a) => serve::serve(a),
        Command::ServeBench(a) => serve::bench(a),
    };
    match result {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        r => r,
    }
}
