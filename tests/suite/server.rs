//! `gpt2 serve` over real HTTP on loopback: the built binary on an ephemeral port, fixture models,
//! bounded requests. Results are checked against the library run alone (`Generator`, `eval::score`).

use crate::common;

use common::server::{agent, Server, FIXTURE};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use gpt2::generate::{Generation, GenerationConfig, Generator};
use gpt2::sampling::SamplingParams;
use gpt2::{Model, Tokenizer};
use serde_json::{json, Value};

fn load_fixture() -> (Model, Tokenizer) {
    let dir = common::fixture_dir(FIXTURE);
    (
        Model::load(&dir).unwrap(),
        Tokenizer::from_dir(&dir).unwrap(),
    )
}

/// The library's answer for one prompt alone.
fn alone(model: &Model, tok: &Tokenizer, prompt: &str, cfg: &GenerationConfig) -> Generation {
    let ids = tok.encode(prompt);
    Generator::new(model, tok, &[ids], cfg)
        .unwrap()
        .run(|_| {})
        .unwrap()
        .swap_remove(0)
}

fn finish(g: &Generation) -> &'static str {
    match g.finish_reason {
        gpt2::generate::FinishReason::Length => "length",
        _ => "stop",
    }
}

/// f32 values from a JSON list (exact: serde writes an f32's shortest round-trip form).
fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Request `i` of the mixed load: its body and the library config it must equal.
fn mixed(i: usize) -> (String, Value, GenerationConfig) {
    let prompts = [
        "Hello",
        "The quick brown fox",
        "In 1905, Einstein",
        "",
        "a b c d e f g h i j k l",
    ];
    let prompt = format!("{} {i}", prompts[i % prompts.len()]);
    let max_tokens = 5 + (i * 7) % 25;
    let seed = 1000 + i as u64;
    let mut body = json!({
        "model": "fixture", "prompt": prompt, "max_tokens": max_tokens, "seed": seed,
        "stream": true, "logprobs": 0, "stream_options": {"include_usage": true},
    });
    let mut s = SamplingParams {
        seed,
        ..Default::default()
    };
    match i % 4 {
        0 => {
            body["temperature"] = json!(0);
            s.temperature = 0.0;
        }
        1 => {
            body["temperature"] = json!(0.8);
            body["top_p"] = json!(0.9);
            body["top_k"] = json!(40);
            (s.temperature, s.top_p, s.top_k) = (0.8, 0.9, 40);
        }
        2 => {
            body["presence_penalty"] = json!(0.5);
            body["frequency_penalty"] = json!(0.3);
            body["min_p"] = json!(0.05);
            body["ignore_eos"] = json!(true);
            (s.presence_penalty, s.frequency_penalty, s.min_p) = (0.5, 0.3, 0.05);
        }
        _ => {
            body["repetition_penalty"] = json!(1.3);
            body["stop"] = json!(["e", "\n"]);
            s.repetition_penalty = 1.3;
        }
    }
    let cfg = GenerationConfig {
        max_new_tokens: max_tokens,
        sampling: s,
        stop: if i % 4 == 3 {
            vec!["e".into(), "\n".into()]
        } else {
            vec![]
        },
        ignore_eos: i % 4 == 2,
        ..Default::default()
    };
    (prompt, body, cfg)
}

#[test]
fn concurrent_streams_equal_each_request_run_alone() {
    // Chunks of 7 prompt tokens per step: prompts are prefilled over several steps, between other
    // requests' decode steps.
    let server = Server::fixture(&["--parallel", "8", "--prefill-chunk", "7"]);
    let (model, tok) = load_fixture();
    let results: Vec<(usize, Vec<Value>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..32)
            .map(|i| {
                let server = &server;
                sc.spawn(move || (i, server.stream("/v1/completions", &mixed(i).1)))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, events) in results {
        let (prompt, _, cfg) = mixed(i);
        let want = alone(&model, &tok, &prompt, &cfg);
        let (mut text, mut lps, mut fin, mut usage) = (String::new(), Vec::new(), None, None);
        for e in &events[..events.len() - 1] {
            if let Some(u) = e.get("usage").filter(|u| !u.is_null()) {
                usage = Some(u.clone());
            }
            for c in e["choices"].as_array().unwrap() {
                assert_eq!(c["index"], 0);
                text.push_str(c["text"].as_str().unwrap());
                if !c["logprobs"].is_null() {
                    lps.extend(f32s(&c["logprobs"]["token_logprobs"]));
                }
                if let Some(f) = c["finish_reason"].as_str() {
                    fin = Some(f.to_owned());
                }
            }
        }
        assert_eq!(text, want.text, "request {i}: text");
        assert_eq!(
            lps, want.logprobs,
            "request {i}: the logprob of each token, bit for bit"
        );
        assert_eq!(
            fin.as_deref(),
            Some(finish(&want)),
            "request {i}: finish_reason"
        );
        let usage = usage.expect("include_usage sends usage");
        assert_eq!(usage["completion_tokens"], want.tokens.len(), "request {i}");
        assert_eq!(
            usage["prompt_tokens"],
            want.prompt_tokens.len(),
            "request {i}"
        );
    }
    assert_eq!(server.metric("gpt2_running_sequences"), 0.0);
    assert_eq!(server.metric("gpt2_queue_length"), 0.0);
}

#[test]
fn completions_shapes_n_prompt_lists_and_token_ids() {
    let server = Server::fixture(&["--parallel", "4"]);
    let (model, tok) = load_fixture();
    // Two prompts × n = 2: choice p·n + j samples with seed + j.
    let (status, v) = server.post(
        "/v1/completions",
        &json!({"prompt": ["Hello there", "One two"], "n": 2, "max_tokens": 8, "seed": 7, "temperature": 0.9}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    let mut completion_tokens = 0;
    for (k, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], k);
        let prompt = ["Hello there", "One two"][k / 2];
        let cfg = GenerationConfig {
            max_new_tokens: 8,
            sampling: SamplingParams {
                temperature: 0.9,
                seed: 7 + (k % 2) as u64,
                ..Default::default()
            },
            ..Default::default()
        };
        let want = alone(&model, &tok, prompt, &cfg);
        assert_eq!(c["text"], want.text, "choice {k}");
        assert_eq!(c["finish_reason"], finish(&want));
        completion_tokens += want.tokens.len();
    }
    assert_eq!(v["usage"]["completion_tokens"], completion_tokens);
    assert_eq!(v["usage"]["prompt_tokens"], 2 + 2);
    assert_eq!(v["system_fingerprint"], "seed-7");

    // Token ids (a list, and a list of lists) run as the text they encode.
    let ids = tok.encode("Hello there");
    let by_text = server
        .post(
            "/v1/completions",
            &json!({"prompt": "Hello there", "max_tokens": 6, "temperature": 0}),
        )
        .1;
    let by_ids = server
        .post(
            "/v1/completions",
            &json!({"prompt": ids, "max_tokens": 6, "temperature": 0}),
        )
        .1;
    let by_lists = server
        .post(
            "/v1/completions",
            &json!({"prompt": [ids], "max_tokens": 6, "temperature": 0}),
        )
        .1;
    assert_eq!(by_text["choices"][0]["text"], by_ids["choices"][0]["text"]);
    assert_eq!(
        by_text["choices"][0]["text"],
        by_lists["choices"][0]["text"]
    );

    // Without a seed each request picks its own, and says which.
    let a = server
        .post("/v1/completions", &json!({"prompt": "x", "max_tokens": 4}))
        .1;
    let seed: u64 = a["system_fingerprint"].as_str().unwrap()[5..]
        .parse()
        .unwrap();
    let again = server
        .post(
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 4, "seed": seed}),
        )
        .1;
    assert_eq!(a["choices"][0]["text"], again["choices"][0]["text"]);
}

#[test]
fn echo_with_logprobs_equals_score() {
    // Prompt log-probs gathered over chunks of 3 tokens.
    let server = Server::fixture(&["--prefill-chunk", "3"]);
    let (model, tok) = load_fixture();
    let text = "The capital of France is Paris, and";
    let ids = tok.encode(text);
    let want = gpt2::eval::score(&model, &ids).unwrap();
    for max_tokens in [0, 1] {
        let (status, v) = server.post(
            "/v1/completions",
            &json!({"prompt": text, "max_tokens": max_tokens, "echo": true, "logprobs": 3, "temperature": 0}),
        );
        assert_eq!(status, 200, "{v}");
        let c = &v["choices"][0];
        let lp = &c["logprobs"];
        let got = lp["token_logprobs"].as_array().unwrap();
        assert_eq!(got.len(), ids.len() + max_tokens);
        assert!(got[0].is_null(), "the first token has no log-prob");
        let prompt_lps: Vec<f32> = got[1..ids.len()]
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(
            prompt_lps, want,
            "max_tokens {max_tokens}: echo equals `gpt2 score`"
        );
        assert!(lp["top_logprobs"][0].is_null());
        assert_eq!(lp["top_logprobs"][1].as_object().unwrap().len(), 3);
        let tokens: Vec<&str> = lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(tokens[..ids.len()].concat(), text);
        assert_eq!(lp["text_offset"][1], tokens[0].chars().count());
        assert!(c["text"].as_str().unwrap().starts_with(text));
        assert_eq!(v["usage"]["completion_tokens"], max_tokens);
        assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    }
    // Streaming echo with logprobs sends the same prompt log-probs.
    let events = server.stream(
        "/v1/completions",
        &json!({"prompt": text, "max_tokens": 0, "echo": true, "logprobs": 1, "stream": true}),
    );
    let first = &events[0]["choices"][0];
    assert_eq!(first["text"], text);
    assert_eq!(
        f32s(&json!(
            first["logprobs"]["token_logprobs"].as_array().unwrap()[1..]
        )),
        want
    );
}

#[test]
fn chat_tokenize_models_health_metrics() {
    let server = Server::fixture(&["--parallel", "2"]);
    let (model, tok) = load_fixture();
    let messages =
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
    let (status, v) = server.post(
        "/v1/chat/completions",
        &json!({"model": "fixture", "messages": messages, "max_tokens": 10, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["role"], "assistant");
    let cfg = GenerationConfig {
        max_new_tokens: 10,
        sampling: SamplingParams::greedy(),
        stop: vec!["\nUser:".into(), "\nSystem:".into()],
        ..Default::default()
    };
    let want = alone(
        &model,
        &tok,
        "System: Be brief.\nUser: Hi\nAssistant:",
        &cfg,
    );
    assert_eq!(msg["content"], want.text);
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), want.tokens.len());
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);

    let events = server.stream(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 10, "temperature": 0, "stream": true}),
    );
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, want.text);
    assert_eq!(
        events[events.len() - 2]["choices"][0]["finish_reason"],
        finish(&want)
    );

    let (s, t) = server.post("/tokenize", &json!({"prompt": "Hello world"}));
    assert_eq!(s, 200);
    assert_eq!(t["tokens"], json!([15496, 995]));
    assert_eq!(t["count"], 2);
    assert_eq!(t["max_model_len"], 64);
    let (s, d) = server.post("/detokenize", &json!({"tokens": [15496, 995]}));
    assert_eq!((s, d), (200, json!({"prompt": "Hello world"})));

    let (s, m) = server.get("/v1/models");
    assert_eq!(s, 200);
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(m["data"][0]["id"], "fixture");
    assert_eq!(server.get("/health").0, 200);
    let (_, metrics) = server.get("/metrics");
    assert!(
        metrics.contains("gpt2_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gpt2_time_to_first_token_seconds_count 2"),
        "{metrics}"
    );
    assert!(server.metric("gpt2_generation_tokens_total") >= want.tokens.len() as f64 * 2.0);
}

fn assert_error(server: &Server, body: &str, status: u16, needle: &str, param: Option<&str>) {
    let (s, v) = server.post_raw("/v1/completions", body, &[]);
    assert_eq!(s, status, "{body} → {v}");
    let e = &v["error"];
    let msg = e["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error shape: {v}"));
    assert!(
        msg.contains(needle),
        "{body}: {msg:?} should say {needle:?}"
    );
    assert!(
        e["type"].is_string() && e.get("code").is_some() && e.get("param").is_some(),
        "{v}"
    );
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
}

#[test]
fn bad_requests_get_openai_errors() {
    let server = Server::fixture(&["--parallel", "2", "--max-body", "2000"]);
    assert_error(&server, "{\"prompt\": ", 400, "not valid JSON", None);
    assert_error(&server, "[1, 2]", 400, "must be a JSON object", None);
    assert_error(
        &server,
        r#"{"prompt": 5}"#,
        400,
        "prompt must be",
        Some("prompt"),
    );
    assert_error(
        &server,
        r#"{"max_tokens": 3}"#,
        400,
        "prompt is required",
        Some("prompt"),
    );
    assert_error(
        &server,
        r#"{"prompt": "x", "temperature": "hot"}"#,
        400,
        "must be a number",
        Some("temperature"),
    );
    assert_error(
        &server,
        r#"{"prompt": "x", "temperature": 7}"#,
        400,
        "from 0 to 2",
        Some("temperature"),
    );
    assert_error(
        &server,
        r#"{"prompt": "x", "top_p": 0}"#,
        400,
        "top_p",
        Some("top_p"),
    );
    assert_error(
        &server,
        r#"{"prompt": "x", "max_tokens": -1}"#,
        400,
        "non-negative integer",
        Some("max_tokens"),
    );
    assert_error(
        &server,
        r#"{"prompt": "x", "logprobs": 21}"#,
        400,
        "from 0 to 20",
        Some("logprobs"),
    );
    assert_error(
        &server,
        r#"{"prompt": "x", "stream": "yes"}"#,
        400,
        "true or false",
        Some("stream"),
    );
    assert_error(
        &server,
        r#"{"prompt": "x", "stop": [1]}"#,
        400,
        "stop must be",
        Some("stop"),
    );
    assert_error(
        &server,
        r#"{"prompt": [99999]}"#,
        400,
        "beyond the vocabulary",
        Some("prompt"),
    );
    assert_error(
        &server,
        r#"{"prompt": "x", "logit_bias": {"abc": 1}}"#,
        400,
        "not a token id",
        Some("logit_bias"),
    );
    assert_error(
        &server,
        r#"{"prompt": "x", "max_tokens": 64}"#,
        400,
        "maximum context length is 64 tokens, but 65 were requested",
        Some("prompt"),
    );
    assert_error(
        &server,
        r#"{"prompt": "x", "max_tokens": 18446744073709551615}"#,
        400,
        "maximum context length",
        Some("prompt"),
    );
    let long = "word ".repeat(70);
    assert_error(
        &server,
        &json!({"prompt": long, "max_tokens": 1}).to_string(),
        400,
        "71 in the prompt",
        Some("prompt"),
    );
    assert_error(
        &server,
        r#"{"prompt": "x", "model": "gpt-4"}"#,
        404,
        "does not exist",
        None,
    );
    assert_error(
        &server,
        r#"{"prompt": "x", "n": 3}"#,
        400,
        "more than the 2 sequences",
        Some("n"),
    );
    assert_error(
        &server,
        &json!({"prompt": "x".repeat(3000)}).to_string(),
        413,
        "larger than the limit",
        None,
    );
    let (s, v) = server.post("/v1/chat/completions", &json!({"messages": "hi"}));
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], "messages");
    let (s, v) = server.post("/v1/nothing", &json!({}));
    assert_eq!(s, 404, "{v}");
    assert!(v["error"]["message"].is_string());
    let (s, _) = server.get("/v1/completions");
    assert_eq!(s, 405);
    // The server is still fine.
    let (s, v) = server.post("/v1/completions", &json!({"prompt": "x", "max_tokens": 2}));
    assert_eq!(s, 200, "{v}");
    assert!(
        server.metric("gpt2_requests_total{endpoint=\"/v1/completions\",status=\"400\"}") >= 14.0
    );
}

#[test]
fn api_key_is_required_when_set() {
    let server = Server::fixture(&["--api-key", "sesame"]);
    let body = json!({"prompt": "x", "max_tokens": 2}).to_string();
    let (s, v) = server.post_raw("/v1/completions", &body, &[]);
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let (s, _) = server.post_raw(
        "/v1/completions",
        &body,
        &[("Authorization", "Bearer wrong")],
    );
    assert_eq!(s, 401);
    let (s, v) = server.post_raw(
        "/v1/completions",
        &body,
        &[("Authorization", "Bearer sesame")],
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(server.get("/v1/models").0, 401);
    assert_eq!(server.get("/health").0, 200);
}

/// Send a streaming request on a raw socket and read until its first token arrives.
fn open_stream(base: &str, body: &Value) -> TcpStream {
    let addr = base.strip_prefix("http://").unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let body = body.to_string();
    write!(
        sock,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"text\"") {
        let n = sock.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the stream closed early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    sock
}

/// A model slow enough (random distilgpt2) that a request is still running when the test acts.
#[test]
fn disconnect_frees_the_slot_and_a_full_queue_answers_429() {
    let server = Server::start(&[
        "--random",
        "distilgpt2",
        "--parallel",
        "1",
        "--max-queue",
        "0",
    ]);
    let long = json!({"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": true, "stream": true, "temperature": 0});
    let sock = open_stream(&server.base, &long);
    assert_eq!(server.metric("gpt2_running_sequences"), 1.0);
    // The one slot is busy and nothing may wait: 429 with Retry-After.
    let resp = agent()
        .post(&server.url("/v1/completions"))
        .send_string(&json!({"prompt": "x", "max_tokens": 2}).to_string());
    match resp {
        Err(ureq::Error::Status(429, r)) => {
            assert_eq!(r.header("retry-after"), Some("1"));
            let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
            assert_eq!(v["error"]["type"], "rate_limit_error");
        }
        other => panic!("expected 429, got {:?}", other.map(|r| r.status())),
    }
    // The client goes away: generation stops well before 1000 tokens and the slot is free again.
    drop(sock);
    let t = Instant::now();
    while server.metric("gpt2_running_sequences") != 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the slot was not freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let generated = server.metric("gpt2_generation_tokens_total");
    assert!(
        generated < 1000.0,
        "generation ran on after the disconnect: {generated}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.metric("gpt2_generation_tokens_total"), generated);
    let (s, v) = server.post("/v1/completions", &json!({"prompt": "x", "max_tokens": 2}));
    assert_eq!(s, 200, "{v}");
}

#[test]
fn time_limit_ends_a_long_request() {
    let server = Server::start(&["--random", "distilgpt2", "--time-limit", "1"]);
    let t = Instant::now();
    let (s, v) = server.post(
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 1000, "ignore_eos": true}),
    );
    assert_eq!(s, 200, "{v}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() < 1000,
        "{v}"
    );
}

#[test]
fn sigterm_lets_streams_finish_then_exits() {
    let mut server = Server::start(&["--random", "distilgpt2", "--parallel", "2"]);
    let body = json!({"prompt": "Hello", "max_tokens": 40, "ignore_eos": true, "stream": true, "temperature": 0});
    let mut sock = open_stream(&server.base, &body);
    let pid = server.child.id().to_string();
    let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(ok.success());
    let mut rest = String::new();
    sock.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("data: [DONE]"),
        "the stream in flight finished: {rest}"
    );
    let t = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the server did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
