//! Live migration to another host's gpuvisor (`instance migrate ID --to NODE`): the node's
//! two halves; the daemons carry the bytes and decide (`gpuvisor_control::engine::migration`).
//!
//! QEMU has no network of its own here: every byte goes over descriptors the daemons hand
//! it (`getfd`), whose other ends the daemons relay over the API's TLS connections. Two
//! channels: the root disk's blocks (the destination's QEMU serves its new disk over NBD;
//! the source mirrors the whole disk into it with `blockdev-mirror`, `sync: full`, as the
//! destination's template base need not be the same bytes as ours), and the migration
//! stream. The copy of RAM starts once the mirror is in step (with the guest paused from
//! then on under TCG before QEMU 9.0: [`super::migrate::CopyMode`]); the source pauses before
//! the switchover (`pause-before-switchover`), where the mirror is ended in step (the guest
//! writes nothing more), then QEMU sends the devices' state.
//!
//! The destination is started with `-S`: its guest runs only when its daemon is told the
//! source is done (`run_received`: after the copy completed, or at the switch to post-copy),
//! so up to then a failure leaves the guest whole on the source, which resumes. Volumes are
//! not carried yet (refused by the engine).

use super::migrate::{copy, resume_source, MigrateAsk};
use super::qemu::VmSpec;
use super::qmp::{MigrationStats, Monitor};
use super::runtime::VmRuntime;
use super::{vio, VmError};
use crate::{Node, NodeError};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// The destination's NBD socket, in QEMU's own dir.
pub const NBD_SOCKET: &str = "nbd.sock";
/// The export (and drive) carried: the root disk.
const ROOT: &str = "root";
/// The root disk's block node on the destination (`node-name` of its `-drive`).
pub const ROOT_NODE: &str = "gvroot";
/// The source's NBD node and mirror job.
const MIRROR: &str = "gvmig-root";
/// Descriptor names in the QEMUs.
const DISK_FD: &str = "gvnbd";
const STATE_FD: &str = "gvmig";
/// Longest the mirror may take to be in step before the copy of RAM starts.
const MIRROR_DEADLINE: Duration = Duration::from_secs(10 * 60);
/// Longest the destination may take to have the whole state once the source is done.
const RECEIVE_DEADLINE: Duration = Duration::from_secs(60);
/// No cap: the daemons' TLS connection is the limit.
const BANDWIDTH: u64 = 64 << 30;

/// What the source measured.
#[derive(Debug, Clone)]
pub struct Sent {
    pub stats: MigrationStats,
    /// It switched to post-copy.
    pub postcopy: bool,
    /// The destination was told to run at the switch (else the caller tells it, as after a
    /// pre-copy: the source holds the whole state).
    pub ran_there: bool,
    pub pid: i32,
    /// When the copy paused the guest ([`super::migrate::CopyMode::Paused`]): its downtime
    /// runs until the destination resumes it, which the caller tells it to after a pre-copy.
    pub paused_at: Option<std::time::Instant>,
}

impl Sent {
    /// Told to run now: a guest the copy paused was paused until this moment.
    pub fn run_now(mut self) -> Self {
        if let Some(at) = self.paused_at {
            self.stats.downtime_ms = Some(super::migrate::millis(at.elapsed()));
        }
        self
    }
}

impl VmRuntime {
    /// The source's recorded start, checked as every migration checks it: what the
    /// destination starts its QEMU from.
    pub fn outgoing_spec(&self, node: &Node, id: &str) -> Result<VmSpec, NodeError> {
        let (_, mut spec, _) = self.migratable(node, id)?;
        self.source_shape(id, &mut spec)?;
        if !spec.volumes.is_empty() {
            return Err(VmError::Migrate {
                id: id.to_string(),
                why: "it has volumes, which a migration to another host does not carry yet: \
                      migrate it on this host, or stop it and move its data"
                    .into(),
            }
            .into());
        }
        Ok(spec)
    }

    /// The source's half: mirrors the root disk into `disk` (an NBD connection to the
    /// destination's QEMU) and sends the running state into `state`. `run_destination` is
    /// called once the guest has switched over in post-copy (the destination must run for
    /// the rest to come); otherwise the caller lets it run once this returns. Any error
    /// before the switch leaves the guest running here (mirror ended, NBD node removed,
    /// migration cancelled, guest resumed); an error after it is
    /// [`VmError::PostcopyLost`]. `before_copy` is called once the disk is in step, right
    /// before the RAM copy starts (and, under TCG, the guest pauses): the caller readies the
    /// call that runs the destination (a connection made now is not made in the pause).
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &self,
        node: &Node,
        id: &str,
        ask: &MigrateAsk,
        disk: OwnedFd,
        state: OwnedFd,
        before_copy: &mut dyn FnMut(),
        run_destination: &mut dyn FnMut() -> Result<(), VmError>,
    ) -> Result<Sent, NodeError> {
        let (pid, spec, _) = self.migratable(node, id)?;
        let mut src = Monitor::connect(&self.run_paths(id).qmp(), Duration::from_secs(5))?;
        let mode = super::migrate::CopyMode::of_source(&mut src, &spec.accel);
        let sent = (|| {
            src.getfd(DISK_FD, disk.as_raw_fd())?;
            drop(disk);
            src.blockdev_add_nbd(MIRROR, DISK_FD, ROOT)?;
            src.mirror(MIRROR, ROOT, MIRROR, true)?;
            await_job(&mut src, MIRROR, "ready", MIRROR_DEADLINE)?;
            src.migration_capabilities(&[
                ("auto-converge", true),
                ("postcopy-ram", ask.postcopy),
                ("pause-before-switchover", true),
            ])?;
            src.migration_limits(ask.max_downtime_ms, BANDWIDTH)?;
            src.getfd(STATE_FD, state.as_raw_fd())?;
            drop(state);
            before_copy();
            let paused = mode.start(&mut src, &format!("fd:{STATE_FD}"))?;
            // At the switchover the guest is paused: the mirror ends in step.
            let mut end_mirror = |m: &mut Monitor| -> Result<(), VmError> {
                m.block_job_cancel(MIRROR, false)?;
                await_job(m, MIRROR, "gone", Duration::from_secs(60))
            };
            copy(&mut src, ask, paused, &mut end_mirror, run_destination)
                .map(|(stats, postcopy, ran_there)| (stats, postcopy, ran_there, paused))
        })();
        match sent {
            Ok((stats, postcopy, ran_there, paused_at)) => Ok(Sent {
                stats,
                postcopy,
                ran_there,
                pid,
                paused_at,
            }),
            Err(e @ VmError::PostcopyLost { .. }) => Err(e.into()),
            Err(e) => match keep_source(&mut src) {
                Ok(()) => Err(e.into()),
                Err(r) => Err(VmError::not_resumed(id, e, r).into()),
            },
        }
    }

    /// The source runs on after all (the destination was refused or failed before it ran):
    /// what [`VmRuntime::send`] left is removed and the guest resumes. Ok(false) when no QEMU
    /// of it runs here any more (nothing to resume: the reconciler sees the exit); an error
    /// when it runs and its guest could not be resumed.
    pub fn keep_sent(&self, node: &Node, id: &str) -> Result<bool, NodeError> {
        if self.live_pid(node, id).is_none() {
            return Ok(false);
        }
        let mut src = Monitor::connect(&self.run_paths(id).qmp(), Duration::from_secs(5))?;
        keep_source(&mut src)?;
        Ok(true)
    }

    /// The destination's half, once its QEMU waits (`-incoming defer -S`, provisioned from
    /// the source's spec): the migration stream's channel. Returns the daemon's end.
    pub fn receive_state(&self, id: &str, postcopy: bool) -> Result<OwnedFd, NodeError> {
        let mut dst = Monitor::connect(&self.run_paths(id).qmp(), Duration::from_secs(5))?;
        if postcopy {
            dst.migration_capabilities(&[("postcopy-ram", true)])
                .map_err(|e| VmError::Migrate {
                    id: id.to_string(),
                    why: format!(
                        "post-copy is not available on the destination host ({e}): its QEMU \
                         cannot open userfaultfd (vm.unprivileged_userfaultfd=0); migrate \
                         without --postcopy"
                    ),
                })?;
        }
        let (ours, qemus) = std::os::unix::net::UnixStream::pair().map_err(vio("socketpair"))?;
        dst.getfd(STATE_FD, qemus.as_raw_fd())?;
        dst.migrate_incoming(&format!("fd:{STATE_FD}"))?;
        Ok(ours.into())
    }

    /// The destination's half: a connection to its QEMU's NBD server (the new root disk).
    pub fn receive_disk(&self, id: &str) -> Result<OwnedFd, NodeError> {
        let path = self.run_paths(id).own.join(NBD_SOCKET);
        let s = std::os::unix::net::UnixStream::connect(&path).map_err(vio(&path))?;
        Ok(s.into())
    }

    /// The destination, before its guest may run: waits until the whole state is in (or the
    /// guest has switched over in post-copy and its devices' state is loaded), then gives
    /// the paused VM what provisioning
    /// gives a booted one (pinning, disk limits, balloon statistics). Nothing runs yet: an
    /// error here leaves the guest to the source.
    pub fn ready_received(
        &self,
        node: &Node,
        id: &str,
        cpus: &[u32],
        disk_io: &gpuvisor_wire::DiskIo,
    ) -> Result<(), NodeError> {
        let refuse = |why: String| -> NodeError {
            VmError::Migrate {
                id: id.to_string(),
                why,
            }
            .into()
        };
        let Some(pid) = self.live_pid(node, id) else {
            return Err(refuse("the destination QEMU is not running".into()));
        };
        let mut dst = Monitor::connect(&self.run_paths(id).qmp(), Duration::from_secs(5))?;
        let asked = Instant::now();
        let deadline = asked + RECEIVE_DEADLINE;
        loop {
            if dst.status()?.0 {
                break; // asked again after it ran
            }
            let st = dst.migration_stats()?;
            match st.status.as_str() {
                "completed" | "postcopy-active" => break,
                "failed" | "cancelled" => {
                    return Err(refuse(format!(
                        "the destination could not load the state: {}",
                        st.error.unwrap_or(st.status)
                    )))
                }
                _ if Instant::now() > deadline => {
                    return Err(refuse(format!(
                        "the destination did not have the whole state within \
                         {RECEIVE_DEADLINE:?} of the source's end (status {})",
                        st.status
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        // Post-copy is `postcopy-active` from its LISTEN on, before the devices' state (the
        // package that follows) is loaded: nothing is set on a device, and nothing resumed,
        // until the runstate has left `inmigrate` (paused, as `-S` leaves it).
        loop {
            let (running, state) = dst.status()?;
            if running || state != "inmigrate" {
                break;
            }
            if Instant::now() > deadline {
                return Err(refuse(format!(
                    "the destination had not loaded the devices' state within \
                     {RECEIVE_DEADLINE:?} of the source's end"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let loaded = Instant::now();
        dst.balloon_stats_every(super::runtime::BALLOON_STATS_SECS)?;
        let vcpus = dst.vcpus()?;
        super::qemu::pin_vcpus(&node.cfg.root, pid, &vcpus, cpus)?;
        if !disk_io.is_unlimited() {
            dst.throttle_disks(disk_io)?;
        }
        tracing::info!(
            id,
            state_wait_ms = super::migrate::millis(loaded - asked),
            setup_ms = super::migrate::millis(loaded.elapsed()),
            "received state loaded; pinned and throttled"
        );
        Ok(())
    }

    /// The destination's guest runs (after [`VmRuntime::ready_received`] and once the
    /// engine has recorded that it does): the NBD server stops (the mirror ended before the
    /// switchover) and the guest resumes.
    pub fn resume_received(&self, id: &str) -> Result<(), NodeError> {
        let mut dst = Monitor::connect(&self.run_paths(id).qmp(), Duration::from_secs(5))?;
        if dst.status()?.0 {
            return Ok(());
        }
        let _ = dst.nbd_stop();
        dst.resume()?;
        Ok(())
    }

    /// Whether the source's copy went whole (completed, or switched to post-copy): from then
    /// on the destination may have run the guest. True when QEMU cannot say (unsure is
    /// taken as "may have"), and for a failed migration that had post-copy on (QEMU ends a
    /// post-copy whose return path broke as `failed`: it may have switched).
    pub fn sent_whole(&self, id: &str) -> bool {
        let Ok(mut m) = Monitor::connect(&self.run_paths(id).qmp(), Duration::from_secs(5)) else {
            return true;
        };
        match m.migration_stats().map(|st| st.status) {
            Ok(st) if before_any_switch(&st) => false,
            Ok(st) if matches!(st.as_str(), "failed" | "cancelling" | "cancelled") => {
                m.migration_capability("postcopy-ram").unwrap_or(true)
            }
            _ => true,
        }
    }

    /// The migration status of the instance's QEMU (`query-migrate`: `none`, `active`,
    /// `postcopy-active`, `postcopy-paused`, `completed`, `failed`, …; on a destination, its
    /// incoming migration's): None where no QEMU of it runs, an error where it runs and its
    /// monitor did not answer.
    pub fn migration_status(&self, node: &Node, id: &str) -> Result<Option<String>, String> {
        if self.live_pid(node, id).is_none() {
            return Ok(None);
        }
        self.qmp_migration_status(id)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    fn qmp_migration_status(&self, id: &str) -> Result<String, VmError> {
        Monitor::connect(&self.run_paths(id).qmp(), Duration::from_secs(5))
            .and_then(|mut m| m.migration_stats())
            .map(|st| st.status)
    }
}

/// A source's migration status from which no destination can have run the guest: none
/// begun, or under way before any switch (one that ended `failed` or `cancelled` may have
/// switched to post-copy first).
fn before_any_switch(status: &str) -> bool {
    status == "none" || super::migrate::copy_under_way(status)
}

/// Turns `spec` (made on this host for the instance) into the shape of the source's QEMU
/// `src`: the same vCPUs, memory, room to grow, kernel command line and devices, waiting for
/// the state (`-incoming defer -S`). What cannot match is refused.
pub(super) fn receive_into(spec: &mut VmSpec, src: &VmSpec) -> Result<(), VmError> {
    let refuse = |why: String| VmError::Migrate {
        id: spec.id.clone(),
        why,
    };
    if src.gpus.is_some() {
        return Err(refuse("it has passed-through GPUs".into()));
    }
    if std::mem::discriminant(&src.accel) != std::mem::discriminant(&spec.accel) {
        return Err(refuse(format!(
            "it runs under {} and this host's VMs under {}",
            src.accel.describe(),
            spec.accel.describe()
        )));
    }
    if src.vsock_cid.is_some() != spec.vsock_cid.is_some() {
        return Err(refuse(
            "its vsock device and this host's /dev/vhost-vsock do not match (one has it, the \
             other not)"
                .into(),
        ));
    }
    let mac = |s: &VmSpec| s.net.as_ref().map(|n| n.mac.clone());
    if mac(src) != mac(spec) {
        return Err(refuse(format!(
            "its network card's address {:?} is not the one made here ({:?})",
            mac(src),
            mac(spec)
        )));
    }
    // The destination charged what the instance asked for: the source's QEMU must be that.
    if src.vcpus != spec.vcpus || src.memory >> 20 != spec.memory >> 20 {
        return Err(refuse(format!(
            "its QEMU has {} vCPUs and {} MiB, not the instance's {} and {} MiB",
            src.vcpus,
            src.memory >> 20,
            spec.vcpus,
            spec.memory >> 20
        )));
    }
    if src.max_vcpus < src.vcpus
        || src.max_memory < src.memory
        || src.max_vcpus > super::resize::MAX_VCPUS
        || src.max_memory > super::resize::MAX_MEMORY
    {
        return Err(refuse(
            "its room to grow is smaller than its size or beyond any VM's".into(),
        ));
    }
    if !super::qemu::known_ram_pad(src.ram_pad) {
        return Err(refuse(format!(
            "its RAM beyond its size ({} bytes) is not one this host makes",
            src.ram_pad
        )));
    }
    if let Some(why) = super::qemu::older_qemu(src.qemu_version, spec.qemu_version) {
        return Err(refuse(why));
    }
    if let Some(m) = src
        .machine
        .as_deref()
        .filter(|m| !super::qemu::known_machine(m))
    {
        return Err(refuse(format!(
            "its machine type {m:?} is not one this host starts"
        )));
    }
    if !src.volumes.is_empty() || src.root_size != spec.root_size {
        return Err(refuse(
            "its disks are not the instance's here (volumes are not carried; the root disk's \
             size differs)"
                .into(),
        ));
    }
    spec.vcpus = src.vcpus;
    spec.memory = src.memory;
    spec.max_vcpus = src.max_vcpus;
    spec.max_memory = src.max_memory;
    spec.ram_pad = src.ram_pad;
    spec.machine = src.machine.clone();
    spec.cmdline = src.cmdline.clone();
    // This host's CID for the id, or the other one where the source has it (both run at
    // once, on one machine too); never one the offer chose. The guest re-reads it.
    spec.vsock_cid = spec.vsock_cid.map(|mine| {
        if src.vsock_cid == Some(mine) {
            super::migrate::other_cid(mine)
        } else {
            mine
        }
    });
    spec.incoming = Some(super::qemu::Incoming::Held);
    Ok(())
}

/// Waits until job `id` is `want` (`gone`: no longer listed); an error names the job's.
fn await_job(mon: &mut Monitor, id: &str, want: &str, wait: Duration) -> Result<(), VmError> {
    let deadline = Instant::now() + wait;
    loop {
        let jobs = mon.job_states()?;
        let job = jobs.iter().find(|(j, _, _)| j == id);
        match job {
            None if want == "gone" => return Ok(()),
            None => return Err(mirror_failed("it ended before it was in step")),
            Some((_, status, Some(err))) if status == "concluded" || status == "aborting" => {
                return Err(mirror_failed(err));
            }
            Some((_, status, _)) if status == want => return Ok(()),
            Some((_, status, _)) if status == "concluded" => {
                let _ = mon.job_dismiss(id);
            }
            Some(_) => {}
        }
        if Instant::now() > deadline {
            return Err(mirror_failed(format!("it was not {want} within {wait:?}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mirror_failed(why: impl std::fmt::Display) -> VmError {
    VmError::QmpCommand {
        command: "blockdev-mirror".into(),
        message: why.to_string(),
    }
}

/// Cancels what a failed send left in the source (migration, mirror, NBD node) and resumes
/// its guest. Each step on its own; the answer is the resume's.
fn keep_source(src: &mut Monitor) -> Result<(), VmError> {
    let resumed = resume_source(src);
    // A later snapshot's migration into a file must not stop before its switchover.
    let _ = src.migration_capabilities(&[("pause-before-switchover", false)]);
    if src
        .job_states()
        .is_ok_and(|j| j.iter().any(|(id, _, _)| id == MIRROR))
    {
        let _ = src.block_job_cancel(MIRROR, true);
        let _ = await_job(src, MIRROR, "gone", Duration::from_secs(30));
    }
    let _ = src.blockdev_del(MIRROR);
    resumed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::qemu::tests::spec;
    use crate::vm::qemu::Incoming;
    use crate::vm::Accel;

    /// What this host made for the instance: its own paths, fds and CID, booted its way.
    fn here() -> VmSpec {
        let mut s = spec();
        s.volumes.clear();
        s.max_vcpus = 8;
        s.max_memory = 8 << 30;
        s.cmdline = "made here".into();
        s.kernel = "/here/vmlinuz".into();
        s.root = "/here/root.qcow2".into();
        s.vsock_cid = Some(7);
        s.qemu_version = Some((10, 0));
        s
    }

    fn source() -> VmSpec {
        let mut s = spec();
        s.volumes.clear();
        s.max_vcpus = 4;
        s.max_memory = 2 << 30;
        s.vsock_cid = Some(9);
        s.kernel = "/there/vmlinuz".into();
        s.root = "/there/root.qcow2".into();
        s
    }

    #[test]
    fn the_destination_takes_the_sources_shape_and_keeps_its_own_files() {
        let (src, mut mine) = (source(), here());
        receive_into(&mut mine, &src).unwrap();
        assert_eq!((mine.max_vcpus, mine.max_memory), (4, 2 << 30));
        assert_eq!(mine.cmdline, src.cmdline);
        assert_eq!(mine.incoming, Some(Incoming::Held));
        // The source's RAM length, padded or not (its state loads only into that).
        assert_eq!(mine.ram_pad, 0);
        let mut padded = source();
        padded.ram_pad = crate::vm::qemu::TCG_RAM_PAD;
        let mut p = here();
        receive_into(&mut p, &padded).unwrap();
        assert_eq!(p.ram_pad, crate::vm::qemu::TCG_RAM_PAD);
        // The source's machine (its state loads into no other), this host's QEMU version.
        let mut older = source();
        older.machine = Some("pc-q35-7.2".into());
        older.qemu_version = Some((7, 2));
        let mut up = here();
        receive_into(&mut up, &older).unwrap();
        assert_eq!(up.machine.as_deref(), Some("pc-q35-7.2"));
        assert_eq!(up.qemu_version, Some((10, 0)));
        // This host's CID, never the offer's; flipped when the source has the same.
        assert_eq!(mine.vsock_cid, Some(7));
        let mut same = source();
        same.vsock_cid = Some(7);
        let mut flipped = here();
        receive_into(&mut flipped, &same).unwrap();
        assert_eq!(flipped.vsock_cid, Some(super::super::migrate::other_cid(7)));
        // Never a path of the offer's.
        assert_eq!(mine.kernel, here().kernel);
        assert_eq!(mine.root, here().root);
        assert_eq!(mine.run, here().run);
        assert_eq!(mine.net, here().net);
    }

    #[test]
    fn what_cannot_match_is_refused() {
        type Change = Box<dyn Fn(&mut VmSpec)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "GPUs",
                Box::new(|s| {
                    s.gpus = Some(crate::vm::qemu::GpuPassthrough {
                        args: vec!["-device".into(), "vfio-pci,host=0000:01:00.0".into()],
                        ovmf_code: "/x".into(),
                        ovmf_vars: "/y".into(),
                    })
                }),
            ),
            ("accelerator", Box::new(|s| s.accel = Accel::Kvm)),
            ("vsock", Box::new(|s| s.vsock_cid = None)),
            (
                "MAC",
                Box::new(|s| s.net.as_mut().unwrap().mac = "02:00:00:00:00:01".into()),
            ),
            ("vCPUs", Box::new(|s| s.vcpus = 3)),
            ("memory", Box::new(|s| s.memory = 4 << 30)),
            ("room", Box::new(|s| s.max_memory = 1 << 20)),
            ("room beyond any VM", Box::new(|s| s.max_vcpus = 100_000)),
            (
                "volumes",
                Box::new(|s| s.volumes = vec![("data".into(), "/etc/shadow".into())]),
            ),
            ("root size", Box::new(|s| s.root_size += 1)),
            ("RAM padding", Box::new(|s| s.ram_pad = 1 << 30)),
            (
                "machine type",
                Box::new(|s| s.machine = Some("pc-q35-7.2,kernel=/etc/shadow".into())),
            ),
            ("machine type", Box::new(|s| s.machine = Some("q35".into()))),
            ("newer QEMU", Box::new(|s| s.qemu_version = Some((11, 0)))),
        ];
        for (what, change) in cases {
            let mut src = source();
            change(&mut src);
            let mut mine = here();
            let before = mine.clone();
            assert!(receive_into(&mut mine, &src).is_err(), "{what} accepted");
            assert_eq!(mine, before, "{what}: changed although refused");
        }
    }
}
