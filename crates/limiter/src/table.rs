//! What this process holds: device pointer / handle → (device, bytes), so a free gives back
//! exactly what its allocation charged.
//!
//! Why a hand-written table: the hot path may not allocate, and must not depend on the
//! application's allocator, so `HashMap` is out. This is a fixed-capacity open-addressing table
//! (linear probing) in an anonymous `mmap` made once per process (lazily committed, so its
//! 12 MiB of address space cost only the pages touched).
//!
//! Key decision: **backward-shift deletion, not tombstones.** A removal moves the entries after
//! the freed slot back towards their home slots, so the table never holds deleted markers and a
//! probe chain is only ever as long as the live entries around it make it. With tombstones (the
//! first version), long alloc/free churn with ever-new pointers (`cudaMallocAsync` pools, the
//! PyTorch caching allocator growing and trimming) filled the table with markers, and every
//! lookup of a key that is not there walked them all. Moving entries cannot be done safely
//! against concurrent lock-free readers, so every table operation takes one per-process spin
//! lock: uncontended it is one CAS, the same cost the lock-free insert had, and it is never
//! held across a driver call or on the launch path (the table is touched only by allocations,
//! frees and mappings). The lock lives in this process only (the shared region never locks), so a
//! process killed while holding it blocks nothing else; a forked child gets a fresh table and a
//! free lock.
//!
//! A key is live in at most one slot because the driver never hands out the same pointer twice
//! while it is allocated, and frees remove the entry *before* calling the driver (so the pointer
//! cannot be reissued while its entry is still here). Keys of different kinds (device pointers,
//! `cuMemCreate` handles, arrays) can collide in value, so each slot also records its kind.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

/// What a key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub(crate) enum Kind {
    DevPtr = 1,
    Handle = 2,
    Array = 3,
    Mipmap = 4,
    /// A `cuMemMap` of a tracked handle: key = virtual address, bytes = mapped size,
    /// aux = the handle.
    Mapping = 5,
    /// A context made by `cuCtxCreate*`: key = handle, device; bytes unused (the footprint is
    /// charged per device, see `hooks`).
    Context = 6,
}

const CAPACITY_BITS: u32 = 19;
const CAPACITY: usize = 1 << CAPACITY_BITS;
const MASK: usize = CAPACITY - 1;
const EMPTY: u64 = 0;
const SIZE_BITS: u64 = 48;
const SIZE_MASK: u64 = (1 << SIZE_BITS) - 1;

/// One slot. Atomics so that a slot can be read without tearing by the fork handler; every
/// access happens under [`LOCK`], so `Relaxed` suffices (the lock orders them).
#[repr(C)]
struct Entry {
    key: AtomicU64,
    /// kind (8 bits) | device (8 bits) | bytes (48 bits).
    meta: AtomicU64,
    /// Per-kind extra state (see `Kind`, and `hooks` for `Handle`: mapping count and released
    /// flag).
    aux: AtomicU64,
}

const TABLE_BYTES: usize = CAPACITY * std::mem::size_of::<Entry>();

static TABLE: AtomicPtr<Entry> = AtomicPtr::new(std::ptr::null_mut());
static LOCK: AtomicBool = AtomicBool::new(false);

/// Maps the table (init path). Returns false if the kernel refuses the mapping.
pub(crate) fn init() -> bool {
    if !TABLE.load(Ordering::Acquire).is_null() {
        return true;
    }
    // SAFETY: anonymous private mapping, checked for MAP_FAILED; zero-filled, which is the
    // valid empty table.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            TABLE_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return false;
    }
    if TABLE
        .compare_exchange(
            std::ptr::null_mut(),
            p.cast(),
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_err()
    {
        // SAFETY: our own mapping, lost the race, never published.
        unsafe { libc::munmap(p, TABLE_BYTES) };
    }
    true
}

/// In a forked child: what the parent held is not the child's. Replace the pages with fresh
/// zero pages at the same address (a single syscall, async-signal-safe), and free the lock a
/// parent thread may have held at the fork.
pub(crate) fn reset_after_fork() {
    LOCK.store(false, Ordering::Release);
    let p = TABLE.load(Ordering::Acquire);
    if p.is_null() {
        return;
    }
    // SAFETY: remapping our own mapping in place; no other thread exists in the child yet.
    let r = unsafe {
        libc::mmap(
            p.cast(),
            TABLE_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        TABLE.store(std::ptr::null_mut(), Ordering::Release);
    }
}

/// The table, locked for the life of the guard.
struct Locked {
    t: &'static [Entry],
}

impl Drop for Locked {
    fn drop(&mut self) {
        LOCK.store(false, Ordering::Release);
    }
}

fn lock() -> Option<Locked> {
    let p = TABLE.load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    let mut spins = 0u32;
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
    }
    // SAFETY: `p` is a live mapping of CAPACITY zero-initialised entries of atomics, never
    // unmapped once published (a fork remaps it in place).
    let t = unsafe { std::slice::from_raw_parts(p, CAPACITY) };
    Some(Locked { t })
}

#[inline]
fn hash(key: u64, kind: u64) -> usize {
    let h = (key ^ kind.rotate_right(8)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> (64 - CAPACITY_BITS)) as usize
}

impl Locked {
    /// Index of the entry for (`kind`, `key`), and the number of slots looked at.
    fn find(&self, kind: Kind, key: u64) -> (Option<usize>, usize) {
        let mut i = hash(key, kind as u64);
        for probes in 1..=CAPACITY {
            let e = &self.t[i];
            let k = e.key.load(Ordering::Relaxed);
            if k == EMPTY {
                return (None, probes);
            }
            if k == key && e.meta.load(Ordering::Relaxed) >> 56 == kind as u64 {
                return (Some(i), probes);
            }
            i = (i + 1) & MASK;
        }
        (None, CAPACITY)
    }

    /// Empties slot `hole` and moves the entries after it back, so that every entry stays
    /// reachable from its home slot without crossing an empty one (Knuth's algorithm R).
    fn delete(&self, mut hole: usize) {
        let mut j = hole;
        loop {
            j = (j + 1) & MASK;
            let e = &self.t[j];
            let k = e.key.load(Ordering::Relaxed);
            if k == EMPTY {
                break;
            }
            let meta = e.meta.load(Ordering::Relaxed);
            let home = hash(k, meta >> 56);
            // The entry at `j` may move to `hole` unless its home lies cyclically in (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if stays {
                continue;
            }
            let h = &self.t[hole];
            h.key.store(k, Ordering::Relaxed);
            h.meta.store(meta, Ordering::Relaxed);
            h.aux
                .store(e.aux.load(Ordering::Relaxed), Ordering::Relaxed);
            hole = j;
        }
        let h = &self.t[hole];
        h.key.store(EMPTY, Ordering::Relaxed);
        h.meta.store(0, Ordering::Relaxed);
        h.aux.store(0, Ordering::Relaxed);
    }
}

/// Records that `key` holds `bytes` on `dev`. False if the table is full (the caller then
/// keeps the charge: conservative, never under-counted).
#[inline]
pub(crate) fn insert(kind: Kind, key: u64, dev: usize, bytes: u64) -> bool {
    insert_aux(kind, key, dev, bytes, 0)
}

/// [`insert`] with the entry's extra word.
#[inline]
pub(crate) fn insert_aux(kind: Kind, key: u64, dev: usize, bytes: u64, aux: u64) -> bool {
    if key == EMPTY || bytes > SIZE_MASK {
        return false;
    }
    let Some(t) = lock() else { return false };
    let meta = ((kind as u64) << 56) | (((dev as u64) & 0xff) << SIZE_BITS) | bytes;
    let mut i = hash(key, kind as u64);
    // Leave one slot empty, so every probe ends.
    for _ in 0..CAPACITY - 1 {
        let e = &t.t[i];
        if e.key.load(Ordering::Relaxed) == EMPTY {
            e.key.store(key, Ordering::Relaxed);
            e.meta.store(meta, Ordering::Relaxed);
            e.aux.store(aux, Ordering::Relaxed);
            return true;
        }
        i = (i + 1) & MASK;
    }
    false
}

/// Removes `key`, returning (device, bytes) if this process recorded it.
#[inline]
pub(crate) fn remove(kind: Kind, key: u64) -> Option<(usize, u64)> {
    remove_aux(kind, key).map(|(dev, bytes, _)| (dev, bytes))
}

/// Updates the extra word of `key` with `f` (`f` returns `None` to leave it).
/// Returns (old, new) if the entry exists and `f` changed it.
pub(crate) fn update_aux(
    kind: Kind,
    key: u64,
    f: impl Fn(u64) -> Option<u64>,
) -> Option<(u64, u64)> {
    let t = lock()?;
    let i = t.find(kind, key).0?;
    let e = &t.t[i];
    let cur = e.aux.load(Ordering::Relaxed);
    let next = f(cur)?;
    e.aux.store(next, Ordering::Relaxed);
    Some((cur, next))
}

/// Removes `key`, returning (device, bytes, extra word) if this process recorded it.
#[inline]
pub(crate) fn remove_aux(kind: Kind, key: u64) -> Option<(usize, u64, u64)> {
    let t = lock()?;
    let i = t.find(kind, key).0?;
    let e = &t.t[i];
    let meta = e.meta.load(Ordering::Relaxed);
    let aux = e.aux.load(Ordering::Relaxed);
    t.delete(i);
    Some((((meta >> SIZE_BITS) & 0xff) as usize, meta & SIZE_MASK, aux))
}

/// Slots a lookup of (`kind`, `key`) looks at (for the tests).
#[cfg(test)]
pub(crate) fn probes(kind: Kind, key: u64) -> usize {
    lock().map_or(0, |t| t.find(kind, key).1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn insert_remove_kinds_and_reuse() {
        assert!(init());
        assert!(insert(Kind::DevPtr, 0x1000, 0, 10));
        assert!(insert(Kind::Handle, 0x1000, 1, 20));
        assert_eq!(remove(Kind::DevPtr, 0x1000), Some((0, 10)));
        assert_eq!(remove(Kind::DevPtr, 0x1000), None);
        assert_eq!(remove(Kind::Handle, 0x1000), Some((1, 20)));
        for k in 1..5000u64 {
            assert!(insert(Kind::Array, k * 4096, 0, k));
        }
        for k in 1..5000u64 {
            assert_eq!(remove(Kind::Array, k * 4096), Some((0, k)));
        }
    }

    #[test]
    fn extra_word_updates_in_place() {
        assert!(init());
        assert!(insert_aux(Kind::Mapping, 0x9000, 0, 64, 7));
        assert!(insert(Kind::Handle, 0x9000, 2, 128));
        assert_eq!(
            update_aux(Kind::Handle, 0x9000, |a| Some(a + 1)),
            Some((0, 1))
        );
        assert_eq!(update_aux(Kind::Handle, 0x9000, |_| None), None);
        assert_eq!(update_aux(Kind::Mipmap, 0x9000, |a| Some(a + 1)), None);
        assert_eq!(remove_aux(Kind::Handle, 0x9000), Some((2, 128, 1)));
        assert_eq!(remove_aux(Kind::Mapping, 0x9000), Some((0, 64, 7)));
    }

    /// Long alloc/free churn with ever-new pointers (a bump allocator, as pools and the fake
    /// driver hand them out) while a few hundred allocations stay live: afterwards every live
    /// entry is still found with what it recorded, and a lookup of a key that is not there
    /// ends after a handful of probes. With tombstones it walked every slot the churn had ever
    /// used.
    #[test]
    fn churn_keeps_probe_chains_short() {
        assert!(init());
        const BASE: u64 = 0x5555_0000_0000;
        let live: Vec<u64> = (0..300u64).map(|i| BASE - (i + 1) * 4096).collect();
        for (n, k) in live.iter().enumerate() {
            assert!(insert(Kind::Mipmap, *k, 0, n as u64 + 1));
        }
        for c in 0..(3 * CAPACITY as u64) {
            let k = BASE + c * 512;
            assert!(
                insert(Kind::Mipmap, k, 1, 512),
                "table full after {c} cycles"
            );
            assert_eq!(remove(Kind::Mipmap, k), Some((1, 512)));
        }
        let worst_miss = (0..1000u64)
            .map(|i| probes(Kind::Mipmap, 0x7777_0000_0000 + i * 4096))
            .max()
            .unwrap();
        assert!(
            worst_miss <= 32,
            "a missing key took {worst_miss} probes after churn"
        );
        for (n, k) in live.iter().enumerate() {
            assert_eq!(remove(Kind::Mipmap, *k), Some((0, n as u64 + 1)));
        }
    }

    /// Backward shift keeps every entry of a dense cluster reachable whichever one leaves.
    #[test]
    fn removal_inside_clusters_keeps_the_rest_reachable() {
        assert!(init());
        // Keys sharing home slots (found by search), so they form one long cluster.
        let home = hash(0x1234_5000, Kind::Context as u64);
        let keys: Vec<u64> = (1..u64::MAX)
            .map(|i| 0x4000_0000_0000 + i * 64)
            .filter(|k| {
                let h = hash(*k, Kind::Context as u64);
                h.wrapping_sub(home) & MASK < 4
            })
            .take(40)
            .collect();
        for (n, k) in keys.iter().enumerate() {
            assert!(insert(Kind::Context, *k, 0, n as u64));
        }
        for (n, k) in keys.iter().enumerate().step_by(3) {
            assert_eq!(remove(Kind::Context, *k), Some((0, n as u64)));
        }
        for (n, k) in keys.iter().enumerate() {
            let want = (n % 3 != 0).then_some((0, n as u64));
            assert_eq!(remove(Kind::Context, *k), want, "key {n}");
        }
    }
}
