//! Structured output on `gpt2 serve`: OpenAI's `response_format`, vLLM's `guided_*` fields and
//! llama-server's `json_schema` / `grammar` give output that parses or matches, on both endpoints
//! and streamed; a constraint that does not compile (or two at once) is a 400 naming the field.
#![cfg(feature = "constrain")]

use crate::common;

use common::server::Server;
use serde_json::{json, Value};

fn ok(server: &Server, path: &str, body: Value) -> Value {
    let (s, v) = server.post(path, &body);
    assert_eq!(s, 200, "{body} → {v}");
    v
}

/// `base` with `extra`'s fields is a 400 naming `param`; its message.
fn refused(server: &Server, mut base: Value, extra: &Value, param: &str) -> String {
    base.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let (s, v) = server.post("/v1/completions", &base);
    assert_eq!(s, 400, "{base} → {v}");
    assert_eq!(v["error"]["param"], param, "{base} → {v}");
    v["error"]["message"].as_str().unwrap().to_owned()
}

fn text(v: &Value) -> &str {
    v["choices"][0]["text"]
        .as_str()
        .or_else(|| v["choices"][0]["message"]["content"].as_str())
        .unwrap()
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "label": {"enum": ["spam", "ham"]},
            "score": {"type": "integer", "minimum": 0, "maximum": 9},
            "ok": {"type": "boolean"}
        },
        "required": ["label", "score", "ok"],
        "additionalProperties": false
    })
}

fn check(v: &Value) {
    let o: Value = serde_json::from_str(text(v)).unwrap_or_else(|e| panic!("{v}: {e}"));
    assert!(
        ["spam", "ham"].contains(&o["label"].as_str().unwrap()),
        "{o}"
    );
    assert!(o["score"].as_u64().unwrap() <= 9, "{o}");
    assert!(o["ok"].is_boolean(), "{o}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
}

#[test]
fn every_constraint_field_constrains_the_reply() {
    let server = Server::fixture(&[]);
    let ws = " ";
    // OpenAI's response_format, on chat and on completions.
    for seed in 0..2 {
        let v = ok(
            &server,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Classify: buy now"}],
                   "max_tokens": 50, "seed": seed, "guided_whitespace_pattern": ws,
                   "response_format": {"type": "json_schema",
                       "json_schema": {"name": "c", "schema": schema(), "strict": true}}}),
        );
        check(&v);
    }
    let v = ok(
        &server,
        "/v1/completions",
        json!({"prompt": "Label:", "max_tokens": 50, "temperature": 0,
               "guided_whitespace_pattern": ws,
               "response_format": {"type": "json_schema", "json_schema": {"schema": schema()}}}),
    );
    check(&v);
    // vLLM's guided_json (as an object and as a string), llama-server's json_schema.
    for body in [
        json!({"guided_json": schema()}),
        json!({"guided_json": schema().to_string()}),
        json!({"json_schema": schema()}),
    ] {
        let mut b = json!({"prompt": "Label:", "max_tokens": 50, "seed": 3,
                           "guided_whitespace_pattern": ws});
        b.as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        check(&ok(&server, "/v1/completions", b));
    }
    // json_object: an object, wherever it ended.
    let v = ok(
        &server,
        "/v1/completions",
        json!({"prompt": "Label:", "max_tokens": 20, "seed": 4,
               "response_format": {"type": "json_object"}}),
    );
    assert!(text(&v).starts_with('{'), "{v}");
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(text(&v)).unwrap().is_object());
    }
    // guided_regex, guided_choice, guided_grammar, llama-server's %llguidance grammar.
    let re = regex::Regex::new(r"^[0-9]{2}-[a-z]{3}$").unwrap();
    for seed in 0..3 {
        let v = ok(
            &server,
            "/v1/completions",
            json!({"prompt": "Code:", "max_tokens": 20, "seed": seed,
                   "guided_regex": "[0-9]{2}-[a-z]{3}"}),
        );
        assert!(re.is_match(text(&v)), "{v}");
        let v = ok(
            &server,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Yes or no?"}], "seed": seed,
                   "max_tokens": 10, "guided_choice": ["yes", "no", "maybe so"]}),
        );
        assert!(["yes", "no", "maybe so"].contains(&text(&v)), "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
    let lark = "start: \"(\" num (\",\" num)* \")\"\nnum: /[1-9]/";
    let tuple = regex::Regex::new(r"^\([1-9](,[1-9])*\)$").unwrap();
    for body in [
        json!({"guided_grammar": lark}),
        json!({"grammar": format!("%llguidance {{}}\n{lark}")}),
    ] {
        let mut b = json!({"prompt": "Tuple:", "max_tokens": 50, "seed": 5});
        b.as_object_mut()
            .unwrap()
            .extend(body.as_object().unwrap().clone());
        let v = ok(&server, "/v1/completions", b);
        if v["choices"][0]["finish_reason"] == "stop" {
            assert!(tuple.is_match(text(&v)), "{v}");
        } else {
            assert!(text(&v).starts_with('('), "{v}");
        }
    }
    // response_format text asks for nothing.
    let plain = ok(
        &server,
        "/v1/completions",
        json!({"prompt": "Hello", "max_tokens": 8, "temperature": 0}),
    );
    let text_format = ok(
        &server,
        "/v1/completions",
        json!({"prompt": "Hello", "max_tokens": 8, "temperature": 0,
               "response_format": {"type": "text"}}),
    );
    assert_eq!(text(&plain), text(&text_format));
    // A constraint that allows what greedy decoding gives changes nothing.
    let any = ok(
        &server,
        "/v1/completions",
        json!({"prompt": "Hello", "max_tokens": 8, "temperature": 0,
               "guided_regex": "(.|\\n)*"}),
    );
    assert_eq!(text(&plain), text(&any));
    let same = ok(
        &server,
        "/v1/completions",
        json!({"prompt": "Hello", "max_tokens": 8, "temperature": 0,
               "guided_choice": [text(&plain), "other"]}),
    );
    assert_eq!(text(&plain), text(&same));
}

#[test]
fn constrained_streams_match_the_constraint() {
    let server = Server::fixture(&[]);
    let body = json!({"prompt": "Label:", "max_tokens": 50, "seed": 9, "stream": true,
                      "guided_whitespace_pattern": " ", "guided_json": schema()});
    let events = server.stream("/v1/completions", &body);
    let mut joined = String::new();
    let mut finish = Value::Null;
    for e in &events {
        if let Some(t) = e["choices"][0]["text"].as_str() {
            joined.push_str(t);
        }
        if !e["choices"][0]["finish_reason"].is_null() {
            finish = e["choices"][0]["finish_reason"].clone();
        }
    }
    check(&json!({"choices": [{"text": joined, "finish_reason": finish}]}));
}

#[test]
fn constraints_that_do_not_compile_are_400s_with_the_librarys_message() {
    let server = Server::fixture(&[]);
    for (extra, param, says) in [
        (
            json!({"guided_regex": "a(b"}),
            "guided_regex",
            "unclosed group",
        ),
        (
            json!({"guided_json": {"type": "no-such-type"}}),
            "guided_json",
            "no-such-type",
        ),
        (
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "x", "schema": {"type": "objec"}}}}),
            "response_format",
            "objec",
        ),
        (
            json!({"json_schema": {"properties": {"a": {"$ref": "#/nowhere"}}}}),
            "json_schema",
            "nowhere",
        ),
        (
            json!({"guided_grammar": "start: undefined_rule"}),
            "guided_grammar",
            "undefined_rule",
        ),
        (
            json!({"guided_json": "{not json"}),
            "guided_json",
            "not JSON",
        ),
        (json!({"guided_choice": []}), "guided_choice", "non-empty"),
        (json!({"grammar": "root ::= \"a\""}), "grammar", "GBNF"),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format",
            "yaml",
        ),
        (
            json!({"guided_regex": "a", "guided_choice": ["a"]}),
            "guided_choice",
            "one constraint",
        ),
        (
            json!({"guided_regex": "a", "guided_whitespace_pattern": " "}),
            "guided_whitespace_pattern",
            "JSON",
        ),
        (
            json!({"guided_regex": "a", "use_beam_search": true, "best_of": 2}),
            "guided_regex",
            "beam",
        ),
    ] {
        let msg = refused(
            &server,
            json!({"prompt": "x", "max_tokens": 5}),
            &extra,
            param,
        );
        assert!(msg.contains(says), "{extra} → {msg}");
    }
}

#[test]
fn cached_choice_lists_are_never_another_requests() {
    let server = Server::fixture(&[]);
    // The first list compiled and cached; the second, once a separator-joined key for the
    // first, must give its own strings.
    for (first, second) in [
        (json!(["a\u{0}b"]), json!(["a", "b"])),
        (json!(["a\u{0}"]), json!(["a", ""])),
    ] {
        for choices in [&first, &second] {
            let v = ok(
                &server,
                "/v1/completions",
                json!({"prompt": "Hi", "max_tokens": 5, "guided_choice": choices,
                       "temperature": 0, "n": 2}),
            );
            for c in v["choices"].as_array().unwrap() {
                assert!(
                    choices.as_array().unwrap().contains(&c["text"]),
                    "{choices} → {v}"
                );
            }
        }
    }
}

/// Every streamed event of `body` (no error among them) and the joined text and last finish.
fn streamed(server: &Server, body: &Value) -> (String, Value) {
    let events = server.stream("/v1/completions", body);
    let mut joined = String::new();
    let mut finish = Value::Null;
    for e in &events {
        assert!(e.get("error").is_none(), "{body} → {e}");
        if let Some(t) = e["choices"][0]["text"].as_str() {
            joined.push_str(t);
        }
        if !e["choices"][0]["finish_reason"].is_null() {
            finish = e["choices"][0]["finish_reason"].clone();
        }
    }
    (joined, finish)
}

#[test]
fn constraints_nothing_can_match_are_400s_naming_the_field() {
    let server = Server::fixture(&[]);
    for (extra, param) in [
        (json!({"guided_regex": "[a&&b]"}), "guided_regex"),
        (
            json!({"guided_grammar": "start: a\na: a \"x\""}),
            "guided_grammar",
        ),
        (json!({"guided_json": {"$ref": "#"}}), "guided_json"),
        (
            json!({"guided_json": {"$ref": "#/definitions/a",
                                   "definitions": {"a": {"$ref": "#/definitions/a"}}}}),
            "guided_json",
        ),
    ] {
        for stream in [false, true] {
            let base = json!({"prompt": "Hi", "max_tokens": 5, "stream": stream});
            let msg = refused(&server, base, &extra, param);
            assert!(msg.contains("allows no output"), "{extra} → {msg}");
            assert!(
                !msg.contains("<state>") && !msg.contains("NoExtensionBias"),
                "{extra} → {msg}"
            );
        }
    }
}

#[test]
fn fields_that_ban_the_constraints_only_tokens_give_way() {
    let server = Server::fixture(&[]);
    // ["x"]: its one token (87, "x") is a stop token that min_tokens bans; [""]: only the end,
    // which ignore_eos bans. The bans give way: an empty reply, finish_reason stop.
    for extra in [
        json!({"guided_choice": ["x"], "stop_token_ids": [87], "min_tokens": 1}),
        json!({"guided_choice": [""], "ignore_eos": true}),
    ] {
        let mut b = json!({"prompt": "Hi", "max_tokens": 5, "temperature": 0});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let v = ok(&server, "/v1/completions", b.clone());
        assert_eq!(v["choices"][0]["text"], "", "{b} → {v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{b} → {v}");
        assert_eq!(v["usage"]["completion_tokens"], 1, "{b} → {v}");
        b["stream"] = json!(true);
        assert_eq!(streamed(&server, &b), (String::new(), json!("stop")), "{b}");
    }
}

#[test]
fn min_tokens_does_not_extend_a_complete_constraint() {
    let server = Server::fixture(&[]);
    let b = json!({"prompt": "Hi", "max_tokens": 8, "temperature": 0, "min_tokens": 3,
                   "guided_choice": ["ab", "a"]});
    let v = ok(&server, "/v1/completions", b.clone());
    assert_eq!(v["choices"][0]["text"], "ab", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 3, "{v}");
}
