//! Weights that stay in the page cache: an f32 tensor loaded from a
//! safetensors file can be a view of the file, mapped copy-on-write, instead
//! of a copy of it.
//!
//! Why: reading a multi-GB folder into fresh buffers costs a page fault and a
//! copy per page before the first step can run (8.7 s for the 7.5 GB
//! wan-1.3b-shape folder, where diffusers maps the file and is done in a
//! quarter of a second). candle's CPU tensors own a `Vec`, so a view can only
//! be handed to candle as a `Vec` whose buffer is the mapping. That is sound
//! only if the global allocator knows such buffers: [`WeightsAllocator`] is
//! the system allocator plus a table of live mappings, and frees (or
//! reallocates) a buffer inside a mapping by releasing its share of the
//! mapping instead of handing the pointer to `free`.
//!
//! A binary opts in with `#[global_allocator]`; the library notices (the
//! allocator marks itself on its first allocation) and, without it, reads
//! tensors into owned buffers as before. Mappings are private and writable:
//! a write to a weight copies the page, never touches the file. A file must
//! not be truncated while a model maps it (the kernel would fault the reader);
//! this crate's exporters write a new file and rename it over the old one.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The system allocator, able to free buffers that are views of a weights
/// file. Install it as the binary's `#[global_allocator]` (and only that
/// way) to load weights without copying them.
pub struct WeightsAllocator;

/// Set by the first allocation through [`WeightsAllocator`]: every
/// allocation goes through the global allocator, so if ours is it, it has
/// run before any weights are opened.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Live mappings (a model maps one per weights file; past this many files
/// they are read into owned buffers instead).
const SLOTS: usize = 256;

/// One mapped file. `[start, end)` is the mapped address range while the
/// slot is live and empty otherwise; `shares` counts the [`Mapping`] handle
/// and every buffer handed out of it.
struct Slot {
    claimed: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    shares: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    claimed: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    shares: AtomicUsize::new(0),
};
static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
/// Claimed slots, so that frees skip the table while nothing is mapped.
static CLAIMED: AtomicUsize = AtomicUsize::new(0);
/// One past the highest slot ever claimed: frees scan only that far.
static HIGH: AtomicUsize = AtomicUsize::new(0);

/// The slot whose mapping holds `ptr`. A pointer inside a live mapping keeps
/// that slot's range fixed (its share is not released yet); a pointer from
/// `malloc` can never lie inside a live mapping, and a slot's range is
/// emptied before its mapping is unmapped, so it cannot match a stale one.
fn slot_of(ptr: *mut u8) -> Option<&'static Slot> {
    if CLAIMED.load(Ordering::Acquire) == 0 {
        return None;
    }
    let p = ptr as usize;
    TABLE[..HIGH.load(Ordering::Acquire)]
        .iter()
        .find(|s| p < s.end.load(Ordering::Acquire) && p >= s.start.load(Ordering::Acquire))
}

/// Drops one share of `slot`'s mapping; the last one unmaps it.
fn release(slot: &Slot) {
    if slot.shares.fetch_sub(1, Ordering::AcqRel) != 1 {
        return;
    }
    let start = slot.start.load(Ordering::Acquire);
    let end = slot.end.load(Ordering::Acquire);
    slot.end.store(0, Ordering::Release);
    slot.start.store(0, Ordering::Release);
    // SAFETY: the range is the mapping this slot made, and no share of it
    // (buffer or handle) is left.
    unsafe { libc::munmap(start as *mut libc::c_void, end - start) };
    slot.claimed.store(false, Ordering::Release);
    CLAIMED.fetch_sub(1, Ordering::AcqRel);
}

// SAFETY: every request is the system allocator's, except pointers into a
// live mapping, which only `Mapping::f32_vec` hands out (as buffers of this
// allocator, the global one) and which are released instead of freed.
unsafe impl GlobalAlloc for WeightsAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(Ordering::Relaxed) {
            INSTALLED.store(true, Ordering::Relaxed);
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(Ordering::Relaxed) {
            INSTALLED.store(true, Ordering::Relaxed);
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match slot_of(ptr) {
            Some(slot) => release(slot),
            None => System.dealloc(ptr, layout),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(slot) = slot_of(ptr) else {
            return System.realloc(ptr, layout, new_size);
        };
        // A view that grows or shrinks becomes an owned buffer.
        let new = System.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            release(slot);
        }
        new
    }
}

/// Whether [`WeightsAllocator`] is the global allocator (so views can be
/// handed out).
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Mappings alive now (files opened, or with buffers still in use).
pub fn live_mappings() -> usize {
    CLAIMED.load(Ordering::Acquire)
}

/// A file mapped whole, copy-on-write; buffers it hands out keep the mapping
/// alive after the handle is dropped.
pub(crate) struct Mapping {
    slot: &'static Slot,
    start: usize,
    len: usize,
    /// Byte ranges handed out as views (start -> end): a range is viewed at
    /// most once, since two `Vec`s over the same bytes would see each
    /// other's writes.
    viewed: Mutex<BTreeMap<usize, usize>>,
}

impl Mapping {
    /// Maps `file` (`len` bytes), or None: the allocator is not installed,
    /// the file is empty, every slot is taken, or `mmap` failed (the caller
    /// reads the file instead).
    pub(crate) fn new(file: &File, len: u64) -> Option<Self> {
        let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
        if !installed() {
            return None;
        }
        let (index, slot) = TABLE.iter().enumerate().find(|(_, s)| {
            s.claimed
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })?;
        CLAIMED.fetch_add(1, Ordering::AcqRel);
        HIGH.fetch_max(index + 1, Ordering::AcqRel);
        // SAFETY: a fresh private mapping of an open file; nothing aliases it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            slot.claimed.store(false, Ordering::Release);
            CLAIMED.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let start = ptr as usize;
        slot.shares.store(1, Ordering::Release);
        slot.start.store(start, Ordering::Release);
        slot.end.store(start + len, Ordering::Release);
        Some(Self {
            slot,
            start,
            len,
            viewed: Mutex::default(),
        })
    }

    /// The `count` little-endian f32 values at byte `offset` as a `Vec`
    /// viewing the file, or None (the caller copies them instead) where they
    /// are not 4-byte aligned in it, out of range, overlap bytes already
    /// viewed, or the machine is big-endian.
    pub(crate) fn f32_vec(&self, offset: usize, count: usize) -> Option<Vec<f32>> {
        let bytes = count.checked_mul(4)?;
        let end = offset.checked_add(bytes)?;
        if cfg!(target_endian = "big") || count == 0 || end > self.len || !offset.is_multiple_of(4)
        {
            return None;
        }
        {
            let mut viewed = self.viewed.lock().unwrap_or_else(|e| e.into_inner());
            let before = viewed.range(..end).next_back();
            if before.is_some_and(|(_, &e)| e > offset) {
                return None;
            }
            viewed.insert(offset, end);
        }
        self.slot.shares.fetch_add(1, Ordering::AcqRel);
        let ptr = (self.start + offset) as *mut f32;
        // SAFETY: the range lies inside a live mapping (one share is now this
        // buffer's), aligned for f32, and every bit pattern is an f32. The
        // global allocator is `WeightsAllocator` (`installed`), which
        // releases the share when the Vec frees or reallocates its buffer.
        Some(unsafe { Vec::from_raw_parts(ptr, count, count) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        release(self.slot);
    }
}

/// The engine's own tests run with views, as the binary does.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: WeightsAllocator = WeightsAllocator;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_hold_shares_and_become_owned_when_they_grow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("values");
        let values: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        let m = Mapping::new(&file, bytes.len() as u64).expect("mapped");
        let shares = || m.slot.shares.load(Ordering::Acquire);
        assert_eq!(shares(), 1);
        assert!(m.f32_vec(2, 4).is_none(), "misaligned");
        assert!(m.f32_vec(3996, 2).is_none(), "past the end");
        let a = m.f32_vec(40, 5).unwrap();
        let mut b = m.f32_vec(400, 100).unwrap();
        assert_eq!(a, [10., 11., 12., 13., 14.]);
        assert_eq!(shares(), 3);
        assert!(m.f32_vec(40, 5).is_none(), "viewed twice");
        assert!(m.f32_vec(0, 11).is_none(), "overlaps a view");
        assert!(m.f32_vec(796, 2).is_none(), "overlaps a view");
        assert_eq!(shares(), 3);
        drop(a);
        assert_eq!(shares(), 2);
        // Writing a view copies the page; the file is untouched.
        b[0] = -1.0;
        assert_eq!(
            &std::fs::read(&path).unwrap()[400..404],
            &100f32.to_le_bytes()
        );
        b.push(1000.0);
        assert_eq!(shares(), 1, "the grown buffer is owned");
        assert_eq!((b[0], b[99], b[100]), (-1.0, 199.0, 1000.0));
        let c = m.f32_vec(0, 2).unwrap();
        drop(m);
        assert_eq!(c, [0., 1.], "a view outlives the handle");
        drop(c);
    }
}
