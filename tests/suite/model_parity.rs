//! The forward pass against transformers' GPT2LMHeadModel on every reference fixture.

use crate::common;

use common::{fixture_dir, max_abs_diff, recorded, MODEL_FIXTURES};
use gpt2::{DType, Logits, Model, SeqInput};

const TOL: f32 = 1e-4;

#[test]
fn full_forward_matches_transformers() {
    for name in MODEL_FIXTURES {
        let model = Model::load(&fixture_dir(name)).unwrap();
        let mut worst = 0f32;
        for rec in recorded(name) {
            let mut state = model.new_state(1, model.config().n_positions).unwrap();
            let got = model
                .forward(
                    &mut state,
                    &[SeqInput {
                        slot: 0,
                        tokens: &rec.ids,
                    }],
                    Logits::All,
                )
                .unwrap();
            worst = worst.max(max_abs_diff(got, &rec.logits));
        }
        eprintln!("{name:>16}: full forward     max |Δ logit| = {worst:.3e}");
        assert!(worst <= TOL, "{name}: {worst}");
    }
}

#[test]
fn token_by_token_decoding_matches_transformers() {
    for name in MODEL_FIXTURES {
        let model = Model::load(&fixture_dir(name)).unwrap();
        let v = model.config().vocab_size;
        let mut worst = 0f32;
        for rec in recorded(name) {
            let mut state = model.new_state(1, model.config().n_positions).unwrap();
            for (t, tok) in rec.ids.iter().enumerate() {
                let got = model
                    .forward(
                        &mut state,
                        &[SeqInput {
                            slot: 0,
                            tokens: &[*tok],
                        }],
                        Logits::Last,
                    )
                    .unwrap();
                worst = worst.max(max_abs_diff(got, &rec.logits[t * v..(t + 1) * v]));
            }
            assert_eq!(state.len(0), rec.ids.len());
        }
        eprintln!("{name:>16}: token by token   max |Δ logit| = {worst:.3e}");
        assert!(worst <= TOL, "{name}: {worst}");
    }
}

#[test]
fn a_batch_equals_its_sequences_run_alone() {
    // f16 weights run with the f16 KV cache.
    for (name, dtype) in MODEL_FIXTURES
        .iter()
        .flat_map(|n| [(n, DType::F32), (n, DType::F16)])
    {
        let model = Model::load_with(
            &fixture_dir(name),
            &gpt2::LoadOptions::new(gpt2::Device::Cpu, dtype),
        )
        .unwrap();
        let recs = recorded(name);
        let alone: Vec<Vec<f32>> = recs
            .iter()
            .map(|r| {
                let mut st = model.new_state(1, model.config().n_positions).unwrap();
                model
                    .forward(
                        &mut st,
                        &[SeqInput {
                            slot: 0,
                            tokens: &r.ids,
                        }],
                        Logits::All,
                    )
                    .unwrap()
                    .to_vec()
            })
            .collect();
        // Both sequences at once, in reverse slot order, with different lengths.
        let mut st = model.new_state(2, model.config().n_positions).unwrap();
        let batch = [
            SeqInput {
                slot: 1,
                tokens: &recs[1].ids,
            },
            SeqInput {
                slot: 0,
                tokens: &recs[0].ids,
            },
        ];
        let got = model.forward(&mut st, &batch, Logits::All).unwrap();
        let (a, b) = got.split_at(alone[1].len());
        assert_eq!(
            a,
            &alone[1][..],
            "{name} {dtype:?}: short sequence in a batch"
        );
        assert_eq!(
            b,
            &alone[0][..],
            "{name} {dtype:?}: long sequence in a batch"
        );
    }
}

/// A batch long enough that its rows cross the MLP's chunks of rows (8-bit weights) at other
/// places than each sequence's own run does: every dtype, the same bits.
#[test]
fn a_long_batch_equals_its_sequences_run_alone_in_every_dtype() {
    let lens = [150, 120, 90];
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(s, &n)| (0..n).map(|i| ((i * 37 + s * 101) % 1000) as u32).collect())
        .collect();
    for dtype in [DType::F32, DType::F16, DType::Bf16, DType::Q8] {
        let opts = gpt2::LoadOptions::new(gpt2::Device::Cpu, dtype);
        let model = Model::random(common::small_config(), 11, &opts).unwrap();
        let mut st = model.new_state(seqs.len(), 256).unwrap();
        let batch: Vec<SeqInput> = seqs
            .iter()
            .enumerate()
            .map(|(slot, t)| SeqInput { slot, tokens: t })
            .collect();
        let all = model
            .forward(&mut st, &batch, Logits::All)
            .unwrap()
            .to_vec();
        let v = model.config().vocab_size;
        let mut at = 0;
        for (s, t) in seqs.iter().enumerate() {
            let mut one = model.new_state(1, 256).unwrap();
            let alone = model
                .forward(&mut one, &[SeqInput { slot: 0, tokens: t }], Logits::All)
                .unwrap();
            let got = &all[at * v..(at + t.len()) * v];
            let same = got
                .iter()
                .zip(alone)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{dtype:?}: sequence {s} differs in the batch");
            at += t.len();
        }
    }
}

#[test]
fn chunked_prefill_then_batched_decode_equals_single_runs() {
    let name = "headdim-24";
    let model = Model::load(&fixture_dir(name)).unwrap();
    let v = model.config().vocab_size;
    let recs = recorded(name);
    let (long, short) = (&recs[0], &recs[1]);
    let mut st = model.new_state(2, model.config().n_positions).unwrap();
    // Prefill 5 tokens of each, then both step together one token at a time.
    model
        .forward(
            &mut st,
            &[
                SeqInput {
                    slot: 0,
                    tokens: &long.ids[..5],
                },
                SeqInput {
                    slot: 1,
                    tokens: &short.ids[..5],
                },
            ],
            Logits::Last,
        )
        .unwrap();
    for t in 5..short.ids.len() {
        let got = model
            .forward(
                &mut st,
                &[
                    SeqInput {
                        slot: 0,
                        tokens: &long.ids[t..t + 1],
                    },
                    SeqInput {
                        slot: 1,
                        tokens: &short.ids[t..t + 1],
                    },
                ],
                Logits::Last,
            )
            .unwrap();
        assert!(max_abs_diff(&got[..v], &long.logits[t * v..(t + 1) * v]) <= TOL);
        assert!(max_abs_diff(&got[v..], &short.logits[t * v..(t + 1) * v]) <= TOL);
    }
    // Last logits of a multi-token chunk are the last row of All.
    // Rewind slot 0 (which holds 7 tokens) to 4, then run a 16-token chunk from there.
    assert_eq!(st.len(0), short.ids.len());
    st.truncate(0, 4).unwrap();
    let got = model
        .forward(
            &mut st,
            &[SeqInput {
                slot: 0,
                tokens: &long.ids[4..20],
            }],
            Logits::Last,
        )
        .unwrap();
    assert!(max_abs_diff(got, &long.logits[19 * v..20 * v]) <= TOL);
}

/// Sequences that advance by a few tokens at a time (one attention block each, whose keys and
/// values the attention tasks store themselves), together, in both cache types.
#[test]
fn a_batch_of_short_chunks_matches_transformers() {
    for dtype in [DType::F32, DType::F16] {
        let name = "headdim-24";
        let model = Model::load_with(
            &fixture_dir(name),
            &gpt2::LoadOptions::new(gpt2::Device::Cpu, dtype),
        )
        .unwrap();
        let v = model.config().vocab_size;
        let recs = recorded(name);
        let n = recs[0].ids.len().min(recs[1].ids.len());
        let mut st = model.new_state(2, model.config().n_positions).unwrap();
        let mut worst = 0f32;
        let mut t = 0;
        for size in [3, 1, 4, 2].iter().cycle() {
            let end = (t + size).min(n);
            if t == end {
                break;
            }
            let batch = [
                SeqInput {
                    slot: 1,
                    tokens: &recs[1].ids[t..end],
                },
                SeqInput {
                    slot: 0,
                    tokens: &recs[0].ids[t..end],
                },
            ];
            let got = model.forward(&mut st, &batch, Logits::All).unwrap();
            let (a, b) = got.split_at((end - t) * v);
            worst = worst.max(max_abs_diff(a, &recs[1].logits[t * v..end * v]));
            worst = worst.max(max_abs_diff(b, &recs[0].logits[t * v..end * v]));
            t = end;
        }
        assert_eq!((st.len(0), st.len(1)), (n, n));
        // f16 rounds weights, keys and values (1.6e-2 here): a looser bound, still far below what a
        // wrong cache gives.
        let tol = if dtype == DType::F32 { TOL } else { 5e-2 };
        assert!(worst <= tol, "{dtype:?}: {worst}");
    }
}

#[test]
fn bad_batches_are_refused_and_leave_the_cache_untouched() {
    let model = Model::load(&fixture_dir("openai-f32")).unwrap();
    let n_pos = model.config().n_positions;
    let mut st = model.new_state(2, model.config().n_positions).unwrap();
    model
        .forward(
            &mut st,
            &[SeqInput {
                slot: 0,
                tokens: &[1, 2, 3],
            }],
            Logits::Last,
        )
        .unwrap();
    let too_long = vec![1u32; n_pos - 2];
    let cases: Vec<(Vec<SeqInput>, &str)> = vec![
        (
            vec![SeqInput {
                slot: 0,
                tokens: &too_long,
            }],
            "does not fit the context",
        ),
        (
            vec![SeqInput {
                slot: 2,
                tokens: &[1],
            }],
            "slot 2 does not exist",
        ),
        (
            vec![SeqInput {
                slot: 1,
                tokens: &[],
            }],
            "no tokens",
        ),
        (
            vec![SeqInput {
                slot: 1,
                tokens: &[384],
            }],
            "token id 384 is out of range",
        ),
        (
            vec![
                SeqInput {
                    slot: 1,
                    tokens: &[1],
                },
                SeqInput {
                    slot: 1,
                    tokens: &[2],
                },
            ],
            "appears twice",
        ),
    ];
    for (batch, want) in cases {
        let e = model
            .forward(&mut st, &batch, Logits::Last)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e:?} should contain {want:?}");
        assert_eq!((st.len(0), st.len(1)), (3, 0));
    }
    // Exactly filling the context is fine.
    let fill = vec![5u32; n_pos - 3];
    model
        .forward(
            &mut st,
            &[SeqInput {
                slot: 0,
                tokens: &fill,
            }],
            Logits::Last,
        )
        .unwrap();
    let e = model
        .forward(
            &mut st,
            &[SeqInput {
                slot: 0,
                tokens: &[1],
            }],
            Logits::Last,
        )
        .unwrap_err();
    assert!(e.to_string().contains(&format!(
        "{} tokens does not fit the context of {n_pos}",
        n_pos + 1
    )));
}
