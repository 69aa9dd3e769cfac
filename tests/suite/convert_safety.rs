//! `gpt2 convert` never damages its input, whatever `--out` names (issue 28): an output that would
//! replace a file the input is read from (the checkpoint itself, or the config and tokenizer files
//! beside it) is refused with a clear error, and every file is written beside its destination and
//! renamed into place, so no file is ever truncated under a memory map and no temporary is left.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn gpt2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(args)
        .output()
        .unwrap()
}

fn formats() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Copy the named files of `src` into a fresh directory `dst`.
fn copy_files(src: &Path, dst: &Path, names: &[&str]) {
    std::fs::create_dir_all(dst).unwrap();
    for n in names {
        std::fs::copy(src.join(n), dst.join(n)).unwrap();
    }
}

/// Every entry of `dir` (not recursive): a file's bytes, or None for anything else.
fn snapshot(dir: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = if e.file_type().unwrap().is_file() {
                Some(std::fs::read(e.path()).unwrap())
            } else {
                None
            };
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command ran to its end (no signal such as SIGBUS, no panic) and refused, saying why.
fn assert_refused(o: &Output, what: &str, mentions: &str) {
    assert_eq!(
        o.status.code(),
        Some(1),
        "{what}: expected a refusal (exit 1), got {:?}; stderr: {}",
        o.status,
        stderr(o)
    );
    let e = stderr(o);
    assert!(
        e.contains("would overwrite") && e.contains(mentions) && !e.contains("panicked"),
        "{what}: {e}"
    );
}

/// `gpt2 inspect` reads the checkpoint at `p`.
fn assert_loads(p: &Path) {
    let o = gpt2(&["inspect", "--model", s(p), "--json"]);
    assert!(
        o.status.success(),
        "inspect {}: {}",
        p.display(),
        stderr(&o)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v.is_object(), "inspect {}: {v}", p.display());
}

/// Convert `model` to `out` and return the files written (`--json`'s list), asserting success.
fn convert_ok(model: &Path, out: &Path, format: &str) -> Vec<PathBuf> {
    let o = gpt2(&[
        "convert",
        "--model",
        s(model),
        "--out",
        s(out),
        "--format",
        format,
        "--json",
    ]);
    assert!(
        o.status.success(),
        "convert {} → {} ({format}): {}",
        model.display(),
        out.display(),
        stderr(&o)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| PathBuf::from(f.as_str().unwrap()))
        .collect()
}

#[test]
fn converting_a_safetensors_checkpoint_onto_itself_leaves_it_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_files(
        &formats().join("tiny"),
        &dir,
        &[
            "config.json",
            "model.safetensors",
            "vocab.json",
            "merges.txt",
        ],
    );
    // A fixture without tokenizer files too (the builtin vocabulary), of another width.
    let bare = tmp.path().join("bare");
    copy_files(
        &common::fixture_dir("hf-f16"),
        &bare,
        &["config.json", "model.safetensors"],
    );
    for (d, dtype) in [
        (&dir, "f32"),
        (&dir, "f16"),
        (&bare, "f32"),
        (&bare, "bf16"),
    ] {
        let before = snapshot(d);
        let file = d.join("model.safetensors");
        let trailing = format!("{}/", s(d));
        for (model, out) in [
            (d.as_path(), d.as_path()),
            (file.as_path(), d.as_path()),
            (d.as_path(), Path::new(&trailing)),
        ] {
            let what = format!("{} → {} ({dtype})", model.display(), out.display());
            let o = gpt2(&[
                "convert",
                "--model",
                s(model),
                "--out",
                s(out),
                "--dtype",
                dtype,
            ]);
            assert_refused(&o, &what, "model.safetensors");
            assert!(snapshot(d) == before, "{what}: the input directory changed");
            assert_loads(d);
        }
    }
}

#[test]
fn converting_a_gguf_onto_itself_leaves_it_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let g = tmp.path().join("g");
    let written = convert_ok(&formats().join("tiny"), &g, "gguf");
    let gguf = g.join("model.gguf");
    assert_eq!(written, vec![gguf.clone()]);
    let before = snapshot(&g);
    assert_eq!(before.len(), 1, "{:?}", before.keys());
    let mut cases = vec![
        (gguf.clone(), g.clone(), "f32"),
        (gguf.clone(), gguf.clone(), "f32"),
        (g.clone(), g.clone(), "f16"),
        (g.clone(), gguf.clone(), "q8"),
    ];
    // The same directory under another name is still the same file.
    #[cfg(unix)]
    {
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&g, &link).unwrap();
        cases.push((gguf.clone(), link.clone(), "f32"));
        cases.push((link.join("model.gguf"), link.join("model.gguf"), "q8"));
    }
    for (model, out, dtype) in cases {
        let what = format!("{} → {} (gguf {dtype})", model.display(), out.display());
        let o = gpt2(&[
            "convert",
            "--model",
            s(&model),
            "--out",
            s(&out),
            "--format",
            "gguf",
            "--dtype",
            dtype,
        ]);
        assert_refused(&o, &what, "model.gguf");
        assert!(snapshot(&g) == before, "{what}: the input changed");
        assert_loads(&gguf);
    }
    // Safetensors beside the GGUF replaces none of its inputs (its config and vocabulary are inside
    // it): allowed, and the GGUF is untouched.
    let written = convert_ok(&gguf, &g, "safetensors");
    assert_eq!(written.len(), 4);
    let after = snapshot(&g);
    assert!(after["model.gguf"] == before["model.gguf"]);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        [
            "config.json",
            "merges.txt",
            "model.gguf",
            "model.safetensors",
            "vocab.json"
        ]
    );
    assert_loads(&gguf);
    assert_loads(&g.join("model.safetensors"));
}

#[test]
fn converting_over_the_inputs_config_or_tokenizer_files_is_refused() {
    // A PyTorch checkpoint converted to safetensors in its own directory would replace the
    // config.json, vocab.json and merges.txt it was read with.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pt");
    copy_files(
        &formats().join("pytorch"),
        &dir,
        &[
            "config.json",
            "pytorch_model.bin",
            "vocab.json",
            "merges.txt",
        ],
    );
    let before = snapshot(&dir);
    let o = gpt2(&["convert", "--model", s(&dir), "--out", s(&dir)]);
    assert_refused(&o, "pytorch → its own directory", "config.json");
    assert!(snapshot(&dir) == before, "the input directory changed");
    assert_loads(&dir);
    // GGUF into the same directory replaces nothing the input reads.
    let written = convert_ok(&dir, &dir, "gguf");
    assert_eq!(written, vec![dir.join("model.gguf")]);
    let after = snapshot(&dir);
    for (name, bytes) in &before {
        assert!(after[name] == *bytes, "{name} changed");
    }
    assert_eq!(after.len(), before.len() + 1);
    assert_loads(&dir.join("model.gguf"));
}

#[test]
fn converting_to_a_fresh_directory_leaves_no_temporary_files() {
    let tmp = tempfile::tempdir().unwrap();
    let src = formats().join("tiny");
    let src_before = snapshot(&src);
    let out = tmp.path().join("st");
    let names = [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "vocab.json",
    ];
    // Twice: the second run replaces the first one's files (outputs, not inputs).
    for _ in 0..2 {
        let written = convert_ok(&src, &out, "safetensors");
        assert_eq!(written.len(), 4);
        assert_eq!(snapshot(&out).keys().collect::<Vec<_>>(), names);
        assert_loads(&out);
    }
    // The converted weights are the source's, and the vocabulary travels with them.
    let tok = gpt2::weights::tokenizer_for(&out).unwrap();
    assert_eq!(tok.vocab_size(), 300);
    let o = gpt2::weights::open(&out).unwrap();
    let t = gpt2::weights::open(&src).unwrap();
    let wte_a = o
        .checkpoint
        .f32("wte.weight", &[t.config.vocab_size, t.config.n_embd]);
    let wte_b = t
        .checkpoint
        .f32("wte.weight", &[t.config.vocab_size, t.config.n_embd]);
    assert!(wte_a.unwrap() == wte_b.unwrap());
    // A GGUF named by its file, and one named by its directory.
    let gdir = tmp.path().join("gg");
    for (out, file) in [
        (gdir.join("named.gguf"), "named.gguf"),
        (gdir.clone(), "model.gguf"),
    ] {
        let written = convert_ok(&src, &out, "gguf");
        assert_eq!(written, vec![gdir.join(file)]);
        assert_loads(&gdir.join(file));
    }
    assert_eq!(
        snapshot(&gdir).keys().collect::<Vec<_>>(),
        ["model.gguf", "named.gguf"]
    );
    // A destination that cannot be replaced fails the conversion before any file is: nothing is
    // written, no temporary is left.
    let blocked = tmp.path().join("blocked");
    std::fs::create_dir_all(blocked.join("config.json")).unwrap();
    let o = gpt2(&["convert", "--model", s(&src), "--out", s(&blocked)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("is a directory"), "{}", stderr(&o));
    assert_eq!(
        snapshot(&blocked).keys().collect::<Vec<_>>(),
        ["config.json"]
    );
    // A failed conversion (q8 has no safetensors form; gelu has no GGUF) leaves nothing behind.
    let failed = tmp.path().join("failed");
    let o = gpt2(&[
        "convert",
        "--model",
        s(&src),
        "--out",
        s(&failed),
        "--dtype",
        "q8",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = gpt2(&[
        "convert",
        "--model",
        s(&common::fixture_dir("sharded")),
        "--out",
        s(&failed.join("x.gguf")),
        "--format",
        "gguf",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        !failed.exists() || snapshot(&failed).is_empty(),
        "{:?}",
        snapshot(&failed).keys()
    );
    assert!(snapshot(&src) == src_before, "the source changed");
}
