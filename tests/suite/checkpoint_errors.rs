//! Every broken checkpoint gives an error that names the file, the tensor, and expected vs found.

use crate::common;

use std::path::{Path, PathBuf};

use common::fixture_dir;
use gpt2::{Logits, Model, SeqInput};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// A copy of the `openai-f32` fixture whose tensors pass through `edit` (name, dtype, shape, bytes).
fn edited(
    edit: impl Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) -> (tempfile::TempDir, PathBuf) {
    let src = fixture_dir("openai-f32");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    let file = dir.path().join("model.safetensors");
    std::fs::write(&file, out).unwrap();
    (dir, file)
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error {err:?} should mention {p:?}");
    }
}

#[test]
fn missing_tensor() {
    let (dir, file) = edited(|t| t.retain(|x| x.0 != "h.1.ln_2.bias"));
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &[
            &file.display().to_string(),
            "`h.1.ln_2.bias`",
            "missing",
            "[64]",
        ],
    );
}

#[test]
fn unknown_extra_tensor() {
    let (dir, file) =
        edited(|t| t.push(("h.0.attn.rotary".into(), Dtype::F32, vec![2], vec![0; 8])));
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &[
            &file.display().to_string(),
            "`h.0.attn.rotary`",
            "unexpected tensor",
        ],
    );
}

#[test]
fn misshapen_tensor() {
    let (dir, file) = edited(|t| {
        let wpe = t.iter_mut().find(|x| x.0 == "wpe.weight").unwrap();
        wpe.2 = vec![31, 64];
        wpe.3.truncate(31 * 64 * 4);
    });
    let e = load_err(dir.path());
    assert_mentions(
        &e,
        &[
            &file.display().to_string(),
            "`wpe.weight`",
            "expected shape [32, 64], found [31, 64]",
        ],
    );
}

#[test]
fn unsupported_dtype() {
    let (dir, _) = edited(|t| {
        let w = t.iter_mut().find(|x| x.0 == "ln_f.bias").unwrap();
        w.1 = Dtype::I32;
    });
    assert_mentions(
        &load_err(dir.path()),
        &["`ln_f.bias`", "dtype I32 is not supported"],
    );
}

#[test]
fn truncated_file() {
    let (dir, file) = edited(|_| {});
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    assert_mentions(
        &load_err(dir.path()),
        &[&file.display().to_string(), "not a valid safetensors file"],
    );
}

#[test]
fn not_a_safetensors_file() {
    let (dir, file) = edited(|_| {});
    std::fs::write(&file, b"<html>404 not found</html>").unwrap();
    assert_mentions(
        &load_err(dir.path()),
        &[&file.display().to_string(), "not a valid safetensors file"],
    );
    std::fs::write(&file, b"").unwrap();
    assert_mentions(&load_err(dir.path()), &["not a valid safetensors file"]);
}

#[test]
fn header_that_lies_about_offsets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir("openai-f32").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    // Claims 400 bytes of data, but only 100 follow; then overlapping ranges.
    for header in [
        r#"{"wte.weight":{"dtype":"F32","shape":[10,10],"data_offsets":[0,400]}}"#,
        r#"{"a":{"dtype":"F32","shape":[25],"data_offsets":[0,100]},"b":{"dtype":"F32","shape":[25],"data_offsets":[0,100]}}"#,
        r#"{"a":{"dtype":"F32","shape":[10],"data_offsets":[0,100]}}"#,
    ] {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0u8; 100]);
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        assert_mentions(
            &load_err(dir.path()),
            &["model.safetensors", "not a valid safetensors file"],
        );
    }
}

#[test]
fn no_weights_or_no_config() {
    let dir = tempfile::tempdir().unwrap();
    assert_mentions(&load_err(dir.path()), &["config.json"]);
    std::fs::copy(
        fixture_dir("openai-f32").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    assert_mentions(
        &load_err(dir.path()),
        &["no model.safetensors or model.safetensors.index.json"],
    );
}

#[test]
fn sharded_index_problems() {
    let src = fixture_dir("sharded");
    let copy = || {
        let dir = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(&src).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
        }
        dir
    };
    // A shard the index names is gone.
    let dir = copy();
    std::fs::remove_file(dir.path().join("model-00003-of-00007.safetensors")).unwrap();
    assert_mentions(
        &load_err(dir.path()),
        &["model-00003-of-00007.safetensors", "No such file"],
    );
    // The index places a tensor in the wrong shard.
    let dir = copy();
    let idx = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&idx).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let map = v["weight_map"].as_object_mut().unwrap();
    let (name, shard) = map
        .iter()
        .next()
        .map(|(k, s)| (k.clone(), s.as_str().unwrap().to_owned()))
        .unwrap();
    let other = map
        .values()
        .map(|s| s.as_str().unwrap().to_owned())
        .find(|s| *s != shard)
        .unwrap();
    map.insert(name.clone(), other.clone().into());
    std::fs::write(&idx, v.to_string()).unwrap();
    assert_mentions(
        &load_err(dir.path()),
        &[&format!("`{name}`"), &format!("index places it in {other}")],
    );
    // Not JSON.
    std::fs::write(&idx, "{").unwrap();
    assert_mentions(
        &load_err(dir.path()),
        &["model.safetensors.index.json", "not a valid index"],
    );
}

#[test]
fn lm_head_is_used_when_present() {
    let logits = |dir: &Path| {
        let m = Model::load(dir).unwrap();
        let mut st = m.new_state(1, m.config().n_positions).unwrap();
        m.forward(
            &mut st,
            &[SeqInput {
                slot: 0,
                tokens: &[1, 2, 3],
            }],
            Logits::Last,
        )
        .unwrap()
        .to_vec()
    };
    let tied = logits(&fixture_dir("openai-f32"));
    // A copy of wte as lm_head (what tied checkpoints sometimes store): same logits.
    let (dir, _) = edited(|t| {
        let wte = t.iter().find(|x| x.0 == "wte.weight").unwrap().clone();
        t.push(("lm_head.weight".into(), wte.1, wte.2, wte.3));
    });
    assert_eq!(logits(dir.path()), tied);
    // An untied head: logits come from it (here, the negated matrix negates the logits).
    let (dir, _) = edited(|t| {
        let mut wte = t.iter().find(|x| x.0 == "wte.weight").unwrap().clone();
        for b in wte.3.chunks_exact_mut(4) {
            b[3] ^= 0x80;
        }
        t.push(("lm_head.weight".into(), wte.1, wte.2, wte.3));
    });
    let untied = logits(dir.path());
    assert!(untied.iter().zip(&tied).all(|(a, b)| *a == -*b));
}

#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    // A NaN in ln_f.weight used to load, then every token was 0 and perplexity null.
    for (dtype, bad) in [
        (Dtype::F32, f32::NAN.to_le_bytes().to_vec()),
        (Dtype::F32, f32::INFINITY.to_le_bytes().to_vec()),
        (Dtype::F16, half::f16::NEG_INFINITY.to_le_bytes().to_vec()),
        (Dtype::BF16, half::bf16::NAN.to_le_bytes().to_vec()),
    ] {
        let (dir, file) = edited(|t| {
            let w = t.iter_mut().find(|x| x.0 == "ln_f.weight").unwrap();
            if dtype != Dtype::F32 {
                w.1 = dtype;
                w.3.truncate(w.3.len() / 2);
            }
            let at = 3 * bad.len();
            w.3[at..at + bad.len()].copy_from_slice(&bad);
        });
        assert_mentions(
            &load_err(dir.path()),
            &[
                &file.display().to_string(),
                "`ln_f.weight`",
                "element 3 (of 64)",
                "must be finite",
            ],
        );
    }
}

#[test]
fn overflowing_weights_give_errors_not_token_0() {
    // Finite weights so large that the forward pass overflows: the logits are NaN, and every
    // consumer says so instead of answering token 0, `NaN%` or a null perplexity.
    let (dir, _) = edited(|t| {
        let w = t.iter_mut().find(|x| x.0 == "h.0.mlp.c_fc.weight").unwrap();
        for (i, c) in w.3.chunks_exact_mut(4).enumerate() {
            let v = if i % 2 == 0 { 3e38f32 } else { -3e38 };
            c.copy_from_slice(&v.to_le_bytes());
        }
    });
    let model = Model::load(dir.path()).unwrap();
    let ids = [1u32, 2, 3, 4];
    let errors = [
        gpt2::eval::top_k(&model, &ids, 3)
            .err()
            .map(|e| e.to_string()),
        gpt2::eval::score(&model, &ids).err().map(|e| e.to_string()),
        gpt2::eval::perplexity(&model, &ids, 4, 4, 1, |_, _| {})
            .err()
            .map(|e| e.to_string()),
    ];
    for e in errors {
        let e = e.expect("an error");
        assert!(e.contains("NaN"), "{e}");
    }
    let tok = gpt2::Tokenizer::gpt2();
    let cfg = gpt2::generate::GenerationConfig {
        max_new_tokens: 3,
        ..Default::default()
    };
    for sampling in [gpt2::sampling::SamplingParams::greedy(), Default::default()] {
        let cfg = gpt2::generate::GenerationConfig {
            sampling,
            ..cfg.clone()
        };
        let e = gpt2::generate::Generator::new(&model, &tok, &[ids.to_vec()], &cfg)
            .unwrap()
            .run(|_| {})
            .expect_err("an error")
            .to_string();
        assert!(e.contains("NaN") && e.contains("token 1"), "{e}");
    }
    let beams = gpt2::generate::GenerationConfig {
        num_beams: 2,
        sampling: gpt2::sampling::SamplingParams::greedy(),
        ..cfg
    };
    let e = gpt2::generate::beam::beam_search(&model, &tok, &ids, &beams)
        .map(|g| g.len())
        .expect_err("an error")
        .to_string();
    assert!(e.contains("NaN"), "{e}");
}
