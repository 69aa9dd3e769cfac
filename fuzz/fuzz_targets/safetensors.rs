//! The safetensors reader: a single file, or an index and its shards, from arbitrary bytes. Every
//! tensor is then read at its stated shape; nothing may panic, abort or allocate without bound.
//!
//! Input: parts separated by `SEP`. With one part it is `model.safetensors`; with more, the first is
//! `model.safetensors.index.json` and the rest are shards `s0.safetensors`, `s1.safetensors`, ...
//! The property is `properties::safetensors` (../properties.rs), which tests/suite/fuzz_regressions.rs
//! replays.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "../properties.rs"]
mod properties;

/// One directory for the whole run, emptied before each input.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("gpt2-fuzz-safetensors-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    for e in std::fs::read_dir(d).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    properties::safetensors(data, d);
});
