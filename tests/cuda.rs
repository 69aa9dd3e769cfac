//! The CUDA backend against transformers' recorded logits and the CPU, through the same `Model`
//! every command uses. Built only with `--features cuda`; on a machine without an NVIDIA GPU every
//! test prints why and passes.
#![cfg(feature = "cuda")]

mod common;

use std::path::Path;

use common::gpu::{decode_two_slots, one, vs_recorded, EveryCommand, Lengths};
use common::{fixture_dir, max_abs_diff, recorded, small_config, MODEL_FIXTURES};
use gpt2::{DType, Device, GPT2Config, LoadOptions, Logits, Model, SeqInput};

fn on_gpu(dtype: DType) -> LoadOptions {
    LoadOptions::new(Device::Cuda(0), dtype)
}

/// None (with the reason printed) when this machine has no GPU; any other failure fails the test.
fn skip_without_gpu(r: gpt2::Result<Model>) -> Option<Model> {
    match r {
        Ok(g) => Some(g),
        Err(e)
            if e.to_string().contains("no CUDA driver")
                || e.to_string().contains("no CUDA device 0") =>
        {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// A checkpoint directory on GPU 0, or None.
fn gpu(dir: &Path, dtype: DType) -> Option<Model> {
    skip_without_gpu(Model::load_with(dir, &on_gpu(dtype)))
}

#[test]
fn f32_on_the_gpu_matches_transformers_and_the_cpu() {
    for name in MODEL_FIXTURES {
        let model = Model::load(&fixture_dir(name)).unwrap();
        let Some(g) = gpu(&fixture_dir(name), DType::F32) else {
            return;
        };
        let (vs_hf, vs_cpu) = vs_recorded(name, &g, &model, max_abs_diff);
        eprintln!(
            "{name:>16}: cuda f32 max |Δ logit| vs transformers {vs_hf:.2e}, vs cpu {vs_cpu:.2e}"
        );
        assert!(vs_hf <= 1e-3 && vs_cpu <= 1e-3, "{name}");
    }
}

#[test]
fn a_ragged_batch_on_the_gpu_equals_the_cpu() {
    let name = "headdim-24";
    let model = Model::load(&fixture_dir(name)).unwrap();
    let Some(g) = gpu(&fixture_dir(name), DType::F32) else {
        return;
    };
    let recs = recorded(name);
    let prefill = [
        SeqInput {
            slot: 1,
            tokens: &recs[1].ids,
        },
        SeqInput {
            slot: 0,
            tokens: &recs[0].ids[..10],
        },
    ];
    let mut st = g.new_state(2, 24).unwrap();
    let mut cpu = model.new_state(2, 24).unwrap();
    let both = g.forward(&mut st, &prefill, Logits::Last).unwrap().to_vec();
    let want = model.forward(&mut cpu, &prefill, Logits::Last).unwrap();
    assert!(max_abs_diff(&both, want) < 1e-3);
    // Then both decode together through the graph for batch 2.
    for t in 10..14 {
        let step = [
            SeqInput {
                slot: 0,
                tokens: &recs[0].ids[t..t + 1],
            },
            SeqInput {
                slot: 1,
                tokens: &recs[0].ids[t..t + 1],
            },
        ];
        let got = g.forward(&mut st, &step, Logits::Last).unwrap().to_vec();
        let want = model.forward(&mut cpu, &step, Logits::Last).unwrap();
        assert!(max_abs_diff(&got, want) < 1e-3);
    }
}

/// 16-bit accuracy on a gpt2-sized random model: max |Δ logit| after a 128-token prompt, and
/// agreement of 256 greedy tokens, each against f32 on the GPU.
#[test]
fn sixteen_bit_accuracy_is_measured() {
    let cfg = GPT2Config::preset("gpt2").unwrap();
    let Some(f32g) = skip_without_gpu(Model::random(cfg.clone(), 7, &on_gpu(DType::F32))) else {
        return;
    };
    let prompt: Vec<u32> = (0..128).map(|i| (i * 7919 % 50257) as u32).collect();
    let greedy = |g: &Model| {
        let mut st = g.new_state(1, 128 + 256).unwrap();
        let first = g
            .forward(&mut st, &one(&prompt), Logits::Last)
            .unwrap()
            .to_vec();
        let mut next = gpt2::sampling::argmax(&first);
        let mut out = vec![next];
        for _ in 1..256 {
            next = g.forward_argmax(&mut st, &one(&[next])).unwrap()[0];
            out.push(next);
        }
        (first, out)
    };
    let (ref_logits, ref_tokens) = greedy(&f32g);
    for dtype in [DType::F16, DType::Bf16] {
        let g = Model::random(cfg.clone(), 7, &on_gpu(dtype)).unwrap();
        let (logits, tokens) = greedy(&g);
        let same = ref_tokens
            .iter()
            .zip(&tokens)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "{dtype:?}: max |Δ logit| vs f32 {:.3e}, greedy agreement {same}/256 tokens before the first difference",
            max_abs_diff(&logits, &ref_logits),
        );
        assert!(max_abs_diff(&logits, &ref_logits) < 0.5);
    }
}

#[test]
fn bad_devices_are_clear_errors() {
    let opts = LoadOptions::new(Device::Cuda(99), DType::F32);
    match Model::load_with(&fixture_dir("openai-f32"), &opts) {
        Ok(_) => panic!("device 99 exists?"),
        Err(e) => {
            let e = e.to_string();
            eprintln!("device 99: {e}");
            assert!(
                e.contains("no CUDA device 99") || e.contains("no CUDA driver"),
                "{e}"
            );
        }
    }
    let q8 = LoadOptions::new(Device::Cuda(0), DType::Q8);
    let e = Model::load_with(&fixture_dir("openai-f32"), &q8)
        .err()
        .unwrap();
    assert!(e.to_string().contains("CPU only"), "{e}");
}

/// head_dim 64 takes the tiled prefill attention kernel: check it against the CPU on a random model,
/// with a ragged batch whose lengths are not multiples of the 8-row tiles.
#[test]
fn prefill_attention_for_head_dim_64_matches_the_cpu() {
    let model = Model::random(small_config(), 3, &LoadOptions::default()).unwrap();
    let Some(g) = skip_without_gpu(Model::random(small_config(), 3, &on_gpu(DType::F32))) else {
        return;
    };
    let a: Vec<u32> = (0..203).map(|i| (i * 37 % 1000) as u32).collect();
    let b: Vec<u32> = (0..37).map(|i| (i * 91 % 1000) as u32).collect();
    let batch = [
        SeqInput {
            slot: 0,
            tokens: &a,
        },
        SeqInput {
            slot: 1,
            tokens: &b,
        },
    ];
    let mut st = g.new_state(2, 256).unwrap();
    let got = g.forward(&mut st, &batch, Logits::Last).unwrap().to_vec();
    let mut cpu = model.new_state(2, 256).unwrap();
    let want = model.forward(&mut cpu, &batch, Logits::Last).unwrap();
    let d = max_abs_diff(&got, want);
    eprintln!("prefill head_dim 64: max |Δ logit| vs cpu {d:.2e}");
    assert!(d < 1e-3, "{d}");
    let d = decode_two_slots((&g, &mut st), (&model, &mut cpu), max_abs_diff);
    assert!(d < 1e-3, "{d}");
}

/// Every consumer of the model on the GPU: sampling and greedy generation of a ragged batch, beam
/// search (cache slots copied on the device), top, score and strided perplexity, each equal to the
/// CPU's (logits agree to ~1e-5, far inside any decision margin here).
#[test]
fn every_command_on_the_gpu_equals_the_cpu() {
    let dir = fixture_dir("full-vocab-f16");
    let model = Model::load(&dir).unwrap();
    let Some(g) = gpu(&dir, DType::F32) else {
        return;
    };
    let lengths = Lengths {
        new_tokens: 20,
        beam_tokens: 12,
        beams: 4,
    };
    let (a, b) = EveryCommand::both(&model, &g, &lengths);
    a.assert_same_choices(&b);
    assert!(max_abs_diff(&a.score, &b.score) < 1e-3);
    // Diagnostics: the GPU's logits reduced on the host as the CPU reduces its panels; ranks may
    // differ only where a logit lies within float noise of the target's, which is rare.
    let (da, db) = (&a.diagnostics, &b.diagnostics);
    assert_eq!(da.logprobs, a.score);
    assert!(max_abs_diff(&da.logprobs, &db.logprobs) < 1e-3);
    assert!(max_abs_diff(&da.entropies, &db.entropies) < 1e-3);
    let differ = da
        .ranks
        .iter()
        .zip(&db.ranks)
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        differ * 10 <= da.ranks.len(),
        "{:?} {:?}",
        da.ranks,
        db.ranks
    );
    eprintln!(
        "cuda: generate, beam search, top, score, diagnostics and perplexity equal to the cpu"
    );
}
