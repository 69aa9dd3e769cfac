//! The CUDA backend against transformers' recorded logits and the CPU path. Built only with
//! `--features cuda`; on a machine without an NVIDIA GPU every test prints why and passes.
#![cfg(feature = "cuda")]

mod common;

use common::{fixture_dir, max_abs_diff, recorded, small_config, MODEL_FIXTURES};
use gpt2::backend::cuda::{CudaModel, DType};
use gpt2::{GPT2Config, Logits, Model, SeqInput};

/// The model on GPU 0, or None (with the reason printed) when there is none.
fn gpu(model: &Model, dtype: DType) -> Option<CudaModel> {
    match CudaModel::new(model, 0, dtype) {
        Ok(g) => Some(g),
        // Only a missing driver or device skips; any other failure on a GPU machine is a failure.
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

#[test]
fn f32_on_the_gpu_matches_transformers_and_the_cpu() {
    for name in MODEL_FIXTURES {
        let model = Model::load(&fixture_dir(name)).unwrap();
        let Some(g) = gpu(&model, DType::F32) else {
            return;
        };
        let v = model.config.vocab_size;
        let (mut vs_hf, mut vs_cpu) = (0f32, 0f32);
        for rec in recorded(name) {
            // Token by token through the cache (the captured decode graph), against every position.
            let mut st = g.new_state(1, rec.ids.len(), rec.ids.len()).unwrap();
            let mut cpu = model.new_state(1);
            for (t, tok) in rec.ids.iter().enumerate() {
                let got = g
                    .forward(
                        &mut st,
                        &[SeqInput {
                            slot: 0,
                            tokens: &[*tok],
                        }],
                    )
                    .unwrap();
                let want = model
                    .forward(
                        &mut cpu,
                        &[SeqInput {
                            slot: 0,
                            tokens: &[*tok],
                        }],
                        Logits::Last,
                    )
                    .unwrap();
                vs_hf = vs_hf.max(max_abs_diff(&got, &rec.logits[t * v..(t + 1) * v]));
                vs_cpu = vs_cpu.max(max_abs_diff(&got, want));
            }
            // The whole prompt at once (prefill), last position.
            let mut st = g.new_state(1, rec.ids.len(), rec.ids.len()).unwrap();
            let got = g
                .forward(
                    &mut st,
                    &[SeqInput {
                        slot: 0,
                        tokens: &rec.ids,
                    }],
                )
                .unwrap();
            let n = rec.ids.len();
            vs_hf = vs_hf.max(max_abs_diff(&got, &rec.logits[(n - 1) * v..n * v]));
        }
        eprintln!(
            "{name:>16}: cuda f32 max |Δ logit| vs transformers {vs_hf:.2e}, vs cpu {vs_cpu:.2e}"
        );
        assert!(vs_hf <= 1e-3 && vs_cpu <= 1e-3, "{name}");
    }
}

#[test]
fn a_ragged_batch_on_the_gpu_equals_single_runs() {
    let name = "headdim-24";
    let model = Model::load(&fixture_dir(name)).unwrap();
    let Some(g) = gpu(&model, DType::F32) else {
        return;
    };
    let recs = recorded(name);
    let mut st = g.new_state(2, 24, 64).unwrap();
    let both = g
        .forward(
            &mut st,
            &[
                SeqInput {
                    slot: 1,
                    tokens: &recs[1].ids,
                },
                SeqInput {
                    slot: 0,
                    tokens: &recs[0].ids[..10],
                },
            ],
        )
        .unwrap();
    let v = model.config.vocab_size;
    let mut cpu = model.new_state(2);
    let want = model
        .forward(
            &mut cpu,
            &[
                SeqInput {
                    slot: 1,
                    tokens: &recs[1].ids,
                },
                SeqInput {
                    slot: 0,
                    tokens: &recs[0].ids[..10],
                },
            ],
            Logits::Last,
        )
        .unwrap();
    assert!(max_abs_diff(&both, want) < 1e-3);
    // Then both decode together through the graph for batch 2.
    for t in 10..14 {
        let got = g
            .forward(
                &mut st,
                &[
                    SeqInput {
                        slot: 0,
                        tokens: &recs[0].ids[t..t + 1],
                    },
                    SeqInput {
                        slot: 1,
                        tokens: &recs[0].ids[t..t + 1],
                    },
                ],
            )
            .unwrap();
        let want = model
            .forward(
                &mut cpu,
                &[
                    SeqInput {
                        slot: 0,
                        tokens: &recs[0].ids[t..t + 1],
                    },
                    SeqInput {
                        slot: 1,
                        tokens: &recs[0].ids[t..t + 1],
                    },
                ],
                Logits::Last,
            )
            .unwrap();
        assert!(
            max_abs_diff(&got[..v], &want[..v]) < 1e-3
                && max_abs_diff(&got[v..], &want[v..]) < 1e-3
        );
    }
}

/// 16-bit accuracy on a gpt2-sized random model: max |Δ logit| after a 128-token prompt, and
/// agreement of 256 greedy tokens, each against f32 on the GPU.
#[test]
fn sixteen_bit_accuracy_is_measured() {
    let model = Model::random(GPT2Config::preset("gpt2").unwrap(), 7, DType::F32).unwrap();
    let Some(f32g) = gpu(&model, DType::F32) else {
        return;
    };
    let prompt: Vec<u32> = (0..128).map(|i| (i * 7919 % 50257) as u32).collect();
    let greedy = |g: &CudaModel| {
        let mut st = g.new_state(1, 128 + 256, 128).unwrap();
        let first = g
            .forward(
                &mut st,
                &[SeqInput {
                    slot: 0,
                    tokens: &prompt,
                }],
            )
            .unwrap();
        let mut next = gpt2::sampling::argmax(&first);
        let mut out = vec![next];
        for _ in 1..256 {
            next = g
                .forward_argmax(
                    &mut st,
                    &[SeqInput {
                        slot: 0,
                        tokens: &[next],
                    }],
                )
                .unwrap()[0];
            out.push(next);
        }
        (first, out)
    };
    let (ref_logits, ref_tokens) = greedy(&f32g);
    for dtype in [DType::F16, DType::Bf16] {
        let g = CudaModel::new(&model, 0, dtype).unwrap();
        let (logits, tokens) = greedy(&g);
        let same = ref_tokens
            .iter()
            .zip(&tokens)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "{dtype:?}: max |Δ logit| vs f32 {:.3e} (logits span {:.1}), greedy agreement {same}/256 tokens before the first difference",
            max_abs_diff(&logits, &ref_logits),
            ref_logits.iter().copied().fold(f32::MIN, f32::max) - ref_logits.iter().copied().fold(f32::MAX, f32::min),
        );
        assert!(max_abs_diff(&logits, &ref_logits) < 0.5);
    }
}

#[test]
fn bad_devices_are_clear_errors() {
    let model = Model::load(&fixture_dir("openai-f32")).unwrap();
    match CudaModel::new(&model, 99, DType::F32) {
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
}

/// head_dim 64 takes the tiled prefill attention kernel: check it against the CPU on a random model,
/// with a ragged batch whose lengths are not multiples of the 8-row tiles.
#[test]
fn prefill_attention_for_head_dim_64_matches_the_cpu() {
    let model = Model::random(small_config(), 3, DType::F32).unwrap();
    let Some(g) = gpu(&model, DType::F32) else {
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
    let mut st = g.new_state(2, 256, 240).unwrap();
    let got = g.forward(&mut st, &batch).unwrap();
    let mut cpu = model.new_state(2);
    let want = model
        .forward(&mut cpu, &batch, Logits::Last)
        .unwrap()
        .to_vec();
    let d = max_abs_diff(&got, &want);
    eprintln!("prefill head_dim 64: max |Δ logit| vs cpu {d:.2e}");
    assert!(d < 1e-3, "{d}");
    // Then decode steps on top of the prefilled cache.
    for t in 0..3u32 {
        let (x, y) = ([t + 1], [t + 2]);
        let step = [
            SeqInput {
                slot: 0,
                tokens: &x,
            },
            SeqInput {
                slot: 1,
                tokens: &y,
            },
        ];
        let got = g.forward(&mut st, &step).unwrap();
        let want = model.forward(&mut cpu, &step, Logits::Last).unwrap();
        assert!(max_abs_diff(&got, want) < 1e-3);
    }
}

/// The decoding loop on the GPU gives the CPU's tokens for a ragged batch of prompts (greedy and
/// seeded sampling: the logits agree to ~1e-5, far inside any decision margin here).
#[test]
fn generate_on_the_gpu_equals_the_cpu() {
    use gpt2::generate::{Engine, GenerationConfig, Generator};
    use gpt2::sampling::SamplingParams;
    let model = Model::load(&fixture_dir("full-vocab-f16")).unwrap();
    let tok = gpt2::Tokenizer::gpt2();
    let Some(g) = gpu(&model, DType::F32) else {
        return;
    };
    let prompts: Vec<Vec<u32>> = ["Hello", "The tower has three levels", "In 1957"]
        .iter()
        .map(|p| tok.encode(p))
        .collect();
    for sampling in [
        SamplingParams::greedy(),
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            seed: 5,
            ..Default::default()
        },
    ] {
        let cfg = GenerationConfig {
            max_new_tokens: 20,
            sampling,
            ..Default::default()
        };
        let cpu = Generator::new(&model, &tok, &prompts, &cfg)
            .unwrap()
            .run(|_| {})
            .unwrap();
        let gpu_out = Generator::with_engine(Engine::Cuda(&g), &tok, &prompts, &cfg)
            .unwrap()
            .run(|_| {})
            .unwrap();
        for (a, b) in cpu.iter().zip(&gpu_out) {
            assert_eq!(a.tokens, b.tokens);
            assert_eq!(a.text, b.text);
        }
    }
    eprintln!("generate on cuda: 3 prompts x (greedy, seeded sampling) identical to the cpu");
}
