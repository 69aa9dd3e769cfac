//! Any bytes: parsed and refused or accepted, never a panic, a hang or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = gpt2::weights::pytorch::parse_bytes(data);
});
