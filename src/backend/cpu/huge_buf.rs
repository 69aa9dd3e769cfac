//! Storage for what decoding streams every token (packed weights, the KV cache): anonymous memory
//! asking the kernel for transparent huge pages.
//!
//! Decoding reads every weight once per token, so it runs at memory bandwidth. With 4 KiB pages
//! each page costs a TLB miss and a page walk (a two-level one in a virtual machine), and the walks
//! throttle the stream: on a 2-core KVM guest a 2-thread read loop over 1 GiB went from
//! ~29 to ~37 GB/s with 2 MiB pages plus software prefetch (neither alone gave more than ~32).
//! Where huge pages are off (or not Linux) this is plain zeroed memory.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use half::{bf16, f16};
use memmap2::MmapMut;

/// A plain value type whose all-zero bit pattern is a valid value (so fresh mapped memory is one).
///
/// # Safety
/// Implementors must have no padding, no invalid bit patterns and alignment ≤ 4096.
pub unsafe trait Plain: Copy + Send + Sync + 'static {}

// SAFETY: numbers, any bits valid.
unsafe impl Plain for f32 {}
unsafe impl Plain for f16 {}
unsafe impl Plain for bf16 {}
unsafe impl Plain for u8 {}

/// `len` values of `T` in their own mapping (empty: no mapping).
pub struct HugeBuf<T: Plain> {
    map: Option<MmapMut>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Plain> HugeBuf<T> {
    /// `len` zero values.
    pub fn zeroed(len: usize) -> Self {
        let bytes = len * size_of::<T>();
        let map = (bytes > 0).then(|| {
            let map = MmapMut::map_anon(bytes).unwrap_or_else(|e| {
                // As `Vec` does on allocation failure, but saying how much was asked for.
                panic!("cannot map {bytes} bytes: {e}")
            });
            // Before the first touch, so that faults allocate huge pages directly. Advice only:
            // a kernel without transparent huge pages refuses it, and small pages still work.
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::HugePage);
            map
        });
        HugeBuf {
            map,
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

impl<T: Plain> Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.map {
            // SAFETY: the mapping is page-aligned, holds `len` values' bytes, and any bits are a `T`.
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr() as *const T, self.len) },
            None => &[],
        }
    }
}

impl<T: Plain> DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.map {
            // SAFETY: as for `deref`, and `&mut self` makes the access unique.
            Some(m) => unsafe {
                std::slice::from_raw_parts_mut(m.as_mut_ptr() as *mut T, self.len)
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
}
