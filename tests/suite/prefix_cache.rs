//! The engine's prefix cache: requests that share prefixes with running or finished ones reuse
//! their keys, values and prompt log-probs, and get the same bits as with no cache at all
//! (arriving together or one after another, with prompt log-probs of any width, through
//! eviction).

use crate::common;

use std::sync::Arc;

use common::{fixture_dir, sampled_config};
use gpt2::generate::engine::{Engine, Request, TokenLogprob, Update};
use gpt2::generate::Sequence;
use gpt2::{DType, Model, Tokenizer};

/// The full-vocabulary fixture with f16 weights (an f16 KV cache) or in f32 (an f32 one).
fn load(dtype: DType) -> (Model, Tokenizer) {
    let dir = fixture_dir("full-vocab-f16");
    let model = Model::load(&dir).unwrap();
    (
        model.to_dtype(dtype).unwrap(),
        Tokenizer::from_dir(&dir).unwrap(),
    )
}

/// What a request got back: prompt log-probs, generated tokens and their log-probs' bits, text,
/// and how many prompt tokens came from the cache.
#[derive(Debug, Default, Clone)]
struct Got {
    prompt_lp: Option<Vec<TokenLogprob>>,
    tokens: Vec<u32>,
    logprobs: Vec<u32>,
    text: String,
    cached: usize,
}

/// A prompt log-prob's bits: token, log-prob, alternatives, rank.
type LpBits = (u32, Option<u32>, Vec<(u32, u32)>, Option<u32>);

/// Bits of prompt log-probs, with their alternatives (and ranks where the row was at hand).
fn lp_bits(lp: &[TokenLogprob]) -> Vec<LpBits> {
    lp.iter()
        .map(|l| {
            (
                l.token,
                l.logprob.map(f32::to_bits),
                l.top.iter().map(|&(t, v)| (t, v.to_bits())).collect(),
                l.rank,
            )
        })
        .collect()
}

#[derive(Clone)]
struct Job {
    prompt: Vec<u32>,
    /// Generated tokens (0: prompt only).
    max_new: usize,
    prompt_logprobs: Option<usize>,
    seed: u64,
    /// The step it is submitted before.
    at: usize,
}

/// Run `jobs` on `engine`, each submitted before its step.
fn run(model: &Model, tok: &Tokenizer, mut engine: Engine<usize>, jobs: &[Job]) -> Vec<Got> {
    let mut got = vec![Got::default(); jobs.len()];
    let mut step = 0;
    loop {
        for (i, j) in jobs.iter().enumerate().filter(|(_, j)| j.at == step) {
            let seq = (j.max_new > 0).then(|| {
                Sequence::new(
                    model.config(),
                    j.prompt.clone(),
                    sampled_config(j.seed, j.max_new),
                )
                .unwrap()
            });
            engine
                .submit(Request {
                    tag: i,
                    prompt: j.prompt.clone(),
                    seq,
                    prompt_logprobs: j.prompt_logprobs,
                    logprobs: None,
                    logit_bias: Arc::new(Vec::new()),
                })
                .unwrap();
        }
        if engine.is_idle() && jobs.iter().all(|j| j.at <= step) {
            return got;
        }
        for u in engine.step(model, tok) {
            match u {
                Update::Prefilled {
                    tag,
                    logprobs,
                    cached_tokens,
                    ..
                } => {
                    got[tag].prompt_lp = logprobs;
                    got[tag].cached = cached_tokens;
                }
                Update::Token { tag, event, .. } => {
                    got[tag].tokens.push(event.token);
                    got[tag].logprobs.push(event.logprob.to_bits());
                    got[tag].text.push_str(&event.text);
                }
                Update::Failed { error, .. } => panic!("{error}"),
                _ => {}
            }
        }
        step += 1;
        assert!(step < 1000, "the engine does not finish");
    }
}

fn assert_same(cold: &[Got], warm: &[Got]) {
    for (i, (c, w)) in cold.iter().zip(warm).enumerate() {
        assert_eq!(c.tokens, w.tokens, "request {i}: tokens");
        assert_eq!(c.logprobs, w.logprobs, "request {i}: log-probs");
        assert_eq!(c.text, w.text, "request {i}: text");
        match (&c.prompt_lp, &w.prompt_lp) {
            (Some(a), Some(b)) => {
                assert_eq!(lp_bits(a), lp_bits(b), "request {i}: prompt log-probs")
            }
            (a, b) => assert_eq!(a.is_some(), b.is_some(), "request {i}"),
        }
    }
}

/// Multiple-choice questions (a shared context, several endings, echo log-probs, as
/// lm-evaluation-harness sends them) and a conversation resent turn by turn.
fn jobs(tok: &Tokenizer) -> Vec<Job> {
    let context = "The committee met on a cold Tuesday morning to decide, after a long and heated \
                   debate about budgets and schedules, which of the proposals";
    let mut jobs = Vec::new();
    for (q, at) in [(0, 0), (1, 3)] {
        for (a, ending) in [" would win.", " was best.", " they liked.", " failed."]
            .iter()
            .enumerate()
        {
            jobs.push(Job {
                prompt: tok.encode(&format!("{q}. {context}{ending}")),
                max_new: 0,
                // Different widths: an entry computed with more alternatives serves fewer.
                prompt_logprobs: Some([2, 0, 1, 2][a]),
                seed: 0,
                at: at + a / 2,
            });
        }
    }
    let mut history = String::from("User: a story\nAssistant:");
    for turn in 0..4 {
        history.push_str(&format!(" a fox ran {turn}\nUser: more\nAssistant:"));
        jobs.push(Job {
            prompt: tok.encode(&history),
            max_new: 6,
            prompt_logprobs: None,
            seed: turn,
            at: 6 + 12 * turn as usize,
        });
    }
    // The same prompt sampled four ways at once (`n` = 4), with its log-probs.
    for seed in 0..4 {
        jobs.push(Job {
            prompt: tok.encode("Once upon a time, in a land far away beyond the hills and the sea, there lived a king who"),
            max_new: 5,
            prompt_logprobs: Some(1),
            seed,
            at: 60,
        });
    }
    jobs
}

#[test]
fn cached_prefixes_give_the_same_bits_as_none() {
    for fixture in [DType::F32, DType::F16] {
        let (model, tok) = load(fixture);
        let jobs = jobs(&tok);
        let cap = model.config().n_positions;
        let cold = run(
            &model,
            &tok,
            Engine::new(model.new_state(3, cap).unwrap(), 7),
            &jobs,
        );
        let state = model.new_state(6, cap).unwrap();
        let warm = run(
            &model,
            &tok,
            Engine::with_prefix_cache(state, 7, 3, 4 * cap),
            &jobs,
        );
        assert_same(&cold, &warm);
        assert!(cold.iter().all(|g| g.cached == 0));
        // Every multiple-choice ending after the first reuses its question's context, every turn
        // after the first the conversation so far, every sample after the first the prompt.
        let reused: Vec<bool> = warm.iter().map(|g| g.cached > 0).collect();
        assert_eq!(
            reused,
            [false, true, true, true, false, true, true, true]
                .into_iter()
                .chain([false, true, true, true])
                .chain([false, true, true, true])
                .collect::<Vec<_>>(),
            "{fixture:?}: which requests reused a prefix"
        );
        // A whole prompt but its last token, when its log-probs are all held.
        let sample = &warm[12 + 1];
        assert_eq!(sample.cached, jobs[13].prompt.len() - 1, "{fixture:?}");
    }
}

#[test]
fn a_request_waits_only_for_a_prefill_it_can_reuse() {
    let (model, tok) = load(DType::F32);
    let cap = model.config().n_positions;
    let prompt = tok.encode(&"the same long context of many words ".repeat(6));
    let request = |tag, prompt_logprobs| Request {
        tag,
        prompt: prompt.clone(),
        seq: None,
        prompt_logprobs,
        logprobs: None,
        logit_bias: Arc::new(Vec::new()),
    };
    // (the prefilling request's prompt log-probs, the newcomer's, whether the newcomer waits)
    for (first, second, waits) in [
        (None, None, true),
        (Some(2), Some(1), true),
        (None, Some(0), false),
        (Some(1), Some(2), false),
    ] {
        let mut engine = Engine::with_prefix_cache(model.new_state(4, cap).unwrap(), 8, 2, cap);
        engine.submit(request(0, first)).unwrap();
        engine.step(&model, &tok);
        engine.submit(request(1, second)).unwrap();
        engine.step(&model, &tok);
        assert_eq!(
            engine.waiting(),
            usize::from(waits),
            "{first:?} prefilling, {second:?} arriving"
        );
    }
}

#[test]
fn eviction_keeps_the_budget_and_the_results() {
    let (model, tok) = load(DType::F32);
    let cap = model.config().n_positions;
    let a = tok.encode("Alpha beta gamma delta epsilon zeta eta theta iota kappa");
    let b = tok.encode("One two three four five six seven eight nine ten eleven");
    let job = |prompt: &Vec<u32>, extra: &str, at: usize| Job {
        prompt: [prompt.clone(), tok.encode(extra)].concat(),
        max_new: 3,
        prompt_logprobs: Some(1),
        seed: at as u64,
        at,
    };
    // a, then b (a's entry is least recently used, and goes: the budget holds one), then a again.
    let jobs = vec![
        job(&a, " lambda", 0),
        job(&b, " twelve", 10),
        job(&a, " mu", 20),
        job(&b, " thirteen", 30),
    ];
    let budget = a.len() + 4;
    let cold = run(
        &model,
        &tok,
        Engine::new(model.new_state(1, cap).unwrap(), 64),
        &jobs,
    );
    let warm = run(
        &model,
        &tok,
        Engine::with_prefix_cache(model.new_state(3, cap).unwrap(), 64, 1, budget),
        &jobs,
    );
    assert_same(&cold, &warm);
    assert_eq!(
        warm.iter().map(|g| g.cached).collect::<Vec<_>>(),
        [0, 0, 0, 0]
    );
    // With room for both, the second a and b reuse their first runs.
    let roomy = run(
        &model,
        &tok,
        Engine::with_prefix_cache(model.new_state(3, cap).unwrap(), 64, 1, 4 * cap),
        &jobs,
    );
    assert_same(&cold, &roomy);
    let cached: Vec<usize> = roomy.iter().map(|g| g.cached).collect();
    assert_eq!(cached[..2], [0, 0]);
    assert!(
        cached[2] >= a.len() - 1 && cached[3] >= b.len() - 1,
        "{cached:?}"
    );
}
