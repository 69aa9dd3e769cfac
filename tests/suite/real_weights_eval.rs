//! Evaluation checks against the released gpt2 weights (ignored by default; see tests/suite/real_weights.rs
//! for how to get them):
//!
//! ```sh
//! GPT2_MODEL_DIR=$PWD/gpt2-weights WIKITEXT2_TEST=$PWD/wiki.test.raw \
//!     cargo test --release --test suite real_weights_eval:: -- --ignored --nocapture
//! ```
//! `WIKITEXT2_TEST` is WikiText-2 (raw) test split as one file, one dataset row per line (the
//! `wiki.test.raw` file of wikitext-2-raw-v1).

use std::path::PathBuf;

use gpt2::{eval, Model, Tokenizer};

fn load() -> (Model, Tokenizer) {
    let dir = PathBuf::from(
        std::env::var("GPT2_MODEL_DIR")
            .expect("set GPT2_MODEL_DIR to a downloaded openai-community/gpt2"),
    );
    (
        Model::load(&dir).unwrap(),
        Tokenizer::from_dir(&dir).unwrap(),
    )
}

#[test]
#[ignore = "needs the real gpt2 weights in GPT2_MODEL_DIR"]
fn washington_follows_george() {
    let (model, tok) = load();
    let ids = tok.encode("Former President of the United States of America, George");
    let top = eval::top_k(&model, &ids, 10).unwrap();
    for (id, lp) in &top {
        println!("{:>8.4}  {:?}", lp, tok.decode(&[*id]).unwrap());
    }
    let washington = tok.encode(" Washington");
    assert_eq!(washington.len(), 1);
    assert!(top.iter().any(|(id, _)| *id == washington[0]));
}

#[test]
#[ignore = "needs the real gpt2 weights in GPT2_MODEL_DIR and WikiText-2 in WIKITEXT2_TEST"]
fn wikitext2_perplexity() {
    let (model, tok) = load();
    let raw = std::fs::read_to_string(std::env::var("WIKITEXT2_TEST").expect("set WIKITEXT2_TEST"))
        .unwrap();
    // The perplexity guide joins the dataset's rows (each keeping its newline) with "\n\n".
    let text = raw.split_inclusive('\n').collect::<Vec<_>>().join("\n\n");
    let ids = tok.encode(&text);
    let r1024 = eval::perplexity(&model, &ids, 1024, 1024, 2, |_, _| {}).unwrap();
    let r512 = eval::perplexity(&model, &ids, 1024, 512, 2, |_, _| {}).unwrap();
    println!(
        "tokens {}: stride 1024 ppl {:.3} ({} scored); stride 512 ppl {:.3} ({} scored)",
        ids.len(),
        r1024.perplexity,
        r1024.scored,
        r512.perplexity,
        r512.scored
    );
    assert!(
        (r1024.perplexity - 29.9).abs() <= 0.3,
        "{}",
        r1024.perplexity
    );
}
