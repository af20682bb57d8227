//! The global allocator: the C library's `malloc` plus a small cache of large blocks.
//!
//! musl's malloc (what the static build links) serves every allocation from 128 KiB up with its
//! own `mmap` and returns it with `munmap` on free. guestd's streaming paths allocate blocks of
//! that size all the time (output read buffers, encoded messages, JSON text), so under musl every
//! ~128 KiB of process output cost an `mmap`, 32 page faults of zeroed memory, a `munmap` and a
//! TLB shootdown on every core: a third of the agent's CPU time at full stream rate, and a large
//! share of a short command's round trip. mimalloc avoids the churn but doubles guestd's idle
//! memory; this cache removes it for the large sizes only and keeps musl's footprint.
//!
//! Blocks of [`MIN_CACHED`]..=[`MAX_CACHED`] bytes are rounded up to a power of two (only
//! virtual size: untouched pages cost nothing) and, when freed, parked in a per-size slot list
//! instead of going back to the kernel, up to [`BUDGET`] bytes in total. A parked block is handed
//! out again for the next allocation of its size class, already mapped and faulted in. Anything
//! smaller, larger, over-aligned or over budget goes straight to `malloc`/`free`. The budget is
//! what the cache can add to guestd's resident memory at worst: [`trim`] hands everything back
//! and runs when guestd goes idle.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::{Mutex, PoisonError};

/// Smallest size the cache handles: musl's mmap threshold is 128 KiB minus its header, and
/// mallocng serves the classes just below it from a few-slot group that is mapped and unmapped
/// with its blocks, so they churn too.
pub const MIN_CACHED: usize = 16 * 1024;

/// Largest size the cache handles: output chunks and encoded messages stay far below.
pub const MAX_CACHED: usize = 1024 * 1024;

/// Most bytes (counted at the rounded-up class size) parked at any time. A streaming command
/// keeps up to ~5 MiB of output chunks alive (`process::output`'s window plus retained tail)
/// and frees them in bursts as subscribers catch up; measured on a 1 GiB stream, 2 MiB still
/// missed for ~30 % of the bytes, 8 MiB for almost none, and guestd's peak RSS rose by ~1 MiB
/// only (a parked block stands in for the fresh one that would otherwise be mapped).
pub const BUDGET: usize = 8 * 1024 * 1024;

/// Parked blocks per size class at most (32 × 256 KiB output buffers fill the budget).
const SLOTS: usize = 32;

/// Size classes: 16 KiB, 32 KiB, … 1 MiB.
const CLASSES: usize = (MAX_CACHED / MIN_CACHED).trailing_zeros() as usize + 1;

/// Alignment `malloc` guarantees on x86_64 and aarch64; larger alignments bypass the cache.
const MALLOC_ALIGN: usize = 16;

struct Parked {
    blocks: [[*mut u8; SLOTS]; CLASSES],
    len: [usize; CLASSES],
    bytes: usize,
}

// SAFETY: the pointers are exclusively owned, unused heap blocks; whichever thread takes one out
// (under the mutex) becomes its only user.
unsafe impl Send for Parked {}

/// `(class index, class size)` for a layout the cache handles.
fn class_of(layout: Layout) -> Option<(usize, usize)> {
    let size = layout.size();
    if !(MIN_CACHED..=MAX_CACHED).contains(&size) || layout.align() > MALLOC_ALIGN {
        return None;
    }
    let class_size = size.next_power_of_two();
    Some(((class_size / MIN_CACHED).trailing_zeros() as usize, class_size))
}

/// The layout a class's blocks are allocated from `System` with.
fn class_layout(class_size: usize) -> Layout {
    Layout::from_size_align(class_size, MALLOC_ALIGN).expect("class sizes are powers of two below isize::MAX")
}

/// `System` with parked large blocks; [`CachingAlloc`] is the process-wide instance.
struct BlockCache {
    parked: Mutex<Parked>,
}

impl BlockCache {
    const fn new() -> Self {
        let parked = Parked { blocks: [[ptr::null_mut(); SLOTS]; CLASSES], len: [0; CLASSES], bytes: 0 };
        Self { parked: Mutex::new(parked) }
    }

    fn parked(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A parked block of `class`, if any.
    fn take(&self, class: usize, class_size: usize) -> Option<*mut u8> {
        let mut p = self.parked();
        let n = p.len[class].checked_sub(1)?;
        p.len[class] = n;
        p.bytes -= class_size;
        Some(std::mem::replace(&mut p.blocks[class][n], ptr::null_mut()))
    }

    /// Parks `block` unless its class is full or the budget would be exceeded.
    fn park(&self, block: *mut u8, class: usize, class_size: usize) -> bool {
        let mut p = self.parked();
        let n = p.len[class];
        if n == SLOTS || p.bytes + class_size > BUDGET {
            return false;
        }
        p.blocks[class][n] = block;
        p.len[class] = n + 1;
        p.bytes += class_size;
        true
    }

    /// `alloc` or (`zeroed`) `alloc_zeroed`: a parked block of the class if there is one,
    /// else a fresh one from `System` at the class size (calloc's zeroing is free for memory
    /// fresh from the kernel, so only a reused block is zeroed here).
    ///
    /// # Safety
    /// `GlobalAlloc::alloc`'s contract.
    unsafe fn allocate(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let from_system = match class_of(layout) {
            None => layout,
            Some((class, class_size)) => {
                if let Some(block) = self.take(class, class_size) {
                    if zeroed {
                        // SAFETY: a parked block of this class holds at least `layout.size()` bytes.
                        unsafe { block.write_bytes(0, layout.size()) };
                    }
                    return block;
                }
                class_layout(class_size)
            }
        };
        // SAFETY: `from_system` is the caller's layout (non-zero size) or a class layout at least
        // as large and as aligned.
        unsafe { if zeroed { System.alloc_zeroed(from_system) } else { System.alloc(from_system) } }
    }

    /// # Safety
    /// `GlobalAlloc::dealloc`'s contract, for a block from this cache's `allocate`.
    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        let Some((class, class_size)) = class_of(layout) else {
            // SAFETY: an uncached layout was allocated by System with this very layout.
            return unsafe { System.dealloc(block, layout) };
        };
        if !self.park(block, class, class_size) {
            // SAFETY: a cached-class block was allocated by System with exactly this layout.
            unsafe { System.dealloc(block, class_layout(class_size)) }
        }
    }

    /// # Safety
    /// `GlobalAlloc::realloc`'s contract, for a block from this cache's `allocate`.
    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: realloc's contract guarantees new_size, rounded to the alignment, does not
        // overflow isize.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class_of(layout), class_of(new_layout)) {
            // Neither side is cached: let malloc grow in place (musl uses mremap for big blocks).
            // SAFETY: forwarded as is.
            (None, None) => unsafe { System.realloc(block, layout, new_size) },
            // The block is already big enough.
            (Some((_, old)), Some((_, new))) if old == new => block,
            _ => {
                // SAFETY: new_layout is valid (see above) and non-zero (new_size >= 1 for realloc).
                let new_block = unsafe { self.allocate(new_layout, false) };
                if !new_block.is_null() {
                    // SAFETY: both blocks are valid for min(old, new) bytes and distinct; the old
                    // one was allocated here with `layout`.
                    unsafe {
                        ptr::copy_nonoverlapping(block, new_block, layout.size().min(new_size));
                        self.dealloc(block, layout);
                    }
                }
                new_block
            }
        }
    }

    fn trim(&self) {
        // Freed after the lock is released (free is not instant); an array, not a Vec: nothing
        // here may allocate.
        let mut released = [(ptr::null_mut(), 0); CLASSES * SLOTS];
        let mut count = 0;
        {
            let mut p = self.parked();
            for class in 0..CLASSES {
                for n in 0..p.len[class] {
                    released[count] =
                        (std::mem::replace(&mut p.blocks[class][n], ptr::null_mut()), MIN_CACHED << class);
                    count += 1;
                }
                p.len[class] = 0;
            }
            p.bytes = 0;
        }
        for &(block, class_size) in &released[..count] {
            // SAFETY: parked blocks were allocated by System with (class size, MALLOC_ALIGN) and
            // nothing references them any more.
            unsafe { System.dealloc(block, class_layout(class_size)) };
        }
    }

    fn parked_bytes(&self) -> usize {
        self.parked().bytes
    }
}

static CACHE: BlockCache = BlockCache::new();

/// guestd's `#[global_allocator]` (installed by the binary): `malloc` with parked large blocks.
#[derive(Debug)]
pub struct CachingAlloc;

// SAFETY: every block handed out is either fresh from `System` with at least the requested size
// and alignment (cached classes are allocated at the class size, which is >= the request, with
// malloc's 16-byte alignment, which is >= the requested alignment) or a parked block of the same
// class, which no one else references. `dealloc`/`realloc` receive the layout the block was
// allocated with, so its class, and thus the layout `System` allocated it with, is recomputed
// exactly.
unsafe impl GlobalAlloc for CachingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract.
        unsafe { CACHE.allocate(layout, false) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract.
        unsafe { CACHE.allocate(layout, true) }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        // SAFETY: same contract; every block of the process comes from CACHE.allocate.
        unsafe { CACHE.dealloc(block, layout) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract.
        unsafe { CACHE.realloc(block, layout, new_size) }
    }
}

/// Returns every parked block to the C library (and so, under musl, to the kernel).
pub fn trim() {
    CACHE.trim();
}

/// Bytes parked right now (counted at class size).
pub fn parked_bytes() -> usize {
    CACHE.parked_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_the_cached_range() {
        let at = |size| class_of(Layout::from_size_align(size, 8).unwrap());
        assert_eq!(at(MIN_CACHED - 1), None);
        assert_eq!(at(MIN_CACHED), Some((0, MIN_CACHED)));
        assert_eq!(at(MIN_CACHED + 1), Some((1, 2 * MIN_CACHED)));
        assert_eq!(at(MAX_CACHED), Some((CLASSES - 1, MAX_CACHED)));
        assert_eq!(at(MAX_CACHED + 1), None);
        assert_eq!(class_of(Layout::from_size_align(MIN_CACHED, 4096).unwrap()), None);
    }

    /// Exercises a cache of its own (tests run under the default allocator): reuse within a
    /// class, growth across classes keeps the contents, the budget holds and trim empties it.
    #[test]
    fn parks_reuses_grows_and_trims() {
        let cache = BlockCache::new();
        let layout = Layout::from_size_align(100 * 1024, 8).unwrap();
        // SAFETY: every block is used within its layout and freed once with that layout.
        unsafe {
            let first = cache.allocate(layout, false);
            assert!(!first.is_null());
            first.write_bytes(0xab, layout.size());
            cache.dealloc(first, layout);
            assert_eq!(cache.parked_bytes(), 128 * 1024);
            let again = cache.allocate(layout, false);
            assert_eq!(again, first, "a parked block of the class is reused");
            assert_eq!(cache.parked_bytes(), 0);
            again.write_bytes(1, layout.size());

            // A zeroed allocation served from a parked (dirty) block is zeroed.
            let dirty = cache.allocate(layout, false);
            dirty.write_bytes(0xcd, layout.size());
            cache.dealloc(dirty, layout);
            let zeroed = cache.allocate(layout, true);
            assert_eq!(zeroed, dirty);
            assert!(std::slice::from_raw_parts(zeroed, layout.size()).iter().all(|&b| b == 0));
            cache.dealloc(zeroed, layout);
            assert_eq!(cache.parked_bytes(), 128 * 1024);

            // Growth across classes keeps the contents; within the class it is free.
            let grown = cache.realloc(again, layout, 300 * 1024);
            assert_eq!((*grown, *grown.add(layout.size() - 1)), (1, 1));
            let grown_layout = Layout::from_size_align(300 * 1024, 8).unwrap();
            assert_eq!(cache.realloc(grown, grown_layout, 400 * 1024), grown);
            cache.dealloc(grown, Layout::from_size_align(400 * 1024, 8).unwrap());
            assert_eq!(cache.parked_bytes(), 2 * 128 * 1024 + 512 * 1024);

            // The budget holds however many blocks are freed.
            let big = Layout::from_size_align(MAX_CACHED, 8).unwrap();
            let blocks: Vec<*mut u8> = (0..BUDGET / MAX_CACHED + 2).map(|_| cache.allocate(big, false)).collect();
            for b in blocks {
                cache.dealloc(b, big);
            }
            assert!(cache.parked_bytes() <= BUDGET);
        }
        cache.trim();
        assert_eq!(cache.parked_bytes(), 0);
    }
}
