//! Checks against the released gpt2 weights. They need the real checkpoint, so they are ignored by
//! default; anyone online can run them:
//!
//! ```sh
//! huggingface-cli download openai-community/gpt2 config.json model.safetensors vocab.json merges.txt --local-dir gpt2-weights
//! GPT2_MODEL_DIR=$PWD/gpt2-weights cargo test --release --test suite real_weights:: -- --ignored --nocapture
//! ```

use std::path::PathBuf;

use gpt2::{Logits, Model, SeqInput, Tokenizer};

fn model_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("GPT2_MODEL_DIR")
            .expect("set GPT2_MODEL_DIR to a downloaded openai-community/gpt2"),
    )
}

#[test]
#[ignore = "needs the real gpt2 weights in GPT2_MODEL_DIR"]
fn one_two_three_four_five() {
    let dir = model_dir();
    let model = Model::load(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert_eq!(model.config().parameter_count(), 124_439_808);
    let ids = tok.encode("One two three four");
    let mut state = model.new_state(1, model.config().n_positions).unwrap();
    let logits = model
        .forward(
            &mut state,
            &[SeqInput {
                slot: 0,
                tokens: &ids,
            }],
            Logits::Last,
        )
        .unwrap();
    let (best, _) = logits
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &l)| if l > b.1 { (i, l) } else { b });
    let five = tok.encode(" five")[0] as usize;
    println!(
        "next token {:?}, logit of \" five\" {}",
        tok.decode(&[best as u32]).unwrap(),
        logits[five]
    );
    assert_eq!(best, five);
    // rust-bert's recorded value for transformers' gpt2.
    assert!((logits[five] - -69.4948).abs() < 1e-3, "{}", logits[five]);
}

#[test]
#[ignore = "needs the real gpt2 weights in GPT2_MODEL_DIR"]
fn shipped_tokenizer_files_match_the_built_in_ones() {
    let tok = Tokenizer::from_dir(&model_dir()).unwrap();
    let text =
        "The dog was found in a field near the intersection of West and West Streets.\n\n日本語 👍";
    assert_eq!(tok.encode(text), Tokenizer::gpt2().encode(text));
}

#[test]
#[ignore = "needs the real gpt2 weights in GPT2_MODEL_DIR"]
fn greedy_the_dog_as_in_transformers_tests() {
    use gpt2::generate::{generate, GenerationConfig};
    use gpt2::sampling::SamplingParams;
    let dir = model_dir();
    let (model, tok) = (
        Model::load(&dir).unwrap(),
        Tokenizer::from_dir(&dir).unwrap(),
    );
    let cfg = GenerationConfig {
        max_new_tokens: 18,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    let out = generate(&model, &tok, "The dog", &cfg).unwrap();
    println!("{:?}", out.text);
    assert_eq!(
        format!("The dog{}", out.text),
        "The dog was found in a field near the intersection of West and West Streets.\n\nThe dog"
    );
}
