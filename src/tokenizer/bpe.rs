//! Byte-pair encoding of one pre-tokenized piece: start from one token per byte and repeatedly merge
//! the adjacent pair of lowest merge rank (leftmost first among equals), as OpenAI's `bpe()` does.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

/// Merge table: the pair `(left, right)` → `(rank, merged id)`.
pub struct Merges {
    pairs: FxHashMap<u64, (u32, u32)>,
}

#[inline]
fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// Pieces longer than this many bytes use the heap (O(n log n)); shorter ones the plain scan, which
/// is faster at that size.
const HEAP_ABOVE: usize = 64;

impl Merges {
    pub fn new(list: impl IntoIterator<Item = (u32, u32, u32)>) -> Self {
        let mut pairs = FxHashMap::default();
        for (rank, (a, b, merged)) in list.into_iter().enumerate() {
            // The first occurrence of a pair wins, as in a rank dictionary built in file order.
            pairs.entry(key(a, b)).or_insert((rank as u32, merged));
        }
        Merges { pairs }
    }

    #[inline]
    fn get(&self, a: u32, b: u32) -> Option<(u32, u32)> {
        self.pairs.get(&key(a, b)).copied()
    }

    /// Merge `ids` (one per byte of the piece) in place.
    pub fn apply(&self, ids: &mut Vec<u32>) {
        if ids.len() > HEAP_ABOVE {
            self.apply_heap(ids)
        } else {
            self.apply_scan(ids)
        }
    }

    fn apply_scan(&self, ids: &mut Vec<u32>) {
        while ids.len() > 1 {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..ids.len() - 1 {
                if let Some((rank, merged)) = self.get(ids[i], ids[i + 1]) {
                    if best.is_none_or(|(r, _, _)| rank < r) {
                        best = Some((rank, i, merged));
                    }
                }
            }
            let Some((_, i, merged)) = best else { break };
            ids[i] = merged;
            ids.remove(i + 1);
        }
    }

    /// The same merges with a priority queue over a linked list, lazily dropping stale pairs.
    fn apply_heap(&self, ids: &mut Vec<u32>) {
        let n = ids.len();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, ids: &[u32], i: usize, j: usize| {
            if let Some((rank, merged)) = self.get(ids[i], ids[j]) {
                heap.push(Reverse((rank, i, ids[i], ids[j], merged)));
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, ids, i, i + 1);
        }
        while let Some(Reverse((_, i, a, b, merged))) = heap.pop() {
            let j = next[i];
            // Stale: one side was merged away or changed since this pair was queued.
            if !alive[i] || j >= n || ids[i] != a || ids[j] != b {
                continue;
            }
            ids[i] = merged;
            alive[j] = false;
            next[i] = next[j];
            if next[j] < n {
                prev[next[j]] = i;
            }
            if prev[i] < n {
                push(&mut heap, ids, prev[i], i);
            }
            if next[i] < n {
                push(&mut heap, ids, i, next[i]);
            }
        }
        let mut w = 0;
        for r in 0..n {
            if alive[r] {
                ids[w] = ids[r];
                w += 1;
            }
        }
        ids.truncate(w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_and_scan_agree() {
        // Tokens 0..4 are bytes a..d; merges: ab=4, bc=5, aa=6, 4c=7, 66=8.
        let m = Merges::new([(0, 1, 4), (1, 2, 5), (0, 0, 6), (4, 2, 7), (6, 6, 8)]);
        let mut s = 0x2545F4914F6CDD1Du64;
        for len in 1..300 {
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s % 4) as u32
                })
                .collect();
            let (mut a, mut b) = (ids.clone(), ids);
            m.apply_scan(&mut a);
            m.apply_heap(&mut b);
            assert_eq!(a, b, "len {len}");
        }
        let mut v = vec![0, 0, 0, 0, 0];
        m.apply(&mut v);
        assert_eq!(v, [8, 0]);
    }
}
