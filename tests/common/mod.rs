//! Shared helpers for the integration tests: fixture paths and transformers' recorded outputs.
#![allow(dead_code)]

pub mod gpu;
pub mod server;

use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

pub const MODEL_FIXTURES: &[&str] = &[
    "openai-f32",
    "hf-f16",
    "hf-bf16",
    "headdim-24",
    "sharded",
    "scale-inv-layer",
    "full-vocab-f16",
];

/// gpt2's config shrunk to 2 layers of width 128 (2 heads of 64), 1000 tokens and 256 positions:
/// a random model of gpt2's shape that builds in milliseconds.
pub fn small_config() -> gpt2::GPT2Config {
    let mut cfg = gpt2::GPT2Config::preset("gpt2").unwrap();
    (
        cfg.n_layer,
        cfg.n_embd,
        cfg.n_head,
        cfg.n_inner,
        cfg.vocab_size,
        cfg.n_positions,
    ) = (2, 128, 2, 512, 1000, 256);
    cfg
}

/// Seeded sampling (temperature 0.9, top 40) of `n` tokens, past any end of text: the requests of
/// the engine's tests.
pub fn sampled_config(seed: u64, n: usize) -> gpt2::generate::GenerationConfig {
    gpt2::generate::GenerationConfig {
        max_new_tokens: n,
        sampling: gpt2::sampling::SamplingParams {
            temperature: 0.9,
            top_k: 40,
            seed,
            ..Default::default()
        },
        ignore_eos: true,
        ..Default::default()
    }
}

/// Every position's logits `(len, vocab)` of one sequence run alone, in a fresh state.
pub fn logits_alone(model: &gpt2::Model, ids: &[u32]) -> Vec<f32> {
    let mut st = model.new_state(1, ids.len()).unwrap();
    let batch = [gpt2::SeqInput {
        slot: 0,
        tokens: ids,
    }];
    model
        .forward(&mut st, &batch, gpt2::Logits::All)
        .unwrap()
        .to_vec()
}

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// One sequence of a fixture and the logits transformers gave for it: `(len, vocab)`.
pub struct Recorded {
    pub ids: Vec<u32>,
    pub logits: Vec<f32>,
}

/// Every recorded sequence of fixture `name` (`input_ids.{i}`, `logits.{i}` for i = 0, 1, …); there
/// must be at least one.
pub fn recorded(name: &str) -> Vec<Recorded> {
    let bytes = std::fs::read(fixture_dir(name).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let records: Vec<Recorded> = (0..)
        .map_while(|i| {
            let ids = st.tensor(&format!("input_ids.{i}")).ok()?;
            let logits = st.tensor(&format!("logits.{i}")).unwrap();
            assert_eq!((ids.dtype(), logits.dtype()), (Dtype::I64, Dtype::F32));
            Some(Recorded {
                ids: ids
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
                    .collect(),
                logits: logits
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            })
        })
        .collect();
    assert!(
        !records.is_empty(),
        "{name}: no recorded sequences (input_ids.0, logits.0, …) in reference.safetensors"
    );
    records
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A named tensor from a fixture's `reference.safetensors`, as f64 whatever its stored dtype.
pub fn reference_tensor(name: &str, tensor: &str) -> Vec<f64> {
    let bytes = std::fs::read(fixture_dir(name).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensor(tensor)
        .unwrap_or_else(|_| panic!("{name}: no {tensor}"));
    match t.dtype() {
        Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F64 => t
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        d => panic!("{d:?}"),
    }
}

pub fn reference_ids(name: &str, tensor: &str) -> Vec<u32> {
    reference_tensor(name, tensor)
        .into_iter()
        .map(|v| v as u32)
        .collect()
}
