//! The key/value cache: every layer's keys and values for each sequence slot, preallocated for the
//! whole context so that decoding never allocates.

use std::marker::PhantomData;

use half::f16;

use super::attention::{key_index, TILE};
use super::huge_buf::HugeBuf;
use super::packed::Elem;
use super::pool::{parallel_for, Disjoint};
use crate::config::GPT2Config;
use crate::error::Result;

/// Every layer's keys and values in one element type.
struct Layers<T: Elem> {
    /// Per layer, `(slot, head)` regions of keys in tiles, `[position / 16][head_dim][16]`
    /// ([`key_index`]): a query's scores are vertical FMAs over 16 positions.
    k: Vec<HugeBuf<T>>,
    /// Per layer, `(slot, head)` regions of `[position][head_dim]`.
    v: Vec<HugeBuf<T>>,
}

/// How the cache stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvType {
    F32,
    /// Half the memory and bandwidth.
    F16,
}

impl KvType {
    /// How the cache stores keys and values for weights of `dtype`: f32 for f32 weights (exact
    /// parity), f16 with 16- and 8-bit weights (as llama.cpp does by default), halving its reads.
    pub fn for_weights(dtype: crate::dtype::DType) -> KvType {
        use crate::dtype::DType;
        match dtype {
            DType::F32 => KvType::F32,
            DType::F16 | DType::Bf16 | DType::Q8 => KvType::F16,
        }
    }
}

enum Store {
    F32(Layers<f32>),
    F16(Layers<f16>),
}

/// One head's keys and values, as [`KvCache::head`] gives them.
pub enum KvHead<'a> {
    F32 { keys: &'a [f32], values: &'a [f32] },
    F16 { keys: &'a [f16], values: &'a [f16] },
}

/// The cache's dimensions.
#[derive(Clone, Copy)]
struct Shape {
    n_head: usize,
    head_dim: usize,
    slots: usize,
    capacity: usize,
    /// Positions a region has room for: `capacity` rounded up to whole key tiles.
    room: usize,
}

impl Shape {
    /// Where a (slot, head)'s keys or values start.
    fn region(&self, slot: usize, head: usize) -> usize {
        (slot * self.n_head + head) * self.room * self.head_dim
    }
}

pub struct KvCache {
    shape: Shape,
    store: Store,
    /// Tokens cached per slot.
    lens: Vec<usize>,
}

impl<T: Elem> Layers<T> {
    fn prefault(&mut self) {
        for b in self.k.iter_mut().chain(&mut self.v) {
            b.prefault();
        }
    }

    fn new(layers: usize, per_layer: usize) -> Self {
        // Mapped lazily: unused context costs no memory (in steps of a 2 MiB page).
        let bufs = || (0..layers).map(|_| HugeBuf::zeroed(per_layer)).collect();
        Layers {
            k: bufs(),
            v: bufs(),
        }
    }

    /// See [`KvCache::write_rows`].
    fn write_rows(&mut self, c: Shape, layer: usize, rows: &[(usize, usize)], qkv: &[f32]) {
        let (keys, values) = (
            Disjoint::new(&mut self.k[layer]),
            Disjoint::new(&mut self.v[layer]),
        );
        parallel_for(c.n_head, &|h| {
            for (row, &(slot, pos)) in qkv.chunks_exact(3 * c.n_head * c.head_dim).zip(rows) {
                // SAFETY: every (slot, head) region is written by its head's task alone.
                unsafe { store(c, keys, values, slot, h, pos, row) };
            }
        });
    }

    /// See [`KvCache::copy_slot`]: whole key tiles (a partial tile's spare positions are never
    /// read).
    fn copy_slot(&mut self, c: Shape, src: usize, dst: usize, len: usize) {
        let hd = c.head_dim;
        for h in 0..c.n_head {
            let (from, to) = (c.region(src, h), c.region(dst, h));
            for layer in &mut self.v {
                layer.copy_within(from..from + len * hd, to);
            }
            let n = len.next_multiple_of(TILE) * hd;
            for layer in &mut self.k {
                layer.copy_within(from..from + n, to);
            }
        }
    }
}

/// Store head `h`'s key and value from `row` (a q|k|v row) at `pos` of `slot`: keys into their tile,
/// values as a row.
///
/// # Safety
/// No other task touches the (slot, head) region meanwhile; `keys` and `values` are a layer's.
unsafe fn store<T: Elem>(
    c: Shape,
    keys: Disjoint<T>,
    values: Disjoint<T>,
    slot: usize,
    h: usize,
    pos: usize,
    row: &[f32],
) {
    let hd = c.head_dim;
    let width = c.n_head * hd;
    assert!(pos < c.capacity && slot < c.slots && h < c.n_head);
    let o = c.region(slot, h);
    let k = keys.slice(o, hd * c.room);
    // Converted in bulk (a call per element costs a prompt ~5%), then scattered.
    let mut buf = [T::default(); 64];
    for (d0, src) in row[width + h * hd..][..hd].chunks(64).enumerate() {
        T::from_f32_slice(src, &mut buf[..src.len()]);
        for (i, &v) in buf[..src.len()].iter().enumerate() {
            k[key_index(pos, 64 * d0 + i, hd)] = v;
        }
    }
    T::from_f32_slice(
        &row[2 * width + h * hd..][..hd],
        values.slice(o + pos * hd, hd),
    );
}

/// One layer of the cache, shared by the tasks of a parallel loop in which each (slot, head)
/// region is written and read by one task only: decoding stores a token's keys and values in the
/// attention task that reads them next (their lines are then already in that core's cache),
/// instead of in a loop of its own.
pub(crate) struct LayerView<'a> {
    shape: Shape,
    store: ViewStore,
    _cache: PhantomData<&'a mut KvCache>,
}

#[derive(Clone, Copy)]
enum ViewStore {
    F32(Disjoint<f32>, Disjoint<f32>),
    F16(Disjoint<f16>, Disjoint<f16>),
}

impl LayerView<'_> {
    /// Store head `h`'s keys and values of `qkv`'s rows (q|k|v rows of consecutive positions from
    /// `first`) for `slot`.
    ///
    /// # Safety
    /// No other task touches the (slot, head) region during the loop.
    pub(crate) unsafe fn write_head(&self, slot: usize, h: usize, first: usize, qkv: &[f32]) {
        let c = self.shape;
        for (i, row) in qkv.chunks_exact(3 * c.n_head * c.head_dim).enumerate() {
            match self.store {
                ViewStore::F32(k, v) => store(c, k, v, slot, h, first + i, row),
                ViewStore::F16(k, v) => store(c, k, v, slot, h, first + i, row),
            }
        }
    }

    /// As [`KvCache::head`].
    ///
    /// # Safety
    /// No task writes the (slot, head) region while the result lives.
    pub(crate) unsafe fn head(&self, slot: usize, h: usize) -> KvHead<'_> {
        let c = self.shape;
        assert!(slot < c.slots && h < c.n_head);
        let (o, n) = (c.region(slot, h), c.room * c.head_dim);
        match self.store {
            ViewStore::F32(k, v) => KvHead::F32 {
                keys: k.get(o, n),
                values: v.get(o, n),
            },
            ViewStore::F16(k, v) => KvHead::F16 {
                keys: k.get(o, n),
                values: v.get(o, n),
            },
        }
    }
}

impl KvCache {
    /// Whether a cache of `slots` × `capacity` fits the memory available (what [`KvCache::new`]
    /// checks first): callers that know the shape before loading weights check it early.
    pub fn check_fits(cfg: &GPT2Config, slots: usize, capacity: usize, kv: KvType) -> Result<()> {
        let capacity = capacity.min(cfg.n_positions);
        let room = capacity.next_multiple_of(TILE);
        let elem = match kv {
            KvType::F32 => 4,
            KvType::F16 => 2,
        };
        let per_slot = 2usize
            .saturating_mul(cfg.n_layer)
            .saturating_mul(cfg.n_embd)
            .saturating_mul(room)
            .saturating_mul(elem);
        crate::memory::check(
            &format!("the KV cache for {slots} sequences of {capacity} positions"),
            "such sequences",
            slots,
            per_slot,
        )
    }

    /// A cache of `slots` sequences of up to `capacity` tokens each (at most `n_positions`),
    /// holding keys and values as `kv`.
    /// Refuses a cache larger than the memory the machine has available, saying how much it needs.
    pub fn new(cfg: &GPT2Config, slots: usize, capacity: usize, kv: KvType) -> Result<Self> {
        Self::check_fits(cfg, slots, capacity, kv)?;
        let capacity = capacity.min(cfg.n_positions);
        let room = capacity.next_multiple_of(TILE);
        let per_layer = slots * cfg.n_embd * room;
        let store = match kv {
            KvType::F32 => Store::F32(Layers::new(cfg.n_layer, per_layer)),
            KvType::F16 => Store::F16(Layers::new(cfg.n_layer, per_layer)),
        };
        Ok(KvCache {
            shape: Shape {
                n_head: cfg.n_head,
                head_dim: cfg.head_dim(),
                slots,
                capacity,
                room,
            },
            store,
            lens: vec![0; slots],
        })
    }

    /// How keys and values are stored.
    #[cfg(test)]
    pub fn kv_type(&self) -> KvType {
        match self.store {
            Store::F32(_) => KvType::F32,
            Store::F16(_) => KvType::F16,
        }
    }
    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    pub fn capacity(&self) -> usize {
        self.shape.capacity
    }

    /// Tokens cached for `slot`: the position the next token of that sequence takes.
    pub fn len(&self, slot: usize) -> usize {
        self.lens[slot]
    }

    /// Forget the last tokens of `slot`, keeping `len`.
    pub fn truncate(&mut self, slot: usize, len: usize) {
        self.lens[slot] = self.lens[slot].min(len);
    }

    /// Map the whole cache now (see [`HugeBuf::prefault`]); what it holds is unchanged.
    pub fn prefault(&mut self) {
        match &mut self.store {
            Store::F32(l) => l.prefault(),
            Store::F16(l) => l.prefault(),
        }
    }

    pub fn clear(&mut self) {
        self.lens.fill(0);
    }

    /// Make slot `dst` a copy of slot `src` (its first `len(src)` positions, every layer): a beam
    /// that continues another beam's sequence.
    pub fn copy_slot(&mut self, src: usize, dst: usize) {
        if src == dst {
            return;
        }
        let len = self.lens[src];
        match &mut self.store {
            Store::F32(l) => l.copy_slot(self.shape, src, dst, len),
            Store::F16(l) => l.copy_slot(self.shape, src, dst, len),
        }
        self.lens[dst] = len;
    }

    pub(crate) fn set_len(&mut self, slot: usize, len: usize) {
        debug_assert!(len <= self.shape.capacity);
        self.lens[slot] = len;
    }

    /// Store the keys and values of a forward pass's rows: row `r` is token `rows[r] = (slot,
    /// position)`, its keys and values at `[n_embd, 3 · n_embd)` of `qkv`'s row `r` (query, key,
    /// value, heads contiguous). One task per head: a prompt's tiled keys are scattered stores,
    /// worth both cores.
    pub(crate) fn write_rows(&mut self, layer: usize, rows: &[(usize, usize)], qkv: &[f32]) {
        let shape = self.shape;
        assert_eq!(qkv.len(), rows.len() * 3 * shape.n_head * shape.head_dim);
        match &mut self.store {
            Store::F32(l) => l.write_rows(shape, layer, rows, qkv),
            Store::F16(l) => l.write_rows(shape, layer, rows, qkv),
        }
    }

    /// Layer `layer` for a loop whose tasks each own some (slot, head) regions.
    pub(crate) fn layer(&mut self, layer: usize) -> LayerView<'_> {
        let store = match &mut self.store {
            Store::F32(l) => ViewStore::F32(
                Disjoint::new(&mut l.k[layer]),
                Disjoint::new(&mut l.v[layer]),
            ),
            Store::F16(l) => ViewStore::F16(
                Disjoint::new(&mut l.k[layer]),
                Disjoint::new(&mut l.v[layer]),
            ),
        };
        LayerView {
            shape: self.shape,
            store,
            _cache: PhantomData,
        }
    }

    /// One head's region of keys (tiled) and values (rows): positions `0..len(slot)` are valid.
    #[cfg(test)]
    pub(crate) fn head(&self, layer: usize, slot: usize, head: usize) -> KvHead<'_> {
        let o = self.shape.region(slot, head);
        let n = self.shape.room * self.shape.head_dim;
        match &self.store {
            Store::F32(l) => KvHead::F32 {
                keys: &l.k[layer][o..o + n],
                values: &l.v[layer][o..o + n],
            },
            Store::F16(l) => KvHead::F16 {
                keys: &l.k[layer][o..o + n],
                values: &l.v[layer][o..o + n],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows written for one slot read back (rounded to the cache's type) from its tiles, and a
    /// copied slot holds the same positions.
    #[test]
    fn written_rows_read_back_and_copy_to_another_slot() {
        let mut cfg = GPT2Config::preset("gpt2").unwrap();
        (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions) = (2, 2, 8, 40);
        let (hd, width, len) = (4, 8, 21);
        let qkv: Vec<f32> = (0..len * 3 * width)
            .map(|i| i as f32 * 0.37 - 50.0)
            .collect();
        let rows: Vec<(usize, usize)> = (0..len).map(|p| (0, p)).collect();
        for kv in [KvType::F32, KvType::F16] {
            let round = |v: f32| match kv {
                KvType::F32 => v,
                KvType::F16 => f16::from_f32(v).to_f32(),
            };
            let mut cache = KvCache::new(&cfg, 3, 40, kv).unwrap();
            assert_eq!(cache.kv_type(), kv);
            cache.write_rows(1, &rows, &qkv);
            cache.set_len(0, len);
            cache.copy_slot(0, 2);
            assert_eq!(cache.len(2), len);
            for slot in [0, 2] {
                for h in 0..2 {
                    let (keys, values): (Vec<f32>, Vec<f32>) = match cache.head(1, slot, h) {
                        KvHead::F32 { keys, values } => (keys.to_vec(), values.to_vec()),
                        KvHead::F16 { keys, values } => (
                            keys.iter().map(|v| v.to_f32()).collect(),
                            values.iter().map(|v| v.to_f32()).collect(),
                        ),
                    };
                    for p in 0..len {
                        for d in 0..hd {
                            let row = &qkv[p * 3 * width..];
                            let (k, v) = (row[width + h * hd + d], row[2 * width + h * hd + d]);
                            assert_eq!(keys[key_index(p, d, hd)], round(k), "{kv:?} key");
                            assert_eq!(values[p * hd + d], round(v), "{kv:?} value");
                        }
                    }
                }
            }
            // Slot 1 and layer 0 were never written.
            match cache.head(0, 0, 0) {
                KvHead::F32 { keys, .. } => assert!(keys.iter().all(|&v| v == 0.0)),
                KvHead::F16 { keys, .. } => assert!(keys.iter().all(|v| v.to_f32() == 0.0)),
            }
        }
    }
}
