//! `gpt2 serve`'s prefix cache under concurrent load: multiple-choice questions (echo with
//! log-probs and alternatives, as lm-evaluation-harness sends them), a conversation resent each
//! turn, and `n` samples of one prompt get the same replies with the cache as with
//! `--no-prefix-cache`; /metrics and `usage` say what the cache gave.

use crate::common;

use std::thread;

use common::server::Server;
use serde_json::{json, Value};

/// The requests, in the order their client sends them.
fn requests() -> Vec<(&'static str, Value)> {
    let context = "The committee met on a cold Tuesday morning to decide, after a long and heated \
                   debate about budgets and schedules, which of the proposals";
    let mut out = Vec::new();
    for q in 0..3 {
        for ending in [" would win.", " was best.", " they liked.", " failed."] {
            out.push((
                "/v1/completions",
                json!({"prompt": format!("{q}. {context}{ending}"), "max_tokens": 0,
                       "echo": true, "logprobs": 2, "temperature": 0}),
            ));
        }
    }
    let mut messages = vec![json!({"role": "user", "content": "a story"})];
    for turn in 0..3 {
        out.push((
            "/v1/chat/completions",
            json!({"messages": messages.clone(), "max_tokens": 4, "seed": turn,
                   "temperature": 0.8, "logprobs": true, "top_logprobs": 1}),
        ));
        messages.push(json!({"role": "assistant", "content": format!(" a fox ran {turn}")}));
        messages.push(json!({"role": "user", "content": "more"}));
    }
    out.push((
        "/v1/completions",
        json!({"prompt": "Once upon a time, in a land far away beyond the hills and the sea, there lived a king who",
               "max_tokens": 5, "n": 3, "seed": 7, "temperature": 0.9, "logprobs": 1, "echo": true}),
    ));
    out
}

/// Each request's reply without the parts that differ run to run, and its cached tokens: four
/// clients take the requests in turn.
fn run(server: &Server) -> Vec<(Value, u64)> {
    let reqs = requests();
    let mut replies: Vec<Option<(Value, u64)>> = vec![None; reqs.len()];
    thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|c| {
                let reqs = &reqs;
                s.spawn(move || {
                    let mut got = Vec::new();
                    for (i, (path, body)) in reqs.iter().enumerate().skip(c).step_by(4) {
                        let (status, v) = server.post(path, body);
                        assert_eq!(status, 200, "{body} → {v}");
                        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
                            .as_u64()
                            .expect("usage.prompt_tokens_details.cached_tokens");
                        got.push((i, (v["choices"].clone(), cached)));
                    }
                    got
                })
            })
            .collect();
        for h in handles {
            for (i, r) in h.join().unwrap() {
                replies[i] = Some(r);
            }
        }
    });
    replies.into_iter().map(Option::unwrap).collect()
}

#[test]
fn the_cache_changes_no_reply_under_load() {
    let warm = Server::fixture(&["--parallel", "3", "--prefill-chunk", "7"]);
    let cold = Server::fixture(&[
        "--parallel",
        "3",
        "--prefill-chunk",
        "7",
        "--no-prefix-cache",
    ]);
    // Twice on the warm server: the second time every prompt is cached.
    let (w1, w2, c) = (run(&warm), run(&warm), run(&cold));
    for (i, ((a, b), c)) in w1.iter().zip(&w2).zip(&c).enumerate() {
        assert_eq!(a.0, c.0, "request {i}: first warm run vs no cache");
        assert_eq!(b.0, c.0, "request {i}: second warm run vs no cache");
        assert_eq!(c.1, 0, "request {i}: nothing cached without the cache");
    }
    assert!(
        w2.iter().all(|r| r.1 > 0),
        "{:?}",
        w2.iter().map(|r| r.1).collect::<Vec<_>>()
    );
    // Embedded tokens count too: as misses.
    let (s, e) = warm.post(
        "/v1/embeddings",
        &json!({"input": ["an embedded text", "and another"]}),
    );
    assert_eq!(s, 200, "{e}");
    let hits = warm.metric("gpt2_prefix_cache_hit_tokens_total");
    let misses = warm.metric("gpt2_prefix_cache_miss_tokens_total");
    let prompt = warm.metric("gpt2_prompt_tokens_total");
    assert!(
        hits > 0.0 && hits + misses == prompt,
        "{hits} + {misses} vs {prompt}"
    );
    assert_eq!(cold.metric("gpt2_prefix_cache_hit_tokens_total"), 0.0);
    assert_eq!(
        cold.metric("gpt2_prefix_cache_miss_tokens_total"),
        cold.metric("gpt2_prompt_tokens_total")
    );
}

#[test]
fn a_cache_of_no_tokens_still_shares_running_prefixes() {
    // --cache-tokens 0: nothing stays once a request ends, but requests running together share.
    let server = Server::fixture(&["--parallel", "4", "--cache-tokens", "0"]);
    let cold = Server::fixture(&["--parallel", "4", "--no-prefix-cache"]);
    let body = json!({"prompt": "Once upon a time, in a land far away beyond the hills and the sea, there lived a king who",
                      "max_tokens": 4, "n": 4, "seed": 3, "temperature": 1.0, "logprobs": 1});
    let (s, a) = server.post("/v1/completions", &body);
    assert_eq!(s, 200);
    let (_, b) = cold.post("/v1/completions", &body);
    assert_eq!(a["choices"], b["choices"]);
    let hits = server.metric("gpt2_prefix_cache_hit_tokens_total");
    assert!(hits > 0.0, "the samples shared their prompt: {hits}");
    // The same request again: nothing was kept.
    let (_, again) = server.post("/v1/completions", &body);
    assert_eq!(again["choices"], b["choices"]);
    assert_eq!(
        server.metric("gpt2_prefix_cache_hit_tokens_total"),
        2.0 * hits
    );
}
