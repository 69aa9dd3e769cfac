//! Reading a byte-level BPE vocabulary from the three file layouts GPT-2 is shipped in:
//! HF `tokenizer.json`; HF `vocab.json` + `merges.txt`; OpenAI `encoder.json` + `vocab.bpe`
//! (the last two are the same files under other names).

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// A vocabulary as read from files, before validation.
pub struct RawVocab {
    /// Token (in byte-to-unicode form) and id.
    pub tokens: Vec<(String, u32)>,
    /// Merge pairs in rank order.
    pub merges: Vec<(String, String)>,
    /// Added tokens matched in raw text before pre-tokenization: content and id.
    pub added: Vec<(String, u32)>,
    /// Where it came from, for errors.
    pub source: String,
}

pub const BUILTIN_ENCODER: &str = include_str!("../../assets/gpt2/encoder.json");
pub const BUILTIN_MERGES: &str = include_str!("../../assets/gpt2/vocab.bpe");

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// `{"token": id, …}` (encoder.json / vocab.json).
pub fn parse_vocab_json(text: &str, source: &str) -> Result<Vec<(String, u32)>> {
    let map: rustc_hash::FxHashMap<String, u32> = serde_json::from_str(text).map_err(|e| {
        Error::tokenizer(
            source,
            format!(
                "not a valid vocabulary (a JSON object of token → non-negative integer id): {e}"
            ),
        )
    })?;
    Ok(map.into_iter().collect())
}

/// One merge per line, `left right`, after an optional `#version` line (merges.txt / vocab.bpe).
pub fn parse_merges_txt(text: &str, source: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() || (n == 0 && line.starts_with("#version")) {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => out.push((a.to_owned(), b.to_owned())),
            _ => {
                return Err(Error::tokenizer(
                    source,
                    format!("line {}: expected a merge of two tokens separated by one space, found {line:?}", n + 1),
                ))
            }
        }
    }
    Ok(out)
}

/// The BPE model and added tokens of an HF `tokenizer.json`.
pub fn parse_tokenizer_json(text: &str, source: &str) -> Result<RawVocab> {
    let err = |msg: String| Error::tokenizer(source, msg);
    let root: Value =
        serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let model = root
        .get("model")
        .ok_or_else(|| err("no `model` section".into()))?;
    match model.get("type").and_then(Value::as_str) {
        Some("BPE") | None => {}
        Some(other) => return Err(err(format!("model type {other:?} is not byte-level BPE"))),
    }
    let vocab = model
        .get("vocab")
        .ok_or_else(|| err("no `model.vocab`".into()))?;
    let tokens: rustc_hash::FxHashMap<String, u32> = serde_json::from_value(vocab.clone())
        .map_err(|e| {
            err(format!(
                "`model.vocab` is not an object of token → non-negative integer id: {e}"
            ))
        })?;
    let tokens = tokens.into_iter().collect();
    let merges = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| err("no `model.merges` list".into()))?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            // Older files write "a b", newer ones ["a", "b"].
            let pair = match m {
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())),
                Value::Array(v) if v.len() == 2 => match (&v[0], &v[1]) {
                    (Value::String(a), Value::String(b)) => Some((a.clone(), b.clone())),
                    _ => None,
                },
                _ => None,
            };
            pair.ok_or_else(|| {
                err(format!(
                    "merge {i} is {m}, expected \"left right\" or [left, right]"
                ))
            })
        })
        .collect::<Result<_>>()?;
    let mut added = Vec::new();
    for t in root
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match (
            t.get("content").and_then(Value::as_str),
            t.get("id").and_then(Value::as_u64),
        ) {
            (Some(c), Some(id)) if id <= u32::MAX as u64 => added.push((c.to_owned(), id as u32)),
            _ => {
                return Err(err(format!(
                    "added token {t} needs a string `content` and an integer `id`"
                )))
            }
        }
    }
    Ok(RawVocab {
        tokens,
        merges,
        added,
        source: source.to_owned(),
    })
}

/// `<|endoftext|>` is GPT-2's one special token; vocab-file layouts mark it only by name.
fn endoftext(tokens: &[(String, u32)]) -> Vec<(String, u32)> {
    tokens
        .iter()
        .filter(|(t, _)| t == "<|endoftext|>")
        .cloned()
        .collect()
}

pub fn from_vocab_and_merges(vocab: &Path, merges: &Path) -> Result<RawVocab> {
    let source = format!("{} + {}", vocab.display(), merges.display());
    let tokens = parse_vocab_json(&read(vocab)?, &vocab.display().to_string())?;
    let merges = parse_merges_txt(&read(merges)?, &merges.display().to_string())?;
    Ok(RawVocab {
        added: endoftext(&tokens),
        tokens,
        merges,
        source,
    })
}

pub fn builtin() -> RawVocab {
    let tokens = parse_vocab_json(BUILTIN_ENCODER, "built-in encoder.json")
        .expect("built-in vocabulary is valid");
    let merges =
        parse_merges_txt(BUILTIN_MERGES, "built-in vocab.bpe").expect("built-in merges are valid");
    RawVocab {
        added: endoftext(&tokens),
        tokens,
        merges,
        source: "built-in GPT-2".into(),
    }
}

/// The vocabulary files of a model directory, in order of preference; `None` when it has none, an
/// error when it has one file of a pair.
pub fn from_dir(dir: &Path) -> Result<Option<RawVocab>> {
    let tj = dir.join("tokenizer.json");
    if tj.is_file() {
        return parse_tokenizer_json(&read(&tj)?, &tj.display().to_string()).map(Some);
    }
    for (v, m) in [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")] {
        let (v, m) = (dir.join(v), dir.join(m));
        match (v.is_file(), m.is_file()) {
            (true, true) => return from_vocab_and_merges(&v, &m).map(Some),
            // Half a tokenizer is a broken download or a typo, not a reason to use another one.
            (true, false) | (false, true) => {
                let (have, missing) = if v.is_file() { (&v, &m) } else { (&m, &v) };
                return Err(Error::tokenizer(
                    have.display(),
                    format!(
                        "{} is missing: the tokenizer needs both files (or a tokenizer.json)",
                        missing.display()
                    ),
                ));
            }
            (false, false) => {}
        }
    }
    Ok(None)
}

/// A GGUF file's embedded vocabulary: `tokenizer.ggml.tokens` (id = position), `.merges` ("a b"),
/// and `.token_type` (3 control and 4 user-defined tokens are matched in raw text, as llama.cpp
/// does; without types, `<|endoftext|>` is).
pub fn from_gguf(
    tokens: Vec<String>,
    merges: &[String],
    token_types: &[i128],
    source: &str,
) -> Result<RawVocab> {
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                Ok((a.to_owned(), b.to_owned()))
            }
            _ => Err(Error::tokenizer(
                source,
                format!("merge {} is {m:?}, expected \"left right\"", i + 1),
            )),
        })
        .collect::<Result<_>>()?;
    let tokens: Vec<(String, u32)> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    let added = if token_types.is_empty() {
        endoftext(&tokens)
    } else {
        tokens
            .iter()
            .zip(token_types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(t, _)| t.clone())
            .collect()
    };
    Ok(RawVocab {
        tokens,
        merges,
        added,
        source: source.to_owned(),
    })
}
