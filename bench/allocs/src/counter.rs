//! The counting global allocator.
//!
//! Every allocation in the process goes through [`Counting`], but only threads that called
//! [`count_this_thread`] are counted, each into its own slot: the load generator's threads,
//! the main thread and the other systems' server threads never touch a slot they do not own.
//! Per-slot counters (rather than one global counter) matter for Keel, whose background tasks
//! (leak sweep, readiness checks, admin port) keep running while the other systems are
//! measured.

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Slot 0 means "not counted"; systems use 1..SLOTS.
pub(crate) const SLOTS: usize = 4;

thread_local! {
    /// Which slot this thread counts into (0: none). A `const` initialiser with no destructor,
    /// so reading it from inside the allocator never allocates or registers anything.
    static SLOT: Cell<u8> = const { Cell::new(0) };
}

/// Counters of one system.
struct Slot {
    allocs: AtomicU64,
    bytes: AtomicU64,
    frees: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialise the array below
const EMPTY: Slot = Slot {
    allocs: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
    frees: AtomicU64::new(0),
};

static COUNTS: [Slot; SLOTS] = [EMPTY; SLOTS];

/// While set, every counted allocation also records its backtrace (`--sites`).
static SITES_ON: AtomicBool = AtomicBool::new(false);
/// The recorded backtraces, with the slot they were counted in. Resolved to symbols only when
/// printed, so capturing costs an unwind, not a symbol lookup.
static SITES: Mutex<Vec<(u8, Backtrace)>> = Mutex::new(Vec::new());

/// What one slot counted since its last reset.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counts {
    /// `alloc`, `alloc_zeroed` and `realloc` calls.
    pub(crate) allocs: u64,
    /// Bytes asked for by those calls (a `realloc` counts its new size).
    pub(crate) bytes: u64,
    /// `dealloc` calls.
    pub(crate) frees: u64,
}

/// Count this thread's allocations into `slot` (1..SLOTS) from now on.
pub(crate) fn count_this_thread(slot: u8) {
    SLOT.with(|s| s.set(slot));
}

pub(crate) fn reset(slot: u8) {
    let s = &COUNTS[usize::from(slot)];
    s.allocs.store(0, Ordering::SeqCst);
    s.bytes.store(0, Ordering::SeqCst);
    s.frees.store(0, Ordering::SeqCst);
}

pub(crate) fn read(slot: u8) -> Counts {
    let s = &COUNTS[usize::from(slot)];
    Counts {
        allocs: s.allocs.load(Ordering::SeqCst),
        bytes: s.bytes.load(Ordering::SeqCst),
        frees: s.frees.load(Ordering::SeqCst),
    }
}

/// Start or stop recording a backtrace per counted allocation.
pub(crate) fn record_sites(on: bool) {
    SITES_ON.store(on, Ordering::SeqCst);
}

/// The backtraces recorded so far for `slot`, removed from the store.
pub(crate) fn take_sites(slot: u8) -> Vec<Backtrace> {
    let mut all = SITES.lock().unwrap_or_else(|p| p.into_inner());
    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut *all)
        .into_iter()
        .partition(|(s, _)| *s == slot);
    *all = rest;
    mine.into_iter().map(|(_, b)| b).collect()
}

/// The slot of the calling thread; 0 also while the thread is being torn down.
fn current_slot() -> u8 {
    SLOT.try_with(Cell::get).unwrap_or(0)
}

fn on_alloc(size: usize) {
    let slot = current_slot();
    if slot == 0 {
        return;
    }
    let s = &COUNTS[usize::from(slot)];
    s.allocs.fetch_add(1, Ordering::Relaxed);
    s.bytes.fetch_add(size as u64, Ordering::Relaxed);
    if SITES_ON.load(Ordering::Relaxed) {
        // Capturing and storing a backtrace allocates: switching the thread's slot off for
        // the duration keeps those allocations out of the counts and stops the recursion.
        let _ = SLOT.try_with(|c| c.set(0));
        let bt = Backtrace::force_capture();
        if let Ok(mut v) = SITES.lock() {
            v.push((slot, bt));
        }
        let _ = SLOT.try_with(|c| c.set(slot));
    }
}

fn on_free() {
    let slot = current_slot();
    if slot != 0 {
        COUNTS[usize::from(slot)]
            .frees
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// The system allocator, counting the calls made on opted-in threads.
#[derive(Debug)]
pub(crate) struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// bookkeeping around it never touches the memory being allocated or freed.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        // SAFETY: forwarded from our caller, who upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        on_alloc(new_size);
        // SAFETY: as for `alloc`; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_free();
        // SAFETY: as for `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}
