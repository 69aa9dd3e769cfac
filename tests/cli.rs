//! The `gpt2` binary: the `--json` contract, human output, and clear errors with a non-zero exit.

mod common;

use std::process::{Command, Output};

use common::fixture_dir;

fn gpt2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(args)
        .output()
        .unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = gpt2(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON object: {e}"))
}

fn fails_with(args: &[&str], want: &str) {
    let out = gpt2(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        err.contains(want),
        "{args:?}: stderr {err:?} should contain {want:?}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
}

#[test]
fn inspect_json_lists_config_parameters_and_tensors() {
    let dir = fixture_dir("openai-f32");
    let v = json(&["inspect", "--model", dir.to_str().unwrap(), "--json"]);
    assert_eq!(v["config"]["n_layer"], 2);
    assert_eq!(v["config"]["n_embd"], 64);
    // 384·64 + 32·64 + 2·(4·64 + 64·192 + 192 + 64·64 + 64 + 64·256 + 256 + 256·64 + 64) + 2·64
    assert_eq!(v["parameters"], 126_720);
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 4 + 2 * 12, "mask buffers are not listed");
    let wte = tensors.iter().find(|t| t["name"] == "wte.weight").unwrap();
    assert_eq!(
        (wte["dtype"].as_str(), wte["shape"].clone()),
        (Some("F32"), serde_json::json!([384, 64]))
    );
    let bf16 = json(&[
        "inspect",
        "-m",
        fixture_dir("hf-bf16").to_str().unwrap(),
        "--json",
    ]);
    assert!(bf16["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["dtype"] == "BF16"));
    let human = gpt2(&["inspect", "--model", dir.to_str().unwrap()]);
    let text = String::from_utf8(human.stdout).unwrap();
    assert!(
        text.contains("parameters   126720") && text.contains("h.1.mlp.c_fc.weight"),
        "{text}"
    );
}

#[test]
fn tokenize_and_detokenize() {
    let v = json(&["tokenize", "--json", "Hello world<|endoftext|>"]);
    assert_eq!(v["ids"], serde_json::json!([15496, 995, 50256]));
    assert_eq!(
        v["tokens"],
        serde_json::json!(["Hello", " world", "<|endoftext|>"])
    );
    let v = json(&["tokenize", "--json", "--special-as-text", "<|endoftext|>"]);
    assert_eq!(v["ids"].as_array().unwrap().len(), 7);
    let v = json(&["detokenize", "--json", "15496", "995"]);
    assert_eq!(v["text"], "Hello world");
    // From a file, and human output with visible whitespace.
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), "a\n\tb").unwrap();
    let out = gpt2(&["tokenize", "--file", f.path().to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(r#"198  "\n""#) && text.contains(r#"197  "\t""#),
        "{text}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    fails_with(
        &["detokenize", "50257"],
        "token id 50257 is not in the vocabulary",
    );
    fails_with(&["detokenize", "abc"], "invalid value 'abc'");
    fails_with(
        &["inspect", "--model", "/nonexistent/dir"],
        "no such directory",
    );
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), [0x66, 0xFF, 0x6F]).unwrap();
    fails_with(
        &["tokenize", "--file", f.path().to_str().unwrap()],
        "not UTF-8 text (invalid byte at offset 1)",
    );
    fails_with(
        &["tokenize", "x", "--file", f.path().to_str().unwrap()],
        "not both",
    );
    fails_with(&["frobnicate"], "unrecognized subcommand");
    let empty = tempfile::tempdir().unwrap();
    fails_with(
        &["inspect", "--model", empty.path().to_str().unwrap()],
        "config.json",
    );
}

#[test]
fn every_command_has_help() {
    for cmd in ["inspect", "tokenize", "detokenize"] {
        let out = gpt2(&[cmd, "--help"]);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("--model"),
            "{cmd}"
        );
    }
}

fn full_vocab() -> String {
    fixture_dir("full-vocab-f16").to_str().unwrap().to_owned()
}

#[test]
fn top_score_and_perplexity_json() {
    let m = full_vocab();
    let model = gpt2::Model::load(&fixture_dir("full-vocab-f16")).unwrap();
    let tok = gpt2::Tokenizer::gpt2();
    let prompt = "The tower is 324 metres";
    let v = json(&["top", "-m", &m, "-p", prompt, "-k", "5", "--json"]);
    let want = gpt2::eval::top_k(&model, &tok.encode(prompt), 5).unwrap();
    let ids: Vec<u32> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, want.iter().map(|w| w.0).collect::<Vec<_>>());
    assert_eq!(v["tokens"].as_array().unwrap().len(), 5);
    assert!((v["logprobs"][0].as_f64().unwrap() - want[0].1 as f64).abs() < 1e-6);
    // An empty prompt starts from <|endoftext|>.
    let v = json(&["top", "-m", &m, "-p", "", "--json"]);
    assert_eq!(v["prompt_tokens"], 1);

    let v = json(&["score", "-m", &m, "-t", prompt, "--json"]);
    let lps = gpt2::eval::score(&model, &tok.encode(prompt)).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), lps.len() + 1);
    assert_eq!(v["logprobs"].as_array().unwrap().len(), lps.len());
    let total: f64 = lps.iter().map(|&l| l as f64).sum();
    assert!((v["total"].as_f64().unwrap() - total).abs() < 1e-9);

    let f = tempfile::NamedTempFile::new().unwrap();
    let text = "The tower has three levels for visitors, with restaurants on the first and second levels. ".repeat(4);
    std::fs::write(f.path(), &text).unwrap();
    let p = f.path().to_str().unwrap();
    let v = json(&[
        "perplexity",
        "-m",
        &m,
        "-f",
        p,
        "--context",
        "32",
        "--stride",
        "16",
        "--json",
    ]);
    let ids = tok.encode(&text);
    let want = gpt2::eval::perplexity(&model, &ids, 32, 16, 1, |_, _| {}).unwrap();
    assert_eq!(
        (v["tokens"].as_u64(), v["scored"].as_u64()),
        (Some(ids.len() as u64), Some(want.scored as u64))
    );
    assert!((v["perplexity"].as_f64().unwrap() - want.perplexity).abs() <= 1e-9 * want.perplexity);
    // Defaults: context = n_positions, stride = context.
    let v = json(&["perplexity", "-m", &m, "-f", p, "--json"]);
    assert_eq!(
        (v["context"].as_u64(), v["stride"].as_u64()),
        (Some(64), Some(64))
    );
}

#[test]
fn bad_evaluation_input_is_a_clear_error() {
    let m = full_vocab();
    let f = tempfile::NamedTempFile::new().unwrap();
    let p = f.path().to_str().unwrap().to_owned();
    let ppl = |extra: &[&str], want: &str| {
        let mut args = vec!["perplexity", "-m", &m, "-f", &p];
        args.extend_from_slice(extra);
        fails_with(&args, want);
    };
    std::fs::write(f.path(), "").unwrap();
    ppl(&[], "at least 2 tokens");
    std::fs::write(f.path(), "Hello").unwrap();
    ppl(&[], "at least 2 tokens (the first is only context); got 1");
    std::fs::write(f.path(), b"ok \xC3\x28 bad").unwrap();
    ppl(&[], "not UTF-8 text (invalid byte at offset 3)");
    std::fs::write(f.path(), "a few words of text here").unwrap();
    ppl(
        &["--stride", "0"],
        "stride 0 must be between 1 and the context (64)",
    );
    ppl(
        &["--context", "16", "--stride", "17"],
        "stride 17 must be between 1 and the context (16)",
    );
    ppl(
        &["--context", "65"],
        "context 65 must be between 2 and the model's 64 positions",
    );
    fails_with(
        &["perplexity", "-m", &m, "-f", "/nonexistent.txt"],
        "/nonexistent.txt",
    );
    fails_with(&["score", "-m", &m, "-t", "Hi"], "at least 2 tokens");
    fails_with(&["top", "-m", &m, "-p", "x", "-k", "0"], "-k");
}

#[test]
fn generate_json_streaming_batches_and_stop() {
    let m = full_vocab();
    let v = json(&[
        "generate",
        "-m",
        &m,
        "-p",
        "The tower is",
        "-n",
        "12",
        "--greedy",
        "--json",
    ]);
    assert_eq!(v["prompt_tokens"], 3);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 12);
    assert_eq!(v["logprobs"].as_array().unwrap().len(), 12);
    assert_eq!(v["finish_reason"], "length");
    let tok = gpt2::Tokenizer::gpt2();
    let ids: Vec<u32> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(v["text"].as_str().unwrap(), tok.decode(&ids).unwrap());

    // Human mode streams the prompt and the continuation to stdout, the speed to stderr.
    let out = gpt2(&[
        "generate",
        "-m",
        &m,
        "-p",
        "The tower is",
        "-n",
        "12",
        "--greedy",
    ]);
    let (stdout, stderr) = (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    );
    assert_eq!(
        stdout,
        format!("The tower is{}\n", v["text"].as_str().unwrap())
    );
    assert!(
        stderr.contains("tokens/s") && stderr.contains("finish: length"),
        "{stderr}"
    );

    // Seeded sampling repeats; a prompt from stdin works like --prompt.
    let args = [
        "generate", "-m", &m, "-p", "Hello", "-n", "10", "--seed", "5", "--top-p", "0.9", "--json",
    ];
    assert_eq!(json(&args)["tokens"], json(&args)["tokens"]);

    // A file of prompts (plain lines and JSON lines) gives each prompt's own result.
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        f.path(),
        "Hello\n{\"prompt\": \"The tower is\"}\n\nIn 1957\n",
    )
    .unwrap();
    let v = json(&[
        "generate",
        "-m",
        &m,
        "--prompts",
        f.path().to_str().unwrap(),
        "-n",
        "6",
        "--greedy",
        "--json",
    ]);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for r in results {
        let alone = json(&[
            "generate",
            "-m",
            &m,
            "-p",
            r["prompt"].as_str().unwrap(),
            "-n",
            "6",
            "--greedy",
            "--json",
        ]);
        assert_eq!(r["tokens"], alone["tokens"]);
    }

    // A stop string is not printed.
    let full = json(&[
        "generate", "-m", &m, "-p", "In 1957", "-n", "15", "--greedy", "--json",
    ]);
    let text = full["text"].as_str().unwrap();
    let stop = &text[text.len() / 2..text.len() / 2 + 3];
    let v = json(&[
        "generate", "-m", &m, "-p", "In 1957", "-n", "15", "--greedy", "--stop", stop, "--json",
    ]);
    assert_eq!(v["finish_reason"], "stop");
    assert_eq!(
        v["text"].as_str().unwrap(),
        &text[..text.find(stop).unwrap()]
    );

    // Beam search returns the asked number of sequences.
    let v = json(&[
        "generate",
        "-m",
        &m,
        "-p",
        "Hello",
        "-n",
        "5",
        "--num-beams",
        "3",
        "--num-return-sequences",
        "2",
        "--json",
    ]);
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
}

#[test]
fn generate_refuses_bad_settings() {
    let m = full_vocab();
    let g = |extra: &[&str], want: &str| {
        let mut args = vec!["generate", "-m", m.as_str(), "-p", "Hello"];
        args.extend_from_slice(extra);
        fails_with(&args, want);
    };
    g(&["--temperature", "-1"], "temperature -1 must be ≥ 0");
    g(&["--top-p", "1.5"], "top-p 1.5 must be in (0, 1]");
    g(&["--top-p", "0"], "top-p 0 must be in (0, 1]");
    g(&["--top-k", "0"], "invalid value '0' for '--top-k");
    g(&["-n", "0"], "invalid value '0' for '--max-tokens");
    g(&["--no-such-flag"], "unexpected argument '--no-such-flag'");
    g(
        &["-n", "64"],
        "max tokens 64 leaves no room for a prompt in the context of 64",
    );
    let long = "word ".repeat(60);
    fails_with(
        &["generate", "-m", &m, "-p", &long, "-n", "10"],
        "exceed the context of 64",
    );
    let v = json(&[
        "generate",
        "-m",
        &m,
        "-p",
        &long,
        "-n",
        "10",
        "--truncate-prompt",
        "--greedy",
        "--json",
    ]);
    assert_eq!(v["prompt_tokens"], 54);
    g(
        &["--num-beams", "2", "--top-k", "5"],
        "beam search is deterministic",
    );
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), "{\"text\": 1}\n").unwrap();
    fails_with(
        &[
            "generate",
            "-m",
            &m,
            "--prompts",
            f.path().to_str().unwrap(),
        ],
        "expected an object with a string \"prompt\" field",
    );
}

#[test]
fn dtype_and_threads_flags_run_the_model_as_stored() {
    let m = full_vocab();
    let tok = gpt2::Tokenizer::gpt2();
    let prompt = "The tower is 324 metres";
    for d in ["f16", "bf16", "q8"] {
        let opts = gpt2::LoadOptions::new(gpt2::Device::Cpu, gpt2::DType::parse(d).unwrap());
        let model = gpt2::Model::load_with(&fixture_dir("full-vocab-f16"), &opts).unwrap();
        let want = gpt2::eval::top_k(&model, &tok.encode(prompt), 3).unwrap();
        let v = json(&[
            "top",
            "-m",
            &m,
            "-p",
            prompt,
            "-k",
            "3",
            "--dtype",
            d,
            "--threads",
            "1",
            "--json",
        ]);
        assert_eq!(v["ids"][0].as_u64(), Some(want[0].0 as u64), "{d}");
        assert!((v["logprobs"][0].as_f64().unwrap() - want[0].1 as f64).abs() < 1e-6);
        let g = json(&[
            "generate", "-m", &m, "-p", prompt, "-n", "4", "--greedy", "--dtype", d, "--json",
        ]);
        assert_eq!(g["tokens"].as_array().unwrap().len(), 4, "{d}");
    }
    fails_with(
        &["top", "-m", &m, "-p", "x", "--dtype", "f8"],
        "--dtype f8: expected f32, f16, bf16 or q8",
    );
    fails_with(&["top", "-m", &m, "-p", "x", "--threads", "0"], "--threads");
    let b = json(&[
        "bench",
        "--random",
        "distilgpt2",
        "--dtype",
        "q8",
        "--prompt",
        "8",
        "--decode",
        "4",
        "--repeat",
        "1",
        "--json",
    ]);
    assert_eq!(b["dtype"], "q8");
    assert!(b["decode_tok_s"].as_f64().unwrap() > 0.0);
    assert!(b["rss_bytes"].as_u64().unwrap() > 0);
}
