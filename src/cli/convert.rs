//! `gpt2 convert`: write any checkpoint we read as safetensors in the hub's layout (with
//! config.json, vocab.json, merges.txt) or as GGUF the way llama.cpp's converter lays GPT-2 out
//! (metadata, the BPE vocabulary, Conv1D weights as `(out, in)`).
//!
//! `--dtype` applies to the weight matrices (what `--dtype` stores in memory); layer norms, biases
//! and position embeddings stay f32, so that loading the result in that dtype gives the same bits as
//! loading the source in it. Tensors are streamed to the file one at a time.
//!
//! The input is never written over: an `--out` that would replace a file the model is read from
//! (its weights, or the config and tokenizer files read with them) is refused before anything is
//! written, and every output file is written beside its destination and renamed into place, so no
//! file is ever truncated (not even one some other process has memory-mapped) and a failed
//! conversion leaves the destination as it was.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use gpt2::internal::vocab::{self, RawVocab};
use gpt2::weights::{Checkpoint, Format, Opened};
use gpt2::{DType, GPT2Config};
use half::{bf16, f16};

use super::{print_json, ModelArg};

#[derive(Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Output directory (for gguf, a path ending in .gguf names the file itself). Never the
    /// input: an --out that would replace a file the model is read from (its weights, config.json
    /// or tokenizer files; e.g. a safetensors checkpoint's own directory) is refused. Files are
    /// written beside their destination and renamed into place.
    #[arg(long)]
    out: PathBuf,
    /// safetensors (the hub's layout) or gguf (llama.cpp's).
    #[arg(long, default_value = "safetensors")]
    format: String,
    /// Weight matrices as f32, f16, bf16 or q8 (gguf q8_0 only); the rest stays f32.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Print one JSON object: format, dtype, files.
    #[arg(long)]
    json: bool,
}

/// One tensor to write, under its transformers name.
struct Item {
    name: String,
    /// transformers' shape.
    shape: Vec<usize>,
    /// A weight matrix: `n` outputs × `k` inputs, stored as Conv1D `(k, n)` by transformers when
    /// `conv1d`, else `(n, k)`; None for vectors and the position embeddings.
    matrix: Option<(usize, usize, bool)>,
}

fn plan(c: &GPT2Config, untied_head: bool) -> Vec<Item> {
    let (e, f, v) = (c.n_embd, c.n_inner, c.vocab_size);
    let vec = |name: String, n: usize| Item {
        name,
        shape: vec![n],
        matrix: None,
    };
    let conv = |name: String, k: usize, n: usize| Item {
        name,
        shape: vec![k, n],
        matrix: Some((n, k, true)),
    };
    let mut out = vec![
        Item {
            name: "wte.weight".into(),
            shape: vec![v, e],
            matrix: Some((v, e, false)),
        },
        Item {
            name: "wpe.weight".into(),
            shape: vec![c.n_positions, e],
            matrix: None,
        },
    ];
    for i in 0..c.n_layer {
        let p = format!("h.{i}");
        out.push(vec(format!("{p}.ln_1.weight"), e));
        out.push(vec(format!("{p}.ln_1.bias"), e));
        out.push(conv(format!("{p}.attn.c_attn.weight"), e, 3 * e));
        out.push(vec(format!("{p}.attn.c_attn.bias"), 3 * e));
        out.push(conv(format!("{p}.attn.c_proj.weight"), e, e));
        out.push(vec(format!("{p}.attn.c_proj.bias"), e));
        out.push(vec(format!("{p}.ln_2.weight"), e));
        out.push(vec(format!("{p}.ln_2.bias"), e));
        out.push(conv(format!("{p}.mlp.c_fc.weight"), e, f));
        out.push(vec(format!("{p}.mlp.c_fc.bias"), f));
        out.push(conv(format!("{p}.mlp.c_proj.weight"), f, e));
        out.push(vec(format!("{p}.mlp.c_proj.bias"), e));
    }
    out.push(vec("ln_f.weight".into(), e));
    out.push(vec("ln_f.bias".into(), e));
    if untied_head {
        out.push(Item {
            name: "lm_head.weight".into(),
            shape: vec![v, e],
            matrix: Some((v, e, false)),
        });
    }
    out
}

/// Every tensor of the plan present with its shape, and nothing else in the checkpoint.
fn check(ck: &Checkpoint, items: &[Item]) -> Result<()> {
    for it in items {
        ck.check_shape(&it.name, &it.shape)?;
    }
    ck.mark_used("lm_head.weight");
    ck.finish()?;
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Out {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl Out {
    fn st_name(self) -> &'static str {
        match self {
            Out::F32 => "F32",
            Out::F16 => "F16",
            Out::Bf16 => "BF16",
            Out::Q8_0 => unreachable!("safetensors has no q8_0"),
        }
    }

    fn ggml_type(self) -> u32 {
        match self {
            Out::F32 => 0,
            Out::F16 => 1,
            Out::Q8_0 => 8,
            Out::Bf16 => 30,
        }
    }

    fn bytes(self, numel: usize) -> usize {
        match self {
            Out::F32 => 4 * numel,
            Out::F16 | Out::Bf16 => 2 * numel,
            Out::Q8_0 => numel / 32 * 34,
        }
    }

    /// Encode `rows` (row-major, `k` per row) in this type.
    fn encode(self, data: &[f32], k: usize, out: &mut Vec<u8>) {
        out.clear();
        match self {
            Out::F32 => data.iter().for_each(|x| out.extend(x.to_le_bytes())),
            Out::F16 => data
                .iter()
                .for_each(|x| out.extend(f16::from_f32(*x).to_le_bytes())),
            Out::Bf16 => data
                .iter()
                .for_each(|x| out.extend(bf16::from_f32(*x).to_le_bytes())),
            Out::Q8_0 => {
                let mut q = [0i8; 32];
                for row in data.chunks_exact(k) {
                    for block in row.chunks_exact(32) {
                        let d = gpt2::internal::quantize_q8_0(block, &mut q);
                        out.extend(d.to_le_bytes());
                        out.extend(q.iter().map(|&v| v as u8));
                    }
                }
            }
        }
    }
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let dtype = DType::parse(&a.dtype)
        .ok_or_else(|| anyhow::anyhow!("--dtype {}: expected f32, f16, bf16 or q8", a.dtype))?;
    let out_type = match dtype {
        DType::F32 => Out::F32,
        DType::F16 => Out::F16,
        DType::Bf16 => Out::Bf16,
        DType::Q8 => Out::Q8_0,
    };
    let src = a.model.dir()?;
    let opened = gpt2::weights::open(&src)?;
    let ck = &opened.checkpoint;
    let untied = ck.contains("lm_head.weight") && !ck.same_data("lm_head.weight", "wte.weight");
    let items = plan(&opened.config, untied);
    check(ck, &items)?;
    let vocab = match &opened.vocab {
        Some(v) => clone_vocab(v),
        None => vocab::from_dir(&opened.dir)?.unwrap_or_else(vocab::builtin),
    };
    let files = match a.format.as_str() {
        "safetensors" => {
            if out_type == Out::Q8_0 {
                bail!("--dtype q8 has no safetensors form: use --format gguf (q8_0), or f32, f16, bf16");
            }
            let files = SAFETENSORS_FILES.map(|f| a.out.join(f)).to_vec();
            refuse_overwriting_input(&opened, &files, &a.out)?;
            write_safetensors(&opened, &items, untied, &vocab, out_type, &a.out)?;
            files
        }
        "gguf" => {
            let path = gguf_path(&a.out);
            refuse_overwriting_input(&opened, std::slice::from_ref(&path), &a.out)?;
            write_gguf(&opened, &items, &vocab, out_type, &src, &path)?;
            vec![path]
        }
        f => bail!("--format {f}: expected safetensors or gguf"),
    };
    if a.json {
        return print_json(&serde_json::json!({
            "source": src.display().to_string(),
            "source_format": opened.format.name(),
            "format": a.format,
            "dtype": dtype.name(),
            "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        }));
    }
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

fn clone_vocab(v: &RawVocab) -> RawVocab {
    RawVocab {
        tokens: v.tokens.clone(),
        merges: v.merges.clone(),
        added: v.added.clone(),
        source: v.source.clone(),
    }
}

/// Item `it`'s data, read from the checkpoint's tensor `name` (its own, or `wte.weight` for a tied
/// head), in the layout `rows` asks for: transformers' own, or one output per row.
fn tensor_data(ck: &Checkpoint, name: &str, it: &Item, rows: bool) -> Result<Vec<f32>> {
    let data = ck.f32(name, &it.shape)?;
    Ok(match it.matrix {
        Some((n, k, true)) if rows => {
            let mut t = vec![0.0; n * k];
            for i in 0..k {
                for o in 0..n {
                    t[o * k + i] = data[i * n + o];
                }
            }
            t
        }
        _ => data,
    })
}

/// The files a safetensors conversion writes into `--out`, in this order.
const SAFETENSORS_FILES: [&str; 4] = [
    "model.safetensors",
    "config.json",
    "vocab.json",
    "merges.txt",
];

/// Where a GGUF conversion writes: `out` itself when it ends in `.gguf`, else `out/model.gguf`.
fn gguf_path(out: &Path) -> PathBuf {
    if out.extension().is_some_and(|e| e == "gguf") {
        out.to_path_buf()
    } else {
        out.join("model.gguf")
    }
}

/// The files `opened` was read from: its checkpoint's, and those beside them read with it (the
/// config and tokenizer files; a GGUF carries its own config, and its own vocabulary if any).
fn input_files(opened: &Opened) -> Vec<(PathBuf, &'static str)> {
    let mut files: Vec<(PathBuf, &'static str)> = opened
        .checkpoint
        .paths()
        .map(|p| (p.to_path_buf(), "the input checkpoint"))
        .collect();
    let mut beside = Vec::new();
    if opened.format != Format::Gguf {
        beside.extend([
            gpt2::weights::INDEX_FILE,
            gpt2::internal::pytorch::INDEX_FILE,
            "config.json",
            "hparams.json",
        ]);
    }
    if opened.vocab.is_none() {
        beside.extend([
            "tokenizer.json",
            "vocab.json",
            "merges.txt",
            "encoder.json",
            "vocab.bpe",
        ]);
    }
    files.extend(
        beside
            .into_iter()
            .map(|n| (opened.dir.join(n), "the input model's")),
    );
    files
}

/// Whether `a` and `b` name the same existing file (through any links or relative paths).
#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Whether `a` and `b` name the same existing file (through any links or relative paths).
#[cfg(not(unix))]
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Refuse, before anything is written, destinations that are files the input is read from:
/// converting in place is almost never meant, and would replace the checkpoint being converted.
fn refuse_overwriting_input(opened: &Opened, destinations: &[PathBuf], out: &Path) -> Result<()> {
    let inputs = input_files(opened);
    for d in destinations {
        if let Some((input, what)) = inputs.iter().find(|(i, _)| same_file(i, d)) {
            let another = if out.extension().is_some_and(|e| e == "gguf") {
                "path"
            } else {
                "directory"
            };
            bail!(
                "--out {} would overwrite {what} {}; choose another {another} (convert never writes \
                 over its input)",
                out.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// Output files written beside their destinations (`.NAME.tmp-PID`), flushed to disk, then renamed
/// over them together by [`Staged::commit`]: a destination is replaced, never truncated, so a file
/// that is memory-mapped (by this process or another) keeps its bytes, and a conversion that fails
/// leaves every destination as it was. Whatever is not committed is removed on drop.
struct Staged {
    /// (temporary, destination), in the order written.
    files: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    fn new() -> Self {
        Staged { files: Vec::new() }
    }

    /// A new temporary file beside `dest`, buffered for writing.
    fn create(&mut self, dest: &Path) -> Result<BufWriter<File>> {
        let name = dest
            .file_name()
            .ok_or_else(|| anyhow::anyhow!("{}: not a file name", dest.display()))?
            .to_string_lossy();
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if dest.is_dir() {
            bail!("{} is a directory", dest.display());
        }
        let pid = std::process::id();
        for n in 0u32.. {
            let tmp = match n {
                0 => dir.join(format!(".{name}.tmp-{pid}")),
                n => dir.join(format!(".{name}.tmp-{pid}-{n}")),
            };
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(f) => {
                    self.files.push((tmp, dest.to_path_buf()));
                    return Ok(BufWriter::with_capacity(1 << 20, f));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", tmp.display()));
                }
            }
        }
        unreachable!("the loop returns")
    }

    /// Flush `w` (one of [`Staged::create`]'s) and its file to disk.
    fn finish(&self, w: BufWriter<File>) -> Result<()> {
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(())
    }

    /// A whole file's `bytes`, staged for `dest`.
    fn write(&mut self, dest: &Path, bytes: &[u8]) -> Result<()> {
        let mut w = self.create(dest)?;
        w.write_all(bytes)?;
        self.finish(w)
    }

    /// Rename every temporary over its destination, then flush the directories' entries.
    fn commit(mut self) -> Result<()> {
        let files = std::mem::take(&mut self.files);
        for (i, (tmp, dest)) in files.iter().enumerate() {
            if let Err(e) = std::fs::rename(tmp, dest) {
                self.files = files[i..].to_vec(); // removed on drop
                return Err(e).with_context(|| format!("writing {}", dest.display()));
            }
        }
        #[cfg(unix)]
        {
            let mut dirs: Vec<&Path> = files.iter().filter_map(|(_, d)| d.parent()).collect();
            dirs.dedup();
            for d in dirs {
                let d = if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                };
                // Best effort: the files themselves are on disk already.
                let _ = File::open(d).and_then(|f| f.sync_all());
            }
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

fn write_safetensors(
    opened: &Opened,
    items: &[Item],
    untied: bool,
    vocab: &RawVocab,
    out_type: Out,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let [model_file, config_file, vocab_file, merges_file] = SAFETENSORS_FILES.map(|f| out.join(f));
    let mut staged = Staged::new();
    let ty = |it: &Item| {
        if it.matrix.is_some() {
            out_type
        } else {
            Out::F32
        }
    };
    // The header first (offsets follow from the shapes), then each tensor streamed in order.
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut at = 0usize;
    for it in items {
        let len = ty(it).bytes(it.shape.iter().product());
        header.insert(
            it.name.clone(),
            serde_json::json!({ "dtype": ty(it).st_name(), "shape": it.shape, "data_offsets": [at, at + len] }),
        );
        at += len;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut w = staged.create(&model_file)?;
    w.write_all(&(h.len() as u64).to_le_bytes())?;
    w.write_all(&h)?;
    let mut buf = Vec::new();
    for it in items {
        let data = tensor_data(&opened.checkpoint, &it.name, it, false)?;
        ty(it).encode(&data, *it.shape.last().unwrap(), &mut buf);
        w.write_all(&buf)?;
    }
    staged.finish(w)?;
    let c = &opened.config;
    let config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": c.activation_function.name(),
        "n_layer": c.n_layer,
        "n_embd": c.n_embd,
        "n_head": c.n_head,
        "n_inner": c.n_inner,
        "n_positions": c.n_positions,
        "n_ctx": c.n_positions,
        "vocab_size": c.vocab_size,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "scale_attn_by_inverse_layer_idx": c.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": c.reorder_and_upcast_attn,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "tie_word_embeddings": !untied,
        "torch_dtype": match out_type { Out::F16 => "float16", Out::Bf16 => "bfloat16", _ => "float32" },
    });
    staged.write(
        &config_file,
        (serde_json::to_string_pretty(&config)? + "\n").as_bytes(),
    )?;
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .tokens
        .iter()
        .map(|(t, id)| (t.clone(), (*id).into()))
        .collect();
    staged.write(&vocab_file, serde_json::to_string(&map)?.as_bytes())?;
    let mut m = String::from("#version: 0.2\n");
    for (a, b) in &vocab.merges {
        m.push_str(a);
        m.push(' ');
        m.push_str(b);
        m.push('\n');
    }
    staged.write(&merges_file, m.as_bytes())?;
    staged.commit()
}

/// GGUF writing: little-endian scalars, u64-length strings.
struct G<W: Write>(W);

impl<W: Write> G<W> {
    fn u32(&mut self, v: u32) -> Result<()> {
        Ok(self.0.write_all(&v.to_le_bytes())?)
    }
    fn u64(&mut self, v: u64) -> Result<()> {
        Ok(self.0.write_all(&v.to_le_bytes())?)
    }
    fn str(&mut self, s: &str) -> Result<()> {
        self.u64(s.len() as u64)?;
        Ok(self.0.write_all(s.as_bytes())?)
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> Result<()> {
        self.str(k)?;
        self.u32(4)?;
        self.u32(v)
    }
    fn kv_f32(&mut self, k: &str, v: f32) -> Result<()> {
        self.str(k)?;
        self.u32(6)?;
        Ok(self.0.write_all(&v.to_le_bytes())?)
    }
    fn kv_str(&mut self, k: &str, v: &str) -> Result<()> {
        self.str(k)?;
        self.u32(8)?;
        self.str(v)
    }
    fn kv_strs<'a>(&mut self, k: &str, v: impl ExactSizeIterator<Item = &'a str>) -> Result<()> {
        self.str(k)?;
        self.u32(9)?;
        self.u32(8)?;
        self.u64(v.len() as u64)?;
        for s in v {
            self.str(s)?;
        }
        Ok(())
    }
    fn kv_i32s(&mut self, k: &str, v: &[i32]) -> Result<()> {
        self.str(k)?;
        self.u32(9)?;
        self.u32(5)?;
        self.u64(v.len() as u64)?;
        for x in v {
            self.0.write_all(&x.to_le_bytes())?;
        }
        Ok(())
    }
}

/// llama.cpp's tensor name for a transformers one.
fn gguf_name(name: &str) -> String {
    match name {
        "wte.weight" => return "token_embd.weight".into(),
        "wpe.weight" => return "position_embd.weight".into(),
        "ln_f.weight" => return "output_norm.weight".into(),
        "ln_f.bias" => return "output_norm.bias".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = name.strip_prefix("h.").expect("a block tensor");
    let (i, rest) = rest.split_once('.').expect("h.N.");
    let (part, leaf) = rest.rsplit_once('.').expect("a leaf");
    let g = match part {
        "ln_1" => "attn_norm",
        "attn.c_attn" => "attn_qkv",
        "attn.c_proj" => "attn_output",
        "ln_2" => "ffn_norm",
        "mlp.c_fc" => "ffn_up",
        "mlp.c_proj" => "ffn_down",
        _ => unreachable!("planned names only"),
    };
    format!("blk.{i}.{g}.{leaf}")
}

fn write_gguf(
    opened: &Opened,
    items: &[Item],
    vocab: &RawVocab,
    out_type: Out,
    src: &Path,
    path: &Path,
) -> Result<()> {
    let c = &opened.config;
    if c.activation_function != gpt2::config::Activation::GeluNew {
        bail!(
            "activation {}: llama.cpp's gpt2 architecture runs gelu_new only",
            c.activation_function.name()
        );
    }
    if c.scale_attn_by_inverse_layer_idx {
        bail!("scale_attn_by_inverse_layer_idx has no GGUF metadata; llama.cpp would run this model wrongly");
    }
    if let Some(p) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    let ty = |it: &Item| match it.matrix {
        Some((_, k, _)) if out_type == Out::Q8_0 && !k.is_multiple_of(32) => Err(anyhow::anyhow!(
            "{}: q8_0 needs rows of whole blocks of 32 inputs, this one has {k}",
            it.name
        )),
        Some(_) => Ok(out_type),
        None => Ok(Out::F32),
    };
    // Token texts indexed by id; ids the vocabulary skips become placeholder tokens.
    let n_tok = vocab
        .tokens
        .iter()
        .map(|(_, id)| *id as usize + 1)
        .max()
        .unwrap_or(0)
        .max(c.vocab_size);
    let mut tokens: Vec<String> = (0..n_tok).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![1i32; n_tok];
    for (t, id) in &vocab.tokens {
        tokens[*id as usize] = t.clone();
    }
    for (t, id) in &vocab.added {
        tokens[*id as usize] = t.clone();
        types[*id as usize] = 3;
    }
    let merges: Vec<String> = vocab
        .merges
        .iter()
        .map(|(a, b)| format!("{a} {b}"))
        .collect();
    let name = src
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "gpt2".into());

    // llama.cpp's gpt2 architecture requires `output.weight` (its own converter writes the tied
    // head as a copy of `token_embd.weight`), so a tied head is written out too.
    let head = Item {
        name: "lm_head.weight".into(),
        shape: vec![c.vocab_size, c.n_embd],
        matrix: Some((c.vocab_size, c.n_embd, false)),
    };
    let mut tensors: Vec<(&Item, &str)> = items.iter().map(|it| (it, it.name.as_str())).collect();
    if !items.iter().any(|it| it.name == head.name) {
        tensors.push((&head, "wte.weight"));
    }

    let mut staged = Staged::new();
    let mut g = G(staged.create(path)?);
    g.0.write_all(b"GGUF")?;
    g.u32(3)?;
    g.u64(tensors.len() as u64)?;
    g.u64(18)?; // metadata entries, as written below
    g.kv_str("general.architecture", "gpt2")?;
    g.kv_str("general.name", &name)?;
    let file_type = match out_type {
        Out::F32 => 0,
        Out::F16 => 1,
        Out::Q8_0 => 7,
        Out::Bf16 => 32,
    };
    g.kv_u32("general.file_type", file_type)?;
    g.kv_u32("general.quantization_version", 2)?;
    g.kv_u32("gpt2.context_length", c.n_positions as u32)?;
    g.kv_u32("gpt2.embedding_length", c.n_embd as u32)?;
    g.kv_u32("gpt2.feed_forward_length", c.n_inner as u32)?;
    g.kv_u32("gpt2.block_count", c.n_layer as u32)?;
    g.kv_u32("gpt2.attention.head_count", c.n_head as u32)?;
    g.kv_f32(
        "gpt2.attention.layer_norm_epsilon",
        c.layer_norm_epsilon as f32,
    )?;
    g.kv_str("tokenizer.ggml.model", "gpt2")?;
    g.kv_str("tokenizer.ggml.pre", "gpt-2")?;
    g.kv_strs("tokenizer.ggml.tokens", tokens.iter().map(String::as_str))?;
    g.kv_i32s("tokenizer.ggml.token_type", &types)?;
    g.kv_strs("tokenizer.ggml.merges", merges.iter().map(String::as_str))?;
    g.kv_u32("tokenizer.ggml.bos_token_id", c.bos_token_id)?;
    g.kv_u32("tokenizer.ggml.eos_token_id", c.eos_token_id)?;
    g.kv_u32("tokenizer.ggml.padding_token_id", c.eos_token_id)?;
    // Tensor infos: ggml dims (fastest first); Conv1D weights as (out, in), i.e. [in, out].
    let mut at = 0u64;
    for &(it, _) in &tensors {
        let t = ty(it)?;
        let dims: Vec<u64> = match it.matrix {
            Some((n, k, _)) => vec![k as u64, n as u64],
            None => it.shape.iter().rev().map(|&d| d as u64).collect(),
        };
        g.str(&gguf_name(&it.name))?;
        g.u32(dims.len() as u32)?;
        for d in &dims {
            g.u64(*d)?;
        }
        g.u32(t.ggml_type())?;
        g.u64(at)?;
        at += (t.bytes(it.shape.iter().product()) as u64).div_ceil(32) * 32;
    }
    g.0.flush()?;
    let pos = g.0.get_ref().metadata()?.len() as usize;
    let pad = |n: usize| vec![0u8; n.div_ceil(32) * 32 - n];
    g.0.write_all(&pad(pos))?;
    let mut buf = Vec::new();
    for &(it, from) in &tensors {
        let t = ty(it)?;
        let data = tensor_data(&opened.checkpoint, from, it, true)?;
        let k = it.matrix.map_or(*it.shape.last().unwrap(), |(_, k, _)| k);
        t.encode(&data, k, &mut buf);
        g.0.write_all(&buf)?;
        g.0.write_all(&pad(buf.len()))?;
    }
    staged.finish(g.0)?;
    staged.commit()
}
