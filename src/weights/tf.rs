//! OpenAI's original TensorFlow release, read without TensorFlow: `checkpoint` names the prefix,
//! `<prefix>.index` is a LevelDB-style sorted string table mapping each variable to a
//! `BundleEntryProto` (dtype, shape, shard, offset, size, crc32c), and `<prefix>.data-0000N-of-0000M`
//! holds the raw little-endian tensors, which we map. The table and protobuf are parsed here by hand:
//! the few fields needed do not justify a protobuf toolchain.

use std::path::{Path, PathBuf};

use super::checkpoint::{Entry, Parts, Store, Stored};
use crate::config::GPT2Config;
use crate::error::{Error, Result};

/// The table footer's magic number (LevelDB's, which TensorFlow's table keeps).
const TABLE_MAGIC: u64 = 0xdb47_7524_8b80_fb57;
const FOOTER: usize = 48;

type R<T> = std::result::Result<T, String>;

/// A cursor over bytes with protobuf/LevelDB varints.
struct Cur<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cur<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cur { b, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.b.len()
    }

    fn varint(&mut self) -> R<u64> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let byte = *self.b.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            if shift == 63 && byte > 1 {
                return Err("varint overflows 64 bits".into());
            }
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn bytes(&mut self, n: u64) -> R<&'a [u8]> {
        let n = usize::try_from(n).map_err(|_| "length too large")?;
        if n > self.b.len() - self.pos {
            return Err(format!(
                "{n} bytes wanted at offset {}, {} left",
                self.pos,
                self.b.len() - self.pos
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
}

fn masked_crc(data: &[&[u8]]) -> u32 {
    let mut crc = 0;
    for d in data {
        crc = crc32c::crc32c_append(crc, d);
    }
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// How much a table may read and decode: each block once, for a well-formed file. Without it, a
/// hostile index could point every entry at one large block (quadratic time and memory).
struct Budget {
    raw: usize,
    decoded: usize,
}

impl Budget {
    fn new(file: usize) -> Self {
        Budget {
            raw: file,
            decoded: 16 * file + (1 << 20),
        }
    }

    fn spend(n: &mut usize, k: usize) -> R<()> {
        *n = n
            .checked_sub(k)
            .ok_or("the index reads its blocks more than once or decodes implausibly much")?;
        Ok(())
    }
}

/// A block of the table at `handle`, its trailer's checksum verified and decompressed if needed.
fn block(file: &[u8], handle: &[u8], budget: &mut Budget) -> R<Vec<u8>> {
    let mut c = Cur::new(handle);
    let (off, size) = (c.varint()?, c.varint()?);
    let end = off
        .checked_add(size)
        .and_then(|e| e.checked_add(5))
        .filter(|&e| e <= file.len() as u64)
        .ok_or_else(|| {
            format!(
                "a block at {off} of {size} bytes lies outside the file ({} bytes)",
                file.len()
            )
        })?;
    let (off, size) = (off as usize, size as usize);
    Budget::spend(&mut budget.raw, size)?;
    let data = &file[off..off + size];
    let kind = file[off + size];
    let crc = u32::from_le_bytes(file[off + size + 1..end as usize].try_into().unwrap());
    // Under the fuzzer, a mutated block is parsed anyway: the checksum would stop nearly every
    // input before the table and protobuf parsers that need exercising.
    if masked_crc(&[data, &[kind]]) != crc && !cfg!(fuzzing) {
        return Err(format!("block at {off}: checksum mismatch (corrupt index)"));
    }
    match kind {
        0 => Ok(data.to_vec()),
        1 => {
            let n = snap::raw::decompress_len(data).map_err(|e| format!("snappy block: {e}"))?;
            // A block decompresses to at most a few times its size; refuse absurd claims.
            if n > 64 * data.len() + 4096 {
                return Err(format!("snappy block claims {n} bytes from {}", data.len()));
            }
            Budget::spend(&mut budget.decoded, n)?;
            snap::raw::Decoder::new()
                .decompress_vec(data)
                .map_err(|e| format!("snappy block: {e}"))
        }
        k => Err(format!("block compression type {k} is unknown")),
    }
}

/// The (key, value) entries of a table block, keys prefix-decoded.
fn block_entries(b: &[u8], budget: &mut Budget) -> R<Vec<(Vec<u8>, Vec<u8>)>> {
    if b.len() < 4 {
        return Err("block shorter than its restart count".into());
    }
    let restarts = u32::from_le_bytes(b[b.len() - 4..].try_into().unwrap()) as usize;
    let body = restarts
        .checked_mul(4)
        .and_then(|r| (b.len() - 4).checked_sub(r))
        .ok_or("block's restart array is larger than the block")?;
    let mut c = Cur::new(&b[..body]);
    let mut out = Vec::new();
    let mut key: Vec<u8> = Vec::new();
    while !c.done() {
        let (shared, non_shared, vlen) = (c.varint()?, c.varint()?, c.varint()?);
        if shared > key.len() as u64 {
            return Err("a key shares more bytes than the previous key has".into());
        }
        key.truncate(shared as usize);
        key.extend_from_slice(c.bytes(non_shared)?);
        let value = c.bytes(vlen)?;
        Budget::spend(&mut budget.decoded, key.len() + value.len() + 48)?;
        out.push((key.clone(), value.to_vec()));
    }
    Ok(out)
}

/// Every (key, value) of a table file, in order.
fn table(file: &[u8]) -> R<Vec<(Vec<u8>, Vec<u8>)>> {
    if file.len() < FOOTER {
        return Err(format!(
            "{} bytes: too short for a table footer",
            file.len()
        ));
    }
    let footer = &file[file.len() - FOOTER..];
    if u64::from_le_bytes(footer[40..].try_into().unwrap()) != TABLE_MAGIC {
        return Err("no table magic number at the end: not a TensorFlow checkpoint index".into());
    }
    let mut c = Cur::new(&footer[..40]);
    let _meta = (c.varint()?, c.varint()?);
    let mut budget = Budget::new(file.len());
    let index = block(file, &footer[c.pos..40], &mut budget)?;
    let mut out = Vec::new();
    for (_, handle) in block_entries(&index, &mut budget)? {
        let b = block(file, &handle, &mut budget)?;
        out.extend(block_entries(&b, &mut budget)?);
    }
    Ok(out)
}

/// The fields of a `BundleEntryProto` we use.
#[derive(Debug, Default)]
struct BundleEntry {
    dtype: u64,
    shape: Vec<u64>,
    shard: u64,
    offset: u64,
    size: u64,
    crc32c: Option<u32>,
    slices: bool,
}

/// Walk a protobuf message: call `f(field, wire type, value)` with a varint, a fixed value, or bytes.
fn fields(b: &[u8], mut f: impl FnMut(u64, Field) -> R<()>) -> R<()> {
    let mut c = Cur::new(b);
    while !c.done() {
        let tag = c.varint()?;
        let field = match tag & 7 {
            0 => Field::Int(c.varint()?),
            1 => Field::Int(u64::from_le_bytes(c.bytes(8)?.try_into().unwrap())),
            2 => {
                let n = c.varint()?;
                Field::Bytes(c.bytes(n)?)
            }
            5 => Field::Int(u32::from_le_bytes(c.bytes(4)?.try_into().unwrap()) as u64),
            w => return Err(format!("protobuf wire type {w} is not supported")),
        };
        f(tag >> 3, field)?;
    }
    Ok(())
}

enum Field<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

fn bundle_entry(b: &[u8]) -> R<BundleEntry> {
    let mut e = BundleEntry::default();
    let mut unknown_rank = false;
    fields(b, |n, v| {
        match (n, v) {
            (1, Field::Int(v)) => e.dtype = v,
            (2, Field::Bytes(shape)) => fields(shape, |n, v| {
                match (n, v) {
                    (2, Field::Bytes(dim)) => {
                        let mut size = 0;
                        fields(dim, |n, v| {
                            if let (1, Field::Int(s)) = (n, v) {
                                size = s;
                            }
                            Ok(())
                        })?;
                        if (size as i64) < 0 {
                            return Err(format!("negative dimension {}", size as i64));
                        }
                        e.shape.push(size)
                    }
                    (3, Field::Int(v)) => unknown_rank = v != 0,
                    _ => {}
                }
                Ok(())
            })?,
            (3, Field::Int(v)) => e.shard = v,
            (4, Field::Int(v)) => e.offset = v,
            (5, Field::Int(v)) => e.size = v,
            (6, Field::Int(v)) => e.crc32c = Some(v as u32),
            (7, _) => e.slices = true,
            _ => {}
        }
        Ok(())
    })?;
    if unknown_rank {
        return Err("a tensor of unknown rank".into());
    }
    Ok(e)
}

fn dtype_name(t: u64) -> Stored {
    match t {
        1 => Stored::F32,
        14 => Stored::Bf16,
        19 => Stored::F16,
        2 => Stored::Other("DT_DOUBLE".into()),
        3 => Stored::Other("DT_INT32".into()),
        9 => Stored::Other("DT_INT64".into()),
        7 => Stored::Other("DT_STRING".into()),
        t => Stored::Other(format!("TensorFlow dtype {t}")),
    }
}

/// OpenAI's variable names → transformers' (and whether to drop the conv1d weights' leading 1).
fn normalise(name: &str) -> (String, bool) {
    let map = |leaf: &str, ln: bool| match (leaf, ln) {
        ("g", true) => Some("weight"),
        ("b", _) => Some("bias"),
        ("w", false) => Some("weight"),
        _ => None,
    };
    let Some(rest) = name.strip_prefix("model/") else {
        return (name.to_owned(), false);
    };
    match rest {
        "wte" | "wpe" => return (format!("{rest}.weight"), false),
        "ln_f/g" => return ("ln_f.weight".into(), false),
        "ln_f/b" => return ("ln_f.bias".into(), false),
        _ => {}
    }
    let parts: Vec<&str> = rest.split('/').collect();
    if let Some(i) = parts[0]
        .strip_prefix('h')
        .filter(|i| i.parse::<usize>().is_ok())
    {
        let (path, leaf) = (&parts[1..parts.len() - 1], parts[parts.len() - 1]);
        let ok_path = matches!(
            path,
            ["ln_1"]
                | ["ln_2"]
                | ["attn", "c_attn"]
                | ["attn", "c_proj"]
                | ["mlp", "c_fc"]
                | ["mlp", "c_proj"]
        );
        let ln = path.len() == 1;
        if let (true, Some(l)) = (ok_path, map(leaf, ln)) {
            return (
                format!("h.{i}.{}.{l}", path.join(".")),
                l == "weight" && !ln,
            );
        }
    }
    (name.to_owned(), false)
}

/// The checkpoint prefix of a TF model: from the `checkpoint` file of a directory, or a path to
/// `<prefix>.index` or to the prefix itself.
pub(crate) fn prefix(path: &Path) -> Option<PathBuf> {
    if path.is_dir() {
        let text = std::fs::read_to_string(path.join("checkpoint")).ok();
        let named = text.as_deref().and_then(|t| {
            t.lines()
                .find_map(|l| l.trim().strip_prefix("model_checkpoint_path:"))
                .map(|v| v.trim().trim_matches('"').to_owned())
        });
        // Only the last component: Savers write absolute paths of the machine that saved.
        let base = named
            .as_deref()
            .and_then(|n| Path::new(n).file_name())
            .map(|n| path.join(n));
        return base
            .or_else(|| Some(path.join("model.ckpt")))
            .filter(|p| index_of(p).is_file());
    }
    let s = path.to_str()?;
    if let Some(p) = s.strip_suffix(".index") {
        return Some(PathBuf::from(p));
    }
    index_of(path).is_file().then(|| path.to_path_buf())
}

pub(crate) fn index_of(prefix: &Path) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".index");
    PathBuf::from(s)
}

/// Open a TF checkpoint by prefix: the index's entries pointing into the mapped data shards.
pub(crate) fn open(prefix: &Path) -> Result<Parts> {
    let index_path = index_of(prefix);
    let index = Store::map(&index_path)?;
    let (shards, list) =
        parse_index(&index).map_err(|m| Error::weights(index_path.display(), None, m))?;
    let mut files = Vec::with_capacity(shards);
    for s in 0..shards {
        let mut p = prefix.as_os_str().to_owned();
        p.push(format!(".data-{s:05}-of-{shards:05}"));
        let p = PathBuf::from(p);
        let store = Store::map(&p)?;
        files.push((p, store));
    }
    let mut entries = Vec::with_capacity(list.len());
    for (name, e) in list {
        let (key, squeeze) = normalise(&name);
        let err = |m: String| Error::weights(files[e.shard as usize].0.display(), Some(&name), m);
        let data = &files[e.shard as usize].1;
        let end = e
            .offset
            .checked_add(e.size)
            .filter(|&end| end <= data.len() as u64)
            .ok_or_else(|| {
                err(format!(
                    "bytes {}..+{} lie outside the data file ({} bytes)",
                    e.offset,
                    e.size,
                    data.len()
                ))
            })?;
        let (start, end) = (e.offset as usize, end as usize);
        if let Some(crc) = e.crc32c {
            let got = masked_crc(&[&data[start..end]]);
            data.release(start, end); // read again when converted; not all resident at once
            if got != crc {
                return Err(err(format!(
                    "checksum mismatch (crc32c {got:08x}, the index says {crc:08x}): corrupt data"
                )));
            }
        }
        let mut shape: Vec<usize> = e
            .shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| err("dimension too large".into())))
            .collect::<Result<_>>()?;
        if squeeze && shape.len() == 3 && shape[0] == 1 {
            shape.remove(0);
        }
        entries.push((
            key,
            Entry {
                file: e.shard as usize,
                dtype: dtype_name(e.dtype),
                shape,
                start,
                end,
                stored_name: name,
                transposed: false,
            },
        ));
    }
    Ok((files, entries))
}

/// The number of data shards and each variable's entry.
fn parse_index(index: &[u8]) -> R<(usize, Vec<(String, BundleEntry)>)> {
    let mut shards = None;
    let mut out = Vec::new();
    for (key, value) in table(index)? {
        if key.is_empty() {
            // BundleHeaderProto: num_shards = 1, endianness = 2 (0 little).
            let (mut n, mut big) = (1u64, false);
            fields(&value, |f, v| {
                match (f, v) {
                    (1, Field::Int(v)) => n = v,
                    (2, Field::Int(v)) => big = v != 0,
                    _ => {}
                }
                Ok(())
            })?;
            if big {
                return Err("a big-endian checkpoint is not supported".into());
            }
            if n == 0 || n > 1024 {
                return Err(format!("{n} data shards: expected 1 to 1024"));
            }
            shards = Some(n as usize);
            continue;
        }
        let name = String::from_utf8(key).map_err(|_| "a variable name is not UTF-8")?;
        let e = bundle_entry(&value).map_err(|m| format!("variable {name}: {m}"))?;
        if e.slices {
            return Err(format!(
                "variable {name} is saved in slices (a partitioned variable), which is not supported"
            ));
        }
        out.push((name, e));
    }
    let shards = shards.ok_or("no bundle header (the entry with the empty key)")?;
    if let Some((name, e)) = out.iter().find(|(_, e)| e.shard >= shards as u64) {
        return Err(format!(
            "variable {name} is in shard {} of {shards}",
            e.shard
        ));
    }
    Ok((shards, out))
}

/// `hparams.json` (`n_vocab`, `n_ctx`, `n_embd`, `n_head`, `n_layer`) as a config.
pub(crate) fn hparams(path: &Path) -> Result<GPT2Config> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let origin = path.display().to_string();
    let err = |msg: String| Error::Config {
        path: origin.clone(),
        msg,
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let get = |k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| err(format!("missing or non-integer `{k}`")))
    };
    let json = serde_json::json!({
        "n_layer": get("n_layer")?, "n_embd": get("n_embd")?, "n_head": get("n_head")?,
        "n_positions": get("n_ctx")?, "vocab_size": get("n_vocab")?,
    });
    GPT2Config::from_json(&json.to_string(), &origin)
}

/// Parse an index held in memory (the fuzz target's entry point): the number of variables.
pub fn parse_index_bytes(bytes: &[u8]) -> std::result::Result<usize, String> {
    parse_index(bytes).map(|(_, v)| v.len())
}
