//! Checkpoints as named tensors in memory-mapped files: safetensors (single-file or sharded) here,
//! PyTorch, TensorFlow and GGUF files through [`Checkpoint::from_parts`] (see [`super::open`]).
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

/// How a tensor's elements are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stored {
    F32,
    F16,
    Bf16,
    /// ggml's q8_0: blocks of 32 consecutive elements of the last (stored) dimension, each an f16
    /// scale then 32 signed bytes.
    Q8_0,
    /// Anything else, by the file's own name for it: an error when looked up.
    Other(String),
}

impl Stored {
    /// Bytes of `numel` elements; None for [`Stored::Other`], or a q8_0 row that is not whole blocks.
    pub(crate) fn bytes(&self, numel: usize, last_dim: usize) -> Option<usize> {
        match self {
            Stored::F32 => numel.checked_mul(4),
            Stored::F16 | Stored::Bf16 => numel.checked_mul(2),
            Stored::Q8_0 if last_dim.is_multiple_of(32) => Some(numel / 32 * 34),
            _ => None,
        }
    }

    pub(crate) fn name(&self) -> &str {
        match self {
            Stored::F32 => "F32",
            Stored::F16 => "F16",
            Stored::Bf16 => "BF16",
            Stored::Q8_0 => "Q8_0",
            Stored::Other(s) => s,
        }
    }
}

/// The bytes a checkpoint's tensors live in: a mapped file, or bytes in memory (the fuzz targets'
/// entry points, which take bytes).
///
/// Crate-private on purpose: a memory map is sound only while nobody writes to or truncates the file
/// (see [`Store::map`]), a promise this crate makes about the files it opens and must not let a
/// caller outside it extend to arbitrary maps. Outside the crate, bytes and paths go through
/// [`super::open`], [`Checkpoint::open_dir`] or the `parse_bytes` functions.
pub(crate) enum Store {
    Mmap(Mmap),
    Bytes(Vec<u8>),
}

impl std::ops::Deref for Store {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Store::Mmap(m) => m,
            Store::Bytes(b) => b,
        }
    }
}

impl Store {
    /// Map a file read-only.
    ///
    /// The map is sound only while the file is neither written nor truncated: a write changes bytes
    /// behind the `&[u8]` this hands out, and a truncation turns a read into `SIGBUS`. Like every
    /// memory-mapping loader (candle's `MmapedSafetensors::new` is `unsafe` for the same reason),
    /// this crate requires that the checkpoint files it opens are not modified while the
    /// [`Checkpoint`] is alive, and says so in [`super::open`]'s documentation; keeping this
    /// function crate-private means only the crate's own readers rely on that condition.
    pub(crate) fn map(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: `Mmap::map` is unsafe because the file may change while mapped. The mapping is
        // read-only and private; it is only ever read through bounds-checked slices of a
        // `Checkpoint` (or a reader building one), and the files a `Checkpoint` is opened from must
        // not be modified while it lives: the documented condition of `weights::open`,
        // `Checkpoint::open_dir` and `Checkpoint::open_files`, the crate's only ways to map a file.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(Store::Mmap(mmap))
    }

    /// Drop the mapped pages of `range` from this process once read: they stay in the page cache,
    /// so a re-read costs a page fault, but the loaded model and its source do not both count
    /// against the process's peak memory.
    pub(crate) fn release(&self, start: usize, end: usize) {
        #[cfg(unix)]
        if let Store::Mmap(m) = self {
            let page = 4096;
            let (a, b) = (start.div_ceil(page) * page, end / page * page);
            if b > a {
                // SAFETY: the mapping is read-only and private and never written, so dropping its
                // pages only means they are read again from the file if touched.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
                };
            }
        }
    }
}

/// A checkpoint's files and named entries, as a format reader returns them.
pub(crate) type Parts = (Vec<(PathBuf, Store)>, Vec<(String, Entry)>);

/// One tensor's place in one file.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) file: usize,
    pub(crate) dtype: Stored,
    /// The shape under the normalised name (transformers' layout).
    pub(crate) shape: Vec<usize>,
    /// Byte range inside the file.
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// The key as written in the file.
    pub(crate) stored_name: String,
    /// Stored as the transpose of `shape` (a 2-D matrix; ggml keeps Conv1D weights as `(out, in)`).
    pub(crate) transposed: bool,
}

/// A tensor's description, as `gpt2 inspect` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// A checkpoint's tensors, by the names of the hub's gpt2 layout, in files mapped into memory:
/// what [`super::open`] returns (in [`super::Opened`]) and a model is built from.
///
/// The files must not be written or truncated while the `Checkpoint` lives: they are memory-mapped,
/// and a change under the map is undefined behaviour (a truncation is a `SIGBUS`).
pub struct Checkpoint {
    files: Vec<(PathBuf, Store)>,
    /// Normalised name → entry.
    entries: BTreeMap<String, Entry>,
    used: RefCell<BTreeSet<String>>,
}

/// Mask buffers that transformers stores in some checkpoints; they are not parameters.
fn is_mask_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")
}

pub(crate) fn normalise(name: &str) -> &str {
    name.strip_prefix("transformer.").unwrap_or(name)
}

/// A weight matrix as [`Checkpoint::matrix`] hands it over.
pub(crate) enum MatrixData<'a> {
    /// llama.cpp's q8_0 blocks, one output per row.
    Q8_0(&'a [u8]),
    /// f32, one output per row.
    Rows(Vec<f32>),
    /// f32, one input per row (the Conv1D layout).
    Cols(Vec<f32>),
}

impl Checkpoint {
    /// Open the safetensors weights of a model directory: `model.safetensors.index.json` with its
    /// shards, else `model.safetensors`. The files are memory-mapped: they must not be modified while
    /// the checkpoint lives.
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
    /// tensor must sit in the shard the index says. The shards are memory-mapped: they must not be
    /// modified while the checkpoint lives.
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

    /// Open and validate a list of safetensors files as one checkpoint. The files are memory-mapped:
    /// they must not be modified while the checkpoint lives.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = BTreeMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let mmap = Store::map(path)?;
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
                let dtype = match view.dtype() {
                    Dtype::F32 => Stored::F32,
                    Dtype::F16 => Stored::F16,
                    Dtype::BF16 => Stored::Bf16,
                    other => Stored::Other(format!("{other:?}")),
                };
                let entry = Entry {
                    file: fi,
                    dtype,
                    shape: view.shape().to_vec(),
                    start,
                    end: start + view.data().len(),
                    stored_name: stored_name.clone(),
                    transposed: false,
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

    /// A checkpoint over files some other reader has parsed: each entry's byte range is checked
    /// against its file and its dtype and shape; names must be unique once normalised, and mask
    /// buffers are dropped.
    pub(crate) fn from_parts(
        files: Vec<(PathBuf, Store)>,
        list: Vec<(String, Entry)>,
    ) -> Result<Self> {
        let mut entries = BTreeMap::new();
        for (name, e) in list {
            let path = files
                .get(e.file)
                .map(|f| f.0.display().to_string())
                .unwrap_or_default();
            let err = |msg: String| Error::weights(&path, Some(&e.stored_name), msg);
            let len = files.get(e.file).map_or(0, |f| f.1.len());
            let numel = e
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| err(format!("shape {:?} overflows", e.shape)))?;
            let last = if e.transposed {
                e.shape.first()
            } else {
                e.shape.last()
            };
            if e.transposed && e.shape.len() != 2 {
                return Err(err(format!(
                    "a transposed tensor must be 2-D, not {:?}",
                    e.shape
                )));
            }
            if let Some(want) = e.dtype.bytes(numel, last.copied().unwrap_or(1)) {
                if e.end.checked_sub(e.start) != Some(want) {
                    return Err(err(format!(
                        "{} shape {:?} needs {want} bytes but the file gives {}..{}",
                        e.dtype.name(),
                        e.shape,
                        e.start,
                        e.end
                    )));
                }
            } else if e.dtype == Stored::Q8_0 {
                return Err(err(format!(
                    "Q8_0 rows must be whole blocks of 32, shape {:?}",
                    e.shape
                )));
            }
            if e.start > e.end || e.end > len {
                return Err(err(format!(
                    "data at bytes {}..{} lies outside the file ({len} bytes)",
                    e.start, e.end
                )));
            }
            if is_mask_buffer(&name) {
                continue;
            }
            let key = normalise(&name).to_owned();
            let stored = e.stored_name.clone();
            if let Some(prev) = entries.insert(key, e) {
                return Err(Error::weights(
                    path,
                    Some(&stored),
                    format!(
                        "duplicate tensor: `{}` names the same parameter",
                        prev.stored_name
                    ),
                ));
            }
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
                dtype: e.dtype.name().to_owned(),
                shape: e.shape.clone(),
            })
            .collect()
    }

    fn file_name(&self, e: &Entry) -> String {
        self.files[e.file].0.display().to_string()
    }

    /// The entry of `name` with its shape checked.
    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
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
        Ok(e)
    }

    /// Check that `name` is present with `shape`, and count it as used, without reading it.
    pub fn check_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        self.entry(name, shape).map(|_| ())
    }

    /// The elements as f32 in the order they are stored. The mapped pages are dropped chunk by
    /// chunk as they are converted, so a tensor and its source are never both resident.
    fn stored_f32(&self, e: &Entry) -> Result<Vec<f32>> {
        // A multiple of every stored element's size (4, 2 and q8_0's 34-byte block).
        const CHUNK: usize = 34 * 4 * 8192;
        let store = &self.files[e.file].1;
        let bytes = &store[e.start..e.end];
        // The element count, and how to convert a run of whole elements (or q8_0 blocks).
        type Convert = fn(&[u8], &mut Vec<f32>);
        let (len, convert): (usize, Convert) = match e.dtype {
            Stored::F32 => (bytes.len() / 4, |c, out| {
                out.extend(
                    c.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                )
            }),
            Stored::F16 => (bytes.len() / 2, |c, out| {
                out.extend(
                    c.chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                )
            }),
            Stored::Bf16 => (bytes.len() / 2, |c, out| {
                out.extend(
                    c.chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
                )
            }),
            Stored::Q8_0 => (bytes.len() / 34 * 32, |c, out| {
                for b in c.chunks_exact(34) {
                    let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    out.extend(b[2..].iter().map(|&q| q as i8 as f32 * d));
                }
            }),
            Stored::Other(ref other) => {
                return Err(Error::weights(
                    self.file_name(e),
                    Some(&e.stored_name),
                    format!("dtype {other} is not supported (expected F32, F16, BF16 or Q8_0)"),
                ))
            }
        };
        let mut out = Vec::with_capacity(len);
        for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
            convert(chunk, &mut out);
            let start = e.start + i * CHUNK;
            store.release(start, start + chunk.len());
        }
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
        store.release(e.start, e.end);
        Ok(out)
    }

    /// Read tensor `name` (normalised), check its shape and convert it to f32.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let e = self.entry(name, shape)?;
        let data = self.stored_f32(e)?;
        Ok(if e.transposed {
            transpose(&data, shape[1], shape[0])
        } else {
            data
        })
    }

    /// The weight matrix `name` of `n` outputs × `k` inputs, handed to `build` as stored: a q8_0
    /// tensor stored one output per row as its blocks when `q8_as_stored` (so that it is not
    /// quantized again), else f32 one output per row or one input per row. `conv1d`: the tensor is
    /// transformers' Conv1D layout `(k, n)`; else it is `(n, k)`. A backend builds its own matrix
    /// type from this; the blocks' pages are released once `build` returns.
    pub(crate) fn matrix<T>(
        &self,
        name: &str,
        n: usize,
        k: usize,
        conv1d: bool,
        q8_as_stored: bool,
        build: impl FnOnce(MatrixData<'_>) -> T,
    ) -> Result<T> {
        let shape = if conv1d { [k, n] } else { [n, k] };
        let e = self.entry(name, &shape)?;
        // Stored one output per row when exactly one of "Conv1D" and "stored transposed" holds.
        let rows_stored = conv1d == e.transposed;
        if q8_as_stored && e.dtype == Stored::Q8_0 && rows_stored {
            let store = &self.files[e.file].1;
            let m = build(MatrixData::Q8_0(&store[e.start..e.end]));
            store.release(e.start, e.end);
            return Ok(m);
        }
        let data = self.stored_f32(e)?;
        Ok(build(if rows_stored {
            MatrixData::Rows(data)
        } else {
            MatrixData::Cols(data)
        }))
    }

    /// The bytes of tensor `name` (normalised) exactly as stored, whatever their dtype.
    pub(crate) fn stored_bytes(&self, name: &str) -> Option<&[u8]> {
        let e = self.entries.get(name)?;
        Some(&self.files[e.file].1[e.start..e.end])
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
                let same_layout =
                    x.dtype == y.dtype && x.shape == y.shape && x.transposed == y.transposed;
                // One storage shared by both (PyTorch's tied lm_head): equal without reading it.
                let same_place = x.file == y.file && x.start == y.start && x.end == y.end;
                same_layout
                    && (same_place || {
                        let (fx, fy) = (&self.files[x.file].1, &self.files[y.file].1);
                        let eq = fx[x.start..x.end] == fy[y.start..y.end];
                        fx.release(x.start, x.end);
                        fy.release(y.start, y.end);
                        eq
                    })
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

/// The bytes of tensor `name` (normalised) exactly as stored (tests compare converted files by them).
pub fn stored_bytes<'c>(ck: &'c Checkpoint, name: &str) -> Option<&'c [u8]> {
    ck.stored_bytes(name)
}

/// `(rows, cols)` row-major → `(cols, rows)` row-major, in 32×32 tiles: an element-by-element
/// transpose writes one cache line per element and dominated loading a gpt2-sized checkpoint.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 32;
    let mut out = vec![0.0; a.len()];
    for r0 in (0..rows).step_by(T) {
        for c0 in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                for c in c0..(c0 + T).min(cols) {
                    out[c * rows + r] = a[r * cols + c];
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn tiled_transpose_is_a_transpose() {
        for (rows, cols) in [(1, 1), (3, 70), (64, 33), (100, 7)] {
            let a: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = super::transpose(&a, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], a[r * cols + c]);
                }
            }
        }
    }
}
