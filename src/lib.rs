//! A GPT-2 inference engine: OpenAI's GPT-2 family (and any fine-tune of the same architecture)
//! with outputs that match Hugging Face `transformers`.
//!
//! The data path: text → [`Tokenizer`] → ids → [`Model::forward`] (with a [`State`] holding the KV
//! cache) → logits → [`sampling`] → next id → text. [`generate`] runs that loop (streaming, batches,
//! beam search); [`eval`] scores text (next-token view, per-token log-probs, strided perplexity).
//! A [`Model`] runs on a [`Device`] with its matrices stored as a [`DType`]; every consumer uses
//! the same `Model`, whichever backend is behind it.
//!
//! ```no_run
//! use gpt2::{Device, DType, LoadOptions, Model, Tokenizer};
//! use gpt2::generate::{generate, GenerationConfig};
//!
//! let dir = gpt2::hub::resolve("gpt2", "main")?; // a local directory, the HF cache, or a download
//! let model = Model::load_with(&dir, &LoadOptions::new(Device::Cpu, DType::F32))?;
//! let tok = Tokenizer::from_dir(&dir)?;
//! let cfg = GenerationConfig { max_new_tokens: 20, ..Default::default() };
//! println!("{}", generate(&model, &tok, "Hello, I'm a language model,", &cfg)?.text);
//! # Ok::<(), gpt2::Error>(())
//! ```

pub(crate) mod backend;
pub mod config;
mod dtype;
pub mod embed;
mod error;
pub mod eval;
pub mod generate;
#[cfg(feature = "hub")]
pub mod hub;
mod memory;
mod model;
mod numerics;
pub mod sampling;
#[cfg(feature = "server")]
pub mod server;
pub mod tokenizer;
// Checkpoint readers: public for the CLI's `inspect` and `convert`, tests and fuzz targets; not a
// stable API (`Model::load` reads every format).
#[doc(hidden)]
pub mod weights;

pub use backend::{Model, State};
pub use config::GPT2Config;
pub use dtype::DType;
pub use error::{Error, Result};
#[doc(hidden)]
pub use model::MAX_THREADS;
pub use model::{
    Activations, BlockSite, Device, Hooked, LoadOptions, Logits, Patch, Rows, SeqInput, Site,
};
pub use tokenizer::{Special, StreamDecoder, Tokenizer};
#[doc(hidden)]
pub use weights::{Checkpoint, TensorInfo};

/// Internals for the crate's benchmarks, fuzz targets and tests; not a stable API. Everything here
/// is sound to call: SIMD kernels take an [`internal::Isa`] token that only detection makes.
#[doc(hidden)]
pub mod internal {
    pub use crate::backend::cpu::kernels::{Isa, Level};
    pub use crate::backend::cpu::matrix::Matrix;
    pub use crate::backend::cpu::packed::Epilogue;
    pub use crate::backend::cpu::pool::Pool;
    pub use crate::backend::cpu::q8::quantize_weights as quantize_q8_0;
    /// The scalar reference ops: the oracle the backends' kernels are tested against.
    pub use crate::backend::cpu::reference;
    /// The wgpu kernels one at a time (the backend-ops tests).
    #[cfg(feature = "wgpu")]
    pub use crate::backend::wgpu::ops::KernelRunner as WgpuKernels;
    /// One line per wgpu adapter, in `gpu:N` order.
    pub use crate::backend::wgpu_adapters;
    /// The host's reductions of a row of logits to a target's log-prob (and rank and entropy):
    /// the oracle of the wgpu scoring kernel.
    pub use crate::numerics::{logprob_of, target_stats, TargetStats};
    pub use crate::weights::checkpoint::stored_bytes;
    pub use crate::weights::{Checkpoint, TensorInfo, INDEX_FILE, SINGLE_FILE};

    /// The tokenizer files' readers (before validation by `Tokenizer::from_raw`) and the built-in
    /// GPT-2 vocabulary.
    pub mod vocab {
        pub use crate::tokenizer::vocab::{
            builtin, from_dir, parse_merges_txt, parse_tokenizer_json, parse_vocab_json, RawVocab,
            BUILTIN_ENCODER, BUILTIN_MERGES,
        };
    }

    /// PyTorch `torch.save` files: file names, and the reader over bytes in memory (a fuzz target).
    pub mod pytorch {
        pub use crate::weights::pytorch::{parse_bytes, INDEX_FILE, SINGLE_FILE};
    }

    /// TensorFlow checkpoints: the index reader over bytes in memory (a fuzz target).
    pub mod tf {
        pub use crate::weights::tf::parse_index_bytes;
    }

    /// GGUF: the reader over bytes in memory (a fuzz target).
    pub mod gguf {
        pub use crate::weights::gguf::parse_bytes;
    }
}
