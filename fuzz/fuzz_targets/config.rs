//! `GPT2Config::from_json` on arbitrary text: an error or a config whose derived sizes are all
//! computable (no overflow, no division by zero).
#![no_main]

use gpt2::config::GPT2Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = GPT2Config::from_json(text, "fuzz.json") else {
        return;
    };
    assert!(c.validate().is_ok());
    assert!(c.head_dim() > 0);
    let n = c.checked_parameter_count().expect("validated: the count fits");
    assert_eq!(n, c.parameter_count());
    let _ = serde_json::to_string(&c).unwrap();
});
