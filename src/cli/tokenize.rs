//! `gpt2 tokenize` and `gpt2 detokenize`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use gpt2::Special;
use serde_json::json;

use super::{escape, print_json, read_text, ModelArg};

#[derive(Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The text (else --file, else standard input).
    text: Option<String>,
    /// Read the text from this file.
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
    /// Treat special tokens such as <|endoftext|> written in the text as plain text.
    #[arg(long)]
    special_as_text: bool,
    /// Print one JSON object: ids, tokens.
    #[arg(long)]
    json: bool,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = a.model.tokenizer()?;
    let text = read_text(a.text, a.file)?;
    let special = if a.special_as_text {
        Special::AsText
    } else {
        Special::Allow
    };
    let ids = tok.encode_with(&text, special);
    let tokens = tok.token_texts(&ids)?;
    if a.json {
        return print_json(&json!({ "ids": ids, "tokens": tokens }));
    }
    for (id, t) in ids.iter().zip(&tokens) {
        outln!("{id:>6}  \"{}\"", escape(t));
    }
    note!("{} tokens, {} bytes", ids.len(), text.len());
    Ok(())
}

#[derive(Args)]
pub struct DetokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Token ids.
    #[arg(required = true, num_args = 1..)]
    ids: Vec<u32>,
    /// Print one JSON object: text.
    #[arg(long)]
    json: bool,
}

pub fn detokenize(a: DetokenizeArgs) -> Result<()> {
    let tok = a.model.tokenizer()?;
    let text = tok.decode(&a.ids)?;
    if a.json {
        return print_json(&json!({ "text": text }));
    }
    outln!("{text}");
    Ok(())
}
