//! Every fuzz target's properties (fuzz/properties.rs, the same code the targets run), replayed in
//! the normal suite over its seed corpus (`fuzz/seeds/<target>`) and every input a fuzzer or an audit
//! ever broke it with (`fuzz/regressions/<target>`), so that a fixed crash stays fixed without
//! nightly or cargo-fuzz. Each input must be accepted or refused with a message, never panic; each
//! target must have inputs, and the seeds that are valid files must load.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../../fuzz/properties.rs"]
mod properties;

use properties::Outcome;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The inputs of one target: its seeds and its regressions, by path.
fn inputs(root: &Path, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

/// Run `check` on every input of `target` under `root`; every input must be accepted or refused with
/// a message (a panic is a failure, reported with its file), there must be inputs, and at least
/// `min_accepted` of them must be accepted.
fn replay_from(root: &Path, target: &str, min_accepted: usize, check: impl Fn(&[u8]) -> Outcome) {
    let inputs = inputs(root, target);
    assert!(
        !inputs.is_empty(),
        "no inputs for fuzz target {target} in {}/{{seeds,regressions}}/{target}",
        root.display()
    );
    let (mut accepted, mut panicked, mut silent) = (0, Vec::new(), Vec::new());
    for (path, data) in &inputs {
        match catch_unwind(AssertUnwindSafe(|| check(data))) {
            Ok(Outcome::Accepted) => accepted += 1,
            Ok(Outcome::Refused(msg)) if msg.trim().is_empty() => silent.push(path.display()),
            Ok(Outcome::Refused(msg)) => eprintln!("{}: refused: {msg}", path.display()),
            Ok(Outcome::Skipped) => eprintln!("{}: not an input of {target}", path.display()),
            Err(_) => panicked.push(path.display()),
        }
    }
    eprintln!("{target}: {accepted} of {} inputs accepted", inputs.len());
    assert!(panicked.is_empty(), "{target}: panicked on {panicked:?}");
    assert!(
        silent.is_empty(),
        "{target}: refused without a message: {silent:?}"
    );
    assert!(
        accepted >= min_accepted,
        "{target}: {accepted} of {} inputs accepted, expected at least {min_accepted}",
        inputs.len()
    );
}

fn replay(target: &str, min_accepted: usize, check: impl Fn(&[u8]) -> Outcome) {
    replay_from(&fuzz_dir(), target, min_accepted, check);
}

/// One test per fuzz target (named after it), and the list of targets they cover.
macro_rules! replays {
    ($($target:ident, accepting at least $min:literal: $check:expr;)*) => {
        const REPLAYED: &[&str] = &[$(stringify!($target)),*];
        mod replay {
            use super::*;
            $(
                #[test]
                fn $target() {
                    replay(stringify!($target), $min, $check);
                }
            )*
        }
    };
}

replays! {
    config, accepting at least 4: properties::config;
    gguf, accepting at least 1: properties::gguf;
    pytorch, accepting at least 2: properties::pytorch;
    safetensors, accepting at least 6: |data: &[u8]| {
        let dir = tempfile::tempdir().unwrap();
        properties::safetensors(data, dir.path())
    };
    sampling, accepting at least 2: properties::sampling;
    tf_bundle, accepting at least 1: properties::tf_bundle;
    tokenizer_files, accepting at least 2: properties::tokenizer_files;
    tokenizer_roundtrip, accepting at least 4: properties::tokenizer_roundtrip;
}

/// Every target in fuzz/fuzz_targets has a replay above, and nothing is replayed that is not one.
#[test]
fn every_fuzz_target_is_replayed() {
    let mut targets: Vec<String> = std::fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    targets.sort();
    let mut replayed: Vec<&str> = REPLAYED.to_vec();
    replayed.sort();
    assert_eq!(targets, replayed);
}

/// The replay fails where it should: without inputs, on a property that panics, on a refusal without
/// a message, and when the valid seeds stop loading.
#[test]
fn a_replay_fails_where_it_should() {
    let empty = tempfile::tempdir().unwrap();
    let no_inputs = catch_unwind(|| replay_from(empty.path(), "gguf", 0, properties::gguf));
    assert!(no_inputs.is_err(), "a target without inputs passed");
    let panics = catch_unwind(|| replay("gguf", 0, |_: &[u8]| panic!("a property failed")));
    assert!(panics.is_err(), "a panicking property passed");
    let silent = catch_unwind(|| replay("gguf", 0, |_: &[u8]| Outcome::Refused(" ".into())));
    assert!(silent.is_err(), "a refusal without a message passed");
    let refuses = catch_unwind(|| replay("gguf", 1, |_: &[u8]| Outcome::Refused("no".into())));
    assert!(refuses.is_err(), "a target that refuses every seed passed");
}
