//! vLLM's request fields on `gpt2 serve` (stop_token_ids, min_tokens, include_stop_str_in_output,
//! skip_special_tokens, truncate_prompt_tokens, no_repeat_ngram_size, prompt_logprobs,
//! use_beam_search): each changes the reply as the library does alone, or is a 400 naming it.

use crate::common;

use common::server::{Server, FIXTURE};

use gpt2::generate::beam::beam_search;
use gpt2::generate::{Generation, GenerationConfig, Generator};
use gpt2::sampling::SamplingParams;
use gpt2::{Model, Tokenizer};
use serde_json::{json, Value};

fn load() -> (Model, Tokenizer) {
    let dir = common::fixture_dir(FIXTURE);
    (
        Model::load(&dir).unwrap(),
        Tokenizer::from_dir(&dir).unwrap(),
    )
}

fn alone(model: &Model, tok: &Tokenizer, prompt: &str, cfg: GenerationConfig) -> Generation {
    Generator::new(model, tok, &[tok.encode(prompt)], &cfg)
        .unwrap()
        .run(|_| {})
        .unwrap()
        .remove(0)
}

fn greedy(max: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: max,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    }
}

fn completion(server: &Server, body: Value) -> Value {
    let (s, v) = server.post("/v1/completions", &body);
    assert_eq!(s, 200, "{body} → {v}");
    v
}

fn finish(g: &Generation) -> &'static str {
    match g.finish_reason {
        gpt2::generate::FinishReason::Length => "length",
        _ => "stop",
    }
}

#[test]
fn stop_tokens_min_tokens_and_stop_strings_as_the_library() {
    let (model, tok) = load();
    let server = Server::fixture(&[]);
    let prompt = "The history of the tower";
    let plain = alone(&model, &tok, prompt, greedy(12));
    // A token first generated at position k ≥ 1.
    let k = (1..plain.tokens.len())
        .find(|&i| !plain.tokens[..i].contains(&plain.tokens[i]))
        .unwrap();
    let third = plain.tokens[k];
    // stop_token_ids: that token ends the reply, without its text.
    let cfg = GenerationConfig {
        stop_token_ids: vec![third],
        ..greedy(12)
    };
    let want = alone(&model, &tok, prompt, cfg);
    assert_eq!(want.tokens.len(), k + 1);
    let v = completion(
        &server,
        json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop_token_ids": [third]}),
    );
    assert_eq!(v["choices"][0]["text"], want.text);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], k + 1);
    // min_tokens: the first token as a stop token cannot end the reply before 4 tokens.
    let first = plain.tokens[0];
    let cfg = GenerationConfig {
        stop_token_ids: vec![first],
        min_tokens: 4,
        ..greedy(12)
    };
    let want = alone(&model, &tok, prompt, cfg);
    assert!(want.tokens.len() >= 4 && !want.tokens[..4].contains(&first));
    let v = completion(
        &server,
        json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop_token_ids": [first], "min_tokens": 4}),
    );
    assert_eq!(v["choices"][0]["text"], want.text);
    assert_eq!(v["choices"][0]["finish_reason"], finish(&want));
    // include_stop_str_in_output keeps the stop string.
    let stop: String = plain.text.chars().skip(3).take(3).collect();
    let v = completion(
        &server,
        json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": [stop], "include_stop_str_in_output": true}),
    );
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(
        text.ends_with(&stop) && plain.text.starts_with(text),
        "{text:?} {stop:?}"
    );
    let v = completion(
        &server,
        json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": [stop]}),
    );
    assert_eq!(
        format!("{}{stop}", v["choices"][0]["text"].as_str().unwrap()),
        text
    );
}

#[test]
fn special_tokens_truncation_and_ngrams_as_the_library() {
    let (model, tok) = load();
    let server = Server::fixture(&[]);
    // Every token <|endoftext|> (biased), kept going: shown or skipped.
    let body = |skip: bool| json!({"prompt": "Hi", "max_tokens": 3, "temperature": 0, "ignore_eos": true, "logit_bias": {"50256": 100}, "skip_special_tokens": skip});
    let shown = completion(&server, body(false));
    assert_eq!(
        shown["choices"][0]["text"],
        "<|endoftext|><|endoftext|><|endoftext|>"
    );
    let skipped = completion(&server, body(true));
    assert_eq!(skipped["choices"][0]["text"], "");
    assert_eq!(skipped["usage"]["completion_tokens"], 3);
    // truncate_prompt_tokens keeps the last k tokens.
    let prompt = "one two three four five six seven eight nine ten";
    let ids = tok.encode(prompt);
    let kept = tok.decode(&ids[ids.len() - 4..]).unwrap();
    let want = alone(&model, &tok, &kept, greedy(8));
    let v = completion(
        &server,
        json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "truncate_prompt_tokens": 4}),
    );
    assert_eq!(v["choices"][0]["text"], want.text);
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    // no_repeat_ngram_size.
    let cfg = GenerationConfig {
        sampling: SamplingParams {
            no_repeat_ngram_size: 2,
            ..SamplingParams::greedy()
        },
        ..greedy(30)
    };
    let want = alone(&model, &tok, "la la la la", cfg);
    let v = completion(
        &server,
        json!({"prompt": "la la la la", "max_tokens": 30, "temperature": 0, "no_repeat_ngram_size": 2}),
    );
    assert_eq!(v["choices"][0]["text"], want.text);
}

#[test]
fn chat_fields_that_would_change_the_reply_are_refused_not_ignored() {
    let server = Server::fixture(&[]);
    let msgs = json!([{"role": "user", "content": "Hi"}]);
    for (field, value) in [
        ("echo", json!(true)),
        ("add_generation_prompt", json!(false)),
        ("continue_final_message", json!(true)),
        ("chat_template", json!("{{ messages }}")),
        ("chat_template_kwargs", json!({"x": 1})),
        ("documents", json!([{"text": "d"}])),
        ("allowed_token_ids", json!([13])),
    ] {
        let body = json!({"messages": msgs, "max_tokens": 2, field: value});
        let (s, v) = server.post("/v1/chat/completions", &body);
        assert_eq!(s, 400, "{body} → {v}");
        assert_eq!(v["error"]["param"], field, "{body} → {v}");
    }
    // The values that change nothing pass, on both endpoints.
    let body = json!({"messages": msgs, "max_tokens": 2, "echo": false, "add_generation_prompt": true,
                      "continue_final_message": false, "documents": [], "allowed_token_ids": null});
    let (s, v) = server.post("/v1/chat/completions", &body);
    assert_eq!(s, 200, "{body} → {v}");
    let body = json!({"prompt": "Hi", "max_tokens": 2, "bad_words": [], "return_tokens_as_token_ids": false});
    let (s, v) = server.post("/v1/completions", &body);
    assert_eq!(s, 200, "{body} → {v}");
    // llama-server's json_object with a schema constrains to the schema.
    let v = completion(
        &server,
        json!({"prompt": "Numbers:", "max_tokens": 12, "temperature": 0,
               "response_format": {"type": "json_object", "schema": {"type": "array", "items": {"type": "integer"}}}}),
    );
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.trim_start().starts_with('['), "{text:?}");
}

#[test]
fn logit_bias_changes_the_choice_not_the_log_probs() {
    let (_, tok) = load();
    let server = Server::fixture(&[]);
    let eot = 50256u32;
    let v = completion(
        &server,
        json!({"prompt": "Hi", "max_tokens": 3, "temperature": 0, "ignore_eos": true, "logprobs": 1,
               "logit_bias": {eot.to_string(): 100}}),
    );
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(
        lp["tokens"],
        json!(["<|endoftext|>", "<|endoftext|>", "<|endoftext|>"])
    );
    // The raw model's log-probs of those tokens: the same ids as a prompt, scored (echo).
    let mut ids = tok.encode("Hi");
    let n = ids.len();
    ids.extend([eot; 3]);
    let echo = completion(
        &server,
        json!({"prompt": ids, "max_tokens": 0, "echo": true, "logprobs": 0}),
    );
    let raw = &echo["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()[n..];
    assert_eq!(lp["token_logprobs"].as_array().unwrap(), raw);
    // The bias made them certain choices; their log-probs are far from 0.
    assert!(raw.iter().all(|x| x.as_f64().unwrap() < -1.0), "{raw:?}");
    // The chosen token's own entry among the alternatives agrees.
    for (t, top) in lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lp["top_logprobs"].as_array().unwrap())
    {
        if let Some(x) = top.get("<|endoftext|>") {
            assert_eq!(x, t);
        }
    }
}

#[test]
fn prompt_logprobs_carry_log_probs_and_ranks() {
    let (model, tok) = load();
    let server = Server::fixture(&[]);
    let prompt = "The quick brown fox jumps";
    let ids = tok.encode(prompt);
    let v = completion(
        &server,
        json!({"prompt": prompt, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 2}),
    );
    let entries = v["choices"][0]["prompt_logprobs"].as_array().unwrap();
    assert_eq!(entries.len(), ids.len());
    assert!(entries[0].is_null());
    assert!(!v["choices"][0]["text"].as_str().unwrap().is_empty());
    let want = gpt2::eval::score(&model, &ids).unwrap();
    let logits = common::logits_alone(&model, &ids);
    let v_size = model.config().vocab_size;
    for (i, e) in entries.iter().enumerate().skip(1) {
        let m = e.as_object().unwrap();
        assert!(m.len() >= 2 && m.len() <= 3, "{e}");
        let own = &m[&ids[i].to_string()];
        assert_eq!(own["logprob"].as_f64().unwrap() as f32, want[i - 1]);
        let row = &logits[(i - 1) * v_size..i * v_size];
        let rank = 1 + row.iter().filter(|&&x| x > row[ids[i] as usize]).count();
        assert_eq!(own["rank"], rank, "{e}");
        assert_eq!(
            own["decoded_token"],
            String::from_utf8_lossy(tok.token_bytes(ids[i]).unwrap()).as_ref()
        );
    }
    // Beside echo with logprobs: each keeps its own number of alternatives.
    let v = completion(
        &server,
        json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 1, "prompt_logprobs": 3}),
    );
    let c = &v["choices"][0];
    assert_eq!(c["text"], prompt);
    assert!(c["logprobs"]["top_logprobs"][1].as_object().unwrap().len() == 1);
    assert!(c["prompt_logprobs"][1].as_object().unwrap().len() >= 3);
}

#[test]
fn beam_search_equals_the_librarys() {
    let (model, tok) = load();
    let server = Server::fixture(&[]);
    let prompt = "In 1957, a broadcasting aerial";
    let cfg = GenerationConfig {
        num_beams: 3,
        num_return_sequences: 2,
        length_penalty: 0.8,
        ..greedy(10)
    };
    let want = beam_search(&model, &tok, &tok.encode(prompt), &cfg).unwrap();
    let v = completion(
        &server,
        json!({"prompt": prompt, "max_tokens": 10, "use_beam_search": true, "n": 2, "best_of": 3, "length_penalty": 0.8, "temperature": 0}),
    );
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (c, w) in choices.iter().zip(&want) {
        assert_eq!(c["text"], w.text);
        assert_eq!(c["finish_reason"], finish(w));
    }
    let tokens: usize = want.iter().map(|g| g.tokens.len()).sum();
    assert_eq!(v["usage"]["completion_tokens"], tokens);
}

#[test]
fn fields_that_do_not_apply_are_400s_naming_them() {
    let server = Server::fixture(&[]);
    for (body, param, needle) in [
        (
            json!({"prompt": "x", "length_penalty": 1.5}),
            "length_penalty",
            "use_beam_search",
        ),
        (
            json!({"prompt": "x", "early_stopping": true}),
            "early_stopping",
            "use_beam_search",
        ),
        (
            json!({"prompt": "x", "use_beam_search": true, "stream": true}),
            "use_beam_search",
            "does not stream",
        ),
        (
            json!({"prompt": "x", "use_beam_search": true, "logprobs": 1}),
            "logprobs",
            "not supported with use_beam_search",
        ),
        (
            json!({"prompt": "x", "use_beam_search": true, "n": 3, "best_of": 2}),
            "best_of",
            "beam width",
        ),
        (
            json!({"prompt": "x", "best_of": 2}),
            "best_of",
            "use_beam_search",
        ),
        (
            json!({"prompt": "x", "max_tokens": 4, "min_tokens": 5}),
            "min_tokens",
            "at most max_tokens",
        ),
        (
            json!({"prompt": "x", "stop_token_ids": [60000]}),
            "stop_token_ids",
            "beyond the vocabulary",
        ),
        (
            json!({"prompt": "x", "stop_token_ids": "7"}),
            "stop_token_ids",
            "list of token ids",
        ),
        (
            json!({"prompt": "x", "truncate_prompt_tokens": 0}),
            "truncate_prompt_tokens",
            "from 1 to 64",
        ),
        (
            json!({"prompt": "x", "prompt_logprobs": 21}),
            "prompt_logprobs",
            "from 0 to 20",
        ),
        (
            json!({"prompt": "x", "use_beam_search": true, "early_stopping": "soon"}),
            "early_stopping",
            "\"never\"",
        ),
        (
            json!({"prompt": "x", "use_beam_search": true, "logit_bias": {"7": 5}}),
            "logit_bias",
            "not supported with use_beam_search",
        ),
        (
            json!({"prompt": "x", "use_beam_search": true, "skip_special_tokens": true}),
            "skip_special_tokens",
            "not supported with use_beam_search",
        ),
        // vLLM's fields that would change the reply and are not implemented.
        (
            json!({"prompt": "x", "allowed_token_ids": [13]}),
            "allowed_token_ids",
            "not supported",
        ),
        (
            json!({"prompt": "x", "bad_words": ["Step"]}),
            "bad_words",
            "not supported",
        ),
        (
            json!({"prompt": "x", "return_tokens_as_token_ids": true}),
            "return_tokens_as_token_ids",
            "not supported",
        ),
        (
            json!({"prompt": "x", "logits_processors": ["m:f"]}),
            "logits_processors",
            "not supported",
        ),
        (
            json!({"prompt": "x", "response_format": {"type": "json_object", "schema": 3}}),
            "response_format",
            "schema as an object",
        ),
    ] {
        let (s, v) = server.post("/v1/completions", &body);
        assert_eq!(s, 400, "{body} → {v}");
        assert_eq!(v["error"]["param"], param, "{body} → {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{body}: {msg:?} should say {needle:?}"
        );
    }
}
