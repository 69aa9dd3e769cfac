//! Checkpoint files → named, shape-checked f32 tensors. `crate::model::params` names GPT-2's
//! tensors over them; each backend builds its typed layers from those.
//!
//! [`open`] takes a directory or a file and recognises its format by content: safetensors, PyTorch
//! (`torch.save` zip or legacy), OpenAI's TensorFlow checkpoint, or GGUF.
//!
//! The format readers themselves are crate-private; the fuzz targets and tests reach their
//! in-memory entry points through `gpt2::internal`.

pub(crate) mod checkpoint;
pub(crate) mod gguf;
mod pickle;
pub(crate) mod pytorch;
pub(crate) mod tf;

use std::path::{Path, PathBuf};

pub use checkpoint::{Checkpoint, TensorInfo, INDEX_FILE, SINGLE_FILE};
pub(crate) use checkpoint::{MatrixData, Store};

use crate::config::GPT2Config;
use crate::error::{Error, Result};
use crate::tokenizer::vocab::RawVocab;
use crate::tokenizer::Tokenizer;

/// A checkpoint's format, as recognised from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    PyTorch,
    TensorFlow,
    Gguf,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::PyTorch => "pytorch",
            Format::TensorFlow => "tensorflow",
            Format::Gguf => "gguf",
        }
    }
}

/// An opened model: its config, its tensors, and where its tokenizer comes from.
pub struct Opened {
    pub config: GPT2Config,
    pub checkpoint: Checkpoint,
    pub format: Format,
    /// The directory whose tokenizer files go with the weights.
    pub dir: PathBuf,
    /// A vocabulary embedded in the checkpoint (GGUF), which takes precedence over `dir`'s files.
    pub vocab: Option<RawVocab>,
}

impl Opened {
    /// The tokenizer that goes with these weights.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match &self.vocab {
            Some(v) => Tokenizer::from_raw(RawVocab {
                tokens: v.tokens.clone(),
                merges: v.merges.clone(),
                added: v.added.clone(),
                source: v.source.clone(),
            }),
            None => Tokenizer::from_dir(&self.dir),
        }
    }
}

/// The tokenizer that goes with a model directory or checkpoint file: a GGUF file's embedded
/// vocabulary, else the tokenizer files beside the checkpoint ([`Tokenizer::from_dir`]).
pub fn tokenizer_for(path: &Path) -> Result<Tokenizer> {
    if path.is_dir() {
        return Tokenizer::from_dir(path);
    }
    open(path)?.tokenizer()
}

/// What the first bytes of a file say it is.
pub(crate) fn sniff(path: &Path) -> Result<Option<Format>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 16];
    let n = f.read(&mut head).map_err(|e| Error::io(path, e))?;
    let head = &head[..n];
    if head.starts_with(gguf::MAGIC) {
        return Ok(Some(Format::Gguf));
    }
    if head.starts_with(pytorch::ZIP_MAGIC) || head.starts_with(pytorch::LEGACY_MAGIC) {
        return Ok(Some(Format::PyTorch));
    }
    // safetensors: a little-endian u64 header length, then the JSON header.
    if n >= 9 && head[8] == b'{' {
        return Ok(Some(Format::Safetensors));
    }
    // A TF index is a table whose last 8 bytes are its magic number.
    let len = f.seek(SeekFrom::End(0)).map_err(|e| Error::io(path, e))?;
    if len >= 48 {
        let mut tail = [0u8; 8];
        f.seek(SeekFrom::End(-8)).map_err(|e| Error::io(path, e))?;
        f.read_exact(&mut tail).map_err(|e| Error::io(path, e))?;
        if u64::from_le_bytes(tail) == 0xdb47_7524_8b80_fb57 {
            return Ok(Some(Format::TensorFlow));
        }
    }
    Ok(None)
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Open a model directory or checkpoint file, whatever its format (recognised by content).
///
/// A directory: `model.safetensors[.index.json]`, else `pytorch_model.bin[.index.json]`, else a TF
/// checkpoint (`checkpoint` / `model.ckpt.index`), else its one `*.gguf` file. A file: its bytes
/// decide; safetensors and PyTorch files take `config.json` from beside them, TF `hparams.json`.
///
/// The checkpoint's files are memory-mapped: they must not be written or truncated while the
/// returned [`Checkpoint`] lives (a change under the map is undefined behaviour, a truncation a
/// `SIGBUS`).
pub fn open(path: &Path) -> Result<Opened> {
    if path.is_dir() {
        for name in [
            INDEX_FILE,
            SINGLE_FILE,
            pytorch::INDEX_FILE,
            pytorch::SINGLE_FILE,
        ] {
            let p = path.join(name);
            if p.is_file() {
                return open_file(&p);
            }
        }
        if let Some(prefix) = tf::prefix(path) {
            return open_tf(&prefix);
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf") && p.is_file())
            .collect();
        if let [one] = &ggufs[..] {
            return open_file(one);
        }
        if ggufs.is_empty() {
            // Nothing of any format: say first what a model directory lacks most visibly.
            GPT2Config::from_file(&path.join("config.json"))?;
        }
        return Err(Error::weights(
            path.display(),
            None,
            if ggufs.len() > 1 {
                "several .gguf files in this directory: name the one to load".to_string()
            } else {
                format!(
                    "no {SINGLE_FILE} or {INDEX_FILE} in this directory (nor {}, a TensorFlow \
                     checkpoint or a .gguf file)",
                    pytorch::SINGLE_FILE
                )
            },
        ));
    }
    if !path.exists() {
        if let Some(prefix) = tf::prefix(path) {
            return open_tf(&prefix); // a TF prefix such as `dir/model.ckpt`
        }
        return Err(Error::io(
            path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    open_file(path)
}

fn open_file(path: &Path) -> Result<Opened> {
    let dir = parent(path);
    let config = || GPT2Config::from_file(&dir.join("config.json"));
    let kind = if path.to_string_lossy().ends_with(".index.json") {
        let shards = pytorch::shard_paths(path)?;
        let first = shards
            .first()
            .ok_or_else(|| Error::weights(path.display(), None, "the index lists no shards"))?;
        return match sniff(first)? {
            Some(Format::Safetensors) => Ok(Opened {
                checkpoint: Checkpoint::open_sharded(path)?,
                config: config()?,
                format: Format::Safetensors,
                dir,
                vocab: None,
            }),
            Some(Format::PyTorch) => {
                let ck = open_pytorch(&shards)?;
                Ok(Opened {
                    config: config()?,
                    checkpoint: ck,
                    format: Format::PyTorch,
                    dir,
                    vocab: None,
                })
            }
            _ => Err(Error::weights(
                first.display(),
                None,
                "a shard that is neither safetensors nor PyTorch",
            )),
        };
    } else {
        // Unrecognised bytes under a known extension get that format's own error.
        sniff(path)?.or_else(|| {
            let name = path.to_string_lossy();
            if name.ends_with(".safetensors") {
                Some(Format::Safetensors)
            } else if name.ends_with(".gguf") {
                Some(Format::Gguf)
            } else if [".bin", ".pt", ".pth"].iter().any(|e| name.ends_with(e)) {
                Some(Format::PyTorch)
            } else {
                None
            }
        })
    };
    match kind {
        Some(Format::Safetensors) => Ok(Opened {
            checkpoint: Checkpoint::open_files(&[path.to_path_buf()])?,
            config: config()?,
            format: Format::Safetensors,
            dir,
            vocab: None,
        }),
        Some(Format::PyTorch) => Ok(Opened {
            checkpoint: open_pytorch(&[path.to_path_buf()])?,
            config: config()?,
            format: Format::PyTorch,
            dir,
            vocab: None,
        }),
        Some(Format::Gguf) => {
            let (config, files, list, vocab) = gguf::open(path)?;
            Ok(Opened {
                config,
                checkpoint: Checkpoint::from_parts(files, list)?,
                format: Format::Gguf,
                dir,
                vocab,
            })
        }
        Some(Format::TensorFlow) => {
            let prefix = tf::prefix(path).unwrap_or_else(|| path.to_path_buf());
            open_tf(&prefix)
        }
        None => Err(Error::weights(
            path.display(),
            None,
            "not a checkpoint this engine reads (expected safetensors, a PyTorch torch.save file, \
             GGUF, or a TensorFlow checkpoint index)",
        )),
    }
}

fn open_pytorch(paths: &[PathBuf]) -> Result<Checkpoint> {
    let mut files = Vec::with_capacity(paths.len());
    let mut list = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let store = Store::map(p)?;
        list.extend(pytorch::entries(p, &store, i)?);
        files.push((p.clone(), store));
    }
    Checkpoint::from_parts(files, list)
}

fn open_tf(prefix: &Path) -> Result<Opened> {
    let dir = parent(prefix);
    let (files, list) = tf::open(prefix)?;
    let hp = dir.join("hparams.json");
    let config = if hp.is_file() {
        tf::hparams(&hp)?
    } else {
        GPT2Config::from_file(&dir.join("config.json"))?
    };
    Ok(Opened {
        config,
        checkpoint: Checkpoint::from_parts(files, list)?,
        format: Format::TensorFlow,
        dir,
        vocab: None,
    })
}
