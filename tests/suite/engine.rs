//! The batch engine and per-sequence outputs: each sequence of a batch gets back what it asks for
//! (nothing, its last row, all rows, its targets' log-probs), the same bits as asking alone, and
//! the engine's requests equal the library's single-purpose paths (`Generator`, `eval::score`)
//! whatever runs beside them and however their prompts are chunked.

use crate::common;

use std::sync::Arc;

use common::{fixture_dir, sampled_config};
use gpt2::generate::engine::{Engine, Request, Update};
use gpt2::generate::{Generator, Sequence};
use gpt2::{eval, Logits, Model, Rows, SeqInput, Tokenizer};

fn load() -> (Model, Tokenizer) {
    let dir = fixture_dir("full-vocab-f16");
    (
        Model::load(&dir).unwrap(),
        Tokenizer::from_dir(&dir).unwrap(),
    )
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn each_sequence_gets_the_rows_it_asks_for() {
    let (model, tok) = load();
    let v = model.config().vocab_size;
    let seqs = [
        tok.encode("The quick brown fox"),
        tok.encode("jumps over"),
        tok.encode("the lazy dog, twice"),
        tok.encode("and then some"),
    ];
    let batch: Vec<SeqInput> = seqs
        .iter()
        .enumerate()
        .map(|(slot, t)| SeqInput { slot, tokens: t })
        .collect();
    // Every row, as `Logits::All` gives it.
    let mut state = model.new_state(4, 32).unwrap();
    let all = model
        .forward(&mut state, &batch, Logits::All)
        .unwrap()
        .to_vec();
    let row = |s: usize, j: usize| {
        let start: usize = seqs[..s].iter().map(Vec::len).sum();
        &all[(start + j) * v..(start + j + 1) * v]
    };
    let targets: Vec<Option<u32>> = (1..=seqs[3].len())
        .map(|j| seqs[3].get(j).copied())
        .collect();
    let mut state = model.new_state(4, 32).unwrap();
    let (logits, lp) = model
        .forward_rows(
            &mut state,
            &batch,
            &[Rows::Last, Rows::None, Rows::All, Rows::Targets(&targets)],
        )
        .unwrap();
    let n2 = seqs[2].len();
    assert_eq!(logits.len(), (1 + n2) * v);
    assert_eq!(bits(&logits[..v]), bits(row(0, seqs[0].len() - 1)));
    for j in 0..n2 {
        assert_eq!(
            bits(&logits[(1 + j) * v..(2 + j) * v]),
            bits(row(2, j)),
            "row {j}"
        );
    }
    // The targets' log-probs: log-softmax of the same rows, bit for bit.
    assert_eq!(lp.len(), seqs[3].len() - 1);
    for (j, got) in lp.iter().enumerate() {
        let mut ls = vec![0f32; v];
        eval::log_softmax(row(3, j), &mut ls);
        let want = ls[seqs[3][j + 1] as usize];
        assert_eq!(
            (*got as f32).to_bits(),
            want.to_bits(),
            "target {j}: {got} vs {want}"
        );
    }
    // The state moved on for every sequence, whatever it asked for.
    for (s, t) in seqs.iter().enumerate() {
        assert_eq!(state.len(s), t.len());
    }
    // A selection per sequence, targets per token.
    let mut state = model.new_state(4, 32).unwrap();
    let e = model
        .forward_rows(&mut state, &batch, &[Rows::Last])
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("1 row selections for a batch of 4"),
        "{e}"
    );
    let e = model
        .forward_rows(&mut state, &batch[3..], &[Rows::Targets(&targets[..1])])
        .err()
        .unwrap();
    assert!(e.to_string().contains("1 targets for 3 new tokens"), "{e}");
}

#[test]
fn requests_equal_their_lone_runs_whatever_runs_beside_them() {
    let (model, tok) = load();
    let prompts = [
        tok.encode("It was the best of times, it was the worst of times"),
        tok.encode("Call me"),
        tok.encode("In a hole in the ground there lived"),
    ];
    // Alone: the Generator, one prompt at a time.
    let alone: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Generator::new(
                &model,
                &tok,
                std::slice::from_ref(p),
                &sampled_config(i as u64, 12),
            )
            .unwrap()
            .run(|_| {})
            .unwrap()
            .remove(0)
        })
        .collect();
    let scored = eval::score(&model, &prompts[0]).unwrap();

    // Together on 2 slots with 5-token prompt chunks: a prompt-only request for the first
    // prompt's log-probs (targets only), then the three generations, which wait for slots.
    let state = model.new_state(2, 64).unwrap();
    let mut engine: Engine<usize> = Engine::new(state, 5);
    engine
        .submit(Request {
            tag: 99,
            prompt: prompts[0].clone(),
            seq: None,
            prompt_logprobs: Some(0),
            logprobs: None,
            logit_bias: Arc::new(Vec::new()),
        })
        .unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let seq = Sequence::new(model.config(), p.clone(), sampled_config(i as u64, 12)).unwrap();
        engine.submit(Request::generate(i, seq)).unwrap();
    }
    let mut got = [None, None, None];
    let mut prompt_lp = None;
    let mut steps = 0;
    while !engine.is_idle() {
        assert!(engine.running() <= 2);
        for u in engine.step(&model, &tok) {
            match u {
                Update::Prefilled {
                    tag: 99, logprobs, ..
                } => prompt_lp = logprobs,
                Update::Retired { tag, seq: Some(s) } => got[tag] = Some(s.into_generation()),
                Update::Failed { error, .. } => panic!("{error}"),
                _ => {}
            }
        }
        steps += 1;
        assert!(steps < 200, "the engine does not finish");
    }
    for (i, (g, a)) in got.iter().zip(&alone).enumerate() {
        let g = g.as_ref().unwrap();
        assert_eq!(g.tokens, a.tokens, "prompt {i}");
        assert_eq!(bits(&g.logprobs), bits(&a.logprobs), "prompt {i}");
        assert_eq!(g.text, a.text, "prompt {i}");
    }
    // The prompt's log-probs in chunks of 5, as targets: `eval::score`'s values.
    let lp = prompt_lp.expect("prompt log-probs");
    assert_eq!(lp.len(), prompts[0].len());
    assert_eq!(lp[0].logprob, None);
    for (j, (l, s)) in lp[1..].iter().zip(&scored).enumerate() {
        assert_eq!(l.token, prompts[0][j + 1]);
        assert_eq!(l.logprob.unwrap().to_bits(), s.to_bits(), "token {}", j + 1);
    }
}

#[test]
fn prompt_log_probs_with_alternatives_equal_targets_alone() {
    let (model, tok) = load();
    let prompt = tok.encode("Four score and seven years ago our fathers");
    let run = |top: usize, chunk: usize| {
        let mut engine: Engine<()> = Engine::new(model.new_state(1, 64).unwrap(), chunk);
        engine
            .submit(Request {
                tag: (),
                prompt: prompt.clone(),
                seq: None,
                prompt_logprobs: Some(top),
                logprobs: None,
                logit_bias: Arc::new(Vec::new()),
            })
            .unwrap();
        let mut out = None;
        while !engine.is_idle() {
            for u in engine.step(&model, &tok) {
                if let Update::Prefilled { logprobs, .. } = u {
                    out = logprobs;
                }
            }
        }
        out.unwrap()
    };
    let (targets, with_top, whole) = (run(0, 3), run(2, 4), run(0, usize::MAX));
    assert_eq!(targets.len(), prompt.len());
    for ((a, b), c) in targets.iter().zip(&with_top).zip(&whole) {
        assert_eq!(a.logprob.map(f32::to_bits), b.logprob.map(f32::to_bits));
        assert_eq!(a.logprob.map(f32::to_bits), c.logprob.map(f32::to_bits));
        assert!(a.top.is_empty());
    }
    assert!(with_top[1..].iter().all(|t| t.top.len() == 2));
}
