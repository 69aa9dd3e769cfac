//! Evaluation against transformers: next-token top-k, per-token log-probabilities and strided
//! perplexity at stride = context and stride = context / 2, on every fixture.

use crate::common;

use common::{fixture_dir, recorded, reference_ids, reference_tensor, MODEL_FIXTURES};
use gpt2::{eval, DType, Logits, Model, SeqInput};

#[test]
fn top_k_matches_transformers() {
    for name in MODEL_FIXTURES {
        let model = Model::load(&fixture_dir(name)).unwrap();
        let prompt = &recorded(name)[1].ids;
        let got = eval::top_k(&model, prompt, 10).unwrap();
        let (want_ids, want_lp) = (
            reference_ids(name, "top.ids"),
            reference_tensor(name, "top.logprobs"),
        );
        let ids: Vec<u32> = got.iter().map(|g| g.0).collect();
        assert_eq!(ids, want_ids, "{name}");
        let worst = got
            .iter()
            .zip(&want_lp)
            .map(|(g, w)| (g.1 as f64 - w).abs())
            .fold(0.0, f64::max);
        eprintln!("{name:>16}: top-10 max |Δ logprob| = {worst:.2e}");
        assert!(worst <= 1e-4, "{name}: {worst}");
    }
}

#[test]
fn score_matches_transformers() {
    for name in MODEL_FIXTURES {
        let model = Model::load(&fixture_dir(name)).unwrap();
        let ids = reference_ids(name, "score.ids");
        let got = eval::score(&model, &ids).unwrap();
        let want = reference_tensor(name, "score.logprobs");
        assert_eq!(got.len(), ids.len() - 1);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "{name:>16}: score ({} tokens) max |Δ logprob| = {worst:.2e}",
            ids.len()
        );
        assert!(worst <= 1e-4, "{name}: {worst}");
    }
}

#[test]
fn strided_perplexity_matches_transformers() {
    for name in MODEL_FIXTURES {
        let model = Model::load(&fixture_dir(name)).unwrap();
        let ids = reference_ids(name, "ppl.ids");
        let context = model.config().n_positions;
        assert!(ids.len() > 3 * context);
        for stride in [context, context / 2] {
            let want = reference_tensor(name, &format!("ppl.stride{stride}"));
            for batch in [1, 3] {
                let mut calls = 0;
                let got = eval::perplexity(&model, &ids, context, stride, batch, |_, _| calls += 1)
                    .unwrap();
                let rel = (got.perplexity - want[2]).abs() / want[2];
                if batch == 1 {
                    eprintln!(
                        "{name:>16}: perplexity context {context} stride {stride:>2}: {:.6} vs {:.6}, rel Δ {rel:.2e}, scored {}",
                        got.perplexity, want[2], got.scored
                    );
                }
                assert_eq!(
                    (got.tokens, got.scored as f64),
                    (ids.len(), want[1]),
                    "{name} stride {stride}"
                );
                assert!(rel <= 1e-5, "{name} stride {stride} batch {batch}: {rel}");
                assert!((got.nll - want[0]).abs() <= 1e-5 * want[0], "{name}");
                assert!(calls > 1);
            }
        }
    }
}

#[test]
fn bad_evaluation_input_is_refused() {
    let model = Model::load(&fixture_dir("openai-f32")).unwrap();
    let ids: Vec<u32> = (0..100).collect();
    let err = |r: Result<eval::Perplexity, gpt2::Error>| r.unwrap_err().to_string();
    assert!(err(eval::perplexity(&model, &ids, 32, 0, 1, |_, _| {}))
        .contains("stride 0 must be between 1 and the context (32)"));
    assert!(err(eval::perplexity(&model, &ids, 32, 33, 1, |_, _| {})).contains("stride 33"));
    assert!(err(eval::perplexity(&model, &ids, 33, 8, 1, |_, _| {}))
        .contains("context 33 must be between 2 and the model's 32"));
    assert!(
        err(eval::perplexity(&model, &ids[..1], 32, 8, 1, |_, _| {})).contains("at least 2 tokens")
    );
    assert!(
        err(eval::perplexity(&model, &[1, 999], 32, 8, 1, |_, _| {}))
            .contains("token 1 has id 999")
    );
    assert!(eval::score(&model, &[5])
        .unwrap_err()
        .to_string()
        .contains("at least 2 tokens"));
    assert!(eval::score(&model, &ids)
        .unwrap_err()
        .to_string()
        .contains("more than the context of 32"));
    assert!(eval::top_k(&model, &[], 5)
        .unwrap_err()
        .to_string()
        .contains("no tokens"));
}

/// `forward_logprobs` (the unembedding reduced as it is computed, rows without a target skipped)
/// gives the bits of `log_softmax` over `forward`'s logits, in every format, for a batch of two
/// sequences; a vocabulary of whole panels and one with a short last panel.
#[test]
fn forward_logprobs_equal_log_softmax_of_the_logits() {
    for name in ["openai-f32", "full-vocab-f16"] {
        let base = Model::load(&fixture_dir(name)).unwrap();
        let v = base.config().vocab_size;
        let ids = reference_ids(name, "score.ids");
        let (a, b) = (&ids[..ids.len().min(20)], &ids[3..ids.len().min(12)]);
        let batch = [
            SeqInput { slot: 0, tokens: a },
            SeqInput { slot: 1, tokens: b },
        ];
        let rows = a.len() + b.len();
        // Every third row without a target; targets anywhere in the vocabulary, the last id too.
        let mut targets: Vec<Option<u32>> = (0..rows)
            .map(|r| (r % 3 != 1).then_some(((r * 7919) % v) as u32))
            .collect();
        targets[0] = Some(v as u32 - 1);
        for dtype in DType::ALL {
            let model = base.to_dtype(dtype).unwrap();
            let mut st = model.new_state(2, 32).unwrap();
            let got = model.forward_logprobs(&mut st, &batch, &targets).unwrap();
            let mut st = model.new_state(2, 32).unwrap();
            let logits = model
                .forward(&mut st, &batch, Logits::All)
                .unwrap()
                .to_vec();
            let mut want = Vec::new();
            let mut row = vec![0.0; v];
            for (l, t) in logits.chunks_exact(v).zip(&targets) {
                if let Some(t) = *t {
                    eval::log_softmax(l, &mut row);
                    want.push(row[t as usize].to_bits());
                }
            }
            let got: Vec<u32> = got.iter().map(|&l| (l as f32).to_bits()).collect();
            assert_eq!(got, want, "{name} {dtype:?}");
        }
        let mut st = base.new_state(2, 32).unwrap();
        let err = |t: &[Option<u32>], st: &mut gpt2::State| {
            base.forward_logprobs(st, &batch, t)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&targets[1..], &mut st).contains("targets for a batch of"));
        let mut bad = targets.clone();
        bad[4] = Some(v as u32);
        assert!(err(&bad, &mut st).contains("target 4 is"));
        // Refused before any work: the state is still empty.
        assert!(st.is_empty(0) && st.is_empty(1));
    }
}
