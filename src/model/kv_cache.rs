//! The key/value cache: every layer's keys and values for each sequence slot, preallocated for the
//! whole context so that decoding never allocates.

use crate::backend::cpu::huge_buf::HugeBuf;
use crate::backend::cpu::pool::{parallel_for, Disjoint};
use crate::config::GPT2Config;

pub struct KvCache {
    n_head: usize,
    head_dim: usize,
    capacity: usize,
    /// Per layer, keys transposed, `(slot, head, head_dim, capacity)`: a query's scores are then
    /// vertical FMAs over consecutive positions.
    k: Vec<HugeBuf<f32>>,
    /// Per layer, `(slot, head, capacity, head_dim)`.
    v: Vec<HugeBuf<f32>>,
    /// Tokens cached per slot.
    lens: Vec<usize>,
}

impl KvCache {
    /// A cache of `slots` sequences of up to `capacity` tokens each (at most `n_positions`).
    pub fn new(cfg: &GPT2Config, slots: usize, capacity: usize) -> Self {
        let capacity = capacity.min(cfg.n_positions);
        let per_layer = slots * cfg.n_embd * capacity;
        KvCache {
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            capacity,
            // Mapped lazily: unused context costs no memory (in steps of a 2 MiB page).
            k: (0..cfg.n_layer)
                .map(|_| HugeBuf::zeroed(per_layer))
                .collect(),
            v: (0..cfg.n_layer)
                .map(|_| HugeBuf::zeroed(per_layer))
                .collect(),
            lens: vec![0; slots],
        }
    }

    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens cached for `slot`: the position the next token of that sequence takes.
    pub fn len(&self, slot: usize) -> usize {
        self.lens[slot]
    }

    pub fn is_empty(&self, slot: usize) -> bool {
        self.lens[slot] == 0
    }

    /// Forget the last tokens of `slot`, keeping `len`.
    pub fn truncate(&mut self, slot: usize, len: usize) {
        self.lens[slot] = self.lens[slot].min(len);
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
        let (hd, cap, len) = (self.head_dim, self.capacity, self.lens[src]);
        for h in 0..self.n_head {
            let from = ((src * self.n_head + h) * cap) * hd;
            let to = ((dst * self.n_head + h) * cap) * hd;
            for layer in &mut self.v {
                layer.copy_within(from..from + len * hd, to);
            }
            for layer in &mut self.k {
                for d in 0..hd {
                    layer.copy_within(from + d * cap..from + d * cap + len, to + d * cap);
                }
            }
        }
        self.lens[dst] = len;
    }

    pub(crate) fn set_len(&mut self, slot: usize, len: usize) {
        debug_assert!(len <= self.capacity);
        self.lens[slot] = len;
    }

    /// Where a (slot, head)'s keys or values start.
    fn region(&self, slot: usize, head: usize) -> usize {
        (slot * self.n_head + head) * self.capacity * self.head_dim
    }

    /// Store the keys and values of a forward pass's rows: row `r` is token `rows[r] = (slot,
    /// position)`, its keys and values at `[n_embd, 3 · n_embd)` of `qkv`'s row `r` (query, key,
    /// value, heads contiguous). One task per head: a prompt's transposed keys are scattered
    /// stores, worth both cores.
    pub(crate) fn write_rows(&mut self, layer: usize, rows: &[(usize, usize)], qkv: &[f32]) {
        let (hd, cap, heads) = (self.head_dim, self.capacity, self.n_head);
        let c = heads * hd;
        assert_eq!(qkv.len(), rows.len() * 3 * c);
        let (keys, values) = (
            Disjoint::new(&mut self.k[layer]),
            Disjoint::new(&mut self.v[layer]),
        );
        parallel_for(heads, &|h| {
            for (row, &(slot, pos)) in qkv.chunks_exact(3 * c).zip(rows) {
                assert!(pos < cap);
                let o = self.region(slot, h);
                // SAFETY: every (slot, head) region is written by its head's task alone, and one
                // slice of it is alive at a time.
                let k = unsafe { keys.slice(o, hd * cap) };
                for (d, &v) in row[c + h * hd..][..hd].iter().enumerate() {
                    k[d * cap + pos] = v;
                }
                let v = unsafe { values.slice(o + pos * hd, hd) };
                v.copy_from_slice(&row[2 * c + h * hd..][..hd]);
            }
        });
    }

    /// One head's keys, transposed (`head_dim` rows of `capacity`, positions `0..len` valid), and
    /// the values of positions `0..len`, `(len, head_dim)`.
    pub(crate) fn head(
        &self,
        layer: usize,
        slot: usize,
        head: usize,
        len: usize,
    ) -> (&[f32], &[f32]) {
        let o = self.region(slot, head);
        let n = self.capacity * self.head_dim;
        (
            &self.k[layer][o..o + n],
            &self.v[layer][o..o + len * self.head_dim],
        )
    }
}
