//! Any bytes as a TensorFlow checkpoint index: parsed and refused or accepted, never a panic, a
//! hang or an unbounded allocation.
//! The property is `properties::tf_bundle` (../properties.rs), which tests/suite/fuzz_regressions.rs replays.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../properties.rs"]
mod properties;

fuzz_target!(|data: &[u8]| {
    properties::tf_bundle(data);
});
