//! Encode throughput on ~1 MB of mixed English, code and Unicode: ours vs tiktoken-rs (r50k_base,
//! the same GPT-2 vocabulary), single-threaded, and ours batched over the thread pool.
//!
//! `cargo bench --bench tokenizer`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gpt2::{Special, Tokenizer};

/// Deterministic, varied text: no fixed phrase repeats, so per-call caches get only what natural
/// text would give them.
fn corpus() -> String {
    let mut rng = 0x9E3779B97F4A7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // English-like prose: words of the GPT-2 vocabulary drawn with a Zipf-like law.
    let vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(gpt2::internal::vocab::BUILTIN_ENCODER).unwrap();
    let words: Vec<String> = vocab
        .keys()
        .filter_map(|k| k.strip_prefix('Ġ'))
        .filter(|w| w.len() > 1 && w.chars().all(|c| c.is_ascii_alphabetic()))
        .map(str::to_owned)
        .collect();
    let mut prose = String::new();
    while prose.len() < 650_000 {
        let r = (next() % 1_000_000) as f64 / 1_000_000.0;
        let w = &words[((words.len() as f64).powf(r) as usize).min(words.len() - 1)];
        prose.push_str(w);
        prose.push_str(match next() % 20 {
            0 => ". ",
            1 => ", ",
            2 => ".\n\n",
            _ => " ",
        });
    }
    // Code: this crate's own sources.
    let mut code = String::new();
    for dir in [
        "src",
        "src/model",
        "src/tokenizer",
        "src/backend/cpu",
        "src/weights",
        "tests",
    ] {
        let mut files: Vec<_> =
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/").to_owned() + dir)
                .unwrap()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "rs"))
                .collect();
        files.sort();
        for f in files {
            code += &std::fs::read_to_string(f).unwrap();
        }
    }
    let mut cut = 250_000.min(code.len());
    while !code.is_char_boundary(cut) {
        cut -= 1;
    }
    code.truncate(cut);
    // Unicode: words of random characters from several scripts, and emoji.
    let ranges: [(u32, u32); 6] = [
        (0x4E00, 0x9FFF),
        (0x0400, 0x044F),
        (0x3040, 0x30FF),
        (0xAC00, 0xD7A3),
        (0x0600, 0x064A),
        (0x1F600, 0x1F64F),
    ];
    let mut uni = String::new();
    while uni.len() < 150_000 {
        let (lo, hi) = ranges[(next() % ranges.len() as u64) as usize];
        for _ in 0..1 + next() % 6 {
            uni.extend(char::from_u32(lo + (next() % u64::from(hi - lo)) as u32));
        }
        uni.push(if next() % 8 == 0 { '\n' } else { ' ' });
    }
    format!("{prose}\n{code}\n{uni}")
}

fn bench(c: &mut Criterion) {
    let text = corpus();
    if let Ok(p) = std::env::var("DUMP_CORPUS") {
        std::fs::write(p, &text).unwrap();
    }
    let ours = Tokenizer::gpt2();
    let theirs = tiktoken_rs::r50k_base().unwrap();
    assert_eq!(
        ours.encode_with(&text, Special::AsText),
        theirs.encode_ordinary(&text)
    );
    let lines: Vec<&str> = text.split_inclusive('\n').collect();

    let mut g = c.benchmark_group("encode_1mb");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.sample_size(20);
    g.bench_function("ours", |b| {
        b.iter(|| ours.encode_with(&text, Special::AsText))
    });
    g.bench_function("tiktoken-rs", |b| b.iter(|| theirs.encode_ordinary(&text)));
    g.bench_function("ours_batch_lines_all_threads", |b| {
        b.iter(|| ours.encode_batch(&lines, Special::AsText))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
