//! What each fuzz target feeds and checks, written once: the targets (`fuzz_targets/<target>.rs`)
//! call these functions on the fuzzer's inputs, and `tests/suite/fuzz_regressions.rs` calls them, in the
//! normal test suite, on every committed input (`seeds/<target>`, `regressions/<target>`).
//!
//! Each function panics when a property fails; otherwise it says whether the input was accepted,
//! refused (with the error message the caller would see, which must not be empty), or outside what
//! the target feeds (not UTF-8 for a text target, too few bytes to decode).
#![allow(dead_code)] // each fuzz target uses one of these

use std::path::Path;
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use gpt2::config::GPT2Config;
use gpt2::internal::vocab::{self, RawVocab};
use gpt2::sampling::{self, Rng, SamplingParams};
use gpt2::{Checkpoint, Special, StreamDecoder, Tokenizer};

/// What one input came to.
#[derive(Debug)]
pub enum Outcome {
    Accepted,
    /// Refused, with the error's message.
    Refused(String),
    /// Not an input of this target (not UTF-8 text, too few bytes for `arbitrary`).
    Skipped,
}

/// An error's message, checked: a refusal must say something.
fn refused(msg: impl std::fmt::Display) -> Outcome {
    let msg = msg.to_string();
    assert!(!msg.trim().is_empty(), "an error without a message");
    Outcome::Refused(msg)
}

/// The separator of the parts of one input (an index and its shards; vocab.json and merges.txt).
pub const SEP: &[u8] = b"\n=====\n";

fn split(mut data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    while let Some(at) = data.windows(SEP.len()).position(|w| w == SEP) {
        parts.push(&data[..at]);
        data = &data[at + SEP.len()..];
    }
    parts.push(data);
    parts
}

/// `safetensors`: the input is `model.safetensors`, or (parts separated by [`SEP`]) an index and up
/// to 8 shards `s0.safetensors`, …, written into `dir` (which must be empty). The checkpoint opens or
/// errors; every tensor reads at its shape as finite numbers or errors; a wrong shape is an error.
pub fn safetensors(data: &[u8], dir: &Path) -> Outcome {
    let parts = split(data);
    if parts.len() == 1 {
        std::fs::write(dir.join("model.safetensors"), parts[0]).unwrap();
    } else {
        std::fs::write(dir.join("model.safetensors.index.json"), parts[0]).unwrap();
        for (i, p) in parts[1..].iter().take(8).enumerate() {
            std::fs::write(dir.join(format!("s{i}.safetensors")), p).unwrap();
        }
    }
    let ck = match Checkpoint::open_dir(dir) {
        Ok(ck) => ck,
        Err(e) => return refused(e),
    };
    let _ = ck.paths().count();
    for t in &ck.tensor_infos() {
        let _ = ck.same_data(&t.name, "wte.weight");
        match ck.f32(&t.name, &t.shape) {
            Ok(v) => {
                assert_eq!(v.len(), t.shape.iter().product::<usize>());
                assert!(v.iter().all(|x| x.is_finite()));
            }
            Err(e) => {
                refused(e);
            }
        }
        // A wrong shape is an error, never a panic.
        let mut wrong = t.shape.clone();
        wrong.push(1);
        match ck.f32(&t.name, &wrong) {
            Ok(_) => panic!("{} read at the wrong shape {wrong:?}", t.name),
            Err(e) => {
                refused(e);
            }
        }
    }
    if let Err(e) = ck.finish() {
        refused(e);
    }
    Outcome::Accepted
}

/// `config`: `config.json` text to `GPT2Config::from_json`: an error, or a valid config whose
/// derived sizes are all computable (no overflow, no division by zero).
pub fn config(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Outcome::Skipped;
    };
    let c = match GPT2Config::from_json(text, "fuzz.json") {
        Ok(c) => c,
        Err(e) => return refused(e),
    };
    assert!(c.validate().is_ok());
    assert!(c.head_dim() > 0);
    let n = c
        .checked_parameter_count()
        .expect("validated: the count fits");
    assert_eq!(n, c.parameter_count());
    let _ = serde_json::to_string(&c).unwrap();
    Outcome::Accepted
}

/// `tokenizer_files`: first byte even, the rest is a `tokenizer.json`; odd, `vocab.json` [`SEP`]
/// `merges.txt`, as `Tokenizer::from_dir` parses them. A loaded tokenizer encodes and decodes
/// without panicking, and every id it makes decodes.
pub fn tokenizer_files(data: &[u8]) -> Outcome {
    let Some((&mode, rest)) = data.split_first() else {
        return Outcome::Skipped;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return Outcome::Skipped;
    };
    let raw = if mode % 2 == 0 {
        match vocab::parse_tokenizer_json(text, "tokenizer.json") {
            Ok(r) => r,
            Err(e) => return refused(e),
        }
    } else {
        let sep = std::str::from_utf8(SEP).unwrap();
        let (v, m) = text.split_once(sep).unwrap_or((text, ""));
        let tokens = match vocab::parse_vocab_json(v, "vocab.json") {
            Ok(t) => t,
            Err(e) => return refused(e),
        };
        let merges = match vocab::parse_merges_txt(m, "merges.txt") {
            Ok(m) => m,
            Err(e) => return refused(e),
        };
        // As from_vocab_and_merges: <|endoftext|> is the one special token, known by name.
        let added = tokens
            .iter()
            .filter(|(t, _)| t == "<|endoftext|>")
            .cloned()
            .collect();
        RawVocab {
            tokens,
            merges,
            added,
            source: "vocab.json + merges.txt".into(),
        }
    };
    let tok = match Tokenizer::from_raw(raw) {
        Ok(t) => t,
        Err(e) => return refused(e),
    };
    for sample in [text, "Hello, world! <|endoftext|> 日本語\n\n x", ""] {
        for special in [Special::Allow, Special::AsText] {
            let ids = tok.encode_with(sample, special);
            // Every id the encoder makes must decode.
            tok.decode(&ids).unwrap();
            tok.token_texts(&ids).unwrap();
        }
    }
    if let Err(e) = tok.decode(&[0, 1, 255, 256, u32::MAX]) {
        refused(e);
    }
    Outcome::Accepted
}

fn gpt2_tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(Tokenizer::gpt2)
}

/// `tokenizer_roundtrip`: the built-in GPT-2 tokenizer. `decode(encode(s)) == s` for UTF-8 text,
/// special tokens recognised or not, and streamed one token at a time; decoding any ids (the input
/// as little-endian u32s) gives text or an error, never a panic.
pub fn tokenizer_roundtrip(data: &[u8]) -> Outcome {
    let t = gpt2_tokenizer();
    if let Ok(s) = std::str::from_utf8(data) {
        for special in [Special::Allow, Special::AsText] {
            let ids = t.encode_with(s, special);
            assert_eq!(t.decode(&ids).unwrap(), s, "{special:?}");
            // Streaming, one token at a time, gives the same text.
            let mut d = StreamDecoder::new();
            let mut out = String::new();
            for &id in &ids {
                out.push_str(&d.push(t.token_bytes(id).unwrap()));
            }
            out.push_str(&d.finish());
            assert_eq!(out, s);
        }
    }
    let ids: Vec<u32> = data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % 60000)
        .collect();
    if let Err(e) = t.decode(&ids) {
        refused(e);
    }
    Outcome::Accepted
}

/// `sampling`'s input, decoded from the fuzzer's bytes by `arbitrary`.
#[derive(Arbitrary, Debug)]
pub struct SamplingInput {
    temperature: f32,
    top_k: u16,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    frequency_penalty: f32,
    presence_penalty: f32,
    no_repeat_ngram_size: u8,
    seed: u64,
    logits: Vec<f32>,
    context: Vec<u16>,
    prompt_len: u8,
}

/// `sampling` on raw bytes, decoded as libfuzzer-sys's `fuzz_target!(|inp: SamplingInput| …)` does.
pub fn sampling(data: &[u8]) -> Outcome {
    if data.len() < <SamplingInput as Arbitrary>::size_hint(0).0 {
        return Outcome::Skipped;
    }
    match SamplingInput::arbitrary_take_rest(Unstructured::new(data)) {
        Ok(inp) => sampling_input(inp),
        Err(_) => Outcome::Skipped,
    }
}

/// `sampling`: `SamplingParams::validate` refuses or accepts; then `process` and `choose` /
/// `try_choose` never panic, a chosen token is always an index into the logits, and `try_choose`
/// never picks a banned token (or a NaN).
pub fn sampling_input(inp: SamplingInput) -> Outcome {
    let params = SamplingParams {
        temperature: inp.temperature,
        top_k: inp.top_k as usize,
        top_p: inp.top_p,
        min_p: inp.min_p,
        repetition_penalty: inp.repetition_penalty,
        frequency_penalty: inp.frequency_penalty,
        presence_penalty: inp.presence_penalty,
        no_repeat_ngram_size: inp.no_repeat_ngram_size as usize,
        seed: inp.seed,
    };
    if let Err(e) = params.validate() {
        return refused(e);
    }
    if inp.logits.is_empty() {
        return Outcome::Skipped;
    }
    let mut logits = inp.logits.clone();
    logits.truncate(4096);
    let context: Vec<u32> = inp.context.iter().map(|&c| c as u32).collect();
    let generated = &context[(inp.prompt_len as usize).min(context.len())..];
    sampling::process(&params, &mut logits, &context, generated);
    let mut rng = Rng::new(params.seed);
    let t = sampling::choose(&params, &logits, &mut rng);
    assert!((t as usize) < logits.len());
    match sampling::try_choose(&params, &logits, &mut rng) {
        Ok(t) => {
            assert!((t as usize) < logits.len());
            // A chosen token is never a banned one, nor a NaN.
            assert!(logits[t as usize] > f32::NEG_INFINITY, "{t} of {logits:?}");
            Outcome::Accepted
        }
        Err(e) => refused(e),
    }
}

/// `pytorch`: any bytes as a `torch.save` file, parsed and refused or accepted: never a panic, a
/// hang or an unbounded allocation.
pub fn pytorch(data: &[u8]) -> Outcome {
    match gpt2::internal::pytorch::parse_bytes(data) {
        Ok(_) => Outcome::Accepted,
        Err(e) => refused(e),
    }
}

/// `tf_bundle`: any bytes as a TensorFlow checkpoint index, as `pytorch`.
pub fn tf_bundle(data: &[u8]) -> Outcome {
    match gpt2::internal::tf::parse_index_bytes(data) {
        Ok(_) => Outcome::Accepted,
        Err(e) => refused(e),
    }
}

/// `gguf`: any bytes as a GGUF file, as `pytorch`.
pub fn gguf(data: &[u8]) -> Outcome {
    match gpt2::internal::gguf::parse_bytes(data) {
        Ok(_) => Outcome::Accepted,
        Err(e) => refused(e),
    }
}
