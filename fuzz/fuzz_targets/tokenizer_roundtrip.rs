//! The built-in GPT-2 tokenizer: decode(encode(s)) == s for any valid UTF-8, with special tokens
//! recognised or not; decoding arbitrary ids never panics.
//! The property is `properties::tokenizer_roundtrip` (../properties.rs), which tests/suite/fuzz_regressions.rs replays.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../properties.rs"]
mod properties;

fuzz_target!(|data: &[u8]| {
    properties::tokenizer_roundtrip(data);
});
