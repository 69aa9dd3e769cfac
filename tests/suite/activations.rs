//! `gpt2 activations` (sharded safetensors of a corpus' activation sites, resumable) and
//! `gpt2 embed`, against the library run in-process.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use gpt2::embed::{embed, Pooling};
use gpt2::{Hooked, Model, Site, Tokenizer};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

const MODEL: &str = "full-vocab-f16";

fn gpt2() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gpt2"))
}

fn corpus(dir: &Path) -> PathBuf {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let path = dir.join("corpus.txt");
    std::fs::write(&path, &text[..6000.min(text.len())]).unwrap();
    path
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = gpt2().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn i64s(st: &SafeTensors, name: &str) -> Vec<i64> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::I64);
    t.data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn f32s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    let v = match t.dtype() {
        Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::F16 => t
            .data()
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes(b.try_into().unwrap()).to_f32())
            .collect(),
        d => panic!("{d:?}"),
    };
    (t.shape().to_vec(), v)
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn shards_hold_each_windows_sites_as_the_library_computes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let text = corpus(tmp.path());
    let out = tmp.path().join("acts");
    let model_dir = common::fixture_dir(MODEL);
    let (ok, _, err) = run(&[
        "activations",
        "-m",
        model_dir.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "--sites",
        "blocks.*.hook_resid_post,blocks.0.attn.hook_z",
        "--context",
        "48",
        "--shard-mib",
        "0.1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let m = manifest(&out);
    assert_eq!(m["complete"], true);
    let shards = m["shards"].as_array().unwrap();
    assert!(
        shards.len() >= 2,
        "a 0.1 MiB budget makes several shards: {m}"
    );

    let model = Model::load(&model_dir).unwrap();
    let tok = Tokenizer::from_dir(&model_dir).unwrap();
    let ids = tok.encode(&std::fs::read_to_string(&text).unwrap());
    let sites = Site::select(
        &["blocks.*.hook_resid_post", "blocks.0.attn.hook_z"],
        model.config(),
    )
    .unwrap();
    let (mut at, mut windows) = (0usize, 0usize);
    for s in shards {
        let bytes = std::fs::read(out.join(s["file"].as_str().unwrap())).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tokens = i64s(&st, "tokens");
        let docs = i64s(&st, "doc");
        let positions = i64s(&st, "position");
        assert_eq!(tokens.len() as u64, s["tokens"].as_u64().unwrap());
        assert!(docs.iter().all(|&d| d == 0));
        for (k, &t) in tokens.iter().enumerate() {
            assert_eq!(t as u32, ids[at + k]);
            assert_eq!(positions[k] as usize, at + k);
        }
        // Each window (48 tokens) against the library run alone.
        let mut row = 0;
        while row < tokens.len() {
            let w = &ids[at + row..(at + row + 48).min(ids.len())];
            let want = model
                .run_with_hooks(
                    &[Hooked {
                        ids: w,
                        patches: &[],
                    }],
                    &sites,
                    false,
                )
                .unwrap()
                .remove(0);
            for site in &sites {
                let (shape, got) = f32s(&st, &site.to_string());
                assert_eq!(shape[0], tokens.len());
                let width: usize = shape[1..].iter().product();
                let (_, v) = want.get(*site).unwrap();
                assert_eq!(&got[row * width..(row + w.len()) * width], v, "{site}");
            }
            row += w.len();
            windows += 1;
        }
        at += tokens.len();
    }
    assert_eq!(at, ids.len());
    assert_eq!(m["windows"].as_u64().unwrap() as usize, windows);
}

#[test]
fn an_interrupted_run_resumes_after_its_last_complete_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let text = corpus(tmp.path());
    let out = tmp.path().join("acts");
    let model_dir = common::fixture_dir(MODEL);
    let args = |out: &Path| {
        vec![
            "activations".to_string(),
            "-m".into(),
            model_dir.to_str().unwrap().into(),
            "-f".into(),
            text.to_str().unwrap().into(),
            "--sites".into(),
            "blocks.1.hook_resid_pre".into(),
            "--dtype-out".into(),
            "f16".into(),
            "--shard-mib".into(),
            "0.02".into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ]
    };
    let a = args(&out);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let (ok, _, err) = run(&a);
    assert!(ok, "{err}");
    let full = manifest(&out);
    let shards = full["shards"].as_array().unwrap().clone();
    assert!(shards.len() >= 2);
    let last = shards.last().unwrap()["file"].as_str().unwrap().to_owned();
    let last_bytes = std::fs::read(out.join(&last)).unwrap();
    // As a run stopped before its last shard leaves the directory: that shard missing, the
    // manifest one shard short and not complete, a temporary file half written.
    let mut cut = full.clone();
    cut["shards"] = Value::Array(shards[..shards.len() - 1].to_vec());
    cut["windows"] = (full["windows"].as_u64().unwrap()
        - shards.last().unwrap()["windows"].as_u64().unwrap())
    .into();
    cut["tokens"] = (full["tokens"].as_u64().unwrap()
        - shards.last().unwrap()["tokens"].as_u64().unwrap())
    .into();
    cut["complete"] = false.into();
    std::fs::write(out.join("manifest.json"), cut.to_string()).unwrap();
    std::fs::remove_file(out.join(&last)).unwrap();
    std::fs::write(out.join(format!("{last}.tmp")), b"partial").unwrap();
    let (ok, _, err) = run(&a);
    assert!(ok, "{err}");
    assert!(err.contains("resuming after"), "{err}");
    assert_eq!(std::fs::read(out.join(&last)).unwrap(), last_bytes);
    assert_eq!(manifest(&out), full);
    // Complete: nothing to do.
    let (ok, _, err) = run(&a);
    assert!(ok && err.contains("already complete"), "{err}");
    // Other settings in the same directory are refused.
    let mut b = a.clone();
    let i = b
        .iter()
        .position(|x| *x == "blocks.1.hook_resid_pre")
        .unwrap();
    b[i] = "blocks.0.hook_resid_pre";
    let (ok, _, err) = run(&b);
    assert!(
        !ok && err.contains("another run") && err.contains("sites"),
        "{err}"
    );
}

#[test]
fn bad_activation_requests_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let text = corpus(tmp.path());
    let model_dir = common::fixture_dir(MODEL);
    let m = model_dir.to_str().unwrap();
    let t = text.to_str().unwrap();
    let fresh = tmp.path().join("o");
    let o = fresh.to_str().unwrap();
    for (sites, extra, needle) in [
        ("blocks.0.attn.hook_pattern", vec![], "row sites"),
        ("blocks.7.hook_resid_post", vec![], "blocks 0 to 1"),
        (
            "blocks.0.hook_resid_post",
            vec!["--context", "65"],
            "context is 64",
        ),
    ] {
        let mut args = vec![
            "activations",
            "-m",
            m,
            "-f",
            t,
            "--sites",
            sites,
            "--out",
            o,
        ];
        args.extend(extra);
        let (ok, _, err) = run(&args);
        assert!(!ok && err.contains(needle), "{sites}: {err}");
    }
    // A directory with other files and no manifest is left alone.
    let used = tmp.path().join("used");
    std::fs::create_dir(&used).unwrap();
    std::fs::write(used.join("notes.txt"), "mine").unwrap();
    let (ok, _, err) = run(&[
        "activations",
        "-m",
        m,
        "-f",
        t,
        "--sites",
        "hook_embed",
        "--out",
        used.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("not empty"), "{err}");
    assert_eq!(
        std::fs::read_to_string(used.join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn embed_prints_the_librarys_embeddings_as_json_lines() {
    let model_dir = common::fixture_dir(MODEL);
    let texts = ["Hello world", "A second, longer text to embed."];
    let (ok, out, err) = run(&[
        "embed",
        "-m",
        model_dir.to_str().unwrap(),
        "--pooling",
        "last",
        texts[0],
        texts[1],
    ]);
    assert!(ok, "{err}");
    let model = Model::load(&model_dir).unwrap();
    let tok = Tokenizer::from_dir(&model_dir).unwrap();
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t)).collect();
    let want = embed(&model, &ids, Pooling::Last, true).unwrap();
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i);
        assert_eq!(l["tokens"], ids[i].len());
        let got: Vec<f32> = l["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got, want[i]);
    }
}
