//! PyTorch `torch.save` files of a state dict: the zip archive (torch ≥ 1.6) and the legacy stream
//! (`_use_new_zipfile_serialization=False`). The pickle is read by `super::pickle`, which runs
//! nothing; tensors point into the mapped file (torch stores the zip's members uncompressed), so
//! loading copies nothing that safetensors would not.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use super::checkpoint::{Entry, Store, Stored};
use super::pickle::{Format, StorageRef, TensorRef, Unpickler};
use crate::error::{Error, Result};

pub const SINGLE_FILE: &str = "pytorch_model.bin";
pub const INDEX_FILE: &str = "pytorch_model.bin.index.json";

/// The first bytes of a zip archive's first member.
pub(crate) const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// A legacy file starts with the pickle of torch's magic number 0x1950a86a20f9469cfc6c.
pub(crate) const LEGACY_MAGIC: &[u8] = &[
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

fn elem_size(d: &Stored) -> usize {
    match d {
        Stored::F32 => 4,
        _ => 2,
    }
}

/// Where each storage's bytes are in the file: key → (start, bytes, its description).
type Storages = BTreeMap<String, (usize, usize, StorageRef)>;

/// The entries of one PyTorch file (file index `file` in the checkpoint being built).
pub(crate) fn entries(path: &Path, bytes: &[u8], file: usize) -> Result<Vec<(String, Entry)>> {
    let err = |msg: String| Error::weights(path.display(), None, msg);
    let (tensors, storages) = if bytes.starts_with(ZIP_MAGIC) {
        read_zip(bytes).map_err(err)?
    } else if bytes.starts_with(LEGACY_MAGIC) {
        read_legacy(bytes).map_err(err)?
    } else {
        return Err(err(
            "not a PyTorch file (neither a torch.save zip archive nor the legacy format)".into(),
        ));
    };
    tensors
        .into_iter()
        .map(|(name, t)| {
            let e = place(&t, &storages, file, &name)
                .map_err(|m| Error::weights(path.display(), Some(&name), m))?;
            Ok((name, e))
        })
        .collect()
}

/// A tensor's byte range: contiguous (row-major) inside its storage.
fn place(t: &TensorRef, storages: &Storages, file: usize, name: &str) -> Result<Entry, String> {
    let s = &t.storage;
    let (base, len, first) = storages
        .get(&s.key)
        .ok_or_else(|| format!("storage {} is missing from the file", s.key))?;
    let (base, len) = (*base, *len);
    if first != s {
        return Err(format!(
            "storage {} is described two ways ({} × {} and {} × {})",
            s.key,
            first.numel,
            first.dtype.name(),
            s.numel,
            s.dtype.name()
        ));
    }
    let es = elem_size(&s.dtype) as u64;
    let mut numel: u64 = 1;
    let mut want = 1u64;
    let mut contiguous = true;
    for (&d, &st) in t.shape.iter().zip(&t.stride).rev() {
        if d != 1 && st != want {
            contiguous = false;
        }
        want = want.saturating_mul(d);
        numel = numel
            .checked_mul(d)
            .ok_or_else(|| format!("shape {:?} overflows", t.shape))?;
    }
    if !contiguous && numel > 0 {
        return Err(format!(
            "non-contiguous layout (shape {:?}, strides {:?}) is not supported; save the state dict \
             with contiguous tensors (`{{k: v.contiguous() for k, v in sd.items()}}`)",
            t.shape, t.stride
        ));
    }
    let end = t.offset.checked_add(numel).filter(|&e| e <= s.numel);
    if end.is_none() {
        return Err(format!(
            "elements {}..{}+{numel} lie outside its storage {} of {} elements",
            t.offset, t.offset, s.key, s.numel
        ));
    }
    let start = base as u64 + t.offset * es;
    let bytes = numel * es;
    debug_assert!(t.offset * es + bytes <= len as u64);
    let shape = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| "dimension too large".to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Entry {
        file,
        dtype: s.dtype.clone(),
        shape,
        start: start as usize,
        end: (start + bytes) as usize,
        stored_name: name.to_owned(),
        transposed: false,
    })
}

/// A storage's bytes as the file records them must be exactly what its persistent id says.
fn check_storage(s: &StorageRef, len: u64) -> Result<(), String> {
    let want = s.numel.checked_mul(elem_size(&s.dtype) as u64);
    if want != Some(len) {
        return Err(format!(
            "storage {} holds {len} bytes but its pickle says {} elements of {}",
            s.key,
            s.numel,
            s.dtype.name()
        ));
    }
    Ok(())
}

type Read2 = (Vec<(String, TensorRef)>, Storages);

fn read_zip(bytes: &[u8]) -> Result<Read2, String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a valid zip archive: {e}"))?;
    // torch writes `<name>/data.pkl` with every other member under the same `<name>/`.
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(|n| n.into_owned())
        .ok_or("a zip archive without `<name>/data.pkl`: not a torch.save file")?;
    let prefix = pkl.trim_end_matches("data.pkl").to_owned();
    if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut s = String::new();
        f.by_ref()
            .take(16)
            .read_to_string(&mut s)
            .map_err(|e| format!("{prefix}byteorder: {e}"))?;
        if s != "little" {
            return Err(format!(
                "byte order {:?}: only little-endian files are supported",
                s.escape_debug().to_string()
            ));
        }
    }
    let pickle = {
        let mut f = zip.by_name(&pkl).map_err(|e| format!("{pkl}: {e}"))?;
        // The archive's own sizes are checked against the file by the zip reader; cap anyway.
        let size = f.size().min(bytes.len() as u64);
        let mut buf = Vec::with_capacity(size as usize);
        f.by_ref()
            .take(size)
            .read_to_end(&mut buf)
            .map_err(|e| format!("{pkl}: {e}"))?;
        buf
    };
    let tensors = Unpickler::new(&pickle, Format::Zip).state_dict()?;
    let mut storages = Storages::new();
    for (_, t) in &tensors {
        let s = &t.storage;
        if storages.contains_key(&s.key) {
            continue;
        }
        let member = format!("{prefix}data/{}", s.key);
        let f = zip
            .by_name_raw(member.as_bytes())
            .map_err(|e| format!("storage {member}: {e}"))?;
        if f.compression() != zip::CompressionMethod::Stored {
            return Err(format!(
                "storage {member} is compressed ({}); torch.save stores tensors uncompressed",
                f.compression()
            ));
        }
        let start = f
            .data_start()
            .ok_or_else(|| format!("storage {member}: no data offset"))?;
        let len = f.size();
        if f.compressed_size() != len
            || start
                .checked_add(len)
                .is_none_or(|end| end > bytes.len() as u64)
        {
            return Err(format!(
                "storage {member} claims {len} bytes at offset {start}, beyond the file's {} bytes",
                bytes.len()
            ));
        }
        check_storage(s, len)?;
        storages.insert(s.key.clone(), (start as usize, len as usize, s.clone()));
    }
    Ok((tensors, storages))
}

fn read_legacy(bytes: &[u8]) -> Result<Read2, String> {
    let mut u = Unpickler::new(bytes, Format::Legacy);
    u.int_value()?; // the magic number (checked by the caller's prefix)
    let protocol = u.int_value()?;
    if protocol != Some(1001) {
        return Err(format!(
            "legacy protocol version {protocol:?}, expected 1001"
        ));
    }
    if !u.little_endian()? {
        return Err("a big-endian legacy file is not supported".into());
    }
    let tensors = u.state_dict()?;
    let keys = u.strings()?;
    let by_key: BTreeMap<&str, &StorageRef> = tensors
        .iter()
        .map(|(_, t)| (t.storage.key.as_str(), &t.storage))
        .collect();
    // Then each storage in `keys` order: its element count (u64) and its bytes.
    let mut pos = u.position();
    let mut storages = Storages::new();
    for key in &keys {
        let s = by_key
            .get(key.as_str())
            .ok_or_else(|| format!("storage {key} is listed but no tensor uses it"))?;
        let head = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| format!("truncated before storage {key}"))?;
        let numel = u64::from_le_bytes(head.try_into().unwrap());
        pos += 8;
        let len = numel
            .checked_mul(elem_size(&s.dtype) as u64)
            .filter(|&l| l <= (bytes.len() - pos) as u64)
            .ok_or_else(|| {
                format!(
                    "storage {key} claims {numel} elements, beyond the file's {} bytes",
                    bytes.len()
                )
            })?;
        check_storage(s, len)?;
        storages.insert(key.clone(), (pos, len as usize, (*s).clone()));
        pos += len as usize;
    }
    Ok((tensors, storages))
}

/// The files of a sharded `pytorch_model.bin.index.json`, checked to be plain names beside it.
pub(crate) fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let parsed: Index = serde_json::from_str(&text)
        .map_err(|e| Error::weights(index.display(), None, format!("not a valid index: {e}")))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&String> = parsed.weight_map.values().collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|s| {
            if s.contains('/') || s.contains('\\') || s.starts_with("..") || s.is_empty() {
                Err(Error::weights(
                    index.display(),
                    None,
                    format!("shard name {s:?} must be a plain file name"),
                ))
            } else {
                Ok(dir.join(s))
            }
        })
        .collect()
}

/// Parse PyTorch bytes held in memory (the fuzz target's entry point).
pub fn parse_bytes(bytes: &[u8]) -> Result<usize> {
    let store = Store::Bytes(bytes.to_vec());
    let list = entries(Path::new("<memory>"), &store, 0)?;
    let n = list.len();
    super::Checkpoint::from_parts(vec![(PathBuf::from("<memory>"), store)], list)?;
    Ok(n)
}
