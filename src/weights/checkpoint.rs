//! Safetensors checkpoints, single-file or sharded, memory-mapped and validated.
//!
//! Keys are normalised to the hub's openai-community/gpt2 layout (no `transformer.` prefix); mask
//! buffers are dropped. Every lookup checks the shape and converts to f32, and the loader asks
//! [`Checkpoint::finish`] at the end so that an unknown tensor is an error, not silently ignored.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Serialize;

use crate::error::{Error, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor's place in one mapped file.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the mapped file.
    start: usize,
    end: usize,
    /// The key as written in the file.
    stored_name: String,
}

/// A tensor's description, as `gpt2 inspect` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    /// Normalised name → entry.
    entries: BTreeMap<String, Entry>,
    used: RefCell<BTreeSet<String>>,
}

/// Mask buffers that transformers stores in some checkpoints; they are not parameters.
fn is_mask_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
}

fn normalise(name: &str) -> &str {
    name.strip_prefix("transformer.").unwrap_or(name)
}

impl Checkpoint {
    /// Open the safetensors weights of a model directory: `model.safetensors.index.json` with its
    /// shards, else `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_sharded(&index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        Err(Error::weights(
            dir.display(),
            None,
            format!("no {SINGLE_FILE} or {INDEX_FILE} in this directory"),
        ))
    }

    /// Open a sharded checkpoint through its index; every shard the index names is loaded and every
    /// tensor must sit in the shard the index says.
    pub fn open_sharded(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let parsed: Index = serde_json::from_str(&text).map_err(|e| {
            Error::weights(index.display(), None, format!("not a valid index: {e}"))
        })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let shard_names: BTreeSet<&String> = parsed.weight_map.values().collect();
        for s in &shard_names {
            if s.contains('/') || s.contains('\\') || s.starts_with("..") {
                return Err(Error::weights(
                    index.display(),
                    None,
                    format!("shard name {s:?} must be a plain file name"),
                ));
            }
        }
        let paths: Vec<PathBuf> = shard_names.iter().map(|s| dir.join(s)).collect();
        let ckpt = Self::open_files(&paths)?;
        for (name, shard) in &parsed.weight_map {
            let found = ckpt
                .entries
                .values()
                .find(|e| e.stored_name == *name)
                .map(|e| &ckpt.files[e.file].0);
            let want = dir.join(shard);
            match found {
                Some(p) if *p == want => {}
                Some(p) => {
                    return Err(Error::weights(
                        index.display(),
                        Some(name),
                        format!("index places it in {shard} but it is in {}", p.display()),
                    ))
                }
                None if is_mask_buffer(name) => {}
                None => {
                    return Err(Error::weights(
                        want.display(),
                        Some(name),
                        "listed in the index but missing from the shard",
                    ))
                }
            }
        }
        Ok(ckpt)
    }

    /// Open and validate a list of safetensors files as one checkpoint.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = BTreeMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the map is read-only; a file changed under us while loading is the user's race.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                Error::weights(
                    path.display(),
                    None,
                    format!("not a valid safetensors file: {e}"),
                )
            })?;
            let base = mmap.as_ptr() as usize;
            for (stored_name, view) in st.tensors() {
                if is_mask_buffer(&stored_name) {
                    continue;
                }
                let start = view.data().as_ptr() as usize - base;
                let entry = Entry {
                    file: fi,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + view.data().len(),
                    stored_name: stored_name.clone(),
                };
                let key = normalise(&stored_name).to_owned();
                if let Some(prev) = entries.insert(key.clone(), entry) {
                    return Err(Error::weights(
                        path.display(),
                        Some(&stored_name),
                        format!(
                            "duplicate tensor: `{}` in {} names the same parameter",
                            prev.stored_name,
                            paths[prev.file].display()
                        ),
                    ));
                }
            }
            drop(st);
            files.push((path.clone(), mmap));
        }
        Ok(Checkpoint {
            files,
            entries,
            used: RefCell::new(BTreeSet::new()),
        })
    }

    /// The files this checkpoint was read from.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Every tensor (mask buffers excluded), under its normalised name, sorted by name.
    pub fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.entries
            .iter()
            .map(|(name, e)| TensorInfo {
                name: name.clone(),
                dtype: format!("{:?}", e.dtype),
                shape: e.shape.clone(),
            })
            .collect()
    }

    fn file_name(&self, e: &Entry) -> String {
        self.files[e.file].0.display().to_string()
    }

    /// Read tensor `name` (normalised), check its shape and convert it to f32.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let e = self.entries.get(name).ok_or_else(|| {
            let files: Vec<_> = self.paths().map(|p| p.display().to_string()).collect();
            Error::weights(
                files.join(", "),
                Some(name),
                format!("missing (expected shape {shape:?})"),
            )
        })?;
        if e.shape != shape {
            return Err(Error::weights(
                self.file_name(e),
                Some(&e.stored_name),
                format!("expected shape {shape:?}, found {:?}", e.shape),
            ));
        }
        self.used.borrow_mut().insert(name.to_owned());
        let bytes = &self.files[e.file].1[e.start..e.end];
        let out: Vec<f32> = match e.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::weights(
                    self.file_name(e),
                    Some(&e.stored_name),
                    format!("dtype {other:?} is not supported (expected F32, F16 or BF16)"),
                ))
            }
        };
        // A NaN or infinity in a weight poisons every output it touches, and the model would still
        // produce tokens (argmax of NaN is token 0): refuse it here, where we can say which tensor.
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(Error::weights(
                self.file_name(e),
                Some(&e.stored_name),
                format!(
                    "element {i} (of {}) is {}; weights must be finite numbers",
                    out.len(),
                    out[i]
                ),
            ));
        }
        Ok(out)
    }

    /// Count a tensor as used without reading it (a duplicate of one that was read).
    pub fn mark_used(&self, name: &str) {
        if self.entries.contains_key(name) {
            self.used.borrow_mut().insert(name.to_owned());
        }
    }

    /// Whether two tensors hold the same dtype, shape and bytes (a tied `lm_head` stored twice).
    pub fn same_data(&self, a: &str, b: &str) -> bool {
        match (self.entries.get(a), self.entries.get(b)) {
            (Some(x), Some(y)) => {
                x.dtype == y.dtype
                    && x.shape == y.shape
                    && self.files[x.file].1[x.start..x.end] == self.files[y.file].1[y.start..y.end]
            }
            _ => false,
        }
    }

    /// After loading: every tensor in the files must have been used.
    pub fn finish(&self) -> Result<()> {
        let used = self.used.borrow();
        if let Some((_, e)) = self.entries.iter().find(|(n, _)| !used.contains(*n)) {
            return Err(Error::weights(
                self.file_name(e),
                Some(&e.stored_name),
                format!(
                    "unexpected tensor (shape {:?}) that GPT-2 does not have",
                    e.shape
                ),
            ));
        }
        Ok(())
    }
}
