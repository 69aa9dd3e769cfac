//! GPT-2's byte-level BPE tokenizer: text → pieces (`pretokenize`) → bytes → BPE merges (`bpe`) →
//! ids, and back through [`StreamDecoder`]. Byte-exact with OpenAI's encoder.py, transformers'
//! `GPT2TokenizerFast` and tiktoken's `gpt2`.
//!
//! The stages are crate-private; the fuzz targets, tests and benches reach the vocabulary readers
//! through `gpt2::internal::vocab`.

mod bpe;
mod bytes;
mod pretokenize;
mod stream;
pub(crate) mod vocab;

use std::path::Path;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

pub use stream::StreamDecoder;

use crate::error::{Error, Result};
use bpe::Merges;
use vocab::RawVocab;

/// Whether special tokens (`<|endoftext|>`) written in the text are recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Special {
    /// As `GPT2TokenizerFast`: the text `<|endoftext|>` becomes id 50256.
    #[default]
    Allow,
    /// Treat it as plain text (`<|`, `endoftext`, `|>`), as tiktoken's `encode_ordinary`.
    AsText,
}

/// How many ids a vocabulary may skip (see [`Tokenizer::from_raw`]).
pub(crate) const MAX_ID_GAPS: usize = 1 << 16;

/// A validated byte-level BPE vocabulary: [`Tokenizer::gpt2`] (built in), [`Tokenizer::from_dir`] (a
/// model directory's files) or `gpt2::weights::tokenizer_for` (whatever goes with a checkpoint).
pub struct Tokenizer {
    /// id → bytes; `None` for ids the vocabulary skips.
    decoder: Vec<Option<Box<[u8]>>>,
    /// The token of each single byte.
    byte_ids: [u32; 256],
    merges: Merges,
    /// Pieces that are one token: vocabulary entries that BPE maps to themselves (checked at load,
    /// so the shortcut can never disagree with the merges).
    whole: FxHashMap<Box<[u8]>, u32>,
    /// Added/special tokens matched in raw text, longest first.
    specials: Vec<(String, u32)>,
    source: String,
}

impl Tokenizer {
    /// The GPT-2 vocabulary compiled into the binary (OpenAI's encoder.json and vocab.bpe).
    pub fn gpt2() -> Self {
        Self::from_raw(vocab::builtin()).expect("built-in vocabulary is consistent")
    }

    /// The tokenizer of a model directory (tokenizer.json, vocab.json + merges.txt, or encoder.json +
    /// vocab.bpe); the built-in GPT-2 one when it has none of them.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        match vocab::from_dir(dir)? {
            Some(raw) => Self::from_raw(raw),
            None => Ok(Self::gpt2()),
        }
    }

    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_raw(vocab::parse_tokenizer_json(
            &text,
            &path.display().to_string(),
        )?)
    }

    /// From `vocab.json` + `merges.txt` or, equally, `encoder.json` + `vocab.bpe`.
    pub fn from_vocab_and_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        Self::from_raw(vocab::from_vocab_and_merges(vocab, merges)?)
    }

    /// Validate and index a vocabulary as the readers of `gpt2::internal::vocab` return it (hidden:
    /// `RawVocab` is not part of the public API).
    #[doc(hidden)]
    pub fn from_raw(raw: RawVocab) -> Result<Self> {
        let src = raw.source.clone();
        let err = |msg: String| Error::tokenizer(&src, msg);
        // Ids index a table, so bound them by the number of entries: a lying file (`{"a": 4294967295}`)
        // must be an error, not a 64 GB allocation. Gaps are allowed (a vocabulary may skip ids), up
        // to a slack that costs at most a few megabytes.
        let entries = raw.tokens.len() + raw.added.len();
        let limit = entries + MAX_ID_GAPS;
        let mut max_id = 0;
        for (tok, id) in raw.tokens.iter().chain(&raw.added) {
            if *id as usize >= limit {
                return Err(err(format!(
                    "token {tok:?} has id {id}, but there are only {entries} tokens \
                     (vocabulary and added tokens): ids must be below {limit} \
                     (the count plus {MAX_ID_GAPS} for gaps)"
                )));
            }
            max_id = max_id.max(*id);
        }
        let mut decoder: Vec<Option<Box<[u8]>>> = vec![None; max_id as usize + 1];
        let mut names: Vec<Option<&str>> = vec![None; max_id as usize + 1];
        let mut encoder = FxHashMap::default();
        for (tok, id) in &raw.tokens {
            let is_added = raw.added.iter().any(|(c, i)| c == tok && i == id);
            // Added tokens may be arbitrary text; vocabulary entries must be byte-level.
            let bytes = match bytes::token_to_bytes(tok) {
                Some(b) => b,
                None if is_added => tok.as_bytes().to_vec(),
                None => {
                    return Err(err(format!(
                        "token {tok:?} (id {id}) is not written in GPT-2's byte-level alphabet"
                    )))
                }
            };
            if let Some(prev) = names[*id as usize].replace(tok) {
                return Err(err(format!(
                    "id {id} is given to both {prev:?} and {tok:?}"
                )));
            }
            decoder[*id as usize] = Some(bytes.clone().into_boxed_slice());
            encoder.insert(bytes, *id);
        }
        for (content, id) in &raw.added {
            match names[*id as usize] {
                Some(t) if t != content => {
                    return Err(err(format!(
                        "added token {content:?} has id {id}, which the vocabulary gives to {t:?}"
                    )))
                }
                Some(_) => {}
                None => {
                    names[*id as usize] = Some(content);
                    decoder[*id as usize] = Some(content.as_bytes().into());
                }
            }
        }
        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = *encoder.get(&[b as u8][..]).ok_or_else(|| {
                err(format!(
                    "no token for byte 0x{b:02X} ({:?}): a byte-level vocabulary needs all 256",
                    bytes::byte_to_char()[b]
                ))
            })?;
        }
        let by_name: FxHashMap<&str, u32> =
            raw.tokens.iter().map(|(t, id)| (t.as_str(), *id)).collect();
        let id_of = |t: &str, line: usize| {
            by_name.get(t).copied().ok_or_else(|| {
                err(format!(
                    "merge {line} names {t:?}, which is not in the vocabulary"
                ))
            })
        };
        let mut list = Vec::with_capacity(raw.merges.len());
        let mut joined = Vec::new();
        for (i, (a, b)) in raw.merges.iter().enumerate() {
            let (ia, ib) = (id_of(a, i + 1)?, id_of(b, i + 1)?);
            joined.clear();
            for id in [ia, ib] {
                joined.extend_from_slice(
                    decoder[id as usize]
                        .as_deref()
                        .expect("named ids are decodable"),
                );
            }
            let merged = *encoder.get(&joined[..]).ok_or_else(|| {
                err(format!(
                    "merge {} ({a:?} + {b:?}) makes {:?}, which is not in the vocabulary",
                    i + 1,
                    a.to_owned() + b
                ))
            })?;
            list.push((ia, ib, merged));
        }
        let merges = Merges::new(list);
        let mut whole = FxHashMap::default();
        let mut ids = Vec::new();
        for (b, &id) in &encoder {
            if b.len() > 1 && raw.added.iter().all(|(_, a)| *a != id) {
                ids.clear();
                ids.extend(b.iter().map(|&x| byte_ids[x as usize]));
                merges.apply(&mut ids);
                if ids[..] == [id] {
                    whole.insert(b.clone().into_boxed_slice(), id);
                }
            }
        }
        let mut specials = raw.added.clone();
        specials.sort_by_key(|(c, _)| std::cmp::Reverse(c.len()));
        specials.retain(|(c, _)| !c.is_empty());
        Ok(Tokenizer {
            decoder,
            byte_ids,
            merges,
            whole,
            specials,
            source: raw.source,
        })
    }

    /// Where the vocabulary came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// One more than the largest id.
    pub fn vocab_size(&self) -> usize {
        self.decoder.len()
    }

    /// The id of a special token such as `<|endoftext|>`.
    pub fn special_id(&self, content: &str) -> Option<u32> {
        self.specials
            .iter()
            .find(|(c, _)| c == content)
            .map(|(_, id)| *id)
    }

    /// Whether `id` is a special token (`<|endoftext|>` for GPT-2).
    pub fn is_special(&self, id: u32) -> bool {
        self.specials.iter().any(|&(_, s)| s == id)
    }

    /// Encode as `GPT2TokenizerFast` does (special tokens in the text recognised, no BOS added).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_with(text, Special::Allow)
    }

    pub fn encode_with(&self, text: &str, special: Special) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        let mut cache = Cache::default();
        let mut rest = text;
        if special == Special::Allow && !self.specials.is_empty() {
            while let Some((at, content, id)) = self.next_special(rest) {
                self.encode_ordinary(&rest[..at], &mut out, &mut cache);
                out.push(id);
                rest = &rest[at + content.len()..];
            }
        }
        self.encode_ordinary(rest, &mut out, &mut cache);
        out
    }

    /// Encode many texts in parallel over the thread pool.
    pub fn encode_batch(&self, texts: &[&str], special: Special) -> Vec<Vec<u32>> {
        texts
            .par_iter()
            .map(|t| self.encode_with(t, special))
            .collect()
    }

    /// The earliest special token in `text` (the longest at that place).
    fn next_special<'s>(&'s self, text: &str) -> Option<(usize, &'s str, u32)> {
        self.specials
            .iter()
            .filter_map(|(c, id)| text.find(c.as_str()).map(|at| (at, c.as_str(), *id)))
            .min_by_key(|(at, c, _)| (*at, std::cmp::Reverse(c.len())))
    }

    fn encode_ordinary<'t>(&self, text: &'t str, out: &mut Vec<u32>, cache: &mut Cache<'t>) {
        let mut ids = Vec::new();
        for piece in pretokenize::pieces(text) {
            let b = piece.as_bytes();
            if b.len() == 1 {
                out.push(self.byte_ids[b[0] as usize]);
                continue;
            }
            if let Some(&id) = self.whole.get(b) {
                out.push(id);
                continue;
            }
            if let Some(&(start, len)) = cache.pieces.get(piece) {
                out.extend_from_slice(&cache.ids[start as usize..(start + len) as usize]);
                continue;
            }
            ids.clear();
            ids.extend(b.iter().map(|&x| self.byte_ids[x as usize]));
            self.merges.apply(&mut ids);
            out.extend_from_slice(&ids);
            cache
                .pieces
                .insert(piece, (cache.ids.len() as u32, ids.len() as u32));
            cache.ids.extend_from_slice(&ids);
        }
    }

    /// The bytes of one token; an error for an id the vocabulary does not have.
    pub fn token_bytes(&self, id: u32) -> Result<&[u8]> {
        self.decoder
            .get(id as usize)
            .and_then(|b| b.as_deref())
            .ok_or_else(|| {
                Error::Input(format!(
                    "token id {id} is not in the vocabulary ({} ids)",
                    self.decoder.len()
                ))
            })
    }

    /// The bytes of a sequence of ids.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id)?);
        }
        Ok(out)
    }

    /// Decode to text; bytes that are not valid UTF-8 become U+FFFD (as transformers' decode).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }

    /// Each token's own text (lossy for a token that holds part of a character).
    pub fn token_texts(&self, ids: &[u32]) -> Result<Vec<String>> {
        ids.iter()
            .map(|&id| Ok(String::from_utf8_lossy(self.token_bytes(id)?).into_owned()))
            .collect()
    }
}

/// Memo of pieces already merged (per call, or per thread in a batch): natural text repeats its words.
#[derive(Default)]
struct Cache<'t> {
    pieces: FxHashMap<&'t str, (u32, u32)>,
    ids: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids() {
        let t = Tokenizer::gpt2();
        assert_eq!(t.encode("Hello world"), [15496, 995]);
        assert_eq!(t.encode("<|endoftext|>"), [50256]);
        assert_eq!(
            t.encode_with("<|endoftext|>", Special::AsText),
            [27, 91, 437, 1659, 5239, 91, 29]
        );
        assert_eq!(t.vocab_size(), 50257);
        assert_eq!(
            t.decode(&[15496, 995, 50256]).unwrap(),
            "Hello world<|endoftext|>"
        );
        assert!(t
            .decode(&[50257])
            .unwrap_err()
            .to_string()
            .contains("50257"));
    }
}
