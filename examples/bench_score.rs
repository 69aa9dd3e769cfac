//! The Rust side of the Python overhead measurement: `gpt2::eval::score_batch` (what `Model.score`
//! runs) on N documents of L random token ids (the ids `python/bench/bench.py` scores through
//! `Model.score`), timed. MODE `diag` times `score_diagnostics` instead, and `both` alternates the
//! two, repetition by repetition (what the diagnostics cost, in one process).
//!
//!     cargo run --release --example bench_score -- MODEL_DIR [N] [L] [DTYPE] [THREADS] [REPEAT] [MODE]

use std::time::Instant;

use gpt2::{DType, Device, LoadOptions, Model};

/// The ids of document `d`: the same generator as bench.py's `docs()`.
fn docs(n: usize, len: usize, vocab: u64) -> Vec<Vec<u32>> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) % vocab) as u32
                })
                .collect()
        })
        .collect()
}

fn main() -> gpt2::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&a[1]);
    let n = a.get(2).map_or(64, |s| s.parse().unwrap());
    let len = a.get(3).map_or(256, |s| s.parse().unwrap());
    let dtype = DType::parse(a.get(4).map_or("f32", |s| s.as_str())).unwrap();
    let threads = a.get(5).map(|s| s.parse().unwrap());
    let repeat = a.get(6).map_or(1, |s| s.parse().unwrap());
    let mode = a.get(7).map_or("score", |s| s.as_str());
    assert!(
        ["score", "diag", "both"].contains(&mode),
        "MODE: score, diag or both"
    );
    if let Some(t) = threads {
        // As the CLI: eval's row loops run on rayon's pool, sized like the model's.
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .unwrap();
    }
    let mut opts = LoadOptions::new(Device::Cpu, dtype);
    opts.threads = threads;
    let model = Model::load_with(&dir, &opts)?;
    let docs = docs(n, len, model.config().vocab_size as u64);
    for r in 0..repeat {
        let diag = mode == "diag" || (mode == "both" && r % 2 == 1);
        let t = Instant::now();
        let scores = match diag {
            false => gpt2::eval::score_batch(&model, &docs)?,
            true => gpt2::eval::score_diagnostics(&model, &docs)?
                .into_iter()
                .map(|d| d.logprobs)
                .collect(),
        };
        let s = t.elapsed().as_secs_f64();
        let total: f64 = scores.iter().flatten().map(|&l| l as f64).sum();
        let what = if diag {
            "score_diagnostics"
        } else {
            "score_batch"
        };
        println!(
            "rust eval::{what}: {n} docs x {len} tokens in {s:.3} s = {:.1} tokens/s (sum {total:.3})",
            (n * len) as f64 / s
        );
    }
    Ok(())
}
