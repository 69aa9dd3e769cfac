//! The built-in GPT-2 tokenizer: decode(encode(s)) == s for any valid UTF-8, with special tokens
//! recognised or not; decoding arbitrary ids never panics.
#![no_main]

use std::sync::OnceLock;

use gpt2::tokenizer::{Special, StreamDecoder, Tokenizer};
use libfuzzer_sys::fuzz_target;

fn tok() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(Tokenizer::gpt2)
}

fuzz_target!(|data: &[u8]| {
    let t = tok();
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
    let _ = t.decode(&ids);
});
