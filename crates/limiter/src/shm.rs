//! The shared accounting region of one instance: a small file-backed `mmap` that the daemon
//! creates (one per instance) and every limited process of that instance maps.
//!
//! Why shared memory: the quota is per instance, not per process (eight data-loader workers share
//! one VRAM budget), and it must be exact at the boundary, so every charge is one
//! compare-and-swap on a counter all processes see. No lock is ever taken: a process killed while
//! holding a lock would block its peers forever.
//!
//! Key decisions:
//! - **Global counter + per-process slots.** `DeviceState::used` is the authority for admission
//!   (CAS loop: never above quota, even with many writers). Each process also adds what it holds
//!   to its own `Slot`, keyed by pid and process start time, so the usage of a process that died
//!   without cleaning up (SIGKILL) can be subtracted again. Reclaiming is off the hot path: when a
//!   process attaches, before an allocation is refused, and whenever the daemon calls
//!   [`Region::reclaim_dead`]. A charge adds to the global counter before the slot and a release
//!   subtracts from the slot first, so a process killed between the two instructions can only
//!   leave the region over-counted (never over quota); [`Region::reclaim_dead`] zeroes the counter
//!   when no process is attached, which removes even that.
//! - **Limits live here, not in the config file**, so the daemon can resize a running instance.
//! - **The daemon feeds utilisation** (`publish_sample`): the instance's SM utilisation it samples
//!   from NVML, and, for a low-priority instance, the utilisation of high-priority instances on the
//!   same GPU. The launch path only reads these; it never samples anything.
//! - Layout is `repr(C)` with a magic and a version; every field is an atomic, so a zero-filled
//!   file is a valid (empty) region and no process ever sees a torn value. Hot fields sit on their
//!   own cache lines.
//!
//! Threat model: the region is writable by the instance's processes (they must charge it), so it
//! keeps honest frameworks within limits; it is not a security boundary against code that
//! deliberately bypasses the library.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// `GPUVLIM1`, little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"GPUVLIM1");
/// Bumped whenever the layout changes; a library refuses a region of another version.
pub const LAYOUT_VERSION: u32 = 1;
/// GPUs one instance can have limits on (CUDA ordinals `0..MAX_DEVICES` inside the instance).
pub const MAX_DEVICES: usize = 8;
/// Processes of one instance that can hold GPU memory at the same time.
pub const MAX_SLOTS: usize = 256;
/// A compute share of 100 %, in basis points (1/100 of a percent).
pub const FULL_SHARE_BP: u32 = 10_000;
/// Smallest share a low-priority instance keeps while high-priority work runs, so it still makes
/// progress (and reaches its next sample) instead of stalling forever.
pub const MIN_SHARE_BP: u32 = 100;

const PID_RECLAIMING: u32 = u32::MAX;

/// Scheduling priority of an instance on its GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Capped at its share, and additionally yields to high-priority instances on the same GPU.
    Low,
    /// Capped at its share only; never throttled in favour of low-priority work.
    High,
}

impl Priority {
    fn to_raw(self) -> u32 {
        match self {
            Priority::Low => 0,
            Priority::High => 1,
        }
    }
    fn from_raw(raw: u32) -> Priority {
        if raw == 1 {
            Priority::High
        } else {
            Priority::Low
        }
    }
}

/// Limits of one GPU of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimit {
    /// VRAM quota in bytes; `cuMemGetInfo` and NVML report it as the total.
    pub quota_bytes: u64,
    /// Compute share in basis points (`FULL_SHARE_BP` = no compute cap).
    pub share_bp: u32,
}

/// What the daemon asks for when it creates a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSpec {
    /// One entry per GPU the instance sees, in CUDA ordinal order. At most [`MAX_DEVICES`].
    pub devices: Vec<DeviceLimit>,
    pub priority: Priority,
}

#[repr(C, align(64))]
pub(crate) struct DeviceState {
    // cache line 1: admission
    pub(crate) quota: AtomicU64,
    pub(crate) used: AtomicU64,
    _pad1: [u64; 6],
    // cache line 2: written by the daemon
    pub(crate) share_bp: AtomicU32,
    pub(crate) util_bp: AtomicU32,
    pub(crate) high_util_bp: AtomicU32,
    _pad2a: u32,
    pub(crate) sample_seq: AtomicU64,
    _pad2: [u64; 5],
    // cache line 3: controller state, written by whichever limited process applies a sample
    pub(crate) applied_seq: AtomicU64,
    /// Minimum spacing of launches for the whole instance; 0 = not throttled.
    pub(crate) interval_ns: AtomicU64,
    pub(crate) ctl_launches: AtomicU64,
    pub(crate) ctl_time_ns: AtomicU64,
    _pad3: [u64; 4],
    // cache line 4: the launch gate
    pub(crate) tat_ns: AtomicU64,
    pub(crate) launches: AtomicU64,
    _pad4: [u64; 6],
}

#[repr(C, align(64))]
pub(crate) struct Slot {
    pub(crate) pid: AtomicU32,
    _pad0: u32,
    pub(crate) start_time: AtomicU64,
    _pad1: [u64; 6],
    pub(crate) used: [AtomicU64; MAX_DEVICES],
}

#[repr(C, align(64))]
pub(crate) struct Layout {
    pub(crate) magic: AtomicU64,
    pub(crate) version: AtomicU32,
    pub(crate) ndev: AtomicU32,
    pub(crate) priority: AtomicU32,
    _pad: [u32; 11],
    pub(crate) devices: [DeviceState; MAX_DEVICES],
    pub(crate) slots: [Slot; MAX_SLOTS],
}

/// Size of the region file in bytes.
pub const REGION_BYTES: usize = std::mem::size_of::<Layout>();

/// Usage of one GPU of the instance, for `gpuvisor instance get` and telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceUsage {
    pub quota_bytes: u64,
    pub used_bytes: u64,
    pub share_bp: u32,
    /// Last utilisation the daemon published, basis points.
    pub util_bp: u32,
    /// Kernel and graph launches through the limiter since the region was created.
    pub launches: u64,
    /// Current spacing the controller imposes on launches, 0 when not throttled.
    pub interval_ns: u64,
}

/// One attached process (pid as seen inside the instance's pid namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessUsage {
    pub pid: u32,
    pub used_bytes: Vec<u64>,
}

/// A mapped region. Cheap to keep open; all methods take `&self` and are safe to call
/// concurrently with the limited processes.
pub struct Region {
    ptr: NonNull<Layout>,
}

// SAFETY: the mapping is shared memory made only of atomics; every access goes through them.
unsafe impl Send for Region {}
// SAFETY: as above, concurrent access is through atomics only.
unsafe impl Sync for Region {}

impl Region {
    /// Creates (or replaces) the region file at `path` with the given limits and maps it.
    /// The file is written under a temporary name and renamed, so a process never maps a
    /// half-initialised region. Mode 0666: the instance's processes may run as any user.
    pub fn create(path: &Path, spec: &RegionSpec) -> io::Result<Region> {
        if spec.devices.is_empty() || spec.devices.len() > MAX_DEVICES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a region holds 1 to {MAX_DEVICES} devices"),
            ));
        }
        let tmp = path.with_extension("tmp");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o666)
            .open(&tmp)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o666))?;
        file.set_len(REGION_BYTES as u64)?;
        let region = Region::map(&file)?;
        let l = region.layout();
        for (i, d) in spec.devices.iter().enumerate() {
            l.devices[i].quota.store(d.quota_bytes, Ordering::Relaxed);
            l.devices[i]
                .share_bp
                .store(d.share_bp.min(FULL_SHARE_BP), Ordering::Relaxed);
        }
        l.ndev.store(spec.devices.len() as u32, Ordering::Relaxed);
        l.priority.store(spec.priority.to_raw(), Ordering::Relaxed);
        l.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        l.magic.store(MAGIC, Ordering::Release);
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(region)
    }

    /// Maps an existing region, checking its magic and version.
    pub fn open(path: &Path) -> io::Result<Region> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        if file.metadata()?.len() < REGION_BYTES as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "region file too small",
            ));
        }
        let region = Region::map(&file)?;
        let l = region.layout();
        if l.magic.load(Ordering::Acquire) != MAGIC
            || l.version.load(Ordering::Relaxed) != LAYOUT_VERSION
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a gpuvisor limiter region of this version",
            ));
        }
        Ok(region)
    }

    /// Removes the region file (existing mappings stay valid until unmapped).
    pub fn remove(path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn map(file: &std::fs::File) -> io::Result<Region> {
        // SAFETY: mapping a file we hold open, shared, with the size it was checked/set to; the
        // result is checked for MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REGION_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(p.cast::<Layout>())
            .map(|ptr| Region { ptr })
            .ok_or_else(|| io::Error::other("mmap returned null"))
    }

    pub(crate) fn layout(&self) -> &Layout {
        // SAFETY: `ptr` is a live mapping of REGION_BYTES bytes, page-aligned (so aligned for
        // Layout), made only of atomics, and unmapped only in Drop.
        unsafe { self.ptr.as_ref() }
    }

    /// Leaks the mapping and returns a `'static` view (the library keeps its region for the
    /// process's lifetime).
    pub(crate) fn leak(self) -> &'static Layout {
        let ptr = self.ptr;
        std::mem::forget(self);
        // SAFETY: the mapping is never unmapped now that Drop will not run.
        unsafe { ptr.as_ref() }
    }

    /// Number of devices the region limits.
    pub fn devices(&self) -> usize {
        self.layout().ndev.load(Ordering::Relaxed) as usize
    }

    /// Current priority.
    pub fn priority(&self) -> Priority {
        Priority::from_raw(self.layout().priority.load(Ordering::Relaxed))
    }

    /// Changes the priority of the instance.
    pub fn set_priority(&self, p: Priority) {
        self.layout().priority.store(p.to_raw(), Ordering::Relaxed);
    }

    /// Changes the limits of device `dev` while the instance runs. Lowering the quota below
    /// what is in use refuses new allocations until enough is freed; nothing is taken away.
    pub fn set_limit(&self, dev: usize, limit: DeviceLimit) -> io::Result<()> {
        let d = self.device(dev)?;
        d.quota.store(limit.quota_bytes, Ordering::Relaxed);
        d.share_bp
            .store(limit.share_bp.min(FULL_SHARE_BP), Ordering::Relaxed);
        Ok(())
    }

    /// The daemon's utilisation feed for device `dev`, once per NVML sample (every 100-500 ms):
    /// `util_bp` is the SM utilisation of this instance's processes (sum over its pids from
    /// `nvmlDeviceGetProcessUtilization`), `high_util_bp` the utilisation of *other,
    /// high-priority* instances on the same GPU (0 for a high-priority instance). Basis points.
    pub fn publish_sample(&self, dev: usize, util_bp: u32, high_util_bp: u32) -> io::Result<()> {
        let d = self.device(dev)?;
        d.util_bp.store(util_bp, Ordering::Relaxed);
        d.high_util_bp.store(high_util_bp, Ordering::Relaxed);
        d.sample_seq.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Usage of device `dev`.
    pub fn usage(&self, dev: usize) -> io::Result<DeviceUsage> {
        let d = self.device(dev)?;
        Ok(DeviceUsage {
            quota_bytes: d.quota.load(Ordering::Relaxed),
            used_bytes: d.used.load(Ordering::Relaxed),
            share_bp: d.share_bp.load(Ordering::Relaxed),
            util_bp: d.util_bp.load(Ordering::Relaxed),
            launches: d.launches.load(Ordering::Relaxed),
            interval_ns: d.interval_ns.load(Ordering::Relaxed),
        })
    }

    /// Processes currently attached (pids in the instance's pid namespace).
    pub fn processes(&self) -> Vec<ProcessUsage> {
        let l = self.layout();
        let ndev = self.devices();
        l.slots
            .iter()
            .filter_map(|s| {
                let pid = s.pid.load(Ordering::Acquire);
                (pid != 0 && pid != PID_RECLAIMING).then(|| ProcessUsage {
                    pid,
                    used_bytes: s.used[..ndev]
                        .iter()
                        .map(|u| u.load(Ordering::Relaxed))
                        .collect(),
                })
            })
            .collect()
    }

    /// Gives back the usage of attached processes that no longer exist (SIGKILLed, or exited
    /// without running destructors). Liveness is `kill(pid, 0)` plus the process start time, so
    /// it must run in the instance's pid namespace (the library calls it there); the daemon, in
    /// the host namespace, uses [`Region::reclaim_dead_with`]. Returns the bytes reclaimed.
    pub fn reclaim_dead(&self) -> u64 {
        reclaim(self.layout(), process_alive)
    }

    /// Like [`Region::reclaim_dead`], with the caller deciding liveness from (pid, start time in
    /// clock ticks since boot, 0 if unknown).
    pub fn reclaim_dead_with(&self, alive: impl Fn(u32, u64) -> bool) -> u64 {
        reclaim(self.layout(), alive)
    }

    fn device(&self, dev: usize) -> io::Result<&DeviceState> {
        if dev >= self.devices() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no such device in region",
            ));
        }
        Ok(&self.layout().devices[dev])
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `map`; no reference outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), REGION_BYTES);
        }
    }
}

/// [`Region::reclaim_dead`] for the library's own leaked mapping.
pub(crate) fn reclaim_local(l: &Layout) -> u64 {
    reclaim(l, process_alive)
}

pub(crate) fn reclaim(l: &Layout, alive: impl Fn(u32, u64) -> bool) -> u64 {
    let mut total = 0;
    let mut attached = 0;
    for s in &l.slots {
        let pid = s.pid.load(Ordering::Acquire);
        if pid == 0 || pid == PID_RECLAIMING {
            continue;
        }
        if alive(pid, s.start_time.load(Ordering::Relaxed)) {
            attached += 1;
            continue;
        }
        if s.pid
            .compare_exchange(pid, PID_RECLAIMING, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        total += release_slot(l, s);
    }
    if attached == 0 {
        resync_idle(l);
    }
    total
}

/// With no process attached nothing can be in use: clear any residue a kill between two
/// instructions of a charge left behind. A process that attaches meanwhile changes the counter
/// (or takes a slot), so the CAS fails and nothing of it is lost.
fn resync_idle(l: &Layout) {
    let ndev = (l.ndev.load(Ordering::Relaxed) as usize).min(MAX_DEVICES);
    for d in &l.devices[..ndev] {
        let seen = d.used.load(Ordering::Acquire);
        if seen == 0 {
            continue;
        }
        if l.slots.iter().any(|s| s.pid.load(Ordering::Acquire) != 0) {
            return;
        }
        let _ = d
            .used
            .compare_exchange(seen, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Returns a slot's usage to the devices and frees it. The caller owns the slot (its own, or
/// one it marked PID_RECLAIMING).
pub(crate) fn release_slot(l: &Layout, s: &Slot) -> u64 {
    let mut total = 0;
    for (dev, u) in s.used.iter().enumerate() {
        let x = u.swap(0, Ordering::AcqRel);
        if x != 0 {
            saturating_sub(&l.devices[dev].used, x);
            total += x;
        }
    }
    s.start_time.store(0, Ordering::Relaxed);
    s.pid.store(0, Ordering::Release);
    total
}

/// Takes a free slot for `pid`; `None` when all are taken.
pub(crate) fn claim_slot(l: &Layout, pid: u32, start: u64) -> Option<&Slot> {
    l.slots.iter().find(|s| {
        s.pid
            .compare_exchange(0, pid, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
            && {
                s.start_time.store(start, Ordering::Release);
                true
            }
    })
}

/// Charges `bytes` on `dev` if it fits the quota. Hot path: one CAS loop and one add.
#[inline]
pub(crate) fn try_charge(l: &Layout, slot: Option<&Slot>, dev: usize, bytes: u64) -> bool {
    let d = &l.devices[dev];
    let quota = d.quota.load(Ordering::Relaxed);
    let mut cur = d.used.load(Ordering::Relaxed);
    loop {
        let next = match cur.checked_add(bytes) {
            Some(n) if n <= quota => n,
            _ => return false,
        };
        match d
            .used
            .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
        {
            Ok(_) => break,
            Err(seen) => cur = seen,
        }
    }
    if let Some(s) = slot {
        s.used[dev].fetch_add(bytes, Ordering::Relaxed);
    }
    true
}

/// Gives back `bytes` on `dev`. Never more than the process's slot still holds: what the slot
/// no longer has was already given back with the slot (at exit, racing a late free on another
/// thread), and subtracting it again would under-count the instance, or wrap its counter to
/// "everything in use" and refuse every allocation of every process. Hot path: one CAS on the
/// process's own slot (uncontended) and one on the shared counter.
#[inline]
pub(crate) fn uncharge(l: &Layout, slot: Option<&Slot>, dev: usize, bytes: u64) {
    let give = match slot {
        Some(s) => saturating_sub(&s.used[dev], bytes),
        None => bytes,
    };
    if give != 0 {
        saturating_sub(&l.devices[dev].used, give);
    }
}

/// Subtracts up to `bytes` from `a` without going below zero; returns what was subtracted.
#[inline]
fn saturating_sub(a: &AtomicU64, bytes: u64) -> u64 {
    let mut cur = a.load(Ordering::Relaxed);
    loop {
        let take = cur.min(bytes);
        match a.compare_exchange_weak(cur, cur - take, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return take,
            Err(seen) => cur = seen,
        }
    }
}

/// Start time of `pid` (field 22 of /proc/<pid>/stat), clock ticks since boot.
pub(crate) fn proc_start_time(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn process_alive(pid: u32, start: u64) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(raw, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    // Same pid, other process (pid reuse): the start time differs.
    match (start, proc_start_time(pid)) {
        (0, _) | (_, None) => true,
        (s, Some(t)) => s == t,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn spec(q: u64) -> RegionSpec {
        RegionSpec {
            devices: vec![DeviceLimit {
                quota_bytes: q,
                share_bp: 5000,
            }],
            priority: Priority::Low,
        }
    }

    #[test]
    fn layout_is_cache_line_aligned() {
        assert_eq!(std::mem::size_of::<DeviceState>(), 256);
        assert_eq!(std::mem::size_of::<Slot>(), 128);
        assert_eq!(REGION_BYTES % 64, 0);
    }

    /// `bench/limiter_gpu.py` (the GPU check, which has only Python on the GPU machine) writes
    /// regions and samples at these offsets; keep them in step.
    #[test]
    fn offsets_used_by_the_python_gpu_check() {
        use std::mem::offset_of;
        assert_eq!(offset_of!(Layout, devices), 64);
        assert_eq!(offset_of!(Layout, slots), 64 + MAX_DEVICES * 256);
        assert_eq!(offset_of!(DeviceState, used), 8);
        assert_eq!(offset_of!(DeviceState, share_bp), 64);
        assert_eq!(offset_of!(DeviceState, util_bp), 68);
        assert_eq!(offset_of!(DeviceState, high_util_bp), 72);
        assert_eq!(offset_of!(DeviceState, sample_seq), 80);
        assert_eq!(offset_of!(DeviceState, interval_ns), 136);
        assert_eq!(offset_of!(DeviceState, launches), 200);
        assert_eq!(REGION_BYTES, 64 + MAX_DEVICES * 256 + MAX_SLOTS * 128);
    }

    #[test]
    fn create_open_charge_reclaim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.shm");
        let r = Region::create(&path, &spec(100)).unwrap();
        let r2 = Region::open(&path).unwrap();
        let l = r2.layout();
        let me = claim_slot(l, std::process::id(), 0).unwrap();
        assert!(try_charge(l, Some(me), 0, 60));
        assert!(!try_charge(l, Some(me), 0, 41));
        assert!(try_charge(l, Some(me), 0, 40));
        assert_eq!(r.usage(0).unwrap().used_bytes, 100);
        uncharge(l, Some(me), 0, 100);
        assert_eq!(r.usage(0).unwrap().used_bytes, 0);

        // A "dead" process (pid that cannot exist) holding 70 bytes is reclaimed.
        let ghost = claim_slot(l, 0x7fff_fff0, 0).unwrap();
        assert!(try_charge(l, Some(ghost), 0, 70));
        assert_eq!(r.processes().len(), 2);
        assert_eq!(r.reclaim_dead(), 70);
        assert_eq!(r.usage(0).unwrap().used_bytes, 0);
        assert_eq!(r.processes().len(), 1);
        release_slot(l, me);
        Region::remove(&path).unwrap();
    }

    #[test]
    fn rejects_foreign_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, vec![0u8; REGION_BYTES]).unwrap();
        assert!(Region::open(&path).is_err());
    }

    #[test]
    fn start_time_parses() {
        assert!(proc_start_time(std::process::id()).unwrap() > 0);
    }
}
