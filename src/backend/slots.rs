//! What a GPU backend's KV cache keeps on the host: how many positions each slot holds. The CPU's
//! cache keeps its own beside its buffers.

/// The positions each slot of a GPU's KV cache holds, each at most `capacity`.
pub(crate) struct SlotLens {
    lens: Vec<usize>,
    capacity: usize,
}

impl SlotLens {
    /// `slots` empty slots of up to `capacity` positions.
    pub(crate) fn new(slots: usize, capacity: usize) -> SlotLens {
        SlotLens {
            lens: vec![0; slots],
            capacity,
        }
    }

    pub(crate) fn slots(&self) -> usize {
        self.lens.len()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn len(&self, slot: usize) -> usize {
        self.lens[slot]
    }

    /// `slot` now holds `n` more positions.
    pub(crate) fn advance(&mut self, slot: usize, n: usize) {
        self.lens[slot] += n;
    }

    /// Forget every sequence.
    pub(crate) fn clear(&mut self) {
        self.lens.fill(0);
    }

    /// Forget the last tokens of `slot`, keeping `len`.
    pub(crate) fn truncate(&mut self, slot: usize, len: usize) {
        self.lens[slot] = self.lens[slot].min(len);
    }

    /// Slot `dst` holds what `src` does (its keys and values copied on the device).
    pub(crate) fn copy(&mut self, src: usize, dst: usize) {
        self.lens[dst] = self.lens[src];
    }
}
