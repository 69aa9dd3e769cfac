//! The safetensors reader: a single file, or an index and its shards, from arbitrary bytes. Every
//! tensor is then read at its stated shape; nothing may panic, abort or allocate without bound.
//!
//! Input: parts separated by `SEP`. With one part it is `model.safetensors`; with more, the first is
//! `model.safetensors.index.json` and the rest are shards `s0.safetensors`, `s1.safetensors`, ...
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use gpt2::Checkpoint;
use libfuzzer_sys::fuzz_target;

const SEP: &[u8] = b"\n=====\n";

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("gpt2-fuzz-safetensors-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fn split<'a>(mut data: &'a [u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    while let Some(at) = data.windows(SEP.len()).position(|w| w == SEP) {
        parts.push(&data[..at]);
        data = &data[at + SEP.len()..];
    }
    parts.push(data);
    parts
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    for e in std::fs::read_dir(d).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let parts = split(data);
    if parts.len() == 1 {
        std::fs::write(d.join("model.safetensors"), parts[0]).unwrap();
    } else {
        std::fs::write(d.join("model.safetensors.index.json"), parts[0]).unwrap();
        for (i, p) in parts[1..].iter().take(8).enumerate() {
            std::fs::write(d.join(format!("s{i}.safetensors")), p).unwrap();
        }
    }
    let Ok(ck) = Checkpoint::open_dir(d) else {
        return;
    };
    let _ = ck.paths().count();
    let infos = ck.tensor_infos();
    for t in &infos {
        let _ = ck.same_data(&t.name, "wte.weight");
        if let Ok(v) = ck.f32(&t.name, &t.shape) {
            assert_eq!(v.len(), t.shape.iter().product::<usize>());
            assert!(v.iter().all(|x| x.is_finite()));
        }
        // A wrong shape is an error, never a panic.
        let mut wrong = t.shape.clone();
        wrong.push(1);
        assert!(ck.f32(&t.name, &wrong).is_err());
    }
    let _ = ck.finish();
});
