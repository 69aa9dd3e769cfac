//! Any bytes as a GGUF file: parsed and refused or accepted, never a panic, a hang or an unbounded
//! allocation.
//! The property is `properties::gguf` (../properties.rs), which tests/suite/fuzz_regressions.rs replays.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../properties.rs"]
mod properties;

fuzz_target!(|data: &[u8]| {
    properties::gguf(data);
});
