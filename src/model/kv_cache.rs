//! The key/value cache: every layer's keys and values for each sequence slot, preallocated for the
//! whole context so that decoding never allocates.

use crate::config::GPT2Config;

pub struct KvCache {
    n_head: usize,
    head_dim: usize,
    capacity: usize,
    /// Per layer, `(slot, head, capacity, head_dim)`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
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
            // Zeroed allocations are lazily backed by the OS: unused context costs no memory.
            k: (0..cfg.n_layer).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..cfg.n_layer).map(|_| vec![0.0; per_layer]).collect(),
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
        for layer in self.k.iter_mut().chain(self.v.iter_mut()) {
            for h in 0..self.n_head {
                let from = ((src * self.n_head + h) * cap) * hd;
                let to = ((dst * self.n_head + h) * cap) * hd;
                layer.copy_within(from..from + len * hd, to);
            }
        }
        self.lens[dst] = len;
    }

    pub(crate) fn set_len(&mut self, slot: usize, len: usize) {
        debug_assert!(len <= self.capacity);
        self.lens[slot] = len;
    }

    fn offset(&self, slot: usize, head: usize, pos: usize) -> usize {
        ((slot * self.n_head + head) * self.capacity + pos) * self.head_dim
    }

    /// Store one token's keys and values (`n_embd` each, heads contiguous).
    pub(crate) fn write(&mut self, layer: usize, slot: usize, pos: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        for h in 0..self.n_head {
            let o = self.offset(slot, h, pos);
            self.k[layer][o..o + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            self.v[layer][o..o + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }

    /// Keys and values of positions `0..len` of one head: `(len, head_dim)` each.
    pub(crate) fn head(
        &self,
        layer: usize,
        slot: usize,
        head: usize,
        len: usize,
    ) -> (&[f32], &[f32]) {
        let o = self.offset(slot, head, 0);
        let n = len * self.head_dim;
        (&self.k[layer][o..o + n], &self.v[layer][o..o + n])
    }
}
