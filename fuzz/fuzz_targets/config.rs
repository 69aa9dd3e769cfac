//! `GPT2Config::from_json` on arbitrary text: an error, or a config whose derived sizes are all
//! computable (no overflow, no division by zero).
//! The property is `properties::config` (../properties.rs), which tests/suite/fuzz_regressions.rs replays.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../properties.rs"]
mod properties;

fuzz_target!(|data: &[u8]| {
    properties::config(data);
});
