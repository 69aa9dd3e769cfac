//! Storage for what decoding streams every token (packed weights, the KV cache): anonymous memory
//! asking the kernel for transparent huge pages.
//!
//! Decoding reads every weight once per token, so it runs at memory bandwidth. With 4 KiB pages
//! each page costs a TLB miss and a page walk (a two-level one in a virtual machine), and the walks
//! throttle the stream; 2 MiB pages together with software prefetch remove that limit.
//! Where huge pages are off (or not Linux) this is plain zeroed memory.
//!
//! A huge page backs only a 2 MiB-aligned range that lies wholly inside one mapping. A mapping per
//! matrix would leave each matrix's unaligned ends in small pages (a large share of a small model's
//! matrices, about half of gpt2's q8 ones). So buffers are carved one after
//! another out of shared 2 MiB-aligned regions: a model's matrices, packed in sequence at load,
//! lie back to back in huge pages. On Linux a dropped buffer gives its pages back at once
//! (`MADV_DONTNEED`); elsewhere they go with the region, which is unmapped when its last buffer goes.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use half::{bf16, f16};
use memmap2::MmapMut;

/// A plain value type whose all-zero bit pattern is a valid value (so fresh mapped memory is one).
///
/// # Safety
/// Implementors must have no padding, no invalid bit patterns and alignment ≤ 4096.
pub unsafe trait Plain: Copy + Send + Sync + 'static {}

// SAFETY: numbers, any bits valid.
unsafe impl Plain for f32 {}
// SAFETY: as f32.
unsafe impl Plain for f16 {}
// SAFETY: as f32.
unsafe impl Plain for bf16 {}
// SAFETY: as f32.
unsafe impl Plain for u8 {}

const HUGE_PAGE: usize = 2 << 20;
const PAGE: usize = 4096;
/// Bytes of a shared region; a buffer of half this or more gets a region of its own.
const REGION: usize = 64 << 20;

/// One anonymous mapping; `start` is its first 2 MiB-aligned byte (the mapping has a huge page of
/// slack for it). Buffers read and write it through `base`, the mapping's own pointer.
struct Region {
    map: MmapMut,
    base: *mut u8,
    start: usize,
    len: usize,
}

// SAFETY: `base` points into `map`, which lives as long as the region; buffers use disjoint ranges.
unsafe impl Send for Region {}
// SAFETY: as for Send.
unsafe impl Sync for Region {}

impl Region {
    fn new(len: usize) -> Region {
        let bytes = len + HUGE_PAGE;
        let mut map = MmapMut::map_anon(bytes).unwrap_or_else(|e| {
            // As `Vec` does on allocation failure, but saying how much was asked for.
            panic!("cannot map {bytes} bytes: {e}")
        });
        // Before the first touch, so that faults allocate huge pages directly. Advice only: a
        // kernel without transparent huge pages refuses it, and small pages still work.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let base = map.as_mut_ptr();
        let start = base.align_offset(HUGE_PAGE);
        Region {
            map,
            base,
            start,
            len,
        }
    }
}

/// The region small buffers are carved from, and the offset of its first free byte.
static CURRENT: Mutex<Option<(Arc<Region>, usize)>> = Mutex::new(None);

/// `len` values of `T` at `offset` bytes into `region` (empty: no region).
pub struct HugeBuf<T: Plain> {
    region: Option<Arc<Region>>,
    offset: usize,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Plain> HugeBuf<T> {
    /// Touch every page now (each value is written back unchanged), so that later writes do not
    /// pay the page faults: with huge pages a fault may have to compact memory first, which can
    /// take far longer than the write.
    pub fn prefault(&mut self) {
        let step = (PAGE / size_of::<T>()).max(1);
        for i in (0..self.len()).step_by(step) {
            let v = self[i];
            self[i] = std::hint::black_box(v);
        }
    }

    /// `len` zero values.
    pub fn zeroed(len: usize) -> Self {
        let bytes = len * size_of::<T>();
        let (region, offset) = match bytes.next_multiple_of(PAGE) {
            0 => (None, 0),
            size if size >= REGION / 2 => {
                let r = Region::new(size);
                let start = r.start;
                (Some(Arc::new(r)), start)
            }
            size => {
                let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
                let fits = matches!(&*current, Some((r, next)) if next + size <= r.start + r.len);
                if !fits {
                    let r = Region::new(REGION);
                    let start = r.start;
                    *current = Some((Arc::new(r), start));
                }
                let (r, next) = current.as_mut().expect("a current region");
                let offset = *next;
                *next += size;
                (Some(Arc::clone(r)), offset)
            }
        };
        HugeBuf {
            region,
            offset,
            len,
            _t: PhantomData,
        }
    }

    /// `len` copies of `v`.
    pub fn filled(len: usize, v: T) -> Self {
        let mut b = Self::zeroed(len);
        b.fill(v);
        b
    }
}

impl<T: Plain> Drop for HugeBuf<T> {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(r) = &self.region {
            let size = (self.len * size_of::<T>()).next_multiple_of(PAGE);
            // SAFETY: these whole pages belong to this buffer alone, which is going away; the
            // region never hands them out again, so no one reads the zeros they turn into.
            let _ = unsafe {
                r.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, self.offset, size)
            };
        }
    }
}

impl<T: Plain> Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.region {
            // SAFETY: the range is inside the mapping, page-aligned, this buffer's alone, and any
            // bits are a `T`.
            Some(r) => unsafe {
                std::slice::from_raw_parts(r.base.add(self.offset) as *const T, self.len)
            },
            None => &[],
        }
    }
}

impl<T: Plain> DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &self.region {
            // SAFETY: as for `deref`; `&mut self` makes the access unique, and no other buffer
            // overlaps the range.
            Some(r) => unsafe {
                std::slice::from_raw_parts_mut(r.base.add(self.offset) as *mut T, self.len)
            },
            None => &mut [],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_what_is_written_and_starts_zeroed() {
        let mut b = HugeBuf::<f32>::zeroed(3 << 20);
        assert!(b.iter().all(|&v| v == 0.0));
        b[12345] = 1.5;
        assert_eq!(b[12345], 1.5);
        assert_eq!(b.len(), 3 << 20);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(HugeBuf::<u8>::filled(0, 1).is_empty());
        assert!(HugeBuf::<u8>::filled(5, 7).iter().all(|&v| v == 7));
    }

    /// Buffers carved from shared regions (and ones with a region of their own) never overlap,
    /// start zeroed even after others were dropped, and are page-aligned.
    #[test]
    fn buffers_from_shared_regions_are_disjoint_and_zeroed() {
        let mut kept = Vec::new();
        for i in 0..100usize {
            let len = [1, 4095, 4096, 70_000, 1 << 20, 3 << 20][i % 6] + i;
            let b = HugeBuf::<u8>::zeroed(len);
            assert_eq!(b.as_ptr() as usize % PAGE, 0);
            assert!(b.iter().all(|&v| v == 0), "buffer {i} not zeroed");
            let mut b = b;
            b.fill(i as u8);
            if i % 3 == 0 {
                kept.push((i, b));
            }
        }
        // One with a region of its own, between the others.
        let own = HugeBuf::<u8>::filled(REGION / 2, 1);
        for (i, b) in &kept {
            assert!(b.iter().all(|&v| v == *i as u8), "buffer {i} overwritten");
        }
        assert!(own.iter().all(|&v| v == 1));
    }
}
