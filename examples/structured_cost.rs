//! What structured output costs, in one process (so that other load on a shared machine falls on
//! both sides alike): a five-field JSON schema (the one `scripts/structured_load.py` sends).
//!
//! 1. The constraint's own work per token, without a model: `Sequence::advance` over random logits
//!    (every allowed token equally likely to win, as with random weights), constrained against
//!    unconstrained, greedy; the difference is llguidance's mask and the token it consumes.
//! 2. Decoding on random weights at PRESET's shape: C sequences of 64 tokens (greedy, ignore_eos)
//!    through the batch engine, unconstrained and constrained, alternated round by round; decode
//!    tokens/s (the first step, the prompts' prefill, left out) and the medians.
//!
//!     cargo run --release --example structured_cost -- [PRESET] [DTYPE] [THREADS] [ROUNDS]

use std::time::Instant;

use gpt2::generate::{ConstraintSpec, GenerationConfig, Generator, Grammars, Sequence};
use gpt2::sampling::SamplingParams;
use gpt2::{DType, Device, GPT2Config, LoadOptions, Model, Tokenizer};
use serde_json::json;

fn schema() -> ConstraintSpec {
    ConstraintSpec::JsonSchema(json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"type": "string", "maxLength": 24},
            "member": {"type": "boolean"},
            "color": {"enum": ["red", "green", "blue"]}
        },
        "required": ["name", "age", "city", "member", "color"],
        "additionalProperties": false
    }))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Microseconds per `advance` over `tokens` steps of random logits (sequences restarted as they
/// finish), and the tokens each sequence had on average.
fn advance_cost(
    config: &GPT2Config,
    tok: &Tokenizer,
    cfg: &GenerationConfig,
    tokens: usize,
) -> (f64, f64) {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut logits = vec![0f32; config.vocab_size];
    let mut work = Vec::new();
    let (mut done, mut seqs, mut spent) = (0, 0, 0.0);
    while done < tokens {
        let mut seq = Sequence::new(config, tok.encode("Q:"), cfg.clone()).unwrap();
        seqs += 1;
        while seq.finished().is_none() && done < tokens {
            for l in logits.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *l = (x >> 40) as f32 / (1u64 << 24) as f32 * 8.0;
            }
            let t = Instant::now();
            seq.advance(tok, &logits, &[], &mut work).unwrap();
            spent += t.elapsed().as_secs_f64();
            done += 1;
        }
    }
    (spent / done as f64 * 1e6, done as f64 / seqs as f64)
}

/// Decode tokens/s of `c` sequences of 64 tokens under `cfg`, and the tokens generated.
fn decode(model: &Model, tok: &Tokenizer, cfg: &GenerationConfig, c: usize) -> (f64, usize) {
    let prompts: Vec<Vec<u32>> = (0..c)
        .map(|i| tok.encode(&format!("Record {i}: the name, age and city of the member")))
        .collect();
    let mut g = Generator::new(model, tok, &prompts, cfg).unwrap();
    let first = g.step().unwrap().len();
    let t = Instant::now();
    let mut n = 0;
    while !g.is_done() {
        n += g.step().unwrap().len();
    }
    (n as f64 / t.elapsed().as_secs_f64(), n + first)
}

fn main() -> gpt2::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let preset = a.get(1).map_or("gpt2", String::as_str);
    let dtype =
        DType::parse(a.get(2).map_or("q8", String::as_str)).expect("DTYPE: f32, f16, bf16 or q8");
    let threads = a.get(3).map_or(2, |s| s.parse().unwrap());
    let rounds = a.get(4).map_or(5, |s| s.parse().unwrap());
    let config = GPT2Config::preset(preset).expect("a preset: gpt2, gpt2-medium, ...");
    let tok = Tokenizer::gpt2();
    let t = Instant::now();
    let grammars = Grammars::new(&tok, config.eos_token_id)?;
    println!(
        "token trie over {} tokens: {:.0} ms",
        tok.vocab_size(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let constraint = grammars.compile(&schema())?;
    println!(
        "five-field schema compiled in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let base = GenerationConfig {
        max_new_tokens: 64,
        sampling: SamplingParams::greedy(),
        ignore_eos: true,
        ..Default::default()
    };
    let constrained = GenerationConfig {
        constraint: Some(constraint),
        ..base.clone()
    };

    let (mut free_us, mut json_us) = (Vec::new(), Vec::new());
    let mut per_seq = 0.0;
    for _ in 0..rounds {
        free_us.push(advance_cost(&config, &tok, &base, 2000).0);
        let (us, n) = advance_cost(&config, &tok, &constrained, 2000);
        json_us.push(us);
        per_seq = n;
    }
    let (f, j) = (median(free_us), median(json_us));
    println!(
        "advance over random logits: unconstrained {f:.1} µs/token, constrained {j:.1} µs/token \
         (constraint {:.1} µs/token; {per_seq:.0} tokens per sequence)",
        j - f
    );

    let mut opts = LoadOptions::new(Device::Cpu, dtype);
    opts.threads = Some(threads);
    let model = Model::random(config, 1, &opts)?;
    decode(&model, &tok, &base, 1); // warm-up: pages, pool
    for c in [1, 8] {
        let (mut free, mut json) = (Vec::new(), Vec::new());
        let mut tokens = (0, 0);
        for _ in 0..rounds {
            let (s, n) = decode(&model, &tok, &base, c);
            free.push(s);
            tokens.0 = n;
            let (s, n) = decode(&model, &tok, &constrained, c);
            json.push(s);
            tokens.1 = n;
        }
        println!(
            "C={c}: unconstrained {:?} tok/s, constrained {:?} tok/s",
            free.iter()
                .map(|v| (v * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            json.iter()
                .map(|v| (v * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
        let (f, j) = (median(free), median(json));
        println!(
            "C={c}: median decode {f:.1} vs {j:.1} tok/s, constrained/unconstrained {:.3} \
             ({} vs {} tokens)",
            j / f,
            tokens.0,
            tokens.1
        );
    }
    Ok(())
}
