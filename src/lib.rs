//! A GPT-2 inference engine.
//!
//! Data flow: text → [`tokenizer`] → ids → [`model`] (with a [`model::KvCache`]) → logits.
//! Checkpoints are read by [`weights`] into the typed layers of [`model::layers`]; the
//! [`backend::cpu`] kernels do the arithmetic, each beside its scalar reference.

pub mod backend;
pub mod config;
pub mod dtype;
pub mod error;
pub mod eval;
pub mod generate;
pub mod hub;
pub mod model;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use config::GPT2Config;
pub use dtype::DType;
pub use error::{Error, Result};
pub use model::{KvCache, Logits, Model, SeqInput, State};
pub use tokenizer::{Special, StreamDecoder, Tokenizer};
