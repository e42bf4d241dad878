//! Live migration of a running VM to a new QEMU process on this host ("local" migration:
//! to re-create the process without rebooting the guest, e.g. after a QEMU package update of
//! the same version; the machine type and CPU model are not pinned across QEMU versions).
//!
//! The destination QEMU is started from the very spec the source was started with (the run
//! dir's `spec.json`), held (`-incoming defer -S`: it runs the guest only once the daemon has
//! written the `took-over` mark and resumed it), with staging run dirs ([`staging`]: `.in-<id>`,
//! counted as the instance's by every sweep), in the instance's own cgroup (cgroup v2 cannot
//! rename one), whose memory limit is doubled until the source is gone; its vCPUs are pinned
//! as soon as it has started, its other threads (those that receive the state) run on the
//! host's reserved CPUs where there are some ([`qemu::CpuPins`]). It gets the source's
//! own tap and console pipe (duplicated out of the source with `pidfd_getfd`, the tap checked
//! to be the instance's: same bridge port, same filter, no link flap; a paused or not yet
//! running guest's NIC takes no frames, so only one of the two reads it at a time) and, where
//! the host has vsock, another CID (the guest re-reads it on the transport reset QEMU sends
//! after a migration). The disks are the same files: QEMU flushes and lets go of them when
//! the source stops for good, the destination takes them over when it starts.
//!
//! The state goes over a socket pair the daemon hands both QEMUs (`getfd`; no path, no port):
//! pre-copy with auto-converge (the guest's vCPUs are slowed down when it dirties memory
//! faster than the copy goes) and a switchover bounded by `max_downtime_ms`; with `postcopy`,
//! once the first full pass is over, the guest switches over and pulls the pages dirtied
//! since from the source. Under TCG with QEMU before 9.0 the copy is live only for a guest
//! whose RAM is padded off the dirty sync's fast path and has none plugged
//! ([`CopyMode::Paused`]: that fast path loses guest writes during a live copy there);
//! otherwise the guest pauses for the whole copy, or, with `postcopy`, until it switches
//! over, at once.
//!
//! The source is torn down only once the destination runs (`VmRuntime::finish_switch`, each
//! step safe to take again). Any failure before that stops the destination first, then
//! cancels the migration and resumes the source if the copy had paused it. A daemon killed in
//! the middle leaves a phase the dirs tell ([`VmRuntime::recover_migration`]): finished when
//! the destination had run (the source may not run again on the same disks), else undone.

use super::qemu::{self, Incoming, RunPaths, VmSpec};
use super::qmp::{MigrationStats, Monitor};
use super::runtime::VmRuntime;
use super::{vio, VmError};
use crate::{cgroup, Node, NodeError};
use gpuvisor_wire::{DiskIo, MigrationReport};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// What the engine asks of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateAsk {
    /// The instance (for errors).
    pub id: String,
    pub postcopy: bool,
    /// The longest pause of the guest at the switchover.
    pub max_downtime_ms: u64,
    /// The host CPUs the instance is pinned to, and its disk limits: the new QEMU gets them.
    pub cpus: Vec<u32>,
    pub disk_io: DiskIo,
}

/// Longest a whole migration may take before it is cancelled (the guest runs on).
const MIGRATION_DEADLINE: Duration = Duration::from_secs(10 * 60);
/// Longest a restarted daemon waits for a post-copy the QEMUs carried on alone.
const POSTCOPY_RECOVERY_WAIT: Duration = Duration::from_secs(120);
/// Longest the destination may take to run once the state is over.
const RUN_DEADLINE: Duration = Duration::from_secs(30);
/// With `postcopy`, the switch comes once the first full pass over the guest's RAM is over
/// (the second dirty-page sync): the total time is about one copy of the RAM, whatever the
/// guest dirties, and pages dirtied since are pulled on demand.
const POSTCOPY_AFTER_PASSES: u64 = 2;
/// How the guest's RAM is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// While the guest runs: pre-copy passes over what it dirtied, bounded by the downtime.
    Live,
    /// With the guest paused from the start of the copy (with post-copy: until the switch,
    /// which comes at once). Under TCG QEMU can lose guest writes during a live copy: 7.2's
    /// dirty-bitmap sync has a fast path for a RAM block whose length is a whole number of
    /// bitmap words (64 pages, 256 KiB) that clears the words without resetting TCG's TLB,
    /// so a page whose TLB entry is already writable is written again without being marked
    /// dirty, and the destination keeps the page's older copy. Hot kernel pages (free lists,
    /// per-CPU lists, `struct page`s) are the ones lost, and the guest crashes minutes later.
    /// QEMU 9.0 ("physmem: Fix migration dirty bitmap coherency with TCG memory access")
    /// resets the TLB on that path, once per block, but for the block's offset within itself
    /// rather than within QEMU's RAM address space (still so in 10.0): only a block at
    /// offset 0 is covered. The daemon puts the boot RAM there ([`super::qemu::MAIN_RAM`],
    /// created before virtio-mem's block), so from 9.0 on it is copied live while nothing is
    /// plugged (virtio-mem's block lies above it). The page-by-page path, for a block of any
    /// other length, resets the TLB page by page, in every version: a guest whose boot RAM
    /// is not a whole number of words (`VmSpec::ram_pad`, before 9.0) and has no RAM
    /// plugged since (virtio-mem's block is whole 2 MiB blocks) is copied live too. KVM's
    /// dirty log does not go through that TLB.
    Paused,
}

/// The length in bytes of RAM whose dirty bits QEMU syncs by whole words (64 pages).
const DIRTY_WORD_BYTES: u64 = 64 << 12;

/// What QEMU says of a guest's RAM, for [`CopyMode::choose`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RamLayout {
    /// Boot RAM and RAM plugged since, bytes (`query-memory-size-summary`).
    pub base: u64,
    pub plugged: u64,
    /// Where the boot RAM's block starts in QEMU's RAM address space (`x-query-ramblock`);
    /// None where QEMU did not say.
    pub main_offset: Option<u64>,
}

impl CopyMode {
    /// The mode for a guest under `accel` in a QEMU of `version` (major, minor; None: it did
    /// not say, taken as one with the bug) whose RAM is `ram` (None: unknown, taken as whole
    /// words off offset 0).
    ///
    /// Under TCG the page-by-page path's first dirty sync resets TCG's TLB once per page
    /// (every page is dirty then), under QEMU's big lock: the guest stalls for about 0.3 s
    /// per GiB here. A paused copy pays that too, inside its pause (post-copy included), so
    /// padded RAM is copied live either way. The fast path of 9.0 on resets it once.
    pub(super) fn choose(
        accel: &super::Accel,
        version: Option<(i64, i64)>,
        ram: Option<RamLayout>,
    ) -> Self {
        let fixed = version.is_some_and(|v| v >= super::qemu::TCG_DIRTY_SYNC_FIXED);
        match accel {
            super::Accel::Kvm => CopyMode::Live,
            super::Accel::Tcg { .. }
                if ram.is_some_and(|r| {
                    r.plugged == 0
                        && (!r.base.is_multiple_of(DIRTY_WORD_BYTES)
                            || (fixed && r.main_offset == Some(0)))
                }) =>
            {
                CopyMode::Live
            }
            super::Accel::Tcg { .. } => CopyMode::Paused,
        }
    }

    /// The mode for the guest of the source QEMU `src` runs, started under `accel`.
    pub(super) fn of_source(src: &mut Monitor, accel: &super::Accel) -> Self {
        let (version, ram) = match accel {
            super::Accel::Kvm => (None, None),
            super::Accel::Tcg { .. } => (
                src.qemu_version().ok(),
                src.memory_sizes().ok().map(|(base, plugged)| RamLayout {
                    base,
                    plugged,
                    main_offset: src.ram_block_offset(super::qemu::MAIN_RAM).ok().flatten(),
                }),
            ),
        };
        Self::choose(accel, version, ram)
    }

    /// Starts the copy into `uri` on `src` (migration capabilities and limits set): pauses
    /// the guest first where the copy is not live, and answers when it did.
    pub(super) fn start(self, src: &mut Monitor, uri: &str) -> Result<Option<Instant>, VmError> {
        let paused = match self {
            CopyMode::Live => None,
            CopyMode::Paused => {
                src.pause()?;
                Some(Instant::now())
            }
        };
        src.migrate(uri)?;
        Ok(paused)
    }
}

/// The migration channel is a local socket: no bandwidth cap.
const LOCAL_BANDWIDTH: u64 = 64 << 30;
/// The name both QEMUs know the channel by.
const CHANNEL: &str = "gvmig";

fn failed(command: &str, message: impl std::fmt::Display) -> VmError {
    VmError::QmpCommand {
        command: command.to_string(),
        message: message.to_string(),
    }
}

/// A copy of descriptor `fd` of process `pid` (`pidfd_open` + `pidfd_getfd`; the daemon is
/// root, QEMU its child).
pub fn take_fd(pid: i32, fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and no flags; it returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let pidfd = RawFd::try_from(pidfd).map_err(std::io::Error::other)?;
    // SAFETY: `pidfd` was just returned by the kernel and is owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number of that process and no flags; it
    // returns a new descriptor (close-on-exec) or -1.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let got = RawFd::try_from(got).map_err(std::io::Error::other)?;
    // SAFETY: a new descriptor from the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(got) })
}

/// Whether `fd` is a tap attached to interface `name` (`TUNGETIFF`): what the source QEMU
/// holds under the number it was given is checked before the destination gets it.
pub fn check_tap(fd: &OwnedFd, name: &str) -> std::io::Result<()> {
    const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
    let mut ifr = [0u8; 40];
    // SAFETY: TUNGETIFF writes a `struct ifreq` (40 bytes on Linux) into the buffer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF as _, ifr.as_mut_ptr()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let end = ifr[..16].iter().position(|&b| b == 0).unwrap_or(16);
    let got = String::from_utf8_lossy(&ifr[..end]);
    if got != name {
        return Err(std::io::Error::other(format!(
            "the source's network descriptor is tap {got:?}, not {name:?}"
        )));
    }
    Ok(())
}

/// The destination's vsock CID: the source's with bit 28 flipped (CIDs are 3 + 28 bits of the
/// id, so the two never meet another VM's).
pub fn other_cid(cid: u32) -> u32 {
    let n = cid.wrapping_sub(3);
    3 + (n ^ (1 << 28))
}

/// Moves the running state from `src` to `dst` (started held: `-incoming defer -S`) and
/// lets the guest run there. Returns QEMU's figures and whether it ended in post-copy. The
/// destination never runs the guest on its own: it is resumed here, once it has the devices'
/// state (the whole state after a pre-copy; at the switch in post-copy), right after the
/// `took_over` mark is written: from that mark on the source never runs again, and without it
/// the destination has not run. An error after the switch to post-copy is
/// [`VmError::PostcopyLost`]; any other leaves the rollback to the caller (the destination
/// must be stopped before the source resumes).
pub fn transfer(
    src: &mut Monitor,
    dst: &mut Monitor,
    ask: &MigrateAsk,
    mode: CopyMode,
    took_over: &std::path::Path,
) -> Result<(MigrationStats, bool), VmError> {
    let postcopy = [("postcopy-ram", ask.postcopy)];
    if ask.postcopy {
        dst.migration_capabilities(&postcopy)
            .map_err(|e| VmError::Migrate {
                id: ask.id.clone(),
                why: format!(
                    "post-copy is not available on this host ({e}): the destination QEMU, \
                     running as the VM's own user, cannot open userfaultfd (this QEMU asks the \
                     system call, which vm.unprivileged_userfaultfd=0 refuses to unprivileged \
                     users; gpuvisor leaves that host-wide setting alone); migrate without \
                     --postcopy"
                ),
            })?;
    }
    src.migration_capabilities(&[
        ("auto-converge", true),
        postcopy[0],
        ("pause-before-switchover", false),
    ])?;
    src.migration_limits(ask.max_downtime_ms, LOCAL_BANDWIDTH)?;
    let (a, b) = std::os::unix::net::UnixStream::pair().map_err(vio("socketpair"))?;
    dst.getfd(CHANNEL, b.as_raw_fd())?;
    dst.migrate_incoming(&format!("fd:{CHANNEL}"))?;
    src.getfd(CHANNEL, a.as_raw_fd())?;
    let paused = mode.start(src, &format!("fd:{CHANNEL}"))?;
    // Each QEMU has its own end now.
    drop((a, b));
    // At the post-copy switch the guest must run there for its pages to come.
    let mut run_there = || run_held(dst, took_over, false);
    let (mut stats, switched, began) = copy(src, ask, paused, &mut |_| Ok(()), &mut run_there)?;
    if !began {
        // The whole state is there: the guest runs there from now on.
        run_held(dst, took_over, true).map_err(|e| lost(switched, e))?;
        if let Some(at) = paused {
            stats.downtime_ms = Some(millis(at.elapsed()));
        }
    }
    Ok((stats, switched))
}

/// Lets a held destination run the guest once it has the devices' state (`whole`: once it
/// has loaded the whole state, after a pre-copy), the `took_over` mark written first. Ok at
/// once where it runs already (resumed by an earlier call).
fn run_held(dst: &mut Monitor, took_over: &std::path::Path, whole: bool) -> Result<(), VmError> {
    let deadline = Instant::now() + RUN_DEADLINE;
    loop {
        let (running, state) = dst.status()?;
        if running {
            return Ok(());
        }
        let st = dst.migration_stats()?;
        let ready = if whole {
            st.status == "completed"
        } else {
            // Post-copy is active from its LISTEN on, before the devices' state (the package
            // that follows) is loaded: not resumed until the run state has left `inmigrate`.
            (st.status == "completed" || st.status.starts_with("postcopy")) && state != "inmigrate"
        };
        if ready {
            std::fs::write(took_over, b"").map_err(vio(took_over))?;
            return dst.resume();
        }
        if matches!(st.status.as_str(), "failed" | "cancelled") || Instant::now() > deadline {
            let why = st.error.unwrap_or(st.status);
            return Err(failed(
                "migrate-incoming",
                format!("the destination did not take the guest: {why}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A migration status of a copy under way before any switch to the destination (what a
/// cancel stops with the source's guest whole).
pub(super) fn copy_under_way(status: &str) -> bool {
    matches!(
        status,
        "setup" | "active" | "pre-switchover" | "device" | "wait-unplug"
    )
}

/// Once the guest runs on the destination with pages still on the source, no error leaves
/// a guest to roll back to.
fn lost(switched: bool, e: VmError) -> VmError {
    if switched {
        VmError::PostcopyLost { why: e.to_string() }
    } else {
        e
    }
}

/// Drives the migration `src` has begun until it completes: switches to post-copy after
/// the first full pass when asked; at `pre-switchover` (when the source asked to pause
/// there) calls `switchover` with the guest paused, then lets it go on; calls
/// `postcopy_began` once the guest has switched to the destination in post-copy (seen
/// active). Returns QEMU's figures, whether it switched to post-copy and whether the
/// destination was let run then (an error after the switch is [`VmError::PostcopyLost`]).
pub(super) fn copy(
    src: &mut Monitor,
    ask: &MigrateAsk,
    paused: Option<Instant>,
    switchover: &mut dyn FnMut(&mut Monitor) -> Result<(), VmError>,
    postcopy_began: &mut dyn FnMut() -> Result<(), VmError>,
) -> Result<(MigrationStats, bool, bool), VmError> {
    let mut switched = false;
    let mut continued = false;
    let mut began = false;
    // A guest paused for the copy switches to post-copy at once: its pause ends when it runs
    // on the destination, not after a pass over its RAM.
    let postcopy_after = if paused.is_some() {
        1
    } else {
        POSTCOPY_AFTER_PASSES
    };
    // Where the copy paused the guest, its downtime is from that pause until the destination
    // may run (the switch to post-copy, or the end of the copy), not QEMU's figure.
    let mut ran_at = None;
    let mut switch_at: Option<Instant> = None;
    let deadline = Instant::now() + MIGRATION_DEADLINE;
    loop {
        let mut st = src.migration_stats().map_err(|e| lost(switched, e))?;
        match st.status.as_str() {
            // A post-copy whose last pages went before this loop saw it active: the source
            // holds the whole state, so the caller lets the destination run (or not) as after
            // a pre-copy.
            "completed" => {
                if let Some(at) = paused {
                    let ran = ran_at.unwrap_or_else(Instant::now);
                    st.downtime_ms = Some(millis(ran.saturating_duration_since(at)));
                }
                return Ok((st, switched, began));
            }
            "failed" | "cancelled" | "postcopy-paused" => {
                let why = st.error.unwrap_or(st.status);
                return Err(lost(switched, failed("migrate", why)));
            }
            "pre-switchover" if !continued => {
                let t = Instant::now();
                switchover(src).map_err(|e| lost(switched, e))?;
                src.migrate_continue().map_err(|e| lost(switched, e))?;
                continued = true;
                tracing::info!(
                    id = ask.id,
                    switchover_ms = millis(t.elapsed()),
                    "migration at its switchover: the source's part done, continued"
                );
            }
            "postcopy-active" | "postcopy-recover" => {
                switched = true;
                if !began {
                    began = true;
                    let active = Instant::now();
                    postcopy_began().map_err(|e| lost(true, e))?;
                    ran_at = Some(Instant::now());
                    tracing::info!(
                        id = ask.id,
                        active_after_ms = switch_at.map(|t| millis(active - t)),
                        destination_ran_after_ms = millis(active.elapsed()),
                        "post-copy: the guest switched over"
                    );
                }
            }
            _ => {}
        }
        if ask.postcopy && !switched && st.dirty_sync_count >= postcopy_after {
            src.start_postcopy().map_err(|e| lost(true, e))?;
            switched = true;
            switch_at = Some(Instant::now());
        }
        if Instant::now() > deadline {
            if !switched {
                let _ = src.migrate_cancel();
            }
            return Err(lost(
                switched,
                failed(
                    "migrate",
                    format!("did not complete within {MIGRATION_DEADLINE:?}: cancelled"),
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Cancels what is left of a migration in the source and resumes its guest if the copy
/// paused it (`postmigrate` after a completed copy whose destination never ran, `paused`
/// mid-switchover). Only once the destination is stopped for good. Ok once the guest runs
/// again, or is in a state that no resume changes (suspended by its own kernel, shut down,
/// panicked: as it was before the migration); an error says why it is still paused.
pub(super) fn resume_source(src: &mut Monitor) -> Result<(), VmError> {
    // Afresh: a command that timed out on this connection (a `stop` flushing the disks) may
    // still have its reply on the way.
    src.reconnect()?;
    if let Ok(st) = src.migration_stats() {
        if copy_under_way(&st.status) {
            let _ = src.migrate_cancel();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match src.migration_stats() {
            Ok(st) if matches!(st.status.as_str(), "cancelling" | "active" | "device") => {}
            _ => break,
        }
        if Instant::now() > deadline {
            return Err(failed(
                "migrate_cancel",
                "the copy was still being cancelled after 30 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (running, state) = src.status()?;
    if running || !source_resumes(&state) {
        return Ok(());
    }
    src.resume()?;
    match src.status()? {
        (true, _) => Ok(()),
        (false, state) if !source_resumes(&state) => Ok(()),
        (false, state) => Err(failed(
            "cont",
            format!("the guest is still {state} after `cont`"),
        )),
    }
}

/// A source's run state that a migration left and a `cont` ends: paused for the copy or at
/// its switchover, or done sending (`postmigrate`, `finish-migrate`).
fn source_resumes(state: &str) -> bool {
    matches!(state, "paused" | "postmigrate" | "finish_migrate")
}

/// Why a switch to the new QEMU did not complete.
enum Unfinished {
    /// The new QEMU runs the guest: the next daemon start completes the switch.
    Pending(NodeError),
    /// The new QEMU ended after it took the guest over: the guest is lost.
    Lost(NodeError),
}

/// Where a cut-short migration stands, from what is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing staged.
    None,
    /// A destination was being started or fed: its run dir is still the staging one.
    Staged,
    /// The switch had begun (the staging run dir has taken the instance's name, or the
    /// instance's own was set aside): only the switch is left to finish.
    Switching,
}

impl VmRuntime {
    /// See the module doc. `id` runs on this host; returns what the migration measured.
    pub(super) fn migrate_local(
        &self,
        node: &Node,
        id: &str,
        ask: &MigrateAsk,
    ) -> Result<MigrationReport, NodeError> {
        let refuse = |why: String| -> NodeError {
            VmError::Migrate {
                id: id.to_string(),
                why,
            }
            .into()
        };
        let (old_pid, mut spec, net) = self.migratable(node, id)?;
        let run = self.run_paths(id);
        // The destination holds a second copy of the guest's RAM until the source goes.
        let limit = spec.memory_limit();
        if let Some(avail) = node.cfg.root.mem_available() {
            if avail < limit {
                return Err(refuse(format!(
                    "the host has {} of memory available and the new QEMU may take up to {} \
                     while both run",
                    gpuvisor_wire::format_size(avail),
                    gpuvisor_wire::format_size(limit)
                )));
            }
        }
        // Leftovers of an earlier attempt: judged as a restarted daemon judges them (a
        // destination that had the guest is finished, not killed), never blindly undone; then
        // this request is refused (its QEMU, its guest's state may have changed).
        if self.phase(id) != Phase::None {
            let what = self
                .recover_migration(node, ask)
                .unwrap_or_else(|| "nothing to do".into());
            tracing::warn!(id, "an earlier migration's leftovers: {what}");
            return Err(refuse(format!(
                "an earlier migration of it was left half done and has just been settled \
                 ({what}): look at the instance and migrate it again"
            )));
        }
        self.source_shape(id, &mut spec)?;
        let here = self.qemu_version();
        if let Some(why) = qemu::older_qemu(spec.qemu_version, here) {
            return Err(refuse(why));
        }
        // The new process runs in this host's QEMU.
        spec.qemu_version = here;
        // Nothing staged: any other QEMU in its cgroup is a stray, and the limit one VM's.
        self.undo(node, id, old_pid, Some(limit), ask)?;
        let staged = self.staged_paths(id);
        // Both QEMUs in the instance's own cgroup (a cgroup cannot be renamed on cgroup v2),
        // its memory limit doubled until the source is gone.
        let pins = self.pins(node, &ask.cpus);
        let procs = qemu::make_cgroup(&node.cfg.root, id, &pins, limit.saturating_mul(2))?;
        let r = self.start_destination(
            node, id, old_pid, &run, &staged, &mut spec, net.fd, &procs, &pins,
        );
        drop(procs);
        let new_pid = match r {
            Ok(pid) => pid,
            Err(e) => {
                let _ = self.undo(node, id, old_pid, Some(limit), ask);
                return Err(e);
            }
        };
        let started = Instant::now();
        let mut src = match Monitor::connect(&run.qmp(), Duration::from_secs(5)) {
            Ok(m) => m,
            Err(e) => {
                let _ = self.undo(node, id, old_pid, Some(limit), ask);
                return Err(e.into());
            }
        };
        let mode = CopyMode::of_source(&mut src, &spec.accel);
        let moved = Monitor::connect(&staged.qmp(), Duration::from_secs(5))
            .and_then(|mut dst| transfer(&mut src, &mut dst, ask, mode, &took_over_mark(&staged)));
        let (stats, postcopy) = match moved {
            Ok(m) => m,
            Err(e @ VmError::PostcopyLost { .. }) => {
                // Neither half of the guest can run on: both QEMUs go, the instance ends
                // (its restart policy boots it again from its disks).
                self.lose_guest(node, id, Some(limit), ask);
                return Err(e.into());
            }
            Err(e) => {
                // The destination first: one that has the whole state takes over after all;
                // else it is stopped for good before the source may resume.
                let took = dest_took_over(&staged);
                tracing::warn!(
                    id,
                    "live migration failed: {e}; the destination took over: {took}"
                );
                if took {
                    let st = src.migration_stats().unwrap_or_default();
                    (st, false)
                } else {
                    if let Err(u) = self.undo(node, id, old_pid, Some(limit), ask) {
                        return Err(VmError::SwitchIncomplete {
                            id: id.to_string(),
                            why: format!(
                                "the migration failed ({e}) and its destination could not be \
                                 removed ({u}); the next daemon start undoes it"
                            ),
                        }
                        .into());
                    }
                    if let Err(r) = resume_source(&mut src) {
                        return Err(VmError::not_resumed(id, e, r).into());
                    }
                    return Err(e.into());
                }
            }
        };
        drop(src);
        tracing::info!(id, new_pid, postcopy, status = %stats.status, "live migration copied; switching");
        let total_ms = millis(started.elapsed());
        test_hold("switch");
        if let Err(u) = self.finish_or_lose(node, id, new_pid, Some(limit), ask) {
            let why = match u {
                Unfinished::Pending(e) => format!(
                    "its guest runs in the new QEMU (pid {new_pid}) but the switch to it did \
                     not complete: {e}; the next daemon start completes it"
                ),
                Unfinished::Lost(e) => format!(
                    "the new QEMU (pid {new_pid}) ended right after it took the guest over \
                     ({e}): the guest is lost and the instance restarts from its disks"
                ),
            };
            return Err(VmError::SwitchIncomplete {
                id: id.to_string(),
                why,
            }
            .into());
        }
        Ok(MigrationReport {
            instance: id.to_string(),
            node: String::new(),
            downtime_ms: stats.downtime_ms.unwrap_or(0),
            total_ms: stats.total_ms.unwrap_or(total_ms),
            transferred_bytes: stats.transferred,
            dirty_sync_count: stats.dirty_sync_count,
            cpu_throttle_percent: stats.cpu_throttle_percent,
            postcopy,
            paused_copy: mode == CopyMode::Paused,
            old_pid,
            new_pid,
        })
    }

    /// The checks every live migration makes of `id` first; its QEMU's pid, the spec it was
    /// started from and its network device.
    pub(super) fn migratable(
        &self,
        node: &Node,
        id: &str,
    ) -> Result<(i32, VmSpec, qemu::NetDev), NodeError> {
        let refuse = |why: String| -> NodeError {
            VmError::Migrate {
                id: id.to_string(),
                why,
            }
            .into()
        };
        let Some(old_pid) = self.live_pid(node, id) else {
            return Err(refuse(
                "its QEMU is not running: only a running VM migrates".into(),
            ));
        };
        let run = self.run_paths(id);
        if run.dir.join("OVMF_VARS.fd").exists() {
            return Err(NodeError::Unsupported {
                kind: gpuvisor_wire::RuntimeKind::Vm,
                what: "live migration of a VM with passed-through GPUs (VFIO migration needs \
                       vendor support): stop it and start it again instead"
                    .into(),
            });
        }
        if super::resize::Sizes::read(&run.dir)?.resized() {
            return Err(refuse(
                "it was resized while running (hot-plugged vCPUs or memory): restart it once \
                 (`instance stop` and `start`) before migrating it"
                    .into(),
            ));
        }
        let spec = VmSpec::read(&run.dir).map_err(|e| {
            refuse(format!(
                "its start was not recorded ({e}): it was started by an older gpuvisor; restart \
                 it once to make it migratable"
            ))
        })?;
        let Some(net) = spec.net.clone() else {
            return Err(refuse("it has no network device recorded".into()));
        };
        Ok((old_pid, spec, net))
    }

    /// What the source QEMU of `id` runs, into `spec` (its recorded start): the machine type,
    /// which the running state loads into only (whatever this host's QEMU starts by default
    /// now: after an upgrade, the new QEMU starts the old machine), and its version.
    pub(super) fn source_shape(&self, id: &str, spec: &mut VmSpec) -> Result<(), NodeError> {
        let refuse = |e: VmError| VmError::Migrate {
            id: id.to_string(),
            why: format!("its QEMU does not say which machine it runs: {e}"),
        };
        let mut m =
            Monitor::connect(&self.run_paths(id).qmp(), Duration::from_secs(5)).map_err(refuse)?;
        spec.machine = Some(m.machine_type().map_err(refuse)?);
        // The version recorded at its start where QEMU does not say.
        spec.qemu_version = m.qemu_version().ok().or(spec.qemu_version);
        Ok(())
    }

    /// The staging run dir of `id`'s migration destination.
    fn staged_paths(&self, id: &str) -> RunPaths {
        let name = staging(id);
        RunPaths::new(self.run_root().join(&name), self.own_root().join(name))
    }

    fn retired(&self, id: &str) -> [std::path::PathBuf; 2] {
        let name = format!("{RETIRED}{id}");
        [self.run_root().join(&name), self.own_root().join(name)]
    }

    /// Starts the destination QEMU, paused for the incoming state: `spec` is the source's,
    /// turned to the staging dir and descriptors; it joins the instance's cgroup (`procs`).
    /// Returns its pid.
    #[allow(clippy::too_many_arguments)]
    fn start_destination(
        &self,
        node: &Node,
        id: &str,
        old_pid: i32,
        run: &RunPaths,
        staged: &RunPaths,
        spec: &mut VmSpec,
        tap_fd: RawFd,
        procs: &[OwnedFd],
        pins: &qemu::CpuPins,
    ) -> Result<i32, NodeError> {
        let user = self.vm_user(node, id, false)?;
        for dir in [&staged.dir, &staged.own] {
            std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
                .create(dir)
                .map_err(vio(dir))?;
        }
        if let Some(u) = &user {
            std::os::unix::fs::chown(&staged.own, Some(u.uid), Some(u.gid))
                .map_err(vio(&staged.own))?;
        }
        // What the run dir holds besides QEMU's sockets: the same for the new process.
        for f in ["boot.json", "volumes", "seed.iso", super::resize::SIZES] {
            let from = run.dir.join(f);
            if from.exists() {
                std::fs::copy(&from, staged.dir.join(f)).map_err(vio(&from))?;
            }
        }
        let tap = take_fd(old_pid, tap_fd).map_err(vio("the source's tap (pidfd_getfd)"))?;
        check_tap(&tap, &node.net.tap_name(id)).map_err(vio("the source's tap"))?;
        let output = take_fd(old_pid, 1).map_err(vio("the source's output (pidfd_getfd)"))?;
        check_fifo(&output).map_err(vio("the source's output"))?;
        spec.run = staged.clone();
        spec.seed = spec.seed.as_ref().map(|_| staged.seed());
        spec.vsock_cid = spec.vsock_cid.map(other_cid);
        spec.incoming = Some(Incoming::Held);
        if let Some(n) = spec.net.as_mut() {
            n.fd = tap.as_raw_fd();
        }
        let (held, fds) = qemu::open_fds(spec, &node.cfg.root)?;
        let mut keep: Vec<RawFd> = held.iter().map(AsRawFd::as_raw_fd).collect();
        keep.push(tap.as_raw_fd());
        let pid = qemu::spawn(
            &self.cfg.qemu,
            spec,
            &fds,
            output,
            procs,
            &keep,
            user.as_ref(),
            &pins.emulator,
            super::runtime::START_TIMEOUT,
        )?;
        drop((tap, held));
        // Its vCPUs on the VM's CPUs before any of them runs the guest.
        let vcpus = Monitor::connect(&staged.qmp(), Duration::from_secs(5))?.vcpus()?;
        qemu::pin_vcpus(&node.cfg.root, pid, &vcpus, &pins.vcpus)?;
        std::os::unix::fs::chown(&staged.own, Some(0), Some(0)).map_err(vio(&staged.own))?;
        let pid_file = staged.dir.join(super::runtime::MAIN_PID);
        std::fs::write(&pid_file, format!("{pid}\n")).map_err(vio(&pid_file))?;
        // What a later migration starts from: this process's spec, as it will be named.
        let mut kept = spec.clone();
        kept.run = run.clone();
        kept.seed = kept.seed.as_ref().map(|_| run.seed());
        kept.incoming = None;
        kept.write(&staged.dir)?;
        Ok(pid)
    }

    /// The destination (`new_pid`) runs the guest: it becomes the instance's QEMU. Each step
    /// can be taken again after a crash, and the set-aside and staging dirs (what tells a
    /// restarted daemon a switch is under way) go last: the new pid is recorded as the
    /// instance's first (so nothing sees the instance without a live QEMU), every other
    /// process of the instance's cgroup is killed and waited for, the staging dirs take the
    /// instance's names, the memory limit comes back to one VM's (`limit`, when known), and the
    /// new QEMU is pinned, throttled and watched.
    fn finish_switch(
        &self,
        node: &Node,
        id: &str,
        new_pid: i32,
        limit: Option<u64>,
        ask: &MigrateAsk,
    ) -> Result<(), NodeError> {
        let run = self.run_paths(id);
        let staged = self.staged_paths(id);
        if run.dir.exists() {
            let f = run.dir.join(super::runtime::MAIN_PID);
            std::fs::write(&f, format!("{new_pid}\n")).map_err(vio(&f))?;
        }
        self.kill_qemus(node, id, Some(new_pid))?;
        test_hold("rename");
        let retired = self.retired(id);
        for ((dir, new), old) in [(&run.dir, &staged.dir), (&run.own, &staged.own)]
            .into_iter()
            .zip(&retired)
        {
            if !new.exists() {
                continue;
            }
            if dir.exists() {
                std::fs::rename(dir, old).map_err(vio(dir))?;
            }
            std::fs::rename(new, dir).map_err(vio(new))?;
        }
        // The mark came along with the staging dir: done with.
        let _ = std::fs::remove_file(took_over_mark(&run));
        if let Some(limit) = limit {
            qemu::make_cgroup(&node.cfg.root, id, &self.pins(node, &ask.cpus), limit)?;
        }
        let mut mon = Monitor::connect(&run.qmp(), Duration::from_secs(5))?;
        // A later snapshot's migration into a file must not carry post-copy.
        mon.migration_capabilities(&[("postcopy-ram", false)])?;
        mon.balloon_stats_every(super::runtime::BALLOON_STATS_SECS)?;
        let vcpus = mon.vcpus()?;
        qemu::pin_vcpus(&node.cfg.root, new_pid, &vcpus, &ask.cpus)?;
        if !ask.disk_io.is_unlimited() {
            mon.throttle_disks(&ask.disk_io)?;
        }
        self.remove_staged_dirs(id)?;
        Ok(())
    }

    /// [`Self::finish_switch`], tried twice. Where the new QEMU has ended meanwhile the guest
    /// is lost: every QEMU of the instance is killed (the old one, paused and older than what
    /// the new one wrote to the disks, must not stay as the instance's process) and the
    /// staged dirs go, so the reconciler sees the instance's end.
    fn finish_or_lose(
        &self,
        node: &Node,
        id: &str,
        new_pid: i32,
        limit: Option<u64>,
        ask: &MigrateAsk,
    ) -> Result<(), Unfinished> {
        let Err(e) = self
            .finish_switch(node, id, new_pid, limit, ask)
            .or_else(|_| self.finish_switch(node, id, new_pid, limit, ask))
        else {
            return Ok(());
        };
        if cgroup::holds(&node.cfg.root, id, new_pid) {
            return Err(Unfinished::Pending(e));
        }
        self.lose_guest(node, id, limit, ask);
        Err(Unfinished::Lost(e))
    }

    /// The guest is lost (neither QEMU may run it on): every QEMU of the instance killed,
    /// the staged dirs removed, the memory limit back to one VM's (when known). Best effort:
    /// the reconciler then sees the instance's end and its restart policy acts.
    fn lose_guest(&self, node: &Node, id: &str, limit: Option<u64>, ask: &MigrateAsk) {
        let _ = self.kill_qemus(node, id, None);
        let _ = self.remove_staged_dirs(id);
        if let Some(limit) = limit {
            let _ = qemu::make_cgroup(&node.cfg.root, id, &self.pins(node, &ask.cpus), limit);
        }
    }

    /// Undoes a migration that did not get the guest: every other process of the instance's
    /// cgroup than the source (`keep`) killed and waited for, the memory limit back to one
    /// VM's (when known), the staging dirs removed.
    fn undo(
        &self,
        node: &Node,
        id: &str,
        keep: i32,
        limit: Option<u64>,
        ask: &MigrateAsk,
    ) -> Result<(), VmError> {
        self.kill_qemus(node, id, Some(keep))?;
        if let Some(limit) = limit {
            qemu::make_cgroup(&node.cfg.root, id, &self.pins(node, &ask.cpus), limit)?;
        }
        self.remove_staged_dirs(id)
    }

    /// SIGKILLs every process in instance `id`'s cgroup but `keep` (only QEMU runs there: the
    /// destination, or the source), and waits until they are gone: an error names one that is
    /// not (its memory is still charged, the limit may not come down yet).
    fn kill_qemus(&self, node: &Node, id: &str, keep: Option<i32>) -> Result<(), VmError> {
        let doomed: Vec<i32> = cgroup::pids(&node.cfg.root, id)
            .into_iter()
            .filter(|&p| Some(p) != keep)
            .collect();
        match super::runtime::kill_and_wait(node, id, &doomed, Duration::from_secs(10)).first() {
            Some(p) => Err(VmError::Migrate {
                id: id.to_string(),
                why: format!("its other QEMU (pid {p}) did not end within 10 s of SIGKILL"),
            }),
            None => Ok(()),
        }
    }

    /// Removes the set-aside and staging dirs of `id`, the staging run dir last (while it
    /// exists a restarted daemon sees a migration to finish or undo). Idempotent.
    pub(super) fn remove_staged_dirs(&self, id: &str) -> Result<(), VmError> {
        let staged = self.staged_paths(id);
        for dir in self.retired(id).into_iter().chain([staged.own, staged.dir]) {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(vio(&dir)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    fn phase(&self, id: &str) -> Phase {
        let staged = self.staged_paths(id);
        if staged.dir.exists() {
            Phase::Staged
        } else if staged.own.exists() || self.retired(id).iter().any(|d| d.exists()) {
            Phase::Switching
        } else {
            Phase::None
        }
    }

    /// After a daemon restart: a migration of `id` that a killed daemon left half done is
    /// finished (the destination had run: the source may not run again on the same disks; a
    /// post-copy still going is waited for) or undone (the source runs on, resumed if the
    /// copy had paused it). `ask` has the instance's CPUs and disk limits. Returns what it
    /// did, `None` when there was nothing to do.
    pub fn recover_migration(&self, node: &Node, ask: &MigrateAsk) -> Option<String> {
        let id = ask.id.as_str();
        let phase = self.phase(id);
        if phase == Phase::None {
            return None;
        }
        let run = self.run_paths(id);
        let staged = self.staged_paths(id);
        // Unknown (neither spec readable): the limit is left as it is rather than guessed.
        let limit = VmSpec::read(&staged.dir)
            .or_else(|_| VmSpec::read(&run.dir))
            .ok()
            .map(|s| s.memory_limit());
        let read_pid = |dir: &std::path::Path| -> Option<i32> {
            super::runtime::pid_in(dir).filter(|&p| cgroup::holds(&node.cfg.root, id, p))
        };
        let finish = |new_pid: i32| -> String {
            match self.finish_or_lose(node, id, new_pid, limit, ask) {
                Ok(()) => "a migration cut short by the daemon's end was finished: the VM runs in its new QEMU".into(),
                Err(Unfinished::Pending(e)) => format!("a migration cut short by the daemon's end could not be finished: {e}"),
                Err(Unfinished::Lost(e)) => format!("a migration cut short by the daemon's end had given the guest to its new QEMU, which ended ({e}): the guest is lost and the instance restarts from its disks"),
            }
        };
        if phase == Phase::Switching {
            // The instance's run dir is the destination's already.
            return Some(match read_pid(&run.dir) {
                Some(p) => finish(p),
                None => "a migration cut short by the daemon's end left no QEMU running: the instance restarts".into(),
            });
        }
        let new_pid = read_pid(&staged.dir);
        // The switch had begun (the new pid recorded as the instance's), or the destination
        // has the guest (running, or paused with the whole state: the QEMUs may have finished
        // the copy on their own while no daemon ran).
        let begun = new_pid.is_some() && read_pid(&run.dir) == new_pid;
        if let Some(p) = new_pid.filter(|_| begun || dest_took_over(&staged)) {
            if let Some(lost) = self.await_postcopy(node, id, &staged) {
                return Some(lost);
            }
            return Some(finish(p));
        }
        // Resumed there after a paused copy, and gone since: the guest ran there, so the
        // source (older than what the destination wrote to the disks) must not run again.
        if took_over_mark(&staged).exists() {
            self.lose_guest(node, id, limit, ask);
            return Some(
                "a migration cut short by the daemon's end had resumed the guest in its new QEMU, \
                 which is gone: the guest is lost and the instance restarts from its disks"
                    .into(),
            );
        }
        // The source is the QEMU the run dir names.
        let source = read_pid(&run.dir).filter(|p| Some(*p) != new_pid);
        if let Err(e) = self.undo(node, id, source.unwrap_or(0), limit, ask) {
            return Some(format!(
                "a migration cut short by the daemon's end could not be undone: {e}"
            ));
        }
        match source {
            Some(_) => {
                let resumed = Monitor::connect(&run.qmp(), Duration::from_secs(2))
                    .and_then(|mut src| resume_source(&mut src));
                Some(match resumed {
                    Ok(()) => "a migration cut short by the daemon's end was undone: the VM runs on in its QEMU".into(),
                    Err(e) => format!("a migration cut short by the daemon's end was undone, but its guest could not be resumed ({e}): it stays paused in its QEMU (stop and start the instance)"),
                })
            }
            None => Some("a migration cut short by the daemon's end left no QEMU running: the instance restarts".into()),
        }
    }

    /// A post-copy still pulling pages from the source: waited for (the source must live
    /// until it is done). `Some` when it failed: both QEMUs killed, the guest lost.
    fn await_postcopy(&self, node: &Node, id: &str, staged: &RunPaths) -> Option<String> {
        let mut dst = Monitor::connect(&staged.qmp(), Duration::from_secs(2)).ok()?;
        let deadline = Instant::now() + POSTCOPY_RECOVERY_WAIT;
        loop {
            let st = dst.migration_stats().ok()?;
            if !st.status.starts_with("postcopy") {
                return None;
            }
            if st.status == "postcopy-paused" || Instant::now() > deadline {
                let _ = self.kill_qemus(node, id, None);
                let _ = self.remove_staged_dirs(id);
                return Some(format!(
                    "a post-copy migration cut short by the daemon's end failed ({}): the guest is lost and restarts",
                    st.status
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether the destination in `staged` has taken the guest over. It is held (`-S`): it ran
/// only if the daemon resumed it, which it does only after writing the `took-over` mark. So:
/// the mark says it has the guest (running: resumed again if that `cont` did not take; or not
/// any more); without it, one that has the whole state takes it now (the source stopped for
/// good when its copy completed): mark, then resume; any other (unreachable, or still
/// loading) never ran the guest, and the source may resume once it is killed.
fn dest_took_over(staged: &RunPaths) -> bool {
    let mark = took_over_mark(staged);
    let connect = || Monitor::connect(&staged.qmp(), Duration::from_secs(2));
    if mark.exists() {
        if let Ok(mut dst) = connect() {
            if matches!(dst.status(), Ok((false, state)) if state == "paused") {
                let _ = dst.resume();
            }
        }
        return true;
    }
    let Ok(mut dst) = connect() else {
        return false;
    };
    match dst.migration_stats() {
        Ok(st) if st.status == "completed" => {
            if std::fs::write(&mark, b"").is_err() {
                return false;
            }
            if let Err(e) = dst.resume() {
                tracing::warn!("resuming a destination that has the whole state: {e}");
            }
            true
        }
        _ => false,
    }
}

/// Written in the destination's staging run dir right before the daemon resumes a guest its
/// copy paused: from then on the source must never run again.
fn took_over_mark(staged: &RunPaths) -> std::path::PathBuf {
    staged.dir.join("took-over")
}

/// Whether `fd` is an anonymous pipe (the log relay's): what the source holds as its stdout is
/// checked before the destination gets it (and its pre-exec gives it to the VM's user): a
/// named FIFO somewhere would not pass.
fn check_fifo(fd: &OwnedFd) -> std::io::Result<()> {
    const PIPEFS_MAGIC: libc::__fsword_t = 0x5049_5045;
    let st = nix::sys::stat::fstat(fd).map_err(std::io::Error::from)?;
    let fs = nix::sys::statfs::fstatfs(fd).map_err(std::io::Error::from)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO || fs.filesystem_type().0 != PIPEFS_MAGIC {
        return Err(std::io::Error::other(
            "the source's stdout is not an anonymous pipe",
        ));
    }
    Ok(())
}

/// The staging name of `id`'s destination run dirs until the switch (every sweep counts it as
/// the instance's: [`owner`]).
pub fn staging(id: &str) -> String {
    format!("{STAGING}{id}")
}

const STAGING: &str = ".in-";
/// The instance's own run dirs, set aside during the switch.
const RETIRED: &str = ".out-";

/// The instance a run dir name belongs to (its own, or its migration's staged or retired one).
pub fn owner(name: &str) -> &str {
    name.strip_prefix(STAGING)
        .or_else(|| name.strip_prefix(RETIRED))
        .unwrap_or(name)
}

/// A hidden test hook: with `GPUVISOR_TEST_HOLD_MIGRATION=<point>:<ms>` in the daemon's
/// environment, a migration waits that long at `point` (`switch`: the destination runs, the
/// switch not begun; `rename`: the new pid recorded and the source killed, the dirs not yet
/// renamed), so a test can kill the daemon there. Without it (always, outside tests) it does
/// nothing.
fn test_hold(point: &str) {
    let Ok(v) = std::env::var("GPUVISOR_TEST_HOLD_MIGRATION") else {
        return;
    };
    if let Some(ms) = v
        .strip_prefix(point)
        .and_then(|r| r.strip_prefix(':'))
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        tracing::warn!("test hook: holding the migration at {point} for {ms} ms");
        std::thread::sleep(Duration::from_millis(ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under TCG the copy pauses the guest unless its RAM keeps the sync off the fast path
    /// (boot RAM not whole 256 KiB words, none plugged) or its QEMU has the dirty-bitmap fix
    /// (9.0 on) and the boot RAM's block is the one it covers (at offset 0, none plugged);
    /// under KVM it is live.
    #[test]
    fn a_tcg_guest_is_copied_paused_unless_qemu_keeps_every_write() {
        use crate::vm::Accel;
        let tcg = Accel::Tcg {
            reason: "test".into(),
        };
        let ram = |base: u64, plugged: u64, main_offset: Option<u64>| {
            Some(RamLayout {
                base,
                plugged,
                main_offset,
            })
        };
        let pad = crate::vm::qemu::TCG_RAM_PAD;
        assert_eq!(CopyMode::choose(&Accel::Kvm, None, None), CopyMode::Live);
        assert_eq!(
            CopyMode::choose(&Accel::Kvm, Some((7, 2)), ram(512 << 20, 0, Some(1 << 30))),
            CopyMode::Live
        );
        for version in [
            None,
            Some((7, 2)),
            Some((8, 2)),
            Some((9, 0)),
            Some((10, 0)),
        ] {
            let fixed = version.is_some_and(|v| v >= (9, 0));
            for (layout, live) in [
                (None, false),
                (ram(512 << 20, 0, None), false),
                (ram(512 << 20, 0, Some(1 << 30)), false),
                (ram((512 << 20) + (256 << 10), 0, Some(1 << 30)), false),
                (ram((512 << 20) + pad, 128 << 20, Some(0)), false),
                (ram(512 << 20, 128 << 20, Some(0)), false),
                (ram((512 << 20) + pad, 0, None), true),
                (ram((512 << 20) + pad, 0, Some(1 << 30)), true),
                (ram(512 << 20, 0, Some(0)), fixed),
            ] {
                let want = if live {
                    CopyMode::Live
                } else {
                    CopyMode::Paused
                };
                assert_eq!(
                    CopyMode::choose(&tcg, version, layout),
                    want,
                    "{version:?} {layout:?}"
                );
            }
        }
    }

    #[test]
    fn the_destination_cid_differs_and_flips_back() {
        for cid in [3u32, 3 + 0x0abc_def0, 3 + (1 << 28) - 1] {
            let o = other_cid(cid);
            assert_ne!(o, cid);
            assert!(o >= 3);
            assert_eq!(other_cid(o), cid);
        }
    }

    #[test]
    fn a_descriptor_of_our_own_process_is_taken_and_a_non_tap_is_refused() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let got = take_fd(std::process::id() as i32, f.as_raw_fd()).unwrap();
        assert_ne!(got.as_raw_fd(), f.as_raw_fd());
        let err = check_tap(&got, "gvt0").unwrap_err();
        assert!(err.raw_os_error().is_some(), "{err}");
        assert!(take_fd(std::process::id() as i32, 9999).is_err());
    }
}
