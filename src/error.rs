//! One error type for the library: each variant says what went wrong and where.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The io error is part of the message, not a `source`, so that `{:#}` does not repeat it.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },

    #[error("config {path}: {msg}")]
    Config { path: String, msg: String },

    /// A checkpoint problem, naming the file and (when known) the tensor.
    #[error("checkpoint {file}{}: {msg}", tensor.as_ref().map(|t| format!(", tensor `{t}`")).unwrap_or_default())]
    Weights {
        file: String,
        tensor: Option<String>,
        msg: String,
    },

    #[error("tokenizer {source_name}: {msg}")]
    Tokenizer { source_name: String, msg: String },

    #[error("{0}")]
    Input(String),

    /// The machine could not give what was asked: memory for a KV cache, threads.
    #[error("{0}")]
    Resource(String),

    /// A device or its driver failed (CUDA driver, cuBLAS, NVRTC), or none is available.
    #[error("{backend}: {msg}")]
    Device { backend: &'static str, msg: String },

    /// The server could not start or run (the address is taken, the runtime failed).
    #[error("{0}")]
    Server(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }

    pub fn weights(file: impl ToString, tensor: Option<&str>, msg: impl Into<String>) -> Self {
        Error::Weights {
            file: file.to_string(),
            tensor: tensor.map(str::to_owned),
            msg: msg.into(),
        }
    }

    pub fn tokenizer(source_name: impl ToString, msg: impl Into<String>) -> Self {
        Error::Tokenizer {
            source_name: source_name.to_string(),
            msg: msg.into(),
        }
    }
}
