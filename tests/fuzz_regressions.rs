//! The fuzz targets' properties (see fuzz/README.md), replayed in the normal suite over their seed
//! corpora (`fuzz/seeds/<target>`) and every input a fuzzer ever crashed on (`fuzz/regressions/
//! <target>`), so that a fixed crash stays fixed without nightly or cargo-fuzz.

use std::path::{Path, PathBuf};

use gpt2::config::GPT2Config;
use gpt2::tokenizer::vocab::{self, RawVocab};
use gpt2::tokenizer::{Special, StreamDecoder, Tokenizer};
use gpt2::Checkpoint;

const SEP: &[u8] = b"\n=====\n";

/// The inputs of one target: its seeds and its regressions.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no inputs for {target}");
    out
}

fn split(mut data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    while let Some(at) = data.windows(SEP.len()).position(|w| w == SEP) {
        parts.push(&data[..at]);
        data = &data[at + SEP.len()..];
    }
    parts.push(data);
    parts
}

#[test]
fn safetensors_inputs() {
    let mut opened = 0;
    for (path, data) in inputs("safetensors") {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let parts = split(&data);
        if parts.len() == 1 {
            std::fs::write(d.join("model.safetensors"), parts[0]).unwrap();
        } else {
            std::fs::write(d.join("model.safetensors.index.json"), parts[0]).unwrap();
            for (i, p) in parts[1..].iter().take(8).enumerate() {
                std::fs::write(d.join(format!("s{i}.safetensors")), p).unwrap();
            }
        }
        let Ok(ck) = Checkpoint::open_dir(d) else {
            continue;
        };
        opened += 1;
        for t in ck.tensor_infos() {
            if let Ok(v) = ck.f32(&t.name, &t.shape) {
                assert_eq!(v.len(), t.shape.iter().product::<usize>(), "{path:?}");
                assert!(v.iter().all(|x| x.is_finite()), "{path:?}");
            }
            let mut wrong = t.shape.clone();
            wrong.push(1);
            assert!(ck.f32(&t.name, &wrong).is_err(), "{path:?}");
        }
        let _ = ck.finish();
    }
    assert!(opened > 0, "the seeds include valid checkpoints");
}

#[test]
fn config_inputs() {
    for (path, data) in inputs("config") {
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        if let Ok(c) = GPT2Config::from_json(text, "fuzz.json") {
            assert!(c.validate().is_ok(), "{path:?}");
            assert_eq!(
                c.checked_parameter_count(),
                Some(c.parameter_count()),
                "{path:?}"
            );
        }
    }
}

#[test]
fn tokenizer_file_inputs() {
    let mut loaded = 0;
    for (path, data) in inputs("tokenizer_files") {
        let Some((&mode, rest)) = data.split_first() else {
            continue;
        };
        let Ok(text) = std::str::from_utf8(rest) else {
            continue;
        };
        let raw = if mode % 2 == 0 {
            match vocab::parse_tokenizer_json(text, "tokenizer.json") {
                Ok(r) => r,
                Err(_) => continue,
            }
        } else {
            let (v, m) = text.split_once("\n=====\n").unwrap_or((text, ""));
            let (Ok(tokens), Ok(merges)) = (
                vocab::parse_vocab_json(v, "vocab.json"),
                vocab::parse_merges_txt(m, "merges.txt"),
            ) else {
                continue;
            };
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
        let Ok(tok) = Tokenizer::from_raw(raw) else {
            continue;
        };
        loaded += 1;
        for sample in [text, "Hello, world! <|endoftext|> 日本語\n\n x", ""] {
            for special in [Special::Allow, Special::AsText] {
                let ids = tok.encode_with(sample, special);
                tok.decode(&ids).unwrap();
                tok.token_texts(&ids).unwrap();
            }
        }
        let _ = tok.decode(&[0, 1, 255, 256, u32::MAX]);
        eprintln!("{path:?} loaded");
    }
    assert!(loaded > 0, "the seeds include valid tokenizers");
}

#[test]
fn tokenizer_roundtrip_inputs() {
    let t = Tokenizer::gpt2();
    for (path, data) in inputs("tokenizer_roundtrip") {
        if let Ok(s) = std::str::from_utf8(&data) {
            for special in [Special::Allow, Special::AsText] {
                let ids = t.encode_with(s, special);
                assert_eq!(t.decode(&ids).unwrap(), s, "{path:?}");
                let mut d = StreamDecoder::new();
                let mut out = String::new();
                for &id in &ids {
                    out.push_str(&d.push(t.token_bytes(id).unwrap()));
                }
                out.push_str(&d.finish());
                assert_eq!(out, s, "{path:?}");
            }
        }
    }
}
