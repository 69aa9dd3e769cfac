//! A persistent thread pool for the per-op parallel loops of the forward pass. A decode step runs
//! about five parallel loops per layer, each tens of microseconds long: workers that went to sleep
//! in between would cost a futex wake-up each time, so after a loop they spin for a while before
//! blocking. The calling thread takes tasks too; tasks are claimed one at a time from a shared
//! counter, so the split adapts to busy cores.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long an idle worker spins before it blocks.
const SPIN: Duration = Duration::from_micros(300);

pub use crate::model::device::MAX_THREADS;

/// The task function of the running loop; lives on the caller's stack until every task is done.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
}

struct Shared {
    /// `epoch << 32 | next task`: a claim succeeds only within the loop it was read from.
    ticket: AtomicU64,
    /// `epoch << 32 | task count`.
    bound: AtomicU64,
    job: AtomicPtr<Job<'static>>,
    finished: AtomicUsize,
    /// A task panicked on a worker: the caller panics in its place once the loop is over.
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    /// Workers that have started running.
    started: AtomicUsize,
    /// The pool was dropped: workers return.
    shutdown: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

/// A set of worker threads that run the parallel loops of the forward pass. Each CPU model owns
/// one (so models with different thread counts live side by side); the loops of a forward pass
/// find it through [`Pool::install`].
pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    /// One loop at a time; a nested or concurrent loop runs on its caller's thread.
    dispatch: Mutex<()>,
    workers: Vec<JoinHandle<()>>,
}

thread_local! {
    /// The pool installed on this thread, or null: loops then run on the calling thread alone.
    static CURRENT: Cell<*const Pool> = const { Cell::new(std::ptr::null()) };
}

/// The default thread count: one per core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Pool {
    /// A pool of `threads` threads, the caller of each loop included (so `threads - 1` workers).
    pub fn new(threads: usize) -> Result<Pool> {
        if threads == 0 || threads > MAX_THREADS {
            return Err(Error::Input(format!(
                "threads must be between 1 and {MAX_THREADS}, got {threads} (this machine has {} cores)",
                default_threads()
            )));
        }
        let shared = Arc::new(Shared {
            ticket: AtomicU64::new(0),
            bound: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            finished: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut pool = Pool {
            shared: shared.clone(),
            threads,
            dispatch: Mutex::new(()),
            workers: Vec::with_capacity(threads - 1),
        };
        for i in 1..threads {
            let s = shared.clone();
            match std::thread::Builder::new()
                .name(format!("gpt2-worker-{i}"))
                .spawn(move || worker(&s))
            {
                Ok(h) => pool.workers.push(h),
                // Dropping the pool stops the workers already started.
                Err(e) => {
                    return Err(Error::Resource(format!(
                        "could not start worker thread {i} of {threads}: {e}"
                    )))
                }
            }
        }
        // The pool is ready when its workers run: a thread's start-up (its own allocations among
        // them) then never lands inside a later loop, such as the first tokens of a decode.
        while shared.started.load(Acquire) < threads - 1 {
            std::thread::yield_now();
        }
        Ok(pool)
    }

    /// Threads the loops run on (the caller included).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f` with this pool serving the parallel loops it starts on this thread.
    pub fn install<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(*const Pool);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT.with(|c| c.replace(self)));
        f()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &self.shared;
        s.shutdown.store(true, SeqCst);
        {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// The pool installed on this thread, if any.
fn with_current<R>(f: impl FnOnce(Option<&Pool>) -> R) -> R {
    let p = CURRENT.with(Cell::get);
    // SAFETY: a non-null pointer was set by `Pool::install`, whose borrow of the pool lasts until
    // it restores the previous value, so the pool is alive while this thread sees it.
    f(unsafe { p.as_ref() })
}

/// Threads the loops on this thread run on: the installed pool's, else 1.
pub fn threads() -> usize {
    with_current(|p| p.map_or(1, Pool::threads))
}

/// Claim and run tasks of the loop of `epoch` until none is left.
fn run_tasks(s: &Shared, epoch: u64) {
    let bound = s.bound.load(Acquire);
    if bound >> 32 != epoch {
        return;
    }
    let n = bound & 0xffff_ffff;
    let mut t = s.ticket.load(Acquire);
    loop {
        if t >> 32 != epoch || t & 0xffff_ffff >= n {
            return;
        }
        match s.ticket.compare_exchange_weak(t, t + 1, AcqRel, Acquire) {
            Ok(_) => {
                // SAFETY: holding an unfinished task of this epoch keeps its caller waiting, so the
                // job it published is alive and still the current one.
                let job = unsafe { &*s.job.load(Acquire) };
                if catch_unwind(AssertUnwindSafe(|| (job.f)((t & 0xffff_ffff) as usize))).is_err() {
                    s.panicked.store(true, SeqCst);
                }
                s.finished.fetch_add(1, Release);
                t = s.ticket.load(Acquire);
            }
            Err(now) => t = now,
        }
    }
}

fn worker(s: &Shared) {
    s.started.fetch_add(1, Release);
    let mut seen = 0;
    loop {
        let idle = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = s.ticket.load(Acquire) >> 32;
            if epoch != seen {
                seen = epoch;
                run_tasks(s, epoch);
                break;
            }
            if s.shutdown.load(Relaxed) {
                return;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && idle.elapsed() > SPIN {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, SeqCst);
                while s.ticket.load(SeqCst) >> 32 == seen && !s.shutdown.load(SeqCst) {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, SeqCst);
                break;
            }
        }
    }
}

/// A mutable buffer that the tasks of one loop write in disjoint parts.
pub struct Disjoint<T>(*mut T, usize);
impl<T> Clone for Disjoint<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Disjoint<T> {}
// SAFETY: a `Disjoint` is a `&mut [T]` handed to the tasks of one loop; sending or sharing it is
// sound because every access goes through `slice`/`get`, whose callers promise disjoint use.
unsafe impl<T: Send> Send for Disjoint<T> {}
// SAFETY: as for `Send`.
unsafe impl<T: Send> Sync for Disjoint<T> {}

impl<T> Disjoint<T> {
    pub fn new(buf: &mut [T]) -> Self {
        Disjoint(buf.as_mut_ptr(), buf.len())
    }

    /// # Safety
    /// No other task touches `[start, start + len)` during the loop, and the buffer outlives it.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice<'a>(&self, start: usize, len: usize) -> &'a mut [T] {
        assert!(start + len <= self.1);
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }

    /// A part to read, which several tasks may share.
    ///
    /// # Safety
    /// No task writes `[start, start + len)` while the result lives, and the buffer outlives it.
    pub unsafe fn get<'a>(&self, start: usize, len: usize) -> &'a [T] {
        assert!(start + len <= self.1);
        std::slice::from_raw_parts(self.0.add(start), len)
    }
}

/// Run `f(0) … f(n - 1)` across the installed pool (on this thread alone if none) and return when
/// all have run.
pub fn parallel_for(n: usize, f: &(dyn Fn(usize) + Sync)) {
    with_current(|p| match p {
        Some(p) => p.parallel_for(n, f),
        None => (0..n).for_each(f),
    })
}

impl Pool {
    fn parallel_for(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = if self.threads > 1 && n > 1 {
            self.dispatch.try_lock().ok()
        } else {
            None
        };
        let Some(_guard) = guard else {
            (0..n).for_each(f);
            return;
        };
        assert!(n < 1 << 32);
        let s = &*self.shared;
        let job = Job { f };
        let epoch = (s.ticket.load(Acquire) >> 32) + 1;
        s.finished.store(0, Relaxed);
        s.job
            .store(&job as *const Job as *mut Job<'static>, Release);
        s.bound.store(epoch << 32 | n as u64, Release);
        s.ticket.store(epoch << 32, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        run_tasks(s, epoch);
        while s.finished.load(Acquire) < n {
            std::hint::spin_loop();
        }
        if s.panicked.swap(false, SeqCst) {
            panic!("a task of a parallel loop panicked");
        }
    }
}

/// Shares of [`parallel_for_contiguous`] kept on the stack; more threads than this take a
/// heap allocation per loop.
const STACK_SHARES: usize = 64;

#[repr(align(64))]
struct Share(AtomicU64);

/// Run `f(0) … f(n - 1)` across the pool, each thread walking its own contiguous share in order,
/// then taking what is left from the far end of the others' shares. For loops that stream memory
/// (decoding's products): consecutive tasks read consecutive memory, which the prefetchers and DRAM
/// pages reward more than tasks handed out in turn, while a thread that falls behind still gets
/// helped.
pub fn parallel_for_contiguous(n: usize, f: &(dyn Fn(usize) + Sync)) {
    let shares = threads().min(n).max(1);
    if shares == 1 {
        return (0..n).for_each(f);
    }
    assert!(n < 1 << 32);
    // Share `i`: `front << 32 | back`, tasks `front..back` still to run. On the stack (no
    // allocation per product), a cache line each (each thread claims from its own); the stack
    // array's entries past `shares` are empty and never read.
    let range = |i: usize| {
        let (front, back) = if i < shares {
            (i * n / shares, (i + 1) * n / shares)
        } else {
            (0, 0)
        };
        Share(AtomicU64::new((front as u64) << 32 | back as u64))
    };
    let on_stack: [Share; STACK_SHARES];
    let on_heap: Vec<Share>;
    let ranges: &[Share] = if shares <= STACK_SHARES {
        on_stack = std::array::from_fn(range);
        &on_stack[..shares]
    } else {
        on_heap = (0..shares).map(range).collect();
        &on_heap
    };
    // Claim the first (own share) or last (another's) task of share `i`.
    let claim = |i: usize, own: bool| -> Option<usize> {
        let r = &ranges[i].0;
        let mut v = r.load(Acquire);
        loop {
            let (front, back) = (v >> 32, v & 0xffff_ffff);
            if front >= back {
                return None;
            }
            let (next, task) = if own {
                (v + (1 << 32), front)
            } else {
                (v - 1, back - 1)
            };
            match r.compare_exchange_weak(v, next, AcqRel, Acquire) {
                Ok(_) => return Some(task as usize),
                Err(now) => v = now,
            }
        }
    };
    parallel_for(shares, &|i| {
        while let Some(t) = claim(i, true) {
            f(t);
        }
        for j in (1..shares).map(|d| (i + d) % shares) {
            while let Some(t) = claim(j, false) {
                f(t);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_exactly_once() {
        type Loop = fn(usize, &(dyn Fn(usize) + Sync));
        let loops: [Loop; 2] = [parallel_for, parallel_for_contiguous];
        let pool = Pool::new(3).unwrap();
        for (l, run) in loops.iter().enumerate() {
            for n in [0, 1, 2, 3, 17, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.install(|| {
                    run(n, &|i| {
                        hits[i].fetch_add(1, Relaxed);
                    })
                });
                assert!(
                    hits.iter().all(|h| h.load(Relaxed) == 1),
                    "loop {l}, n = {n}"
                );
            }
        }
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_pool_goes_on() {
        let pool = Pool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.install(|| parallel_for(64, &|i| assert!(i != 40, "task 40")))
        }));
        assert!(r.is_err());
        let total = AtomicUsize::new(0);
        pool.install(|| {
            parallel_for(64, &|i| {
                total.fetch_add(i, Relaxed);
            })
        });
        assert_eq!(total.load(Relaxed), (0..64).sum::<usize>());
    }

    #[test]
    fn loops_from_many_threads_and_nested_loops_complete() {
        let pool = Pool::new(3).unwrap();
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..200 {
                        let total = AtomicUsize::new(0);
                        pool.install(|| {
                            parallel_for(8, &|i| {
                                parallel_for(3, &|j| {
                                    total.fetch_add(i * 3 + j, Relaxed);
                                });
                            })
                        });
                        assert_eq!(total.load(Relaxed), (0..24).sum::<usize>());
                    }
                });
            }
        });
    }

    #[test]
    fn pools_of_different_sizes_coexist_and_stop_when_dropped() {
        let (a, b) = (Pool::new(2).unwrap(), Pool::new(3).unwrap());
        assert_eq!(a.install(threads), 2);
        assert_eq!(b.install(|| (threads(), a.install(threads))), (3, 2));
        assert_eq!(threads(), 1);
        drop(a);
        drop(b); // joins its workers: a hang here would fail the test by timeout
        for n in [0, MAX_THREADS + 1] {
            let err = Pool::new(n).err().expect("refused");
            assert!(err.to_string().contains("threads must be"), "{err}");
        }
    }
}
