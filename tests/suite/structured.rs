//! Structured output in the library: every kind of constraint (JSON object, JSON schema, regex,
//! choice, Lark grammar) gives output that parses or matches, a constraint never changes a token
//! that already satisfies it, and a constraint that does not compile is a clear error.
#![cfg(feature = "constrain")]

use crate::common;

use common::fixture_dir;
use gpt2::generate::{
    generate, ConstraintSpec, FinishReason, Generation, GenerationConfig, Generator, Grammars,
};
use gpt2::sampling::SamplingParams;
use gpt2::{Model, Tokenizer};
use serde_json::{json, Value};

/// The full-vocabulary fixture (random weights: it wants nothing like JSON, so the constraint
/// decides most tokens), its tokenizer and a compiler for it.
fn setup() -> (Model, Tokenizer, Grammars) {
    let model = Model::load(&fixture_dir("full-vocab-f16")).unwrap();
    let tok = Tokenizer::gpt2();
    let g = Grammars::new(&tok, model.config().eos_token_id).unwrap();
    (model, tok, g)
}

fn run(
    model: &Model,
    tok: &Tokenizer,
    g: &Grammars,
    spec: Option<ConstraintSpec>,
    sampling: SamplingParams,
    max: usize,
) -> Generation {
    let cfg = GenerationConfig {
        max_new_tokens: max,
        sampling,
        constraint: spec.map(|s| g.compile(&s).unwrap()),
        ..Default::default()
    };
    generate(model, tok, "The answer is", &cfg).unwrap()
}

/// Five fields, as the issue's speed goal names.
pub fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"type": "string", "maxLength": 10},
            "member": {"type": "boolean"},
            "color": {"enum": ["red", "green", "blue"]}
        },
        "required": ["name", "age", "city", "member", "color"],
        "additionalProperties": false
    })
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed,
        ..Default::default()
    }
}

#[test]
fn json_schema_output_parses_and_has_every_field() {
    let (model, tok, g) = setup();
    // At most one space between JSON tokens (vLLM's guided_whitespace_pattern), so that the
    // object fits the fixture's context of 64 tokens.
    let spec = ConstraintSpec::JsonSchema(person_schema())
        .with_whitespace_pattern(" ")
        .unwrap();
    for (i, s) in [SamplingParams::greedy(), sampled(1), sampled(2)]
        .into_iter()
        .enumerate()
    {
        let out = run(&model, &tok, &g, Some(spec.clone()), s, 60);
        assert_eq!(out.finish_reason, FinishReason::Stop, "{i}: {:?}", out.text);
        let v: Value = serde_json::from_str(&out.text)
            .unwrap_or_else(|e| panic!("{i}: {:?} is not JSON: {e}", out.text));
        let o = v.as_object().unwrap();
        assert_eq!(o.len(), 5, "{v}");
        assert!(o["name"].as_str().unwrap().chars().count() <= 12, "{v}");
        assert!(o["age"].is_i64() || o["age"].is_u64(), "{v}");
        assert!(o["city"].as_str().unwrap().chars().count() <= 10, "{v}");
        assert!(o["member"].is_boolean(), "{v}");
        assert!(
            ["red", "green", "blue"].contains(&o["color"].as_str().unwrap()),
            "{v}"
        );
        // Log-probs stay the raw model's: finite, and the constrained tokens mostly unlikely.
        assert!(out.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
    }
}

#[test]
fn json_object_output_is_an_object() {
    let (model, tok, g) = setup();
    let spec = ConstraintSpec::JsonSchema(json!({
        "type": "object",
        "properties": {"a": {"type": "integer", "maximum": 99, "minimum": 0}},
        "required": ["a"],
        "additionalProperties": false
    }));
    let out = run(&model, &tok, &g, Some(spec), SamplingParams::greedy(), 60);
    let v: Value = serde_json::from_str(&out.text)
        .unwrap_or_else(|e| panic!("{:?} is not JSON: {e}", out.text));
    assert!(v["a"].is_i64(), "{v}");
    // Any object: it may run out of tokens inside, so only its start is certain; where it ends,
    // it parses.
    for seed in 0..3 {
        let out = run(
            &model,
            &tok,
            &g,
            Some(ConstraintSpec::JsonObject),
            sampled(seed),
            60,
        );
        assert!(out.text.trim_start().starts_with('{'), "{:?}", out.text);
        if out.finish_reason == FinishReason::Stop {
            assert!(serde_json::from_str::<Value>(&out.text)
                .unwrap()
                .is_object());
        }
    }
}

#[test]
fn regex_output_matches() {
    let (model, tok, g) = setup();
    let pattern = r"[A-Z][a-z]{2,5} [0-9]{3}-[0-9]{4}";
    let whole = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
    for s in [SamplingParams::greedy(), sampled(3), sampled(4)] {
        let out = run(
            &model,
            &tok,
            &g,
            Some(ConstraintSpec::Regex(pattern.into())),
            s,
            30,
        );
        assert!(whole.is_match(&out.text), "{:?}", out.text);
        assert_eq!(out.finish_reason, FinishReason::Stop);
    }
}

#[test]
fn choice_output_is_one_of_the_choices() {
    let (model, tok, g) = setup();
    let choices: Vec<String> = ["positive", "negative", "neutral (n/a)", "a|b.*"]
        .map(String::from)
        .to_vec();
    for s in [SamplingParams::greedy(), sampled(5), sampled(6), sampled(7)] {
        let out = run(
            &model,
            &tok,
            &g,
            Some(ConstraintSpec::Choice(choices.clone())),
            s,
            20,
        );
        assert!(choices.contains(&out.text), "{:?}", out.text);
        assert_eq!(out.finish_reason, FinishReason::Stop);
    }
}

#[test]
fn lark_grammar_output_is_in_the_language() {
    let (model, tok, g) = setup();
    let grammar = r#"
        start: expr
        expr: num | "(" expr op expr ")"
        op: "+" | "*"
        num: /[0-9]{1,3}/
    "#;
    // A string of that grammar: digits, or balanced parentheses around `expr op expr`.
    fn parse(s: &[u8], i: usize) -> Option<usize> {
        if s.get(i) == Some(&b'(') {
            let j = parse(s, i + 1)?;
            if !matches!(s.get(j), Some(b'+' | b'*')) {
                return None;
            }
            let k = parse(s, j + 1)?;
            (s.get(k) == Some(&b')')).then_some(k + 1)
        } else {
            let n = s[i..].iter().take_while(|c| c.is_ascii_digit()).count();
            (1..=3).contains(&n).then_some(i + n)
        }
    }
    for s in [SamplingParams::greedy(), sampled(8), sampled(9)] {
        let out = run(
            &model,
            &tok,
            &g,
            Some(ConstraintSpec::Grammar(grammar.into())),
            s,
            40,
        );
        if out.finish_reason != FinishReason::Length {
            assert_eq!(
                parse(out.text.as_bytes(), 0),
                Some(out.text.len()),
                "{:?}",
                out.text
            );
        }
    }
}

#[test]
fn a_constraint_never_changes_a_token_that_satisfies_it() {
    let (model, tok, g) = setup();
    let free = run(&model, &tok, &g, None, SamplingParams::greedy(), 20);
    assert_eq!(free.finish_reason, FinishReason::Length);
    // Anything at all: the same tokens, to the length limit.
    let any = run(
        &model,
        &tok,
        &g,
        Some(ConstraintSpec::Regex(r"(.|\n)*".into())),
        SamplingParams::greedy(),
        20,
    );
    assert_eq!(any.tokens, free.tokens);
    assert_eq!(any.logprobs, free.logprobs);
    // The very text greedy decoding gives, as the only choice: the same tokens, then it ends
    // because the choice is complete.
    let exact = run(
        &model,
        &tok,
        &g,
        Some(ConstraintSpec::Choice(vec![
            free.text.clone(),
            "something else".into(),
        ])),
        SamplingParams::greedy(),
        20,
    );
    assert_eq!(exact.tokens, free.tokens);
    assert_eq!(exact.text, free.text);
    assert_eq!(exact.finish_reason, FinishReason::Stop);
}

#[test]
fn end_of_text_only_where_the_constraint_accepts() {
    let (model, tok, g) = setup();
    // `a+`: never complete, so it runs to the limit unless the end-of-text token is chosen, which
    // is allowed from the first `a` on.
    let eos = model.config().eos_token_id;
    for seed in 0..4 {
        let out = run(
            &model,
            &tok,
            &g,
            Some(ConstraintSpec::Regex("a+".into())),
            sampled(seed),
            12,
        );
        assert!(!out.text.is_empty() && out.text.bytes().all(|b| b == b'a'));
        if out.tokens.last() == Some(&eos) {
            assert_eq!(out.finish_reason, FinishReason::Eos);
        }
    }
}

#[test]
fn batched_constrained_sequences_match_their_lone_runs() {
    let (model, tok, g) = setup();
    let cfg = GenerationConfig {
        max_new_tokens: 40,
        sampling: sampled(21),
        constraint: Some(
            g.compile(&ConstraintSpec::JsonSchema(person_schema()))
                .unwrap(),
        ),
        ..Default::default()
    };
    let prompts = vec![tok.encode("A"), tok.encode("Some other prompt"), vec![]];
    let batch = Generator::new(&model, &tok, &prompts, &cfg)
        .unwrap()
        .run(|_| {})
        .unwrap();
    for (p, b) in prompts.iter().zip(&batch) {
        let alone = Generator::new(&model, &tok, std::slice::from_ref(p), &cfg)
            .unwrap()
            .run(|_| {})
            .unwrap();
        assert_eq!(alone[0].tokens, b.tokens);
    }
}

#[test]
fn constraints_that_do_not_compile_say_why() {
    let tok = Tokenizer::gpt2();
    let g = Grammars::new(&tok, 50256).unwrap();
    for (spec, want) in [
        (ConstraintSpec::Regex("a(b".into()), "regex"),
        (ConstraintSpec::Grammar("start: foo".into()), "grammar"),
        (ConstraintSpec::Grammar("".into()), "grammar"),
        (
            ConstraintSpec::JsonSchema(json!({"type": "no-such-type"})),
            "JSON schema",
        ),
        (ConstraintSpec::Choice(vec![]), "choice"),
    ] {
        let e = g.compile(&spec).unwrap_err().to_string();
        assert!(e.contains(want), "{spec:?}: {e}");
    }
    // Beam search is refused.
    let cfg = GenerationConfig {
        num_beams: 2,
        constraint: Some(g.compile(&ConstraintSpec::JsonObject).unwrap()),
        ..Default::default()
    };
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("beam search"), "{e}");
}

/// `gpt2 generate ARGS --json` on the fixture: exit status, the JSON on stdout, stderr.
fn cli(args: &[&str]) -> (i32, Value, String) {
    let dir = fixture_dir("full-vocab-f16");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(["generate", "--model", dir.to_str().unwrap(), "--json"])
        .args(["--prompt", "Q:", "--threads", "2"])
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_flags_constrain_and_bad_constraints_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("schema.json");
    std::fs::write(
        &schema,
        json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
               "maximum": 99}}, "required": ["n"], "additionalProperties": false})
        .to_string(),
    )
    .unwrap();
    let (rc, v, err) = cli(&[
        "--json-schema",
        schema.to_str().unwrap(),
        "-n",
        "40",
        "--seed",
        "1",
    ]);
    assert_eq!(rc, 0, "{err}");
    let o: Value = serde_json::from_str(v["text"].as_str().unwrap()).unwrap();
    assert!(o["n"].as_u64().unwrap() <= 99, "{o}");
    assert_eq!(v["finish_reason"], "stop");

    let (rc, v, err) = cli(&["--regex", "[a-c]{4}", "-n", "10", "--seed", "2"]);
    assert_eq!(rc, 0, "{err}");
    let t = v["text"].as_str().unwrap();
    assert!(
        t.len() == 4 && t.bytes().all(|b| (b'a'..=b'c').contains(&b)),
        "{t:?}"
    );

    let (rc, v, err) = cli(&[
        "--choice", "left", "--choice", "right", "-n", "5", "--greedy",
    ]);
    assert_eq!(rc, 0, "{err}");
    assert!(
        ["left", "right"].contains(&v["text"].as_str().unwrap()),
        "{v}"
    );

    let grammar = dir.path().join("g.lark");
    std::fs::write(&grammar, "start: \"<\" /[xy]{2}/ \">\"").unwrap();
    let (rc, v, err) = cli(&[
        "--grammar",
        grammar.to_str().unwrap(),
        "-n",
        "10",
        "--seed",
        "3",
    ]);
    assert_eq!(rc, 0, "{err}");
    let t = v["text"].as_str().unwrap();
    assert!(
        regex::Regex::new("^<[xy]{2}>$").unwrap().is_match(t),
        "{t:?}"
    );

    let (rc, v, err) = cli(&["--json-object", "-n", "10", "--seed", "4"]);
    assert_eq!(rc, 0, "{err}");
    assert!(v["text"].as_str().unwrap().starts_with('{'), "{v}");

    // Bad constraints: a clear message, a non-zero exit, nothing on stdout.
    let bad_schema = dir.path().join("bad.json");
    std::fs::write(&bad_schema, r#"{"type": "objec"}"#).unwrap();
    let not_json = dir.path().join("not.json");
    std::fs::write(&not_json, "{").unwrap();
    for (args, says) in [
        (vec!["--regex", "a(b"], "regex does not compile"),
        (
            vec!["--json-schema", bad_schema.to_str().unwrap()],
            "JSON schema does not compile",
        ),
        (
            vec!["--json-schema", not_json.to_str().unwrap()],
            "not valid JSON",
        ),
        (
            vec!["--grammar", schema.to_str().unwrap()],
            "grammar does not compile",
        ),
        (vec!["--regex", "a", "--choice", "b"], "cannot be used with"),
        (vec!["--regex", "a", "--num-beams", "2"], "beam search"),
    ] {
        let (rc, v, err) = cli(&args);
        assert_ne!(rc, 0, "{args:?}");
        assert!(v.is_null(), "{args:?}: {v}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn cached_choices_are_never_another_requests_list() {
    let (model, tok, g) = setup();
    // Pairs that a separator-joined cache key confused: the second of each, compiled after the
    // first, must give one of its own strings.
    for (first, second) in [
        (vec!["a\0b"], vec!["a", "b"]),
        (vec!["a\0"], vec!["a", ""]),
        (vec!["a", "b"], vec!["a\0b"]),
    ] {
        let spec = |c: &[&str]| ConstraintSpec::Choice(c.iter().map(|s| s.to_string()).collect());
        g.compile(&spec(&first)).unwrap();
        let out = run(
            &model,
            &tok,
            &g,
            Some(spec(&second)),
            SamplingParams::greedy(),
            5,
        );
        assert!(
            second.contains(&out.text.as_str()),
            "{first:?} then {second:?}: {:?}",
            out.text
        );
    }
}

#[test]
fn constraints_nothing_can_match_do_not_compile() {
    let tok = Tokenizer::gpt2();
    let g = Grammars::new(&tok, 50256).unwrap();
    for spec in [
        ConstraintSpec::Regex("[a&&b]".into()),
        ConstraintSpec::Grammar("start: a\na: a \"x\"".into()),
        ConstraintSpec::JsonSchema(json!({"$ref": "#"})),
        ConstraintSpec::JsonSchema(json!({"$ref": "#/definitions/a",
                                          "definitions": {"a": {"$ref": "#/definitions/a"}}})),
    ] {
        let e = g.compile(&spec).unwrap_err().to_string();
        assert!(e.contains(spec.kind()), "{spec:?}: {e}");
        assert!(e.contains("allows no output"), "{spec:?}: {e}");
        // llguidance's internals stay out of the message.
        for inner in ["NoExtensionBias", "<state>", "<non-verbose/>", "\n"] {
            assert!(!e.contains(inner), "{spec:?}: {e}");
        }
    }
}

/// Greedy from "The answer is" under `spec` with `cfg`'s other settings.
fn run_with(
    model: &Model,
    tok: &Tokenizer,
    g: &Grammars,
    spec: ConstraintSpec,
    cfg: GenerationConfig,
) -> Generation {
    let cfg = GenerationConfig {
        constraint: Some(g.compile(&spec).unwrap()),
        ..cfg
    };
    generate(model, tok, "The answer is", &cfg).unwrap()
}

#[test]
fn bans_that_leave_the_constraint_no_token_give_way() {
    let (model, tok, g) = setup();
    let eos = model.config().eos_token_id;
    let choice = |c: &str| ConstraintSpec::Choice(vec![c.to_owned()]);
    // `[""]` allows only the end; ignore_eos gives way and the end ends the sequence.
    let out = run_with(
        &model,
        &tok,
        &g,
        choice(""),
        GenerationConfig {
            max_new_tokens: 5,
            ignore_eos: true,
            sampling: SamplingParams::greedy(),
            ..Default::default()
        },
    );
    assert_eq!((out.text.as_str(), &out.tokens[..]), ("", &[eos][..]));
    assert_eq!(out.finish_reason, FinishReason::Eos);
    // `["x"]` allows only token 87 ("x"), a stop token here, banned before min_tokens: the ban
    // gives way and the stop token ends the sequence.
    let x = tok.encode("x");
    let out = run_with(
        &model,
        &tok,
        &g,
        choice("x"),
        GenerationConfig {
            max_new_tokens: 5,
            stop_token_ids: x.clone(),
            min_tokens: 1,
            sampling: sampled(1),
            ..Default::default()
        },
    );
    assert_eq!((out.text.as_str(), out.tokens), ("", x));
    assert_eq!(out.finish_reason, FinishReason::Stop);
    // A constraint's completion ends the sequence before min_tokens: min_tokens bans only the end
    // and stop tokens, and only while the constraint allows another token.
    for s in [SamplingParams::greedy(), sampled(2), sampled(3)] {
        let out = run_with(
            &model,
            &tok,
            &g,
            ConstraintSpec::Choice(vec!["ab".into(), "a".into()]),
            GenerationConfig {
                max_new_tokens: 8,
                min_tokens: 3,
                sampling: s,
                ..Default::default()
            },
        );
        assert_eq!(out.text, "ab");
        assert!(out.tokens.len() < 3 && !out.tokens.contains(&eos));
        assert_eq!(out.finish_reason, FinishReason::Stop);
    }
}

#[test]
fn a_grammar_at_a_dead_end_ends_the_sequence() {
    let (model, tok, g) = setup();
    // After "a" the rule `b` can never finish: no token is allowed there, and the sequence ends
    // at "a" rather than failing.
    let spec = ConstraintSpec::Grammar("start: \"a\" b\nb: b \"x\"".into());
    let out = run_with(
        &model,
        &tok,
        &g,
        spec,
        GenerationConfig {
            max_new_tokens: 5,
            sampling: SamplingParams::greedy(),
            ..Default::default()
        },
    );
    assert_eq!(out.text, "a");
    assert_eq!(out.finish_reason, FinishReason::Stop);
}

#[test]
fn no_repeat_ngram_gives_way_to_the_constraint() {
    let (model, tok, g) = setup();
    // Forty `a`s from GPT-2's few all-`a` tokens must repeat one, which a 1-gram ban forbids:
    // the ban gives way rather than leaving no token.
    let out = run_with(
        &model,
        &tok,
        &g,
        ConstraintSpec::Regex("a{40}".into()),
        GenerationConfig {
            max_new_tokens: 40,
            sampling: SamplingParams {
                no_repeat_ngram_size: 1,
                ..sampled(4)
            },
            ..Default::default()
        },
    );
    assert_eq!(out.text, "a".repeat(40));
    assert_eq!(out.finish_reason, FinishReason::Stop);
}
