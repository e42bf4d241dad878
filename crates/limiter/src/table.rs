//! What this process holds: device pointer / handle → (device, bytes), so a free gives back
//! exactly what its allocation charged.
//!
//! Why a hand-written table: the hot path may not allocate or lock, so `HashMap` behind a
//! `Mutex` is out. This is a fixed-capacity open-addressing table of atomics in an anonymous
//! `mmap` made once per process (lazily committed, so its 12 MiB of address space cost only the
//! pages touched). Insertion claims an empty or deleted slot with one CAS; removal turns the slot
//! into a tombstone. A key is live in at most one slot because the driver never hands out the
//! same pointer twice while it is allocated, and frees remove the entry *before* calling the
//! driver (so the pointer cannot be reissued while its entry is still here).
//! Keys of different kinds (device pointers, `cuMemCreate` handles, arrays) can collide in
//! value, so each slot also records its kind.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

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

const CAPACITY: usize = 1 << 19;
const EMPTY: u64 = 0;
const TOMBSTONE: u64 = u64::MAX;
const SIZE_BITS: u64 = 48;
const SIZE_MASK: u64 = (1 << SIZE_BITS) - 1;

#[repr(C)]
struct Entry {
    key: AtomicU64,
    /// kind (8 bits) | device (8 bits) | bytes (48 bits); 0 while being filled in.
    meta: AtomicU64,
    /// Per-kind extra state, written before `meta` publishes the entry (see `Kind`, and
    /// `hooks` for `Handle`: mapping count and released flag).
    aux: AtomicU64,
}

const TABLE_BYTES: usize = CAPACITY * std::mem::size_of::<Entry>();

static TABLE: AtomicPtr<Entry> = AtomicPtr::new(std::ptr::null_mut());

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
/// zero pages at the same address (a single syscall, async-signal-safe).
pub(crate) fn reset_after_fork() {
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

fn entries() -> Option<&'static [Entry]> {
    let p = TABLE.load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` is a live mapping of CAPACITY zero-initialised entries of atomics, never
    // unmapped once published.
    Some(unsafe { std::slice::from_raw_parts(p, CAPACITY) })
}

#[inline]
fn hash(key: u64, kind: Kind) -> usize {
    let h = (key ^ (kind as u64).rotate_right(8)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> (64 - 19)) as usize
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
    let Some(t) = entries() else { return false };
    if key == EMPTY || key == TOMBSTONE || bytes > SIZE_MASK {
        return false;
    }
    let meta = ((kind as u64) << 56) | (((dev as u64) & 0xff) << SIZE_BITS) | bytes;
    let mut i = hash(key, kind);
    for _ in 0..CAPACITY {
        let e = &t[i];
        let k = e.key.load(Ordering::Relaxed);
        if (k == EMPTY || k == TOMBSTONE)
            && e.key
                .compare_exchange(k, key, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            e.aux.store(aux, Ordering::Relaxed);
            e.meta.store(meta, Ordering::Release);
            return true;
        }
        i = (i + 1) & (CAPACITY - 1);
    }
    false
}

/// Removes `key`, returning (device, bytes) if this process recorded it.
#[inline]
pub(crate) fn remove(kind: Kind, key: u64) -> Option<(usize, u64)> {
    remove_aux(kind, key).map(|(dev, bytes, _)| (dev, bytes))
}

/// The live entry for `key`, if any.
fn find(kind: Kind, key: u64) -> Option<&'static Entry> {
    let t = entries()?;
    let mut i = hash(key, kind);
    for _ in 0..CAPACITY {
        let e = &t[i];
        let k = e.key.load(Ordering::Acquire);
        if k == EMPTY {
            return None;
        }
        if k == key && e.meta.load(Ordering::Acquire) >> 56 == kind as u64 {
            return Some(e);
        }
        i = (i + 1) & (CAPACITY - 1);
    }
    None
}

/// Updates the extra word of `key` with `f` (a CAS loop; `f` returns `None` to leave it).
/// Returns (old, new) if the entry exists and `f` changed it.
pub(crate) fn update_aux(
    kind: Kind,
    key: u64,
    f: impl Fn(u64) -> Option<u64>,
) -> Option<(u64, u64)> {
    let e = find(kind, key)?;
    let mut cur = e.aux.load(Ordering::Acquire);
    loop {
        let next = f(cur)?;
        match e
            .aux
            .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Some((cur, next)),
            Err(seen) => cur = seen,
        }
    }
}

/// Removes `key`, returning (device, bytes, extra word) if this process recorded it.
#[inline]
pub(crate) fn remove_aux(kind: Kind, key: u64) -> Option<(usize, u64, u64)> {
    let t = entries()?;
    let mut i = hash(key, kind);
    for _ in 0..CAPACITY {
        let e = &t[i];
        let k = e.key.load(Ordering::Acquire);
        if k == EMPTY {
            return None;
        }
        if k == key {
            let meta = e.meta.load(Ordering::Acquire);
            if meta >> 56 == kind as u64 {
                let aux = e.aux.load(Ordering::Acquire);
                e.meta.store(0, Ordering::Relaxed);
                if e.key
                    .compare_exchange(key, TOMBSTONE, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return Some((((meta >> SIZE_BITS) & 0xff) as usize, meta & SIZE_MASK, aux));
                }
                return None;
            }
        }
        i = (i + 1) & (CAPACITY - 1);
    }
    None
}

/// Slots a lookup of (`kind`, `key`) looks at (for the tests).
#[cfg(test)]
pub(crate) fn probes(kind: Kind, key: u64) -> usize {
    let Some(t) = entries() else { return 0 };
    let mut i = hash(key, kind);
    for n in 1..=CAPACITY {
        let e = &t[i];
        let k = e.key.load(Ordering::Acquire);
        if k == EMPTY || (k == key && e.meta.load(Ordering::Acquire) >> 56 == kind as u64) {
            return n;
        }
        i = (i + 1) & (CAPACITY - 1);
    }
    CAPACITY
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
            assert!(insert(Kind::Mipmap, k, 1, 512), "table full after {c} cycles");
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

}
