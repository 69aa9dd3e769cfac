//! Decoding allocates nothing per token: once a state has run its first tokens, further forward
//! passes (one token per sequence, alone or batched) make no heap allocation on any thread, in
//! every weight type. Its own test binary, with one test, because it counts every allocation of
//! the process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

mod common;

use common::small_config;
use gpt2::{DType, Logits, Model, SeqInput};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(SeqCst) {
            ALLOCATIONS.fetch_add(1, SeqCst);
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(SeqCst) {
            ALLOCATIONS.fetch_add(1, SeqCst);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decoding_allocates_nothing_per_token() {
    for dtype in DType::ALL {
        let model = Model::random(
            small_config(),
            3,
            &gpt2::LoadOptions::new(gpt2::Device::Cpu, dtype),
        )
        .unwrap();
        let mut state = model.new_state(2, model.config().n_positions).unwrap();
        let prompt: Vec<u32> = (0..5).map(|i| i * 37 % 1000).collect();
        let first = [
            SeqInput {
                slot: 0,
                tokens: &prompt,
            },
            SeqInput {
                slot: 1,
                tokens: &prompt[..3],
            },
        ];
        model.forward(&mut state, &first, Logits::Last).unwrap();
        let mut next = [7u32, 11];
        // The first single-token step sizes the buffers of that shape (thread-local ones too).
        for counted in [false, true] {
            COUNTING.store(counted, SeqCst);
            // Past several attention tiles of 16 positions, alone and batched.
            for step in 0..40 {
                let batch: &[SeqInput] = &[
                    SeqInput {
                        slot: 0,
                        tokens: &next[..1],
                    },
                    SeqInput {
                        slot: 1,
                        tokens: &next[1..],
                    },
                ][..if step % 2 == 0 { 1 } else { 2 }];
                let logits = model.forward(&mut state, batch, Logits::Last).unwrap();
                next[0] = (logits[..1000].iter().map(|v| v.to_bits()).sum::<u32>()) % 1000;
            }
            COUNTING.store(false, SeqCst);
        }
        assert_eq!(
            ALLOCATIONS.load(SeqCst),
            0,
            "{dtype:?}: allocations during 40 decode steps"
        );
    }
}
