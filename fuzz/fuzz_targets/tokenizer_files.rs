//! Tokenizer file loading on arbitrary bytes: `tokenizer.json` (first byte even) or `vocab.json` and
//! `merges.txt` (separated by `SEP`), as `Tokenizer::from_dir` parses them. A loaded tokenizer
//! must then encode and decode without panicking.
//! The property is `properties::tokenizer_files` (../properties.rs), which tests/suite/fuzz_regressions.rs replays.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../properties.rs"]
mod properties;

fuzz_target!(|data: &[u8]| {
    properties::tokenizer_files(data);
});
