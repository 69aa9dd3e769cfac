//! Checkpoint files → named, shape-checked f32 tensors. The typed layers that consume them live in
//! [`crate::model::layers`].

mod checkpoint;

pub use checkpoint::{Checkpoint, TensorInfo, INDEX_FILE, SINGLE_FILE};
