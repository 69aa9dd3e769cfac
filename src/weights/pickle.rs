//! A restricted unpickler for PyTorch state dicts: it builds plain data (numbers, strings, tuples,
//! lists, dicts) and exactly the few objects a state dict is made of (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`, `torch.{Float,Half,BFloat16}Storage`
//! behind persistent ids). It never imports or calls anything: a `GLOBAL` naming anything else is
//! refused with its name, and so is every opcode that could construct an arbitrary object.
//!
//! Objects live in an arena and the stack, memo and containers hold indices, so a hostile pickle
//! can neither blow up memory by sharing (`BINGET` of a large list costs one index), nor recurse
//! (no value is ever walked deeper than the state dict's own two levels): memory stays
//! proportional to the number of opcodes, hence to the file's size.

use std::collections::HashMap;

use super::checkpoint::Stored;

/// An index into the arena.
type Id = usize;

/// The callables a state dict's pickle may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(StorageType),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorageType {
    Float,
    Half,
    BFloat16,
}

impl StorageType {
    fn stored(self) -> Stored {
        match self {
            StorageType::Float => Stored::F32,
            StorageType::Half => Stored::F16,
            StorageType::BFloat16 => Stored::Bf16,
        }
    }
}

/// A storage named by a persistent id: `('storage', type, key, location, numel[, view])`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageRef {
    pub key: String,
    pub dtype: Stored,
    /// Elements.
    pub numel: u64,
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRef {
    pub storage: StorageRef,
    /// In elements.
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

#[derive(Debug, Clone)]
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(#[allow(dead_code)] f64),
    Str(String),
    Bytes,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "a bool",
            Obj::Int(_) => "an int",
            Obj::Float(_) => "a float",
            Obj::Str(_) => "a string",
            Obj::Bytes => "bytes",
            Obj::Tuple(_) => "a tuple",
            Obj::List(_) => "a list",
            Obj::Dict(_) => "a dict",
            Obj::Global(_) => "a class or function",
            Obj::Storage(_) => "a storage",
            Obj::Tensor(_) => "a tensor",
        }
    }
}

/// What persistent ids look like in each of torch's two formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `torch.save`'s zip archive: `('storage', type, key, location, numel)`.
    Zip,
    /// The legacy stream: `('storage', type, key, location, numel, view_metadata)`.
    Legacy,
}

pub(crate) struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    arena: Vec<Obj>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    format: Format,
}

type R<T> = std::result::Result<T, String>;

const ALLOWED: &str = "collections.OrderedDict, torch._utils._rebuild_tensor_v2, \
    torch._utils._rebuild_parameter, torch.FloatStorage, torch.HalfStorage, torch.BFloat16Storage";

fn global(module: &str, name: &str) -> R<Global> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", "FloatStorage") => Global::Storage(StorageType::Float),
        ("torch", "HalfStorage") => Global::Storage(StorageType::Half),
        ("torch", "BFloat16Storage") => Global::Storage(StorageType::BFloat16),
        _ => {
            let what = format!("{module}.{name}").escape_debug().to_string();
            return Err(format!(
                "refusing pickle global `{what}`: a state dict needs only {ALLOWED}; nothing was run"
            ));
        }
    })
}

impl<'a> Unpickler<'a> {
    pub fn new(data: &'a [u8], format: Format) -> Self {
        Unpickler {
            data,
            pos: 0,
            arena: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            format,
        }
    }

    /// Where the last pickle ended (the legacy format stores several back to back).
    pub fn position(&self) -> usize {
        self.pos
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if n > self.data.len() - self.pos {
            return Err(format!(
                "truncated pickle: {n} bytes wanted at offset {}, {} left",
                self.pos,
                self.data.len() - self.pos
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> R<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn len(&mut self, n: u64) -> R<usize> {
        usize::try_from(n).map_err(|_| format!("length {n} too large"))
    }

    fn push(&mut self, o: Obj) {
        self.arena.push(o);
        self.stack.push(self.arena.len() - 1);
    }

    fn pop(&mut self) -> R<Id> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!("pickle stack underflow at offset {}", self.pos));
        }
        Ok(self.stack.pop().unwrap())
    }

    fn top(&self) -> R<Id> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(format!("pickle stack underflow at offset {}", self.pos));
        }
        Ok(*self.stack.last().unwrap())
    }

    /// Everything above the last mark, removing the mark.
    fn pop_mark(&mut self) -> R<Vec<Id>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| format!("pickle has no MARK at offset {}", self.pos))?;
        Ok(self.stack.split_off(m))
    }

    fn string(&mut self, n: usize) -> R<Obj> {
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(|s| Obj::Str(s.to_owned()))
            .map_err(|_| format!("string at offset {} is not UTF-8", self.pos - n))
    }

    fn int(&self, id: Id, what: &str) -> R<i64> {
        match &self.arena[id] {
            Obj::Int(v) => Ok(*v),
            Obj::Bool(b) => Ok(*b as i64),
            o => Err(format!("{what} should be an int, found {}", o.kind())),
        }
    }

    fn uint(&self, id: Id, what: &str) -> R<u64> {
        let v = self.int(id, what)?;
        u64::try_from(v).map_err(|_| format!("{what} is negative ({v})"))
    }

    fn str(&self, id: Id, what: &str) -> R<&str> {
        match &self.arena[id] {
            Obj::Str(s) => Ok(s),
            o => Err(format!("{what} should be a string, found {}", o.kind())),
        }
    }

    fn tuple(&self, id: Id, what: &str) -> R<&[Id]> {
        match &self.arena[id] {
            Obj::Tuple(v) | Obj::List(v) => Ok(v),
            o => Err(format!("{what} should be a tuple, found {}", o.kind())),
        }
    }

    fn uints(&self, id: Id, what: &str) -> R<Vec<u64>> {
        self.tuple(id, what)?
            .iter()
            .map(|&i| self.uint(i, what))
            .collect()
    }

    fn persistent_load(&mut self, pid: Id) -> R<Obj> {
        let t = self.tuple(pid, "a persistent id")?.to_vec();
        let want = match self.format {
            Format::Zip => 5,
            Format::Legacy => 6,
        };
        if t.len() != want || self.str(t[0], "a persistent id's tag")? != "storage" {
            return Err(format!(
                "a persistent id should be ('storage', type, key, location, numel{}), found {} items",
                if want == 6 { ", view" } else { "" },
                t.len()
            ));
        }
        let dtype = match &self.arena[t[1]] {
            Obj::Global(Global::Storage(s)) => s.stored(),
            o => {
                return Err(format!(
                    "a storage's type should be torch.FloatStorage, HalfStorage or BFloat16Storage, found {}",
                    o.kind()
                ))
            }
        };
        let key = match &self.arena[t[2]] {
            Obj::Str(s) => s.clone(),
            Obj::Int(i) => i.to_string(),
            o => {
                return Err(format!(
                    "a storage key should be a string, found {}",
                    o.kind()
                ))
            }
        };
        if key.is_empty()
            || key.len() > 64
            || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(format!(
                "storage key {:?} is not a plain name",
                key.escape_debug().to_string()
            ));
        }
        self.str(t[3], "a storage's location")?;
        let numel = self.uint(t[4], "a storage's size")?;
        if want == 6 && !matches!(self.arena[t[5]], Obj::None) {
            return Err("storage views (legacy view_metadata) are not supported".into());
        }
        Ok(Obj::Storage(StorageRef { key, dtype, numel }))
    }

    fn reduce(&mut self, f: Id, args: Id) -> R<Obj> {
        let g = match &self.arena[f] {
            Obj::Global(g) => *g,
            o => {
                return Err(format!(
                    "REDUCE of {}, which is not callable here",
                    o.kind()
                ))
            }
        };
        let a = self.tuple(args, "REDUCE's arguments")?.to_vec();
        match g {
            Global::OrderedDict if a.is_empty() => Ok(Obj::Dict(Vec::new())),
            Global::OrderedDict => Err("collections.OrderedDict called with arguments".into()),
            Global::RebuildTensorV2 => {
                if !(6..=7).contains(&a.len()) {
                    return Err(format!(
                        "_rebuild_tensor_v2 takes 6 or 7 arguments, found {}",
                        a.len()
                    ));
                }
                let storage = match &self.arena[a[0]] {
                    Obj::Storage(s) => s.clone(),
                    o => return Err(format!("_rebuild_tensor_v2's storage is {}", o.kind())),
                };
                let offset = self.uint(a[1], "a tensor's storage offset")?;
                let shape = self.uints(a[2], "a tensor's size")?;
                if shape.len() > 8 {
                    return Err(format!(
                        "a tensor of rank {} (at most 8 accepted)",
                        shape.len()
                    ));
                }
                let stride = self.uints(a[3], "a tensor's stride")?;
                if shape.len() != stride.len() {
                    return Err(format!(
                        "a tensor's size {shape:?} and stride {stride:?} differ in length"
                    ));
                }
                if let Obj::Dict(h) = &self.arena[a[5]] {
                    if !h.is_empty() {
                        return Err("tensor with backward hooks".into());
                    }
                }
                Ok(Obj::Tensor(TensorRef {
                    storage,
                    offset,
                    shape,
                    stride,
                }))
            }
            Global::RebuildParameter => match a.first().map(|&i| &self.arena[i]) {
                Some(Obj::Tensor(t)) if a.len() == 3 => Ok(Obj::Tensor(t.clone())),
                _ => Err("_rebuild_parameter takes (tensor, requires_grad, hooks)".into()),
            },
            Global::Storage(_) => Err("a storage class called directly".into()),
        }
    }

    /// Run one pickle from the current position to its STOP; returns the result's id.
    fn run(&mut self) -> R<Id> {
        self.stack.clear();
        self.marks.clear();
        self.memo.clear();
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(format!("pickle protocol {v} is unknown"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'}' => self.push(Obj::Dict(Vec::new())),
                b']' => self.push(Obj::List(Vec::new())),
                b')' => self.push(Obj::Tuple(Vec::new())),
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.push(Obj::None),
                0x88 => self.push(Obj::Bool(true)),
                0x89 => self.push(Obj::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Obj::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v as i64))
                }
                b'M' => {
                    let b = self.take(2)?;
                    self.push(Obj::Int(u16::from_le_bytes([b[0], b[1]]) as i64))
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        let n = self.u32()?;
                        self.len(n as u64)?
                    };
                    let b = self.take(n)?;
                    if n > 8 {
                        // Only the legacy format's magic number is this long; keep it opaque.
                        self.push(Obj::Bytes);
                    } else {
                        let mut v: i64 = 0;
                        for (i, &x) in b.iter().enumerate() {
                            v |= (x as i64) << (8 * i);
                        }
                        if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                            v -= 1i64 << (8 * n); // two's complement of n bytes
                        }
                        self.push(Obj::Int(v))
                    }
                }
                b'G' => {
                    let b = self.take(8)?;
                    self.push(Obj::Float(f64::from_be_bytes(b.try_into().unwrap())))
                }
                b'X' | 0x8c | 0x8d | b'T' | b'U' => {
                    let n = match op {
                        0x8c | b'U' => self.u8()? as u64,
                        0x8d => self.u64()?,
                        _ => self.u32()? as u64,
                    };
                    let n = self.len(n)?;
                    let s = self.string(n)?;
                    self.push(s)
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'C' => self.u8()? as u64,
                        0x8e => self.u64()?,
                        _ => self.u32()? as u64,
                    };
                    let n = self.len(n)?;
                    self.take(n)?;
                    self.push(Obj::Bytes)
                }
                b'q' | b'r' | 0x94 => {
                    let k = match op {
                        b'q' => self.u8()? as u32,
                        b'r' => self.u32()?,
                        _ => self.memo.len() as u32,
                    };
                    let top = self.top()?;
                    self.memo.insert(k, top);
                }
                b'h' | b'j' => {
                    let k = if op == b'h' {
                        self.u8()? as u32
                    } else {
                        self.u32()?
                    };
                    let id = *self
                        .memo
                        .get(&k)
                        .ok_or_else(|| format!("memo key {k} read before it was written"))?;
                    self.stack.push(id);
                }
                b'c' => {
                    let rest = &self.data[self.pos..];
                    let line = |s: &[u8]| s.iter().position(|&b| b == b'\n');
                    let m = line(rest).ok_or("truncated GLOBAL")?;
                    let n = line(&rest[m + 1..]).ok_or("truncated GLOBAL")?;
                    let module = String::from_utf8_lossy(&rest[..m]).into_owned();
                    let name = String::from_utf8_lossy(&rest[m + 1..m + 1 + n]).into_owned();
                    self.pos += m + n + 2;
                    let g = global(&module, &name)?;
                    self.push(Obj::Global(g))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let g = global(
                        self.str(module, "STACK_GLOBAL's module")?,
                        self.str(name, "STACK_GLOBAL's name")?,
                    )?;
                    self.push(Obj::Global(g))
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::List(items))
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if !items.len().is_multiple_of(2) {
                        return Err("DICT with an odd number of items".into());
                    }
                    let pairs = items.chunks_exact(2).map(|p| (p[0], p[1])).collect();
                    self.push(Obj::Dict(pairs))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Obj::Tuple(items))
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?;
                    self.stack.push(t);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let o = self.persistent_load(pid)?;
                    self.push(o)
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let o = self.reduce(f, args)?;
                    self.push(o)
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.dict_insert(d, vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?;
                    self.dict_insert(d, items)?
                }
                b'a' => {
                    let v = self.pop()?;
                    let l = self.top()?;
                    self.list_extend(l, vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let l = self.top()?;
                    self.list_extend(l, items)?
                }
                b'b' => {
                    // BUILD: only an OrderedDict's attributes (`_metadata`), which we ignore.
                    let _state = self.pop()?;
                    let obj = self.top()?;
                    if !matches!(self.arena[obj], Obj::Dict(_)) {
                        return Err(format!(
                            "BUILD on {}: only an OrderedDict's state is accepted",
                            self.arena[obj].kind()
                        ));
                    }
                }
                _ => {
                    return Err(format!(
                        "pickle opcode 0x{op:02x} at offset {at} is not accepted in a state dict \
                         (it could build arbitrary objects, or is not needed); nothing was run"
                    ))
                }
            }
        }
    }

    fn dict_insert(&mut self, d: Id, items: Vec<Id>) -> R<()> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of items".into());
        }
        match &mut self.arena[d] {
            Obj::Dict(v) => {
                v.extend(items.chunks_exact(2).map(|p| (p[0], p[1])));
                Ok(())
            }
            o => Err(format!("SETITEM on {}", o.kind())),
        }
    }

    fn list_extend(&mut self, l: Id, items: Vec<Id>) -> R<()> {
        match &mut self.arena[l] {
            Obj::List(v) => {
                v.extend(items);
                Ok(())
            }
            o => Err(format!("APPEND on {}", o.kind())),
        }
    }

    /// Unpickle a state dict: `{name: tensor}` in file order.
    pub fn state_dict(&mut self) -> R<Vec<(String, TensorRef)>> {
        let root = self.run()?;
        let items = match &self.arena[root] {
            Obj::Dict(v) => v.clone(),
            o => return Err(format!("the pickle holds {}, not a state dict", o.kind())),
        };
        let mut out = Vec::with_capacity(items.len());
        // Names are copied out; one string shared by many entries must not multiply memory.
        let mut budget = 16 * self.data.len() + (1 << 20);
        for (k, v) in items {
            let name = self.str(k, "a state dict key")?.to_owned();
            budget = budget
                .checked_sub(name.len() + 64)
                .ok_or("the state dict's names are implausibly large for the file")?;
            match &self.arena[v] {
                Obj::Tensor(t) => out.push((name, t.clone())),
                o => {
                    return Err(format!(
                        "state dict entry {:?} is {}, not a tensor",
                        name.escape_debug().to_string(),
                        o.kind()
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Unpickle one plain value and return it as an int (the legacy header's numbers).
    pub fn int_value(&mut self) -> R<Option<i64>> {
        let id = self.run()?;
        Ok(match self.arena[id] {
            Obj::Int(v) => Some(v),
            _ => None,
        })
    }

    /// Unpickle the legacy header's `sys_info` and return its `little_endian` flag.
    pub fn little_endian(&mut self) -> R<bool> {
        let id = self.run()?;
        let Obj::Dict(items) = &self.arena[id] else {
            return Err("the legacy header's sys_info is not a dict".into());
        };
        for &(k, v) in items {
            if matches!(&self.arena[k], Obj::Str(s) if s == "little_endian") {
                return Ok(matches!(self.arena[v], Obj::Bool(true)));
            }
        }
        Err("the legacy header's sys_info has no little_endian".into())
    }

    /// Unpickle a list of strings (the legacy format's storage keys, in the order stored).
    pub fn strings(&mut self) -> R<Vec<String>> {
        let id = self.run()?;
        let items = match &self.arena[id] {
            Obj::List(v) | Obj::Tuple(v) => v.clone(),
            o => {
                return Err(format!(
                    "expected a list of storage keys, found {}",
                    o.kind()
                ))
            }
        };
        let mut budget = 16 * self.data.len() + (1 << 20);
        items
            .iter()
            .map(|&i| {
                let s = self.str(i, "a storage key")?;
                budget = budget
                    .checked_sub(s.len() + 64)
                    .ok_or("the storage keys are implausibly large for the file")?;
                Ok(s.to_owned())
            })
            .collect()
    }
}
