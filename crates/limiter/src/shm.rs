//! The shared accounting region of one instance: two small file-backed `mmap`s that the daemon
//! creates (one pair per instance) and every limited process of that instance maps.
//!
//! Why shared memory: the quota is per instance, not per process (eight data-loader workers share
//! one VRAM budget), and it must be exact at the boundary, so every charge is one
//! compare-and-swap on a counter all processes see. No lock is ever taken: a process killed while
//! holding a lock would block its peers forever.
//!
//! Key decisions:
//! - **Two files, split by who may write them.** The *limits* file ([`Limits`]: quota, share,
//!   priority, the launch spacing, the daemon's utilisation feed and controller state) is written
//!   only by the daemon: owned by root, mode 0644, bound read-only into the instance and mapped
//!   `PROT_READ` by the library, so no process of the instance can raise its own quota or share.
//!   The *usage* file ([`Usage`]: the charge counters, the launch gate, the per-process slots) is
//!   what the processes must write, mode 0666 and bound read-write. A process that forges the
//!   usage file can only do what a process that bypasses the library does (allocate or launch
//!   without being counted); the daemon's outside check (per-process GPU memory from NVML against
//!   the quota) is what stops that, not this file.
//! - **The daemon sets the launch spacing.** The compute-share controller (`throttle`) runs in
//!   the daemon at each utilisation sample ([`Region::publish_sample`]) and writes the spacing into
//!   the limits file; the launch path only reads it. The one input it takes from the writable file,
//!   the launch counter, cannot raise the rate above what the measured utilisation allows for long
//!   (see `throttle::next_interval_guarded`).
//! - **Global counter + per-process slots.** `DeviceUsageState::used` is the authority for
//!   admission (CAS loop: never above quota, even with many writers). Each process also adds what
//!   it holds to its own `Slot`, keyed by pid and process start time, so the usage of a process
//!   that died without cleaning up (SIGKILL) can be subtracted again. Reclaiming is off the hot
//!   path: when a process attaches, before an allocation is refused, and whenever the daemon calls
//!   [`Region::reclaim_dead_with`]. A charge adds to the global counter before the slot and a
//!   release subtracts from the slot first, so a process killed between the two instructions can
//!   only leave the region over-counted (never over quota); reclaiming zeroes the counter when no
//!   process is attached, which removes even that.
//! - **Limits live here, not in the config file**, so the daemon can resize a running instance.
//! - Layouts are `repr(C)` with a magic and a version; every field is an atomic, so a zero-filled
//!   file is a valid (empty) region and no process ever sees a torn value. Hot fields sit on their
//!   own cache lines.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// `GPUVLIML`, little-endian: the limits file.
pub const MAGIC_LIMITS: u64 = u64::from_le_bytes(*b"GPUVLIML");
/// `GPUVLIMU`, little-endian: the usage file.
pub const MAGIC_USAGE: u64 = u64::from_le_bytes(*b"GPUVLIMU");
/// Bumped whenever the layout changes; a library refuses a region of another version.
/// 2: limits and usage split into two files; the daemon runs the controller.
pub const LAYOUT_VERSION: u32 = 2;
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
    pub(crate) fn from_raw(raw: u32) -> Priority {
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

/// Per-GPU limits: written by the daemon only.
#[repr(C, align(64))]
pub(crate) struct DeviceLimits {
    pub(crate) quota: AtomicU64,
    pub(crate) share_bp: AtomicU32,
    /// The instance's own utilisation at the last sample.
    pub(crate) util_bp: AtomicU32,
    /// Utilisation of high-priority instances on the same GPU at the last sample.
    pub(crate) high_util_bp: AtomicU32,
    _pad0: u32,
    pub(crate) sample_seq: AtomicU64,
    /// Minimum spacing of launches for the whole instance; 0 = not throttled.
    pub(crate) interval_ns: AtomicU64,
    /// Controller state: launch counter and time at the last sample.
    pub(crate) ctl_launches: AtomicU64,
    pub(crate) ctl_time_ns: AtomicU64,
    _pad1: u64,
}

/// The limits file (read-only inside the instance).
#[repr(C, align(64))]
pub(crate) struct Limits {
    pub(crate) magic: AtomicU64,
    pub(crate) version: AtomicU32,
    pub(crate) ndev: AtomicU32,
    pub(crate) priority: AtomicU32,
    _pad: [u32; 11],
    pub(crate) devices: [DeviceLimits; MAX_DEVICES],
}

/// Per-GPU counters the processes write.
#[repr(C, align(64))]
pub(crate) struct DeviceUsageState {
    // cache line 1: admission
    pub(crate) used: AtomicU64,
    _pad1: [u64; 7],
    // cache line 2: the launch gate
    pub(crate) tat_ns: AtomicU64,
    pub(crate) launches: AtomicU64,
    _pad2: [u64; 6],
}

#[repr(C, align(64))]
pub(crate) struct Slot {
    pub(crate) pid: AtomicU32,
    _pad0: u32,
    pub(crate) start_time: AtomicU64,
    _pad1: [u64; 6],
    pub(crate) used: [AtomicU64; MAX_DEVICES],
}

/// The usage file (read-write inside the instance).
#[repr(C, align(64))]
pub(crate) struct Usage {
    pub(crate) magic: AtomicU64,
    pub(crate) version: AtomicU32,
    _pad: [u32; 13],
    pub(crate) devices: [DeviceUsageState; MAX_DEVICES],
    pub(crate) slots: [Slot; MAX_SLOTS],
}

/// Size of the limits file in bytes.
pub const LIMITS_BYTES: usize = std::mem::size_of::<Limits>();
/// Size of the usage file in bytes.
pub const USAGE_BYTES: usize = std::mem::size_of::<Usage>();

/// Both halves of a mapped region, as the accounting functions see them.
#[derive(Clone, Copy)]
pub(crate) struct Layout<'a> {
    pub(crate) lim: &'a Limits,
    pub(crate) usage: &'a Usage,
}

impl Layout<'_> {
    pub(crate) fn ndev(&self) -> usize {
        (self.lim.ndev.load(Ordering::Relaxed) as usize).min(MAX_DEVICES)
    }
    pub(crate) fn priority(&self) -> Priority {
        Priority::from_raw(self.lim.priority.load(Ordering::Relaxed))
    }
}

/// Usage of one GPU of the instance, for `gpuvisor instance get` and telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceUsage {
    pub quota_bytes: u64,
    pub used_bytes: u64,
    pub share_bp: u32,
    /// Last utilisation the daemon published, basis points.
    pub util_bp: u32,
    /// Last high-priority utilisation the daemon published for this GPU, basis points.
    pub high_util_bp: u32,
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

/// A shared file mapping of `len` bytes.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(file: &std::fs::File, len: usize, writable: bool) -> io::Result<Mapping> {
        if file.metadata()?.len() < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "limiter region file too small",
            ));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: mapping a file we hold open, shared, no longer than the file; the result is
        // checked for MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(p.cast::<u8>())
            .map(|ptr| Mapping { ptr, len })
            .ok_or_else(|| io::Error::other("mmap returned null"))
    }

    /// # Safety
    /// `T` is a `repr(C)` type made only of atomics and padding, no larger than the mapping.
    unsafe fn get<T>(&self) -> &T {
        // SAFETY: page-aligned live mapping of at least size_of::<T>() bytes (caller), unmapped
        // only in Drop.
        unsafe { self.ptr.cast::<T>().as_ref() }
    }

    /// Keeps the mapping for the life of the process.
    fn leak(self) -> NonNull<u8> {
        let p = self.ptr;
        std::mem::forget(self);
        p
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; no reference outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

fn create_file(
    path: &Path,
    mode: u32,
    len: usize,
) -> io::Result<(std::fs::File, std::path::PathBuf)> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.set_len(len as u64)?;
    Ok((file, tmp))
}

/// A mapped region (both files, writable): the daemon's handle. Cheap to keep open; all methods
/// take `&self` and are safe to call concurrently with the limited processes.
pub struct Region {
    lim: Mapping,
    usage: Mapping,
}

// SAFETY: the mappings are shared memory made only of atomics; every access goes through them.
unsafe impl Send for Region {}
// SAFETY: as above, concurrent access is through atomics only.
unsafe impl Sync for Region {}

impl Region {
    /// Creates (or replaces) the region's files with the given limits and maps them: `limits`
    /// (mode 0644: only its owner, the daemon, writes it; bind it read-only into the instance)
    /// and `usage` (mode 0666: the instance's processes may run as any user). Each is written
    /// under a temporary name and renamed, so a process never maps a half-initialised file.
    pub fn create(limits: &Path, usage: &Path, spec: &RegionSpec) -> io::Result<Region> {
        if spec.devices.is_empty() || spec.devices.len() > MAX_DEVICES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a region holds 1 to {MAX_DEVICES} devices"),
            ));
        }
        let (lf, ltmp) = create_file(limits, 0o644, LIMITS_BYTES)?;
        let (uf, utmp) = create_file(usage, 0o666, USAGE_BYTES)?;
        let region = Region {
            lim: Mapping::new(&lf, LIMITS_BYTES, true)?,
            usage: Mapping::new(&uf, USAGE_BYTES, true)?,
        };
        let l = region.layout();
        for (i, d) in spec.devices.iter().enumerate() {
            l.lim.devices[i]
                .quota
                .store(d.quota_bytes, Ordering::Relaxed);
            l.lim.devices[i]
                .share_bp
                .store(d.share_bp.min(FULL_SHARE_BP), Ordering::Relaxed);
        }
        l.lim
            .ndev
            .store(spec.devices.len() as u32, Ordering::Relaxed);
        l.lim
            .priority
            .store(spec.priority.to_raw(), Ordering::Relaxed);
        l.lim.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        l.lim.magic.store(MAGIC_LIMITS, Ordering::Release);
        l.usage.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        l.usage.magic.store(MAGIC_USAGE, Ordering::Release);
        lf.sync_all()?;
        uf.sync_all()?;
        std::fs::rename(&utmp, usage)?;
        std::fs::rename(&ltmp, limits)?;
        Ok(region)
    }

    /// Maps an existing region (both files writable: the daemon's view), checking magics and
    /// versions.
    pub fn open(limits: &Path, usage: &Path) -> io::Result<Region> {
        let lf = OpenOptions::new().read(true).write(true).open(limits)?;
        let uf = OpenOptions::new().read(true).write(true).open(usage)?;
        let region = Region {
            lim: Mapping::new(&lf, LIMITS_BYTES, true)?,
            usage: Mapping::new(&uf, USAGE_BYTES, true)?,
        };
        check(region.layout())?;
        Ok(region)
    }

    /// Maps a region as a limited process does: the limits file read-only (`PROT_READ`, opened
    /// `O_RDONLY`), the usage file read-write. The mappings are kept for the life of the process.
    pub(crate) fn attach(limits: &Path, usage: &Path) -> io::Result<Layout<'static>> {
        let lf = OpenOptions::new().read(true).open(limits)?;
        let uf = OpenOptions::new().read(true).write(true).open(usage)?;
        let lim = Mapping::new(&lf, LIMITS_BYTES, false)?;
        let use_ = Mapping::new(&uf, USAGE_BYTES, true)?;
        // SAFETY: both are repr(C) types of atomics, and the mappings are at least their size.
        let l = unsafe {
            Layout {
                lim: lim.get::<Limits>(),
                usage: use_.get::<Usage>(),
            }
        };
        check(l)?;
        let (lp, up) = (lim.leak(), use_.leak());
        // SAFETY: as above; the mappings are never unmapped now.
        Ok(unsafe {
            Layout {
                lim: lp.cast::<Limits>().as_ref(),
                usage: up.cast::<Usage>().as_ref(),
            }
        })
    }

    /// Removes the region's files (existing mappings stay valid until unmapped). Idempotent.
    pub fn remove(limits: &Path, usage: &Path) -> io::Result<()> {
        for p in [limits, usage] {
            match std::fs::remove_file(p) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                r => r?,
            }
        }
        Ok(())
    }

    pub(crate) fn layout(&self) -> Layout<'_> {
        // SAFETY: both mappings were made with their type's size and hold only atomics.
        unsafe {
            Layout {
                lim: self.lim.get::<Limits>(),
                usage: self.usage.get::<Usage>(),
            }
        }
    }

    /// Number of devices the region limits.
    pub fn devices(&self) -> usize {
        self.layout().ndev()
    }

    /// Current priority.
    pub fn priority(&self) -> Priority {
        self.layout().priority()
    }

    /// Changes the priority of the instance.
    pub fn set_priority(&self, p: Priority) {
        self.layout()
            .lim
            .priority
            .store(p.to_raw(), Ordering::Relaxed);
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

    /// The daemon's utilisation feed for device `dev`, once per sample (every 100-500 ms), and
    /// one step of the compute-share controller: `util_bp` is the SM utilisation of this
    /// instance's processes (sum over its pids from `nvmlDeviceGetProcessUtilization`),
    /// `high_util_bp` the utilisation of *other, high-priority* instances on the same GPU (0 for
    /// a high-priority instance). Basis points. Sets the launch spacing the library enforces.
    pub fn publish_sample(&self, dev: usize, util_bp: u32, high_util_bp: u32) -> io::Result<()> {
        let d = self.device(dev)?;
        let u = &self.layout().usage.devices[dev];
        let util_bp = util_bp.min(FULL_SHARE_BP);
        d.util_bp.store(util_bp, Ordering::Relaxed);
        d.high_util_bp.store(high_util_bp, Ordering::Relaxed);
        let now = crate::throttle::now_ns();
        let launches = u.launches.load(Ordering::Relaxed);
        let prev_launches = d.ctl_launches.swap(launches, Ordering::Relaxed);
        let prev_time = d.ctl_time_ns.swap(now, Ordering::Relaxed);
        let share = crate::throttle::effective_share(
            self.priority(),
            d.share_bp.load(Ordering::Relaxed),
            high_util_bp,
        );
        if share >= FULL_SHARE_BP {
            d.interval_ns.store(0, Ordering::Relaxed);
        } else if prev_time != 0 && now > prev_time {
            if let Some(iv) = crate::throttle::next_interval_guarded(
                launches.wrapping_sub(prev_launches),
                now - prev_time,
                util_bp,
                share,
                d.interval_ns.load(Ordering::Relaxed),
            ) {
                d.interval_ns.store(iv, Ordering::Relaxed);
            }
        }
        d.sample_seq.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Usage of device `dev`.
    pub fn usage(&self, dev: usize) -> io::Result<DeviceUsage> {
        let d = self.device(dev)?;
        let u = &self.layout().usage.devices[dev];
        Ok(DeviceUsage {
            quota_bytes: d.quota.load(Ordering::Relaxed),
            used_bytes: u.used.load(Ordering::Relaxed),
            share_bp: d.share_bp.load(Ordering::Relaxed),
            util_bp: d.util_bp.load(Ordering::Relaxed),
            high_util_bp: d.high_util_bp.load(Ordering::Relaxed),
            launches: u.launches.load(Ordering::Relaxed),
            interval_ns: d.interval_ns.load(Ordering::Relaxed),
        })
    }

    /// Processes currently attached (pids in the instance's pid namespace).
    pub fn processes(&self) -> Vec<ProcessUsage> {
        let l = self.layout();
        let ndev = self.devices();
        l.usage
            .slots
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

    fn device(&self, dev: usize) -> io::Result<&DeviceLimits> {
        if dev >= self.devices() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no such device in region",
            ));
        }
        Ok(&self.layout().lim.devices[dev])
    }
}

fn check(l: Layout<'_>) -> io::Result<()> {
    if l.lim.magic.load(Ordering::Acquire) != MAGIC_LIMITS
        || l.lim.version.load(Ordering::Relaxed) != LAYOUT_VERSION
        || l.usage.magic.load(Ordering::Acquire) != MAGIC_USAGE
        || l.usage.version.load(Ordering::Relaxed) != LAYOUT_VERSION
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a gpuvisor limiter region of this version",
        ));
    }
    Ok(())
}

/// [`Region::reclaim_dead`] for the library's own leaked mapping.
pub(crate) fn reclaim_local(l: Layout<'_>) -> u64 {
    reclaim(l, process_alive)
}

pub(crate) fn reclaim(l: Layout<'_>, alive: impl Fn(u32, u64) -> bool) -> u64 {
    let mut total = 0;
    let mut attached = 0;
    for s in &l.usage.slots {
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
fn resync_idle(l: Layout<'_>) {
    let ndev = l.ndev();
    for d in &l.usage.devices[..ndev] {
        let seen = d.used.load(Ordering::Acquire);
        if seen == 0 {
            continue;
        }
        if l.usage
            .slots
            .iter()
            .any(|s| s.pid.load(Ordering::Acquire) != 0)
        {
            return;
        }
        let _ = d
            .used
            .compare_exchange(seen, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Returns a slot's usage to the devices and frees it. The caller owns the slot (its own, or
/// one it marked PID_RECLAIMING).
pub(crate) fn release_slot(l: Layout<'_>, s: &Slot) -> u64 {
    let mut total = 0;
    for (dev, u) in s.used.iter().enumerate() {
        let x = u.swap(0, Ordering::AcqRel);
        if x != 0 {
            saturating_sub(&l.usage.devices[dev].used, x);
            total += x;
        }
    }
    s.start_time.store(0, Ordering::Relaxed);
    s.pid.store(0, Ordering::Release);
    total
}

/// Takes a free slot for `pid`; `None` when all are taken.
pub(crate) fn claim_slot<'a>(l: Layout<'a>, pid: u32, start: u64) -> Option<&'a Slot> {
    l.usage.slots.iter().find(|s| {
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
pub(crate) fn try_charge(l: Layout<'_>, slot: Option<&Slot>, dev: usize, bytes: u64) -> bool {
    let d = &l.usage.devices[dev];
    let quota = l.lim.devices[dev].quota.load(Ordering::Relaxed);
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
pub(crate) fn uncharge(l: Layout<'_>, slot: Option<&Slot>, dev: usize, bytes: u64) {
    let give = match slot {
        Some(s) => saturating_sub(&s.used[dev], bytes),
        None => bytes,
    };
    if give != 0 {
        saturating_sub(&l.usage.devices[dev].used, give);
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

    fn paths(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        (dir.join("r.limits"), dir.join("r.usage"))
    }

    #[test]
    fn layout_is_cache_line_aligned() {
        assert_eq!(std::mem::size_of::<DeviceLimits>(), 64);
        assert_eq!(std::mem::size_of::<DeviceUsageState>(), 128);
        assert_eq!(std::mem::size_of::<Slot>(), 128);
        assert_eq!(LIMITS_BYTES % 64, 0);
        assert_eq!(USAGE_BYTES % 64, 0);
    }

    /// `bench/limiter_gpu.py` (the GPU check, which has only Python on the GPU machine) writes
    /// regions and samples at these offsets; keep them in step.
    #[test]
    fn offsets_used_by_the_python_gpu_check() {
        use std::mem::offset_of;
        assert_eq!(offset_of!(Limits, devices), 64);
        assert_eq!(offset_of!(DeviceLimits, quota), 0);
        assert_eq!(offset_of!(DeviceLimits, share_bp), 8);
        assert_eq!(offset_of!(DeviceLimits, util_bp), 12);
        assert_eq!(offset_of!(DeviceLimits, high_util_bp), 16);
        assert_eq!(offset_of!(DeviceLimits, sample_seq), 24);
        assert_eq!(offset_of!(DeviceLimits, interval_ns), 32);
        assert_eq!(offset_of!(DeviceLimits, ctl_launches), 40);
        assert_eq!(offset_of!(DeviceLimits, ctl_time_ns), 48);
        assert_eq!(LIMITS_BYTES, 64 + MAX_DEVICES * 64);
        assert_eq!(offset_of!(Usage, devices), 64);
        assert_eq!(offset_of!(DeviceUsageState, used), 0);
        assert_eq!(offset_of!(DeviceUsageState, launches), 72);
        assert_eq!(offset_of!(Usage, slots), 64 + MAX_DEVICES * 128);
        assert_eq!(USAGE_BYTES, 64 + MAX_DEVICES * 128 + MAX_SLOTS * 128);
    }

    #[test]
    fn create_open_charge_reclaim() {
        let dir = tempfile::tempdir().unwrap();
        let (lp, up) = paths(dir.path());
        let r = Region::create(&lp, &up, &spec(100)).unwrap();
        let r2 = Region::open(&lp, &up).unwrap();
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
        Region::remove(&lp, &up).unwrap();
        Region::remove(&lp, &up).unwrap();
    }

    /// The limits file is the daemon's: 0644, and a process maps it read-only.
    #[test]
    fn limits_are_read_only_to_the_instance() {
        let dir = tempfile::tempdir().unwrap();
        let (lp, up) = paths(dir.path());
        let r = Region::create(&lp, &up, &spec(100)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&lp), mode(&up)), (0o644, 0o666));
        let l = Region::attach(&lp, &up).unwrap();
        assert_eq!(l.lim.devices[0].quota.load(Ordering::Relaxed), 100);
        r.set_limit(
            0,
            DeviceLimit {
                quota_bytes: 7,
                share_bp: 1,
            },
        )
        .unwrap();
        assert_eq!(l.lim.devices[0].quota.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn rejects_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let (lp, up) = paths(dir.path());
        std::fs::write(&lp, vec![0u8; LIMITS_BYTES]).unwrap();
        std::fs::write(&up, vec![0u8; USAGE_BYTES]).unwrap();
        assert!(Region::open(&lp, &up).is_err());
        assert!(Region::attach(&lp, &up).is_err());
    }

    #[test]
    fn start_time_parses() {
        assert!(proc_start_time(std::process::id()).unwrap() > 0);
    }
}
