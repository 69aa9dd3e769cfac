//! The `gpt2` binary: the `--json` contract, human output, and clear errors with a non-zero exit.

use crate::common;

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
    // Ranks and entropies, one per scored token, as the library gives them (JSON holds each f32
    // in its shortest form, which reads back to the same f32).
    let d = gpt2::eval::score_diagnostics(&model, &[tok.encode(prompt)])
        .unwrap()
        .remove(0);
    let got = |key: &str| -> Vec<f32> {
        let a = v[key].as_array().unwrap();
        a.iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    assert_eq!(got("logprobs"), lps);
    assert_eq!(got("logprobs"), d.logprobs);
    assert_eq!(
        got("ranks"),
        d.ranks.iter().map(|&r| r as f32).collect::<Vec<_>>()
    );
    assert_eq!(got("entropies"), d.entropies);

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

/// Run with stdin from `input` and stdout to `stdout`.
fn gpt2_io(args: &[&str], input: &str, stdout: std::process::Stdio) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(input.as_bytes());
    drop(stdin);
    child.wait_with_output().unwrap()
}

#[test]
fn failed_writes_to_stdout_are_errors_not_panics() {
    let m = full_vocab();
    let big = "hello world ".repeat(50_000);
    // A reader that has gone away (`| head -1`): a quiet, successful end.
    for (args, input) in [
        (vec!["tokenize"], big.as_str()),
        (vec!["top", "-m", &m, "-k", "1000", "-p", "Hi"], ""),
        (vec!["generate", "-m", &m, "-p", "Hi", "-n", "40"], ""),
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = gpt2_io(&args, input, writer.into());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("error"),
            "{args:?}: {err}"
        );
    }
    // A full disk: exit 1 and say so.
    for args in [
        vec!["tokenize", "--json", "hello"],
        vec!["inspect", "-m", &m],
        vec!["generate", "-m", &m, "-p", "Hi", "-n", "3", "--json"],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = gpt2_io(&args, "", full.into());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("writing to standard output: No space left on device")
                && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn bench_sizes_are_checked_not_wrapped() {
    let m = fixture_dir("openai-f32");
    let m = m.to_str().unwrap();
    // The sum wrapped to 0 (capacity overflow panic) or into range (a context of 99 positions).
    for (p, d) in [
        ("18446744073709551615", "1"),
        ("100", "18446744073709551615"),
        ("0", "1"),
        ("30", "3"),
    ] {
        fails_with(
            &["bench", "-m", m, "--prompt", p, "--decode", d],
            &format!("--prompt {p} + --decode {d}: need at least 1 prompt token and at most the model's context of 32 positions in all"),
        );
    }
    fails_with(
        &["bench", "-m", m, "--prompt", "4", "--decode", "4", "--batch", "18446744073709551615"],
        "the KV cache for 18446744073709551615 sequences of 8 positions needs more than this machine can address",
    );
    fails_with(
        &["bench", "-m", m, "--repeat", "1001"],
        "1001 is not in 1..=1000",
    );
    // --decode 0 measures the prompt only: no decode line (it said `inf ms/token`).
    let out = gpt2(&[
        "bench", "-m", m, "--prompt", "8", "--decode", "0", "--repeat", "1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("prompt    8 tokens"),
        "{text}"
    );
    assert!(!text.contains("decode") && !text.contains("inf"), "{text}");
}

#[test]
fn inspect_checks_the_config_against_the_tensors() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture_dir("openai-f32").join(f), dir.path().join(f)).unwrap();
    }
    let d = dir.path().to_str().unwrap();
    let set = |k: &str, v: u64| {
        let p = dir.path().join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixture_dir("openai-f32").join("config.json")).unwrap(),
        )
        .unwrap();
        c[k] = v.into();
        if k == "n_embd" {
            c["n_head"] = 1.into();
        }
        std::fs::write(p, c.to_string()).unwrap();
    };
    // Both printed a wrapped parameter count with exit 0.
    set("n_layer", 1_000_000);
    fails_with(
        &["inspect", "-m", d],
        "config.json says n_layer 1000000, but the checkpoint",
    );
    fails_with(&["inspect", "-m", d], "holds 2 layers");
    set("n_embd", 1_000_000_000);
    fails_with(
        &["inspect", "-m", d, "--json"],
        "the parameter count overflows a 64-bit integer",
    );
    set("n_embd", 100_000);
    fails_with(
        &["inspect", "-m", d],
        "tensor `wte.weight`: shape [384, 64], but config.json implies [384, 100000]",
    );
    set("vocab_size", 385);
    fails_with(
        &["inspect", "-m", d],
        "tensor `wte.weight`: shape [384, 64]",
    );
}

#[test]
fn half_a_tokenizer_is_an_error_naming_the_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture_dir("full-vocab-f16").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("vocab.json"), "{}").unwrap();
    let d = dir.path().to_str().unwrap();
    fails_with(&["tokenize", "-m", d, "hello"], "merges.txt is missing");
    fails_with(
        &["generate", "-m", d, "-p", "hello", "-n", "2"],
        "merges.txt is missing",
    );
}

#[test]
fn generate_small_fixes() {
    let m = full_vocab();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "-m",
            m.as_str(),
            "-p",
            "The tower is",
            "-n",
            "8",
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&args)
    };
    // A tiny temperature is greedy; it was token 0 every time (logits / t overflowed to NaN).
    let greedy = run(&["--greedy"])["tokens"].clone();
    for t in ["1e-38", "1e-39", "1e-45"] {
        for k in [&[][..], &["--top-k", "1"]] {
            let mut extra = vec!["--temperature", t, "--seed", "3"];
            extra.extend_from_slice(k);
            assert_eq!(run(&extra)["tokens"], greedy, "temperature {t} {k:?}");
        }
    }
    // --top-k 0 is off, as in transformers and llama.cpp.
    assert_eq!(
        run(&["--top-k", "0", "--seed", "9"])["tokens"],
        run(&["--seed", "9"])["tokens"]
    );
    // One token still prints the seed.
    let out = gpt2(&["generate", "-m", &m, "-p", "Hi", "-n", "1", "--seed", "77"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("seed 77"), "{err}");
    // --truncate-prompt: the JSON echoes the prompt that was used, and says how much was dropped.
    let long = format!("First{}", " word".repeat(60));
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
    assert_eq!(v["prompt_dropped_tokens"], 61 - 54);
    assert_eq!(v["prompt"], " word".repeat(54));
    let v = run(&["--greedy"]);
    assert_eq!(
        (v["prompt"].as_str(), v["prompt_dropped_tokens"].as_u64()),
        (Some("The tower is"), Some(0))
    );
}

#[test]
fn many_prompts_run_in_groups_with_identical_results() {
    let m = full_vocab();
    // More prompts than one group holds (32): the results stay in order, each equal to its prompt alone.
    let prompts: Vec<String> = (0..37).map(|i| format!("Prompt number {i} is")).collect();
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), prompts.join("\n")).unwrap();
    let v = json(&[
        "generate",
        "-m",
        &m,
        "--prompts",
        f.path().to_str().unwrap(),
        "-n",
        "4",
        "--seed",
        "11",
        "--json",
    ]);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 37);
    for i in [0, 31, 32, 36] {
        let alone = json(&[
            "generate",
            "-m",
            &m,
            "-p",
            &prompts[i],
            "-n",
            "4",
            "--seed",
            "11",
            "--json",
        ]);
        assert_eq!(results[i]["prompt"], prompts[i].as_str());
        assert_eq!(results[i]["tokens"], alone["tokens"], "prompt {i}");
    }
}

#[test]
fn download_and_stdin_small_fixes() {
    let m = full_vocab();
    // A local directory is not something to download.
    fails_with(
        &["download", &m],
        "is a local directory; download takes a hub id",
    );
    // `-f -` reads standard input.
    let text = "The tower is tall and the river is wide.";
    let out = gpt2_io(
        &["perplexity", "-m", &m, "-f", "-", "--json"],
        text,
        std::process::Stdio::piped(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let piped: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    let from_file = json(&[
        "perplexity",
        "-m",
        &m,
        "-f",
        f.path().to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(piped["perplexity"], from_file["perplexity"]);
    assert_eq!(piped["tokens"], from_file["tokens"]);
}

#[test]
fn beam_buffers_are_checked_against_memory_before_allocating() {
    // 10^7 beams of a 50,257-token vocabulary need terabytes: the kernel killed the process (or, under
    // a memory cap, an allocation panicked) before this was checked.
    let m = fixture_dir("full-vocab-f16");
    fails_with(
        &[
            "generate",
            "-m",
            m.to_str().unwrap(),
            "--prompt",
            "Hi",
            "-n",
            "3",
            "--num-beams",
            "10000000",
        ],
        "beam search over 10000000 beams of a 50257-token vocabulary needs",
    );
}

#[test]
fn counts_and_seeds_say_their_real_bounds() {
    let m = fixture_dir("openai-f32");
    let m = m.to_str().unwrap();
    let gen = |extra: &[&str]| {
        let mut a = vec!["generate", "-m", m, "--prompt", "a", "--greedy"];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (gen(&["-n", "0"]), "must be at least 1"),
        (gen(&["--num-beams", "0"]), "must be at least 1"),
        (gen(&["--threads", "0"]), "0 is not in 1..=1024"),
        (gen(&["--seed", "-1"]), "expected a whole number from 0 to"),
        (
            ["perplexity", "-m", m, "--file", "-", "--batch", "0"]
                .map(String::from)
                .to_vec(),
            "must be at least 1",
        ),
        (
            ["top", "-m", m, "--prompt", "a", "-k", "0"]
                .map(String::from)
                .to_vec(),
            "must be at least 1",
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&args, want);
        let err = String::from_utf8_lossy(&gpt2(&args).stderr).into_owned();
        assert!(
            !err.contains("18446744073709551615") && !err.contains("4294967295"),
            "{args:?}: the bound is not a range to u64::MAX: {err}"
        );
        assert!(!err.contains("unexpected argument"), "{args:?}: {err}");
    }
}
