//! Live migration of a running VM to a new QEMU process on this host ("local" migration:
//! after a QEMU upgrade, or to re-create the process without rebooting the guest).
//!
//! The destination QEMU is started from the very spec the source was started with (the run
//! dir's `spec.json`), with `-incoming defer`, in a staging cgroup and run dir
//! ([`crate::cgroup::staging`]: `.in-<id>`, counted as the instance's by every sweep). It gets
//! the source's own tap and console pipe (duplicated out of the source with `pidfd_getfd`,
//! the tap checked to be the instance's: same bridge port, same filter, no link flap; a
//! paused or not yet running guest's NIC takes no frames, so only one of the two reads it at
//! a time) and, where the host has vsock, another CID (the guest re-reads it on the
//! transport reset QEMU sends after a migration). The disks are the same files: QEMU flushes
//! and lets go of them when the source stops for good, the destination takes them over when
//! it starts.
//!
//! The state goes over a socket pair the daemon hands both QEMUs (`getfd`; no path, no port):
//! pre-copy with auto-converge (the guest's vCPUs are slowed down when it dirties memory
//! faster than the copy goes) and a switchover bounded by `max_downtime_ms`; with `postcopy`,
//! once the first full pass is over, the guest switches over and pulls the pages dirtied
//! since from the source.
//!
//! The source is torn down only once the destination runs. Any failure before that cancels
//! the migration and the guest runs on in the source (resumed if the copy had paused it); the
//! destination and its staging objects are removed. Then the staging cgroup and run dir take
//! the instance's names (`rename`: QEMU's sockets move with their directory), and the new
//! QEMU is pinned, throttled and watched like the old one. A daemon killed in the middle
//! leaves either the source running (the staging objects are swept) or, past the point where
//! the destination ran, the switch to finish: [`VmRuntime::recover_migration`] decides which.

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
/// Longest the destination may take to run once the state is over.
const RUN_DEADLINE: Duration = Duration::from_secs(30);
/// With `postcopy`, the switch comes once the first full pass over the guest's RAM is over
/// (the second dirty-page sync): the total time is about one copy of the RAM, whatever the
/// guest dirties, and pages dirtied since are pulled on demand.
const POSTCOPY_AFTER_PASSES: u64 = 2;
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

/// Moves the running state from `src` to `dst` (started with `-incoming defer`) and waits
/// until the destination runs. On error the migration was cancelled and the source runs
/// again, except after a switch to post-copy (the error says so).
pub fn transfer(
    src: &mut Monitor,
    dst: &mut Monitor,
    ask: &MigrateAsk,
) -> Result<(MigrationStats, bool), VmError> {
    let r = transfer_inner(src, dst, ask);
    if let Err(e) = &r {
        if !matches!(e, VmError::PostcopyLost { .. }) {
            resume_source(src);
        }
    }
    r
}

fn transfer_inner(
    src: &mut Monitor,
    dst: &mut Monitor,
    ask: &MigrateAsk,
) -> Result<(MigrationStats, bool), VmError> {
    let postcopy = [("postcopy-ram", ask.postcopy)];
    if ask.postcopy {
        dst.migration_capabilities(&postcopy)
            .map_err(|e| VmError::Migrate {
                id: ask.id.clone(),
                why: format!(
                "post-copy is not available on this host ({e}): the destination QEMU, running as \
                 the VM's own user, cannot open userfaultfd (QEMU before 8.1 asks the system \
                 call, which vm.unprivileged_userfaultfd=0 refuses; gpuvisor leaves that \
                 host-wide setting alone); migrate without --postcopy"
            ),
            })?;
    }
    src.migration_capabilities(&[("auto-converge", true), postcopy[0]])?;
    src.migration_limits(ask.max_downtime_ms, LOCAL_BANDWIDTH)?;
    let (a, b) = std::os::unix::net::UnixStream::pair().map_err(vio("socketpair"))?;
    dst.getfd(CHANNEL, b.as_raw_fd())?;
    dst.migrate_incoming(&format!("fd:{CHANNEL}"))?;
    src.getfd(CHANNEL, a.as_raw_fd())?;
    src.migrate(&format!("fd:{CHANNEL}"))?;
    // Each QEMU has its own end now.
    drop((a, b));
    let deadline = Instant::now() + MIGRATION_DEADLINE;
    let mut switched = false;
    let stats = loop {
        let st = src.migration_stats()?;
        match st.status.as_str() {
            "completed" => break st,
            "failed" | "cancelled" => {
                let why = st.error.unwrap_or(st.status);
                return Err(if switched {
                    VmError::PostcopyLost { why }
                } else {
                    failed("migrate", why)
                });
            }
            "postcopy-active" | "postcopy-paused" | "postcopy-recover" => switched = true,
            _ => {}
        }
        if ask.postcopy && !switched && st.dirty_sync_count >= POSTCOPY_AFTER_PASSES {
            src.start_postcopy()?;
            switched = true;
        }
        if Instant::now() > deadline {
            if switched {
                return Err(VmError::PostcopyLost {
                    why: "post-copy did not end within its deadline".into(),
                });
            }
            let _ = src.migrate_cancel();
            return Err(failed(
                "migrate",
                format!("did not complete within {MIGRATION_DEADLINE:?}: cancelled"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // The source's guest was running: the destination runs on its own once the state is in.
    let deadline = Instant::now() + RUN_DEADLINE;
    loop {
        if dst.status()?.0 {
            return Ok((stats, switched));
        }
        let st = dst.migration_stats()?;
        if matches!(st.status.as_str(), "failed" | "cancelled") || Instant::now() > deadline {
            let why = st.error.unwrap_or(st.status);
            return Err(if switched {
                VmError::PostcopyLost { why }
            } else {
                failed(
                    "migrate-incoming",
                    format!("the destination did not run: {why}"),
                )
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Cancels what is left of a migration in the source and resumes its guest if the copy
/// paused it (`postmigrate` after a completed copy whose destination never ran, `paused`
/// mid-switchover).
fn resume_source(src: &mut Monitor) {
    if let Ok(st) = src.migration_stats() {
        if matches!(
            st.status.as_str(),
            "setup" | "active" | "pre-switchover" | "device" | "wait-unplug"
        ) {
            let _ = src.migrate_cancel();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match src.migration_stats() {
            Ok(st) if matches!(st.status.as_str(), "cancelling" | "active" | "device") => {}
            _ => break,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match src.status() {
        Ok((false, state)) if state == "postmigrate" || state == "paused" => {
            if let Err(e) = src.resume() {
                tracing::warn!("cannot resume the source of a failed migration: {e}");
            }
        }
        _ => {}
    }
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
        let mut spec = VmSpec::read(&run.dir).map_err(|e| {
            refuse(format!(
                "its start was not recorded ({e}): it was started by an older gpuvisor; restart \
                 it once to make it migratable"
            ))
        })?;
        let Some(net) = spec.net.clone() else {
            return Err(refuse("it has no network device recorded".into()));
        };
        // The destination holds a second copy of the guest's RAM until the source goes.
        let need = spec.memory_limit();
        if let Some(avail) = mem_available(&node.cfg.root) {
            if avail < need {
                return Err(refuse(format!(
                    "the host has {} of memory available and the new QEMU may take up to {} \
                     while both run",
                    gpuvisor_wire::format_size(avail),
                    gpuvisor_wire::format_size(need)
                )));
            }
        }
        // Leftovers of an earlier attempt first.
        self.remove_staged(node, id)?;
        let staged = self.staged_paths(id);
        let r = self.start_destination(
            node, id, old_pid, &run, &staged, &mut spec, net.fd, &ask.cpus,
        );
        let new_pid = match r {
            Ok(pid) => pid,
            Err(e) => {
                let _ = self.remove_staged(node, id);
                return Err(e);
            }
        };
        let started = Instant::now();
        let moved = (|| {
            let mut src = Monitor::connect(&run.qmp(), Duration::from_secs(5))?;
            let mut dst = Monitor::connect(&staged.qmp(), Duration::from_secs(5))?;
            transfer(&mut src, &mut dst, ask)
        })();
        let (stats, postcopy) = match moved {
            Ok(m) => m,
            Err(e) => {
                if matches!(e, VmError::PostcopyLost { .. }) {
                    // Neither half of the guest can run on: both QEMUs go, the instance ends
                    // (its restart policy boots it again from its disks).
                    if cgroup::holds(&node.cfg.root, id, old_pid) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(old_pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
                let _ = self.remove_staged(node, id);
                return Err(e.into());
            }
        };
        let total_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        test_hold_before_switch();
        self.switch_to_staged(node, id, old_pid)?;
        self.adopt_new_qemu(node, id, new_pid, ask)?;
        Ok(MigrationReport {
            instance: id.to_string(),
            node: String::new(),
            downtime_ms: stats.downtime_ms.unwrap_or(0),
            total_ms: stats.total_ms.unwrap_or(total_ms),
            transferred_bytes: stats.transferred,
            dirty_sync_count: stats.dirty_sync_count,
            cpu_throttle_percent: stats.cpu_throttle_percent,
            postcopy,
            old_pid,
            new_pid,
        })
    }

    /// The staging run dir of `id`'s migration destination.
    fn staged_paths(&self, id: &str) -> RunPaths {
        let name = cgroup::staging(id);
        RunPaths::new(self.run_root().join(&name), self.own_root().join(name))
    }

    /// Starts the destination QEMU, paused for the incoming state: `spec` is the source's,
    /// turned to the staging dir, cgroup and descriptors. Returns its pid.
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
        cpus: &[u32],
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
        spec.run = staged.clone();
        spec.seed = spec.seed.as_ref().map(|_| staged.seed());
        spec.vsock_cid = spec.vsock_cid.map(other_cid);
        spec.incoming = Some(Incoming::Defer);
        if let Some(n) = spec.net.as_mut() {
            n.fd = tap.as_raw_fd();
        }
        let staging = cgroup::staging(id);
        let procs = qemu::make_cgroup(&node.cfg.root, &staging, cpus, spec.memory_limit())?;
        let (held, fds) = qemu::open_fds(spec, &node.cfg.root)?;
        let mut keep: Vec<RawFd> = held.iter().map(AsRawFd::as_raw_fd).collect();
        keep.push(tap.as_raw_fd());
        let pid = qemu::spawn(
            &self.cfg.qemu,
            spec,
            &fds,
            output,
            &procs,
            &keep,
            user.as_ref(),
            super::runtime::START_TIMEOUT,
        )?;
        drop((tap, held));
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

    /// The destination runs: the source goes, the staging cgroup and dirs take the
    /// instance's names.
    fn switch_to_staged(&self, node: &Node, id: &str, old_pid: i32) -> Result<(), NodeError> {
        let root = &node.cfg.root;
        if cgroup::holds(root, id, old_pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(old_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        super::runtime::wait_gone(node, old_pid, Duration::from_secs(10));
        let cg = |e: std::io::Error| NodeError::Io {
            path: "/sys/fs/cgroup".into(),
            source: e,
        };
        cgroup::remove_one(root, id).map_err(cg)?;
        cgroup::rename(root, &cgroup::staging(id), id).map_err(cg)?;
        let run = self.run_paths(id);
        let staged = self.staged_paths(id);
        for (dir, new) in [(&run.dir, &staged.dir), (&run.own, &staged.own)] {
            let old = dir.with_file_name(format!(".out-{id}"));
            if dir.exists() {
                std::fs::rename(dir, &old).map_err(vio(dir))?;
            }
            std::fs::rename(new, dir).map_err(vio(new))?;
            std::fs::remove_dir_all(&old).map_err(vio(&old))?;
        }
        Ok(())
    }

    /// What the provisioning of a VM does after QEMU started, for the migrated process.
    fn adopt_new_qemu(
        &self,
        node: &Node,
        id: &str,
        pid: i32,
        ask: &MigrateAsk,
    ) -> Result<(), NodeError> {
        let mut mon = Monitor::connect(&self.run_paths(id).qmp(), Duration::from_secs(5))?;
        mon.balloon_stats_every(super::runtime::BALLOON_STATS_SECS)?;
        let vcpus = mon.vcpus()?;
        qemu::pin_vcpus(&node.cfg.root, pid, &vcpus, &ask.cpus)?;
        if !ask.disk_io.is_unlimited() {
            mon.throttle_disks(&ask.disk_io)?;
        }
        Ok(())
    }

    /// Kills a migration destination of `id` and removes its staging cgroup and dirs (and a
    /// switch's leftovers). Idempotent.
    pub(super) fn remove_staged(&self, node: &Node, id: &str) -> Result<(), VmError> {
        let staging = cgroup::staging(id);
        cgroup::remove_one(&node.cfg.root, &staging).map_err(|source| VmError::Cgroup {
            path: staging.into(),
            source,
        })?;
        let staged = self.staged_paths(id);
        for dir in [
            staged.dir.clone(),
            staged.own.clone(),
            self.run_root().join(format!(".out-{id}")),
            self.own_root().join(format!(".out-{id}")),
        ] {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(vio(&dir)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// After a daemon restart: a migration of `id` that a killed daemon left half done is
    /// finished (the destination had run: the source may not run again on the same disks) or
    /// undone (the source runs on, resumed if the copy had paused it). Returns what it did,
    /// `None` when there was nothing to do.
    pub fn recover_migration(&self, node: &Node, id: &str) -> Option<String> {
        let staged = self.staged_paths(id);
        let out = self.run_root().join(format!(".out-{id}"));
        if !staged.dir.exists() && !staged.own.exists() && !out.exists() {
            return None;
        }
        let staging = cgroup::staging(id);
        let new_pid: Option<i32> =
            std::fs::read_to_string(staged.dir.join(super::runtime::MAIN_PID))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .filter(|&p| cgroup::holds(&node.cfg.root, &staging, p));
        let dest_ran = new_pid.is_some()
            && Monitor::connect(&staged.qmp(), Duration::from_secs(2))
                .and_then(|mut m| m.status())
                .is_ok_and(|(running, _)| running);
        if let (true, Some(pid)) = (dest_ran, new_pid) {
            let old = self.live_pid(node, id).unwrap_or(0);
            let done = self.switch_to_staged(node, id, old).and_then(|()| {
                let cpus = cpus_of(&node.cfg.root, id);
                self.adopt_new_qemu(
                    node,
                    id,
                    pid,
                    &MigrateAsk {
                        id: id.to_string(),
                        postcopy: false,
                        max_downtime_ms: 0,
                        cpus,
                        disk_io: DiskIo::default(),
                    },
                )
            });
            return Some(match done {
                Ok(()) => "a migration cut short by the daemon's end was finished: the VM runs in its new QEMU (disk limits come back at its next start or `instance scale`)".into(),
                Err(e) => format!("a migration cut short by the daemon's end could not be finished: {e}"),
            });
        }
        let _ = self.remove_staged(node, id);
        if self.live_pid(node, id).is_some() {
            if let Ok(mut src) = Monitor::connect(&self.run_paths(id).qmp(), Duration::from_secs(2))
            {
                resume_source(&mut src);
            }
        }
        Some(
            "a migration cut short by the daemon's end was undone: the VM runs on in its QEMU"
                .into(),
        )
    }
}

/// A hidden test hook: with `GPUVISOR_TEST_HOLD_MIGRATION_SWITCH_MS=N` in the daemon's
/// environment, a migration waits N ms between the destination running and the switch, so a
/// test can kill the daemon there. Without it (always, outside tests) it does nothing.
fn test_hold_before_switch() {
    if let Some(ms) = std::env::var("GPUVISOR_TEST_HOLD_MIGRATION_SWITCH_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tracing::warn!("test hook: holding the migration's switch for {ms} ms");
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// `MemAvailable` of the host, bytes.
fn mem_available(root: &crate::HostRoot) -> Option<u64> {
    let text = std::fs::read_to_string(root.path("/proc/meminfo")).ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// The CPUs cgroup `name` is limited to (empty: not pinned).
fn cpus_of(root: &crate::HostRoot, name: &str) -> Vec<u32> {
    let base = root.path("/sys/fs/cgroup");
    let file = if base.join("cgroup.controllers").exists() {
        base.join(cgroup::PARENT).join(name).join("cpuset.cpus")
    } else {
        base.join("cpuset")
            .join(cgroup::PARENT)
            .join(name)
            .join("cpuset.cpus")
    };
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| gpuvisor_wire::parse_cpu_list(t.trim()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

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
