//! GGUF (versions 2 and 3) files of the `gpt2` architecture, as llama.cpp's `convert_hf_to_gguf.py`
//! writes them: metadata → config, the embedded BPE vocabulary → tokenizer, tensors (f32, f16, bf16,
//! q8_0) mapped from the file under transformers' names.
//!
//! ggml lists dimensions fastest first, so a `(rows, cols)` array is `[cols, rows]`. The converter
//! transposes transformers' Conv1D weights to `(out, in)` (ggml `[in, out]`): those entries are
//! marked `transposed`, with transformers' shape `(in, out)`, and q8_0 blocks run along the input
//! dimension, which is our q8 layout.

use std::path::{Path, PathBuf};

use super::checkpoint::{Entry, Store, Stored};
use crate::config::GPT2Config;
use crate::error::{Error, Result};
use crate::tokenizer::vocab::RawVocab;

pub(crate) const MAGIC: &[u8] = b"GGUF";

type R<T> = std::result::Result<T, String>;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct TensorInfo {
    pub name: String,
    /// ggml order: fastest dimension first.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// From the start of the data section.
    pub offset: u64,
}

pub(crate) struct Gguf {
    pub meta: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Byte offset of the data section in the file.
    pub data_start: usize,
}

/// ggml's type names, for errors.
pub(crate) fn type_name(t: u32) -> String {
    let names = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    match t {
        34 => "TQ1_0".into(),
        35 => "TQ2_0".into(),
        39 => "MXFP4".into(),
        t => names
            .get(t as usize)
            .map(|s| s.to_string())
            .unwrap_or_else(|| format!("ggml type {t}")),
    }
}

fn stored(t: u32) -> Option<Stored> {
    Some(match t {
        0 => Stored::F32,
        1 => Stored::F16,
        8 => Stored::Q8_0,
        30 => Stored::Bf16,
        _ => return None,
    })
}

struct Cur<'a> {
    b: &'a [u8],
    pos: usize,
    /// Metadata array elements still allowed: each costs a `Value` (32 bytes) whatever its size
    /// in the file, so their number is capped (4M is 10× a 128k-token vocabulary's needs).
    elements: u64,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: u64) -> R<&'a [u8]> {
        let left = (self.b.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "truncated: {n} bytes wanted at offset {}, {left} left",
                self.pos
            ));
        }
        let s = &self.b[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> R<String> {
        let n = self.u64()?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| format!("a string at offset {} is not UTF-8", self.pos))
    }
    /// A count of items of at least `min` bytes each, checked against what is left.
    fn count(&mut self, min: u64) -> R<u64> {
        let n = self.u64()?;
        if n.saturating_mul(min) > (self.b.len() - self.pos) as u64 {
            return Err(format!(
                "a count of {n} at offset {} is more than the file holds",
                self.pos - 8
            ));
        }
        Ok(n)
    }

    fn value(&mut self, t: u32, depth: u32) -> R<Value> {
        let int = |b: &[u8], signed: bool| -> i128 {
            let mut v: u64 = 0;
            for (i, &x) in b.iter().enumerate() {
                v |= (x as u64) << (8 * i);
            }
            let bits = 8 * b.len() as u32;
            if signed && bits < 64 && v >> (bits - 1) & 1 == 1 {
                v as i128 - (1i128 << bits)
            } else if signed && bits == 64 {
                v as i64 as i128
            } else {
                v as i128
            }
        };
        Ok(match t {
            0 => Value::Int(int(self.take(1)?, false)),
            1 => Value::Int(int(self.take(1)?, true)),
            2 => Value::Int(int(self.take(2)?, false)),
            3 => Value::Int(int(self.take(2)?, true)),
            4 => Value::Int(int(self.take(4)?, false)),
            5 => Value::Int(int(self.take(4)?, true)),
            10 => Value::Int(int(self.take(8)?, false)),
            11 => Value::Int(int(self.take(8)?, true)),
            6 => Value::Float(f32::from_le_bytes(self.take(4)?.try_into().unwrap()) as f64),
            12 => Value::Float(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err("arrays nested more than 2 deep".into());
                }
                let et = self.u32()?;
                let min = match et {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(format!("metadata value type {t} is unknown")),
                };
                let n = self.count(min)?;
                self.elements = self
                    .elements
                    .checked_sub(n)
                    .ok_or("metadata arrays hold more than 4M elements in all")?;
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, depth + 1)?);
                }
                Value::Array(v)
            }
            t => return Err(format!("metadata value type {t} is unknown")),
        })
    }
}

/// Parse a GGUF header: metadata and tensor infos, each checked against the file's size.
pub(crate) fn parse(b: &[u8]) -> R<Gguf> {
    let mut c = Cur {
        b,
        pos: 0,
        elements: 4 << 20,
    };
    if c.take(4).ok() != Some(MAGIC) {
        return Err("no GGUF magic".into());
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version}: only versions 2 and 3 are read"
        ));
    }
    let n_tensors = c.u64()?;
    let n_kv = c.count(12)?;
    let mut meta = Vec::with_capacity(n_kv as usize);
    for _ in 0..n_kv {
        let key = c.string()?;
        let t = c.u32()?;
        let v = c.value(t, 0).map_err(|e| format!("metadata {key}: {e}"))?;
        meta.push((key, v));
    }
    if n_tensors.saturating_mul(24) > (b.len() - c.pos) as u64 {
        return Err(format!("{n_tensors} tensors: more than the file holds"));
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = c.string()?;
        let nd = c.u32()?;
        if nd > 4 {
            return Err(format!(
                "tensor {name}: {nd} dimensions (ggml has at most 4)"
            ));
        }
        let dims = (0..nd).map(|_| c.u64()).collect::<R<Vec<_>>>()?;
        let ggml_type = c.u32()?;
        let offset = c.u64()?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    let align = match meta.iter().find(|(k, _)| k == "general.alignment") {
        Some((_, v)) => v
            .as_u64()
            .filter(|a| a.is_power_of_two() && *a <= 1 << 20)
            .ok_or("general.alignment must be a power of two")?,
        None => 32,
    } as usize;
    let data_start = c.pos.div_ceil(align) * align;
    Ok(Gguf {
        meta,
        tensors,
        data_start,
    })
}

impl Gguf {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn uint(&self, key: &str) -> R<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .map(Some)
                .ok_or_else(|| format!("metadata {key} should be a non-negative integer")),
        }
    }

    /// The config from `gpt2.*` metadata; the vocabulary size is token_embd's.
    pub fn config(&self) -> R<GPT2Config> {
        match self.get("general.architecture") {
            Some(Value::Str(a)) if a == "gpt2" => {}
            Some(Value::Str(a)) => {
                return Err(format!(
                    "architecture {a:?}: this engine runs only \"gpt2\""
                ))
            }
            _ => return Err("no general.architecture".into()),
        }
        let need = |k: &str| {
            self.uint(k)?
                .ok_or_else(|| format!("metadata {k} is missing"))
        };
        let n_embd = need("gpt2.embedding_length")?;
        let vocab = self
            .tensors
            .iter()
            .find(|t| t.name == "token_embd.weight")
            .and_then(|t| t.dims.get(1))
            .ok_or("no token_embd.weight of 2 dimensions")?;
        let vocab_size = usize::try_from(*vocab).map_err(|_| "vocabulary too large")?;
        let eps = match self.get("gpt2.attention.layer_norm_epsilon") {
            Some(Value::Float(f)) => *f,
            None => 1e-5,
            Some(_) => return Err("gpt2.attention.layer_norm_epsilon should be a float".into()),
        };
        let special = |k: &str| -> R<u64> {
            Ok(self
                .uint(k)?
                .map(|v| v as u64)
                .unwrap_or((vocab_size as u64).saturating_sub(1).min(50256)))
        };
        let json = serde_json::json!({
            "n_layer": need("gpt2.block_count")?,
            "n_embd": n_embd,
            "n_head": need("gpt2.attention.head_count")?,
            "n_positions": need("gpt2.context_length")?,
            "n_inner": self.uint("gpt2.feed_forward_length")?.unwrap_or(4 * n_embd),
            "vocab_size": vocab_size,
            "layer_norm_epsilon": eps,
            "bos_token_id": special("tokenizer.ggml.bos_token_id")?,
            "eos_token_id": special("tokenizer.ggml.eos_token_id")?,
        });
        GPT2Config::from_json(&json.to_string(), "GGUF metadata").map_err(|e| e.to_string())
    }

    /// The embedded vocabulary (`tokenizer.ggml.tokens`, `.merges`, `.token_type`), if any.
    pub fn vocab(&self, source: &str) -> R<Option<RawVocab>> {
        let strings = |k: &str| -> R<Option<Vec<String>>> {
            match self.get(k) {
                None => Ok(None),
                Some(Value::Array(v)) => v
                    .iter()
                    .map(|x| match x {
                        Value::Str(s) => Ok(s.clone()),
                        _ => Err(format!("{k} should hold strings")),
                    })
                    .collect::<R<Vec<_>>>()
                    .map(Some),
                Some(_) => Err(format!("{k} should be an array")),
            }
        };
        let Some(tokens) = strings("tokenizer.ggml.tokens")? else {
            return Ok(None);
        };
        match self.get("tokenizer.ggml.model") {
            Some(Value::Str(m)) if m == "gpt2" => {}
            Some(Value::Str(m)) => {
                return Err(format!(
                "tokenizer.ggml.model {m:?}: only GPT-2's byte-level BPE (\"gpt2\") is supported"
            ))
            }
            _ => return Err("tokenizer.ggml.model is missing".into()),
        }
        let merges = strings("tokenizer.ggml.merges")?.unwrap_or_default();
        let types: Vec<i128> = match self.get("tokenizer.ggml.token_type") {
            Some(Value::Array(v)) => v
                .iter()
                .map(|x| match x {
                    Value::Int(i) => *i,
                    _ => 1,
                })
                .collect(),
            _ => Vec::new(),
        };
        crate::tokenizer::vocab::from_gguf(tokens, &merges, &types, source)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

/// transformers' name for a GGUF tensor, and whether it is a Conv1D weight stored `(out, in)`.
fn hf_name(name: &str) -> Option<(String, bool)> {
    Some(match name {
        "token_embd.weight" => ("wte.weight".into(), false),
        "position_embd.weight" => ("wpe.weight".into(), false),
        "output_norm.weight" => ("ln_f.weight".into(), false),
        "output_norm.bias" => ("ln_f.bias".into(), false),
        "output.weight" => ("lm_head.weight".into(), false),
        _ => {
            let rest = name.strip_prefix("blk.")?;
            let (i, rest) = rest.split_once('.')?;
            i.parse::<usize>().ok()?;
            let (part, leaf) = rest.rsplit_once('.')?;
            let hf = match part {
                "attn_norm" => "ln_1",
                "attn_qkv" => "attn.c_attn",
                "attn_output" => "attn.c_proj",
                "ffn_norm" => "ln_2",
                "ffn_up" => "mlp.c_fc",
                "ffn_down" => "mlp.c_proj",
                _ => return None,
            };
            if leaf != "weight" && leaf != "bias" {
                return None;
            }
            let conv = leaf == "weight" && !hf.starts_with("ln_");
            (format!("h.{i}.{hf}.{leaf}"), conv)
        }
    })
}

/// The checkpoint entries of a parsed GGUF file (file index `file`).
pub(crate) fn entries(g: &Gguf, file_len: usize, file: usize) -> R<Vec<(String, Entry)>> {
    let mut out = Vec::with_capacity(g.tensors.len());
    for t in &g.tensors {
        let dtype = stored(t.ggml_type).ok_or_else(|| {
            format!(
                "tensor {}: type {} is not supported (expected F32, F16, BF16 or Q8_0)",
                t.name,
                type_name(t.ggml_type)
            )
        })?;
        let (name, transposed) = hf_name(&t.name).unwrap_or((t.name.clone(), false));
        let dims: Vec<usize> = t
            .dims
            .iter()
            .map(|&d| {
                usize::try_from(d).map_err(|_| format!("tensor {}: dimension too large", t.name))
            })
            .collect::<R<_>>()?;
        let transposed = transposed && dims.len() == 2;
        // transformers' shape: ggml's reversed, except a Conv1D weight, whose (in, out) is ggml's order.
        let shape: Vec<usize> = if transposed {
            dims.clone()
        } else {
            dims.iter().rev().copied().collect()
        };
        let numel = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("tensor {}: shape {dims:?} overflows", t.name))?;
        let bytes = dtype
            .bytes(numel, dims.first().copied().unwrap_or(1))
            .ok_or_else(|| {
                format!(
                    "tensor {}: Q8_0 needs rows of whole blocks of 32, ggml shape {dims:?}",
                    t.name
                )
            })?;
        let start = (t.offset as usize)
            .checked_add(g.data_start)
            .filter(|_| t.offset <= usize::MAX as u64);
        let end = start
            .and_then(|s| s.checked_add(bytes))
            .filter(|&e| e <= file_len);
        let (Some(start), Some(end)) = (start, end) else {
            return Err(format!(
                "tensor {}: {bytes} bytes at data offset {} lie outside the file ({file_len} bytes)",
                t.name, t.offset
            ));
        };
        out.push((
            name,
            Entry {
                file,
                dtype,
                shape,
                start,
                end,
                stored_name: t.name.clone(),
                transposed,
            },
        ));
    }
    Ok(out)
}

/// Open a GGUF file: config, checkpoint files and entries, and the embedded vocabulary.
#[allow(clippy::type_complexity)]
pub(crate) fn open(
    path: &Path,
) -> Result<(
    GPT2Config,
    Vec<(PathBuf, Store)>,
    Vec<(String, Entry)>,
    Option<RawVocab>,
)> {
    let store = Store::map(path)?;
    let err = |m: String| Error::weights(path.display(), None, m);
    let g = parse(&store).map_err(err)?;
    let config = g.config().map_err(err)?;
    let list = entries(&g, store.len(), 0).map_err(err)?;
    let vocab = g.vocab(&path.display().to_string()).map_err(err)?;
    Ok((config, vec![(path.to_path_buf(), store)], list, vocab))
}

/// Parse GGUF bytes held in memory (the fuzz target's entry point).
pub fn parse_bytes(bytes: &[u8]) -> Result<usize> {
    let err = |m: String| Error::weights("<memory>", None, m);
    let g = parse(bytes).map_err(err)?;
    let list = entries(&g, bytes.len(), 0).map_err(err)?;
    let _ = g.config();
    let _ = g.vocab("<memory>");
    let n = list.len();
    let store = Store::Bytes(bytes.to_vec());
    super::Checkpoint::from_parts(vec![(PathBuf::from("<memory>"), store)], list)?;
    Ok(n)
}
