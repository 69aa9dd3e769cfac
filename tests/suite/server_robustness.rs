//! `gpt2 serve` against clients that misbehave or ask too much: flags out of range, half-sent
//! requests, too many connections, batches that can never fit, fields it does not implement. Each
//! test is one server on an ephemeral loopback port, bounded in time.

use crate::common;

use common::server::{serve_command, wait_for, Server, FIXTURE};

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use gpt2::{Model, Tokenizer};
use serde_json::{json, Value};

/// A small completion answers 200.
fn assert_serves(server: &Server) {
    let (s, v) = server.post(
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 2}),
    );
    assert_eq!(s, 200, "{v}");
}

/// Every `data:` payload of a streaming POST but the final `[DONE]`.
fn events(server: &Server, path: &str, body: &Value) -> Vec<Value> {
    let mut out = server.stream(path, body);
    out.pop();
    out
}

/// Run `gpt2 serve ARGS` that must fail at start: its exit status (None if it still ran after
/// `within`; it is then killed) and its stderr.
fn serve_must_fail(args: &[&str], within: Duration) -> (Option<ExitStatus>, String) {
    let mut child = serve_command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting gpt2 serve");
    let status = wait_for(&mut child, within);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

fn connect(server: &Server) -> TcpStream {
    let sock = TcpStream::connect(server.addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    sock
}

/// Read until the peer closes or `within` passes: the bytes, and whether it closed.
fn read_until_closed(sock: &mut TcpStream, within: Duration) -> (String, bool) {
    read_until(sock, within, None)
}

/// Read until the peer closes, `within` passes, or what came holds `needle`: the bytes, and
/// whether it closed.
fn read_until(sock: &mut TcpStream, within: Duration, needle: Option<&str>) -> (String, bool) {
    sock.set_read_timeout(Some(within)).unwrap();
    let t = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&seen).into_owned(), true),
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if needle.is_some_and(|w| String::from_utf8_lossy(&seen).contains(w)) {
                    return (String::from_utf8_lossy(&seen).into_owned(), false);
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&seen).into_owned(), true)
            }
            Err(_) => return (String::from_utf8_lossy(&seen).into_owned(), false),
        }
        if t.elapsed() >= within {
            return (String::from_utf8_lossy(&seen).into_owned(), false);
        }
    }
}

fn error_of(v: &Value) -> (&str, &Value) {
    let e = &v["error"];
    (
        e["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no error shape: {v}")),
        &e["param"],
    )
}

#[test]
fn time_limits_beyond_a_day_are_refused_at_start() {
    let dir = common::fixture_dir(FIXTURE);
    for limit in ["18446744073709551615", "9223372036854775807", "86401", "0"] {
        let (status, err) = serve_must_fail(
            &["--model", dir.to_str().unwrap(), "--time-limit", limit],
            Duration::from_secs(20),
        );
        let status = status.unwrap_or_else(|| panic!("--time-limit {limit}: the server started"));
        assert!(!status.success(), "--time-limit {limit}: {status}");
        assert!(
            err.contains("1..=86400") && !err.contains("panicked"),
            "--time-limit {limit}: the error names the range: {err}"
        );
    }
    // The longest limit allowed serves.
    let server = Server::fixture(&["--time-limit", "86400"]);
    assert_serves(&server);
}

#[test]
fn sigterm_does_not_wait_for_idle_or_half_sent_connections() {
    // Before, shutdown waited for every connection: time limit + 5 s (35 s here).
    let mut server = Server::fixture(&["--time-limit", "30"]);
    let mut half_head = connect(&server);
    half_head.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    let mut half_body = connect(&server);
    half_body
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
        .unwrap();
    let mut idle = connect(&server);
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 256];
    let n = idle.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let _bare = connect(&server);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let status = server
        .terminate(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("the server did not exit within 5 s of SIGTERM"));
    assert!(status.success(), "{status}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn headers_and_bodies_must_arrive_in_time() {
    let server = Server::fixture(&["--header-timeout", "1", "--body-timeout", "1"]);
    let t = Instant::now();
    let mut half_head = connect(&server);
    half_head.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    let mut half_body = connect(&server);
    half_body
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
        .unwrap();
    let (_, closed) = read_until_closed(&mut half_head, Duration::from_secs(5));
    assert!(closed, "a half-sent head is dropped after --header-timeout");
    let (reply, _) = read_until(
        &mut half_body,
        Duration::from_secs(5),
        Some("--body-timeout"),
    );
    assert!(
        reply.starts_with("HTTP/1.1 408"),
        "a short body is answered 408 after --body-timeout: {reply:?}"
    );
    assert!(reply.contains("--body-timeout"), "{reply}");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    // The server still serves.
    assert_serves(&server);
}

#[test]
fn connections_beyond_the_limit_wait_for_a_free_one() {
    let server = Server::fixture(&["--max-connections", "2"]);
    let a = connect(&server);
    let b = connect(&server);
    std::thread::sleep(Duration::from_millis(200));
    let mut c = connect(&server);
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (reply, _) = read_until_closed(&mut c, Duration::from_millis(700));
    assert!(
        reply.is_empty(),
        "a third connection is not served while two are open: {reply:?}"
    );
    drop(a);
    let (reply, closed) = read_until_closed(&mut c, Duration::from_secs(5));
    assert!(
        closed && reply.starts_with("HTTP/1.1 200"),
        "served once one closes: {reply:?}"
    );
    drop(b);
}

#[test]
fn a_batch_that_can_never_fit_is_a_400_not_a_429() {
    let server = Server::fixture(&["--parallel", "4", "--max-queue", "4"]);
    let (s, v) = server.post(
        "/v1/completions",
        &json!({"prompt": vec!["a"; 200], "max_tokens": 1}),
    );
    assert_eq!(s, 400, "{v}");
    let (msg, param) = error_of(&v);
    assert_eq!(param, "prompt", "{v}");
    for needle in [
        "200 sequences",
        "at most 8",
        "--parallel 4",
        "--max-queue 4",
    ] {
        assert!(msg.contains(needle), "{msg:?} should say {needle:?}");
    }
    // As many as the slots and the queue hold run on an idle server.
    let (s, v) = server.post(
        "/v1/completions",
        &json!({"prompt": vec!["a"; 8], "max_tokens": 1}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 8);
}

#[test]
fn echo_scores_a_prompt_that_fills_the_context() {
    let server = Server::fixture(&[]);
    let dir = common::fixture_dir(FIXTURE);
    let (model, _) = (
        Model::load(&dir).unwrap(),
        Tokenizer::from_dir(&dir).unwrap(),
    );
    let ids = vec![23105u32; 64];
    let want = gpt2::eval::score(&model, &ids).unwrap();
    let (s, v) = server.post(
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 0, "echo": true, "logprobs": 0}),
    );
    assert_eq!(s, 200, "{v}");
    let lp = v["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(lp.len(), 64);
    assert!(lp[0].is_null());
    let got: Vec<f32> = lp[1..].iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert_eq!(got, want, "echo equals `gpt2 score`");
    assert_eq!(v["usage"]["prompt_tokens"], 64);
    assert_eq!(v["usage"]["completion_tokens"], 0);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // One token more than the context is still refused.
    let (s, v) = server.post(
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 1, "echo": true, "logprobs": 0}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(error_of(&v).0.contains("65 were requested"), "{v}");
}

/// Every `text_offset` of a reply, its tokens, and its text.
fn offsets_of(choices: &[&Value]) -> (Vec<u64>, Vec<String>, String) {
    let (mut offsets, mut tokens, mut text) = (Vec::new(), Vec::new(), String::new());
    for c in choices {
        text.push_str(c["text"].as_str().unwrap());
        let lp = &c["logprobs"];
        if lp.is_null() {
            continue;
        }
        for o in lp["text_offset"].as_array().unwrap() {
            offsets.push(o.as_u64().unwrap());
        }
        for t in lp["tokens"].as_array().unwrap() {
            tokens.push(t.as_str().unwrap().to_owned());
        }
    }
    (offsets, tokens, text)
}

#[test]
fn streamed_text_offsets_equal_the_whole_reply() {
    let server = Server::fixture(&[]);
    for echo in [false, true] {
        let body = json!({"prompt": "Hello world, this is", "max_tokens": 6, "temperature": 0,
            "logprobs": 1, "echo": echo, "ignore_eos": true});
        let (s, whole) = server.post("/v1/completions", &body);
        assert_eq!(s, 200, "{whole}");
        let want = offsets_of(&[&whole["choices"][0]]);
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let events = events(&server, "/v1/completions", &streamed);
        let choices: Vec<&Value> = events
            .iter()
            .flat_map(|e| e["choices"].as_array().unwrap())
            .collect();
        let got = offsets_of(&choices);
        assert_eq!(
            got, want,
            "echo {echo}: streamed logprobs equal the reply's"
        );
        let (offsets, tokens, _) = &want;
        assert_eq!(offsets.len(), tokens.len());
        for i in 1..offsets.len() {
            assert_eq!(
                offsets[i],
                offsets[i - 1] + tokens[i - 1].chars().count() as u64,
                "echo {echo}: offsets count the text before each token: {offsets:?}"
            );
        }
        assert_eq!(offsets[0], 0);
        assert!(offsets.len() >= 6 && offsets.last() > Some(&0));
    }
}

#[test]
fn unsupported_chat_fields_are_refused_by_name() {
    let server = Server::fixture(&["--parallel", "2"]);
    let messages = json!([{"role": "user", "content": "Hi"}]);
    let chat = |extra: Value| {
        let mut body = json!({"messages": messages, "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        server.post("/v1/chat/completions", &body)
    };
    for (extra, param, needle) in [
        // Structured output is served (tests/suite/server_structured.rs); what it cannot read is refused.
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format",
            "\"yaml\" is not one of",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format",
            "json_schema.schema",
        ),
        (
            json!({"response_format": "json"}),
            "response_format",
            "must be an object",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
            "tools",
            "no tool calling",
        ),
        (
            json!({"tool_choice": "required"}),
            "tool_choice",
            "no tool calling",
        ),
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "f"}}}),
            "tool_choice",
            "no tool calling",
        ),
        (
            json!({"functions": [{"name": "f", "parameters": {}}]}),
            "functions",
            "no tool calling",
        ),
    ] {
        let (s, v) = chat(extra.clone());
        assert_eq!(s, 400, "{extra} → {v}");
        let (msg, p) = error_of(&v);
        assert_eq!(p, param, "{extra} → {v}");
        assert!(
            msg.contains(needle),
            "{extra}: {msg:?} should say {needle:?}"
        );
    }
    for extra in [
        json!({"response_format": {"type": "text"}}),
        json!({"tools": [], "tool_choice": "none"}),
        json!({"tool_choice": "auto"}),
    ] {
        let (s, v) = chat(extra.clone());
        assert_eq!(s, 200, "{extra} → {v}");
    }
    // Completions refuse what chat refuses.
    let (s, v) = server.post(
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 2, "response_format": {"type": "yaml"}}),
    );
    assert_eq!(s, 400, "{v}");
    assert_eq!(error_of(&v).1, "response_format");
}

#[test]
fn range_errors_print_real_bounds() {
    let server = Server::fixture(&["--parallel", "2"]);
    for (path, body, param, needle) in [
        (
            "/v1/completions",
            json!({"prompt": "x", "n": 0}),
            "n",
            "from 1 to 2",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "n": 3}),
            "n",
            "--parallel 2",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "best_of": 0}),
            "best_of",
            "best_of is 0, n is 1",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}),
            "max_tokens",
            "from 1 to ",
        ),
        // A number is echoed as it was sent, not in 309 digits.
        (
            "/v1/completions",
            json!({"prompt": "x", "temperature": 1e308}),
            "temperature",
            "temperature is 1e+308; expected a number from 0 to 2",
        ),
    ] {
        let (s, v) = server.post(path, &body);
        assert_eq!(s, 400, "{body} → {v}");
        let (msg, p) = error_of(&v);
        assert_eq!(p, param, "{v}");
        assert!(
            msg.contains(needle),
            "{body}: {msg:?} should say {needle:?}"
        );
        assert!(
            !msg.contains("18446744073709551615"),
            "{body}: a real bound, not u64::MAX: {msg}"
        );
    }
}

#[test]
fn chat_without_max_tokens_stops_at_256() {
    let server = Server::start(&["--random", "distilgpt2", "--dtype", "q8"]);
    let (s, v) = server.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 256, "{}", v["usage"]);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[test]
fn a_kv_cache_that_cannot_fit_is_refused_before_building_weights() {
    // gpt2-xl, f32: 2 × 48 layers × 1600 × 1024 positions × 4 bytes per slot, 256 slots.
    let need = 2u64 * 48 * 1600 * 1024 * 4 * 256;
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024);
    if available.is_none_or(|a| a >= need) {
        eprintln!("skipped: this machine has room for the cache ({available:?} bytes)");
        return;
    }
    let t = Instant::now();
    let (status, err) = serve_must_fail(
        &["--random", "gpt2-xl", "--parallel", "256"],
        Duration::from_secs(60),
    );
    let status = status.expect("the server refused to start");
    assert!(!status.success());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "refused after {:?}: the weights were built first",
        t.elapsed()
    );
    assert!(
        err.contains("--parallel 256") && err.contains("KV cache") && err.contains("fits"),
        "{err}"
    );
}

/// Read a raw SSE response until the stream closes (or 20 s pass).
fn read_stream(sock: &mut TcpStream) -> String {
    let (text, closed) = read_until_closed(sock, Duration::from_secs(20));
    assert!(closed, "the stream did not close: {text}");
    text
}

#[test]
fn sigterm_ends_long_streams_after_the_drain_timeout() {
    let mut server = Server::start(&["--random", "distilgpt2", "--drain-timeout", "1"]);
    let body = json!({"prompt": "Hello", "max_tokens": 1000, "ignore_eos": true, "stream": true,
        "temperature": 0})
    .to_string();
    let mut sock = connect(&server);
    write!(
        sock,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let (seen, _) = read_until(&mut sock, Duration::from_secs(20), Some("\"text\""));
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    let t = Instant::now();
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let rest = read_stream(&mut sock);
    assert!(
        rest.contains("\"finish_reason\":\"length\"") && rest.contains("data: [DONE]"),
        "the stream ends properly: {rest}"
    );
    let status = wait_for(&mut server.child, Duration::from_secs(5))
        .expect("the server exits after the drain timeout");
    assert!(status.success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}
