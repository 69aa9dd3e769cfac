//! The sampling-parameter checks, then the logits processors and the choice on arbitrary logits:
//! `SamplingParams::validate`, then `process` and `choose` / `try_choose` never panic, and a chosen
//! token is always an index into the logits.
#![no_main]

use arbitrary::Arbitrary;
use gpt2::sampling::{self, Rng, SamplingParams};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    temperature: f32,
    top_k: u16,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    frequency_penalty: f32,
    presence_penalty: f32,
    no_repeat_ngram_size: u8,
    seed: u64,
    logits: Vec<f32>,
    context: Vec<u16>,
    prompt_len: u8,
}

fuzz_target!(|inp: Input| {
    let params = SamplingParams {
        temperature: inp.temperature,
        top_k: inp.top_k as usize,
        top_p: inp.top_p,
        min_p: inp.min_p,
        repetition_penalty: inp.repetition_penalty,
        frequency_penalty: inp.frequency_penalty,
        presence_penalty: inp.presence_penalty,
        no_repeat_ngram_size: inp.no_repeat_ngram_size as usize,
        seed: inp.seed,
    };
    if params.validate().is_err() || inp.logits.is_empty() {
        return;
    }
    let mut logits = inp.logits.clone();
    logits.truncate(4096);
    let context: Vec<u32> = inp.context.iter().map(|&c| c as u32).collect();
    let generated = &context[(inp.prompt_len as usize).min(context.len())..];
    sampling::process(&params, &mut logits, &context, generated);
    let mut rng = Rng::new(params.seed);
    let t = sampling::choose(&params, &logits, &mut rng);
    assert!((t as usize) < logits.len());
    match sampling::try_choose(&params, &logits, &mut rng) {
        Ok(t) => {
            assert!((t as usize) < logits.len());
            // A chosen token is never a banned one, nor a NaN.
            assert!(logits[t as usize] > f32::NEG_INFINITY, "{t} of {logits:?}");
        }
        Err(e) => assert!(!e.is_empty()),
    }
});
