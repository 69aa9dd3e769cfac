//! The sampling-parameter checks, then the logits processors and the choice on arbitrary logits:
//! `SamplingParams::validate`, then `process` and `choose` / `try_choose` never panic, and a chosen
//! token is always an index into the logits. The property is `properties::sampling_input`
//! (../properties.rs); tests/suite/fuzz_regressions.rs replays it through `properties::sampling`, which
//! decodes the bytes as this macro does.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../properties.rs"]
mod properties;

fuzz_target!(|inp: properties::SamplingInput| {
    properties::sampling_input(inp);
});
