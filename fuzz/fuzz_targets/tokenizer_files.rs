//! Tokenizer file loading on arbitrary bytes: `tokenizer.json` (first byte even) or `vocab.json` and
//! `merges.txt` (separated by `SEP`), as `Tokenizer::from_dir` parses them. A loaded tokenizer
//! must then encode and decode without panicking.
#![no_main]

use gpt2::tokenizer::vocab::{self, RawVocab};
use gpt2::tokenizer::{Special, Tokenizer};
use libfuzzer_sys::fuzz_target;

const SEP: &str = "\n=====\n";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let raw = if mode % 2 == 0 {
        match vocab::parse_tokenizer_json(text, "tokenizer.json") {
            Ok(r) => r,
            Err(_) => return,
        }
    } else {
        let (v, m) = text.split_once(SEP).unwrap_or((text, ""));
        let (Ok(tokens), Ok(merges)) = (
            vocab::parse_vocab_json(v, "vocab.json"),
            vocab::parse_merges_txt(m, "merges.txt"),
        ) else {
            return;
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
    let Ok(tok) = Tokenizer::from_raw(raw) else {
        return;
    };
    for sample in [text, "Hello, world! <|endoftext|> 日本語\n\n x", ""] {
        for special in [Special::Allow, Special::AsText] {
            let ids = tok.encode_with(sample, special);
            // Every id the encoder makes must decode.
            tok.decode(&ids).unwrap();
            tok.token_texts(&ids).unwrap();
        }
    }
    let _ = tok.decode(&[0, 1, 255, 256, u32::MAX]);
});
