//! A VM's snapshots ([`crate::snapshot`] has the layout and the reasons behind it).
//!
//! Disks only: the guest agent freezes the guest's filesystems (when the guest has an agent;
//! else the snapshot is crash-consistent, and says so), one QMP `transaction` starts a backup
//! job per disk into targets the daemon created and hands QEMU as descriptors (`add-fd`), the
//! guest is thawed at once and runs on while QEMU copies (copy-before-write keeps every copy
//! at the transaction's instant). The root disk's job copies only what the overlay holds
//! (`sync: top`) into a qcow2 over the snapshot's own link of the template base; volumes are
//! copied whole (their holes stay holes).
//!
//! With the running state (`--memory`): the guest is paused, its state migrated into a file
//! (`fd:` URI: one pass of its RAM, however fast it dirtied memory), QEMU having flushed and
//! released its disks they are copied as files, then the guest resumes (on every path). The
//! guest is paused for the state's write and the disk copies (measured in docs/bench).
//!
//! A restore or clone copies `root.qcow2` as the instance's new overlay; a restore of the
//! running state starts QEMU with `-incoming fd:N` on `memory.bin` and waits until the guest
//! runs.

use super::qmp::{Agent, Monitor};
use super::{qcow2, vio, VmError};
use crate::snapshot::{
    link_or_copy, replace_with_copy, sparse_copy, volume_file, SnapshotMeta, SnapshotRequest,
    SnapshotSource, BASE, INITRD, KERNEL, MEMORY, ROOT,
};
use gpuvisor_wire::RuntimeKind;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a VM booted (`<run>/boot.json`): a snapshot links the same files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Boot {
    /// The raw base disk under the overlay.
    pub base: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The template's kernel arguments (without the daemon's own).
    pub cmdline: String,
}

impl Boot {
    fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("boot.json")
    }

    /// Into the VM's run dir.
    pub fn write(&self, run_dir: &Path) -> Result<(), VmError> {
        super::write_json(&Self::path(run_dir), self)
    }

    pub fn read(run_dir: &Path) -> Result<Self, VmError> {
        super::read_json(&Self::path(run_dir))
    }
}

/// Longest a snapshot's copy may take (QEMU's jobs, the migration).
const COPY_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// Longest the guest agent may take to answer before the snapshot goes on without it.
const AGENT_WAIT: Duration = Duration::from_secs(3);
/// Fd sets of backup targets: 200 + disk index (the VM's own disks use 1-3 and 10+).
const TARGET_FDSET: i64 = 200;
/// Longest a restored VM may take to load its saved state.
const INCOMING_DEADLINE: Duration = Duration::from_secs(10 * 60);

fn failed(command: &str, message: impl std::fmt::Display) -> VmError {
    VmError::QmpCommand {
        command: command.to_string(),
        message: message.to_string(),
    }
}

/// The instance whose root disk overlay (`<disks>/<id>.qcow2`) `overlay` is.
fn instance_of(overlay: &Path) -> String {
    overlay.file_stem().map_or_else(
        || overlay.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}

/// Makes the new overlay `overlay` from snapshot `src` (a copy of its root disk) and says
/// what to boot.
pub fn boot_from(src: &SnapshotSource, overlay: &Path, disk_size: u64) -> Result<Boot, VmError> {
    let meta = crate::snapshot::read_meta(&src.dir).map_err(vio(&src.dir))?;
    if meta.runtime != RuntimeKind::Vm {
        return Err(VmError::Refused {
            id: instance_of(overlay),
            why: "the snapshot is a container's, not a VM's".into(),
        });
    }
    if meta.disk_size != disk_size {
        return Err(VmError::Refused {
            id: instance_of(overlay),
            why: format!(
                "the snapshot's disk is {} bytes, the instance's {disk_size}",
                meta.disk_size
            ),
        });
    }
    replace_with_copy(&src.dir.join(ROOT), overlay).map_err(vio(overlay))?;
    // The header came from a QEMU that had it open read-write: checked, and its backing named
    // by us, before another QEMU opens it.
    qcow2::check_foreign(overlay).map_err(vio(overlay))?;
    qcow2::set_backing(overlay, &src.dir.join(BASE)).map_err(vio(overlay))?;
    Ok(Boot {
        base: src.dir.join(BASE),
        kernel: src.dir.join(KERNEL),
        initrd: meta.initrd.then(|| src.dir.join(INITRD)),
        cmdline: meta.cmdline.unwrap_or_default(),
    })
}

/// Waits until a QEMU started with `-incoming` has loaded its saved state and runs.
pub fn await_incoming(mon: &mut Monitor) -> Result<(), VmError> {
    let deadline = Instant::now() + INCOMING_DEADLINE;
    loop {
        let (status, error, _) = mon.migration()?;
        match status.as_str() {
            "completed" => break,
            "failed" | "cancelled" => {
                return Err(failed(
                    "migrate-incoming",
                    format!(
                        "the saved state could not be loaded: {}",
                        error.unwrap_or(status)
                    ),
                ))
            }
            _ if Instant::now() > deadline => {
                return Err(failed(
                    "migrate-incoming",
                    "the saved state did not load within its deadline",
                ))
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    // The state was saved with the guest paused (see `with_memory`), and QEMU keeps a
    // migrated guest's run state: resumed here.
    for _ in 0..250 {
        if mon.status()?.0 {
            return Ok(());
        }
        let _ = mon.resume();
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(failed(
        "cont",
        "the guest did not resume after its state was loaded",
    ))
}

/// Undoes what a snapshot cut short (a daemon killed mid-copy) left in QEMU: a migration into
/// a file, its backup jobs, target nodes and fd sets, and a guest left paused by a completed
/// migration. Harmless when there is nothing to undo.
pub fn abandon(mon: &mut Monitor, agent: &Path, drives: usize) -> Result<(), VmError> {
    thaw_guest(agent);
    let (status, _, _) = mon.migration()?;
    if matches!(
        status.as_str(),
        "setup" | "active" | "pre-switchover" | "device"
    ) {
        let _ = mon.migrate_cancel();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ours: Vec<(String, bool)> = mon
            .jobs()?
            .into_iter()
            .filter(|(id, _, _)| id.starts_with("gvsnap-"))
            .map(|(id, done, _)| (id, done))
            .collect();
        if ours.is_empty() {
            break;
        }
        for (id, done) in &ours {
            let _ = if *done {
                mon.job_dismiss(id)
            } else {
                mon.job_cancel(id)
            };
        }
        if Instant::now() > deadline {
            return Err(failed("job-cancel", "a snapshot's copy job did not end"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let nodes = std::iter::once("gvsnap-root".to_string())
        .chain((0..drives).map(|i| format!("gvsnap-vol{i}")));
    for (i, node) in nodes.enumerate() {
        let _ = mon.blockdev_del(&node);
        let _ = mon.remove_fd(TARGET_FDSET + i as i64);
    }
    let (running, state) = mon.status()?;
    // `paused` by a snapshot with memory (nothing else of ours pauses a guest), `postmigrate`
    // after its migration completed.
    if !running && (state == "postmigrate" || state == "paused") {
        tracing::warn!("resuming a guest a cut-short snapshot left paused");
        resume(mon)?;
    }
    Ok(())
}

/// The drives of the VM's volumes, by name (`vol<i>` in the order of its `volumes` list).
fn volume_drives(
    list: &Path,
    images: &[(String, PathBuf)],
) -> Result<Vec<(String, String, PathBuf)>, VmError> {
    let text = std::fs::read_to_string(list).map_err(vio(list))?;
    let started: Vec<&str> = text.lines().collect();
    images
        .iter()
        .map(|(name, image)| {
            let i = started
                .iter()
                .position(|p| Path::new(p) == image)
                .ok_or_else(|| VmError::Start {
                    id: name.clone(),
                    why: format!("volume {name} is not attached to the running VM"),
                })?;
            Ok((name.clone(), format!("vol{i}"), image.clone()))
        })
        .collect()
}

/// How many volumes the VM was started with.
pub fn volume_count(run_dir: &Path) -> usize {
    std::fs::read_to_string(run_dir.join("volumes"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Saves a running VM's disks (and, asked, its running state) into `req.dir`.
pub fn take(
    mon: &mut Monitor,
    agent_socket: &Path,
    run_dir: &Path,
    overlay: &Path,
    volumes: &[(String, PathBuf)],
    req: &SnapshotRequest,
    passthrough: bool,
) -> Result<SnapshotMeta, VmError> {
    let boot = Boot::read(run_dir)?;
    let dir = &req.dir;
    link_or_copy(&boot.base, &dir.join(BASE)).map_err(vio(&boot.base))?;
    link_or_copy(&boot.kernel, &dir.join(KERNEL)).map_err(vio(&boot.kernel))?;
    if let Some(i) = &boot.initrd {
        link_or_copy(i, &dir.join(INITRD)).map_err(vio(i))?;
    }
    let size = qcow2::virtual_size(overlay).map_err(vio(overlay))?;
    let drives = volume_drives(&run_dir.join("volumes"), volumes)?;
    abandon(mon, agent_socket, volume_count(run_dir))?;
    let mut machine = None;
    let consistency = if req.memory {
        if super::resize::Sizes::read(run_dir).is_ok_and(|s| s.resized()) {
            return Err(VmError::Refused {
                id: instance_of(overlay),
                why: "the VM was resized while it runs: its running state would not load into a VM started at its size; restart it (or take a disk snapshot)".into(),
            });
        }
        if passthrough {
            return Err(VmError::Refused {
                id: instance_of(overlay),
                why: "the running state of a VM with passed-through GPUs cannot be saved (VFIO devices need vendor migration support): take a disk snapshot".into(),
            });
        }
        // The state loads only into the machine it was saved from.
        machine = Some(mon.machine_type()?);
        with_memory(mon, dir, &req.home, overlay, &drives)?;
        "paused with memory".to_string()
    } else {
        by_backup(mon, agent_socket, dir, &req.home, size, &drives)?
    };
    Ok(SnapshotMeta {
        runtime: RuntimeKind::Vm,
        disk_size: size,
        volumes: drives.iter().map(|(n, _, _)| n.clone()).collect(),
        memory: req.memory,
        consistency,
        cmdline: Some(boot.cmdline),
        initrd: boot.initrd.is_some(),
        image_digest: req.image_digest.clone(),
        vcpus: req.vcpus,
        memory_bytes: req.memory_bytes,
        ram_pad: super::qemu::VmSpec::read(run_dir)?.ram_pad,
        machine,
        qemu_version: mon.qemu_version().ok(),
        bytes: 0,
    })
}

/// Thaws the guest's filesystems if a snapshot cut short left them frozen
/// (`guest-fsfreeze-status`); nothing when the guest has no agent or is not frozen.
fn thaw_guest(agent: &Path) {
    let Ok(mut a) = Agent::connect(agent, AGENT_WAIT) else {
        return;
    };
    if a.sync().is_ok() && a.fsfreeze_status().is_ok_and(|frozen| frozen) {
        match a.fsthaw() {
            Ok(_) => tracing::warn!("thawed a guest a cut-short snapshot left frozen"),
            Err(e) => tracing::error!(error = %e, "cannot thaw a guest left frozen"),
        }
    }
}

/// The guest agent, frozen; `None` when the guest has none (or it does not answer).
fn freeze_guest(socket: &Path) -> Option<Agent> {
    let mut a = Agent::connect(socket, AGENT_WAIT).ok()?;
    a.sync().ok()?;
    match a.fsfreeze() {
        Ok(n) => {
            tracing::debug!(frozen = n, "guest filesystems frozen for a snapshot");
            Some(a)
        }
        Err(e) => {
            tracing::info!(error = %e, "the guest agent did not freeze: crash-consistent snapshot");
            // A freeze that half happened is undone.
            let _ = a.fsthaw();
            None
        }
    }
}

/// Disks by backup jobs; answers how consistent the copy is.
fn by_backup(
    mon: &mut Monitor,
    agent_socket: &Path,
    dir: &Path,
    home: &Path,
    size: u64,
    drives: &[(String, String, PathBuf)],
) -> Result<String, VmError> {
    // (drive, target node, whole disk, target file)
    let mut jobs: Vec<(String, String, bool, PathBuf)> =
        vec![("root".into(), "gvsnap-root".into(), false, dir.join(ROOT))];
    for (name, drive, _) in drives {
        jobs.push((
            drive.clone(),
            format!("gvsnap-{drive}"),
            true,
            dir.join(volume_file(name)),
        ));
    }
    // Targets: the root's a qcow2 over the snapshot's base link (named where it will be), sized as the overlay; each
    // volume's a sparse file of its size.
    let mut files: Vec<File> = Vec::new();
    for (i, (drive, _, _, path)) in jobs.iter().enumerate() {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(vio(path))?;
        if i == 0 {
            qcow2::write(&f, &home.join(BASE), size).map_err(vio(path))?;
        } else {
            let src = &drives[i - 1].2;
            let len = std::fs::metadata(src).map_err(vio(src))?.len();
            f.set_len(len).map_err(vio(path))?;
        }
        tracing::debug!(drive, target = %path.display(), "snapshot target made");
        files.push(f);
    }
    let mut added: Vec<(i64, Option<String>)> = Vec::new();
    let result = (|| {
        for (i, ((_, node, _, _), f)) in jobs.iter().zip(&files).enumerate() {
            let set = TARGET_FDSET + i as i64;
            mon.add_fd(set, f.as_raw_fd())?;
            added.push((set, None));
            mon.blockdev_add_fdset(node, i == 0, set)?;
            if let Some(a) = added.last_mut() {
                a.1 = Some(node.clone());
            }
        }
        let frozen = freeze_guest(agent_socket);
        let started = mon.backup(
            &jobs
                .iter()
                .map(|(d, n, whole, _)| (d.clone(), n.clone(), *whole))
                .collect::<Vec<_>>(),
        );
        let consistency = match frozen {
            Some(mut a) => {
                if let Err(e) = a.fsthaw() {
                    tracing::warn!(error = %e, "thawing the guest failed: retrying on a new connection");
                    thaw_guest(agent_socket);
                }
                "guest agent freeze"
            }
            None => "crash-consistent",
        };
        started?;
        wait_jobs(mon, jobs.iter().map(|(_, n, _, _)| n.as_str()).collect())?;
        Ok(consistency.to_string())
    })();
    // The targets leave QEMU whatever happened.
    for (set, node) in added.into_iter().rev() {
        if let Some(node) = node {
            if let Err(e) = mon.blockdev_del(&node) {
                tracing::warn!(node, error = %e, "cannot remove a snapshot target from QEMU");
            }
        }
        let _ = mon.remove_fd(set);
    }
    result
}

/// Waits for backup jobs `ids` to conclude and dismisses them; cancels them all when one fails
/// or the deadline passes.
fn wait_jobs(mon: &mut Monitor, mut ids: Vec<&str>) -> Result<(), VmError> {
    let deadline = Instant::now() + COPY_DEADLINE;
    let mut error = None;
    while !ids.is_empty() {
        let jobs = mon.jobs()?;
        let mut left = Vec::new();
        for id in ids {
            match jobs.iter().find(|(j, _, _)| j == id) {
                Some((_, true, e)) => {
                    let _ = mon.job_dismiss(id);
                    if let Some(e) = e {
                        error.get_or_insert_with(|| format!("{id}: {e}"));
                    }
                }
                Some(_) => left.push(id),
                // Gone: dismissed already, or never started.
                None => {}
            }
        }
        ids = left;
        if error.is_some() || Instant::now() > deadline {
            for id in &ids {
                let _ = mon.job_cancel(id);
            }
            let e = error.unwrap_or_else(|| "the copy did not finish within its deadline".into());
            return Err(failed("blockdev-backup", e));
        }
        if !ids.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    match error {
        Some(e) => Err(failed("blockdev-backup", e)),
        None => Ok(()),
    }
}

/// The running state into `memory.bin` by a live migration, then the disks as files while
/// the guest is paused; the guest resumes whatever happens.
fn with_memory(
    mon: &mut Monitor,
    dir: &Path,
    home: &Path,
    overlay: &Path,
    drives: &[(String, String, PathBuf)],
) -> Result<(), VmError> {
    let state = dir.join(MEMORY);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&state)
        .map_err(vio(&state))?;
    mon.getfd("gvsnap", f.as_raw_fd())?;
    drop(f);
    // A plain stream into the file, whatever a live migration set on this QEMU before.
    mon.migration_capabilities(&[("postcopy-ram", false), ("auto-converge", false)])?;
    // Paused first: the stream is one pass of the guest's RAM (a guest dirtying memory
    // faster than the file takes it would never converge live, and each pass would grow the
    // file), and the disks copied below are of the same instant.
    mon.pause()?;
    let saved = (|| {
        mon.migrate("fd:gvsnap")?;
        let deadline = Instant::now() + COPY_DEADLINE;
        loop {
            let (status, error, downtime) = mon.migration()?;
            match status.as_str() {
                "completed" => {
                    tracing::info!(downtime_ms = downtime, "VM state saved");
                    break;
                }
                "failed" | "cancelled" => {
                    return Err(failed(
                        "migrate",
                        format!(
                            "saving the running state failed: {}",
                            error.unwrap_or(status)
                        ),
                    ))
                }
                _ if Instant::now() > deadline => {
                    let _ = mon.migrate_cancel();
                    return Err(failed(
                        "migrate",
                        "saving the running state did not finish within its deadline",
                    ));
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let root = dir.join(ROOT);
        sparse_copy(overlay, &root).map_err(vio(&root))?;
        // The copy points at the snapshot's own link of the same base.
        qcow2::set_backing(&root, &home.join(BASE)).map_err(vio(&root))?;
        for (name, _, image) in drives {
            let dst = dir.join(volume_file(name));
            sparse_copy(image, &dst).map_err(vio(&dst))?;
        }
        Ok(())
    })();
    // The guest runs again whatever happened (a failed migration cancelled first).
    let resumed = resume(mon);
    saved.and(resumed)
}

/// Resumes a guest this snapshot paused: a migration still running is cancelled first
/// (`cont` is refused during one); retried briefly.
fn resume(mon: &mut Monitor) -> Result<(), VmError> {
    let mut last = None;
    for _ in 0..50 {
        let (status, _, _) = mon.migration()?;
        if matches!(
            status.as_str(),
            "setup" | "active" | "device" | "cancelling"
        ) {
            let _ = mon.migrate_cancel();
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        if mon.status()?.0 {
            return Ok(());
        }
        match mon.resume() {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(last.unwrap_or_else(|| failed("cont", "the guest could not be resumed")))
}
