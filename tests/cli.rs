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
