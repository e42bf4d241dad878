//! Snapshots of an instance's disks (and, for a VM, its running state) on this host.
//!
//! ```text
//! <data>/snapshots/<sid>/snapshot.json   what was saved (SnapshotMeta)
//! <data>/snapshots/<sid>/disk.img        a container's disk (the overlay's upper layer), raw ext4
//! <data>/snapshots/<sid>/root.qcow2      a VM's root disk: qcow2 over base.ext4 below
//! <data>/snapshots/<sid>/base.ext4       VM: hard link of the template's base (same inode)
//! <data>/snapshots/<sid>/vmlinuz         VM: hard link of the kernel it booted
//! <data>/snapshots/<sid>/initrd.img      VM: hard link of its initrd, when there was one
//! <data>/snapshots/<sid>/memory.bin      VM with --memory: QEMU's migration stream
//! <data>/snapshots/<sid>/vol-<name>.img  each volume the instance had, raw ext4
//! <data>/snapshots/.tmp-<sid>/           a snapshot being taken (renamed into place at the end)
//! ```
//!
//! Key decisions:
//! - A snapshot is self-contained: every file is a copy (sparse: only the data is copied, holes
//!   stay holes) or a hard link of an immutable template file, never a layer another snapshot
//!   or a live disk depends on. Chains are therefore bounded by construction (a VM's root disk
//!   is always `template base <- snapshot root <- live overlay`, two levels), removing a
//!   snapshot never needs a merge, and a template rebuild never breaks one (the links keep the
//!   old base's inode alive).
//! - Restoring or cloning copies the snapshot's disk into the instance's new disk: the
//!   instance's disk never points into a snapshot, so the snapshot stays unchanged however the
//!   instance writes.
//! - Point in time: a container's disk and volumes are frozen together (`FIFREEZE` on their
//!   mounts) while they are copied; a VM's disks are copied by QEMU backup jobs started in one
//!   QMP transaction (copy-before-write: the guest runs on while they copy), inside the guest
//!   agent's fs-freeze when the guest has one ([`crate::vm::snapshot`]).
//! - Permissions: the directories are 0750 root:`TEMPLATE_GID`, as the templates' are (a VM's
//!   QEMU reaches the base, kernel and initrd links by path; other host users nothing), every
//!   tenant file is 0600 root's: QEMU gets descriptors.

use crate::instance::{io, Node, NodeError};
use gpuvisor_wire::RuntimeKind;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const META: &str = "snapshot.json";
/// A container's disk.
pub const DISK: &str = "disk.img";
/// A VM's root disk.
pub const ROOT: &str = "root.qcow2";
pub const BASE: &str = "base.ext4";
pub const KERNEL: &str = "vmlinuz";
pub const INITRD: &str = "initrd.img";
/// A VM's running state (QEMU's migration stream).
pub const MEMORY: &str = "memory.bin";

/// The file of volume `name` in a snapshot.
pub fn volume_file(name: &str) -> String {
    format!("vol-{name}.img")
}

/// What a snapshot holds (its `snapshot.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub runtime: RuntimeKind,
    /// The root (container or VM) disk's size.
    pub disk_size: u64,
    /// Volumes saved, by name.
    pub volumes: Vec<String>,
    /// A VM's running state was saved.
    pub memory: bool,
    /// How the point in time was made: `filesystem freeze`, `guest agent freeze`, `paused
    /// with memory`, or `crash-consistent` (a VM without a guest agent).
    pub consistency: String,
    /// VM: the kernel arguments of its template (the daemon appends its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// VM: an initrd was linked.
    #[serde(default)]
    pub initrd: bool,
    /// The digest of the image the instance ran: a container's disk is an overlay's upper
    /// layer, which only means something over the same image layers.
    #[serde(default)]
    pub image_digest: String,
    /// The instance's vCPUs and memory when saved (a memory snapshot restores only into the
    /// same size).
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// VM: its guest RAM beyond its size (`VmSpec::ram_pad`): a saved running state loads
    /// only into RAM of the same length. 0 for snapshots made before it was recorded.
    #[serde(default)]
    pub ram_pad: u64,
    /// VM with its running state saved: the versioned machine type it ran
    /// (`VmSpec::machine`), which the state loads into. None for snapshots made before it
    /// was recorded (the machine is then read from the head of the state).
    #[serde(default)]
    pub machine: Option<String>,
    /// VM: the QEMU version (major, minor) it ran in; a saved running state is not restored
    /// into an older one (its CPU may lack features the guest uses). None: not recorded.
    #[serde(default)]
    pub qemu_version: Option<(i64, i64)>,
    /// Bytes the snapshot takes on the host's disk (allocated blocks; hard links counted).
    pub bytes: u64,
}

/// What the engine asks [`Node::take_snapshot`] to save of an instance.
#[derive(Debug, Clone, Default)]
pub struct SnapshotAsk {
    pub tenant: String,
    /// The digest of the image the instance runs.
    pub image_digest: String,
    /// The instance's volumes, by name.
    pub volumes: Vec<String>,
    /// Save a VM's running state too.
    pub memory: bool,
    /// The instance's size.
    pub vcpus: u32,
    pub memory_bytes: u64,
}

/// What [`Node::take_snapshot`] asks a runtime to save into `dir` (a new, empty directory).
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    pub dir: PathBuf,
    /// Where `dir` is renamed to once complete: what files inside name (a qcow2's backing).
    pub home: PathBuf,
    pub tenant: String,
    /// The digest of the image the instance runs.
    pub image_digest: String,
    /// The instance's volumes, by name.
    pub volumes: Vec<String>,
    /// Save a VM's running state too.
    pub memory: bool,
    pub vcpus: u32,
    pub memory_bytes: u64,
}

/// Where an instance's new disks come from when it is restored or cloned.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotSource {
    /// The snapshot's directory.
    pub dir: PathBuf,
    /// Resume the saved running state (a VM restored with `--memory` saved).
    pub memory: bool,
}

impl SnapshotSource {
    /// What a VM snapshot's saved running state loads into: its guest RAM beyond the VM's
    /// size (`SnapshotMeta::ram_pad`: none, or the pad this host gives TCG VMs) and its
    /// machine type (`SnapshotMeta::machine`: a versioned q35, or none recorded); anything
    /// else is refused, and so is a QEMU of version `here` older than the one it ran in.
    pub fn saved_shape(
        &self,
        here: Option<(i64, i64)>,
    ) -> Result<(u64, Option<String>), NodeError> {
        let meta = read_meta(&self.dir).map_err(io(&self.dir))?;
        let refuse = |what: String| NodeError::Unsupported {
            kind: RuntimeKind::Vm,
            what,
        };
        if !crate::vm::qemu::known_ram_pad(meta.ram_pad) {
            return Err(refuse(format!(
                "restoring a saved running state with {} bytes of RAM beyond the VM's size",
                meta.ram_pad
            )));
        }
        if let Some(why) = crate::vm::qemu::older_qemu(meta.qemu_version, here) {
            return Err(refuse(format!("restoring a saved running state: {why}")));
        }
        if let Some(m) = meta
            .machine
            .as_deref()
            .filter(|m| !crate::vm::qemu::known_machine(m))
        {
            return Err(refuse(format!(
                "restoring a saved running state of machine type {m:?}"
            )));
        }
        // Snapshots from before the machine was recorded: the name at the head of the state.
        let machine = meta.machine.or_else(|| {
            use std::io::Read;
            let mut head = [0u8; 64];
            let f = std::fs::File::open(self.dir.join(MEMORY)).ok()?;
            let n = f.take(64).read(&mut head).ok()?;
            crate::vm::qemu::stream_machine(&head[..n])
        });
        Ok((meta.ram_pad, machine))
    }

    /// The snapshot's container disk, for an instance of the image `image_digest`: refused
    /// when the snapshot is not a container's or was taken over other image layers.
    pub fn container_disk(&self, image_digest: &str) -> Result<PathBuf, NodeError> {
        let meta = read_meta(&self.dir).map_err(io(&self.dir))?;
        if meta.runtime != RuntimeKind::Container {
            return Err(NodeError::Unsupported {
                kind: RuntimeKind::Container,
                what: "a disk from a VM's snapshot".into(),
            });
        }
        if !meta.image_digest.is_empty() && meta.image_digest != image_digest {
            return Err(io(&self.dir)(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the snapshot's disk was made over image {}, the instance's image is now {image_digest}: it would not mean the same files",
                    meta.image_digest
                ),
            )));
        }
        Ok(self.dir.join(DISK))
    }
}

/// A snapshot's `snapshot.json`.
pub fn read_meta(dir: &Path) -> std::io::Result<SnapshotMeta> {
    let text = fs::read(dir.join(META))?;
    serde_json::from_slice(&text)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

/// A snapshot id: 1-64 lowercase hex digits (it names a directory).
pub fn check_id(sid: &str) -> Result<(), NodeError> {
    if sid.is_empty()
        || sid.len() > 64
        || !sid
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(io(Path::new(sid))(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a snapshot id is 1-64 lowercase hex digits",
        )));
    }
    Ok(())
}

/// Copies `src` into the new file `dst` (0600), data only: the holes of `src` (`SEEK_HOLE`)
/// stay holes, the data moves by `copy_file_range` (in the kernel; a reflink where the
/// filesystem has them). The copy is synced before it returns.
pub fn sparse_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    let from = File::open(src)?;
    let len = from.metadata()?.len();
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)?;
    to.set_len(len)?;
    let (fd_in, fd_out) = (from.as_raw_fd(), to.as_raw_fd());
    let mut pos: i64 = 0;
    let end = i64::try_from(len).map_err(std::io::Error::other)?;
    while pos < end {
        // SAFETY: plain syscall on a descriptor this function owns.
        let data = unsafe { libc::lseek(fd_in, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd_in, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = usize::try_from(hole - off_in)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            // SAFETY: both descriptors are open; the offsets are this function's own
            // variables, which the kernel advances.
            let n =
                unsafe { libc::copy_file_range(fd_in, &mut off_in, fd_out, &mut off_out, want, 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} shrank while it was copied", src.display()),
                ));
            }
        }
        pos = hole;
    }
    to.sync_all()
}

/// [`sparse_copy`] to `dst` by way of `dst.partial` and a rename: `dst` is the whole copy or
/// what it was before.
pub fn replace_with_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    let tmp = crate::disk::partial_path(dst);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let res = sparse_copy(src, &tmp).and_then(|()| fs::rename(&tmp, dst));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Hard-links `src` to `dst`, or copies it where a link cannot be made (another filesystem).
pub fn link_or_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    match fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            sparse_copy(src, dst)?;
            fs::set_permissions(dst, fs::Permissions::from_mode(0o444))
        }
        Err(e) => Err(e),
    }
}

// FIFREEZE / FITHAW: _IOWR('X', 119 / 120, int).
nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

/// Filesystems frozen with `FIFREEZE` (every write to them waits) until this is dropped.
pub struct Frozen {
    mounts: Vec<(PathBuf, File)>,
}

impl Frozen {
    /// Freezes the filesystems mounted at `mounts`, all or none.
    pub fn freeze(mounts: &[PathBuf]) -> std::io::Result<Self> {
        let mut out = Frozen { mounts: Vec::new() };
        for m in mounts {
            if !is_mount_root(m) {
                return Err(std::io::Error::other(format!(
                    "{} is not a mount point: not frozen (it would freeze the filesystem holding it)",
                    m.display()
                )));
            }
            let f = File::open(m)?;
            let mut arg: libc::c_int = 0;
            // SAFETY: FIFREEZE takes an int the kernel ignores; `f` is an open directory.
            unsafe { fifreeze(f.as_raw_fd(), &mut arg) }
                .map_err(|e| std::io::Error::other(format!("FIFREEZE {}: {e}", m.display())))?;
            out.mounts.push((m.clone(), f));
        }
        Ok(out)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for (m, f) in self.mounts.drain(..).rev() {
            if let Err(e) = thaw_fd(&f) {
                tracing::error!(mount = %m.display(), error = %e, "cannot thaw a frozen filesystem");
            }
        }
    }
}

fn thaw_fd(f: &File) -> nix::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FITHAW takes an int the kernel ignores; `f` is an open directory.
    unsafe { fithaw(f.as_raw_fd(), &mut arg) }.map(drop)
}

/// Whether `path` is the root of a mount (another device than its parent's): freezing or
/// thawing anything else would act on the filesystem that holds it.
fn is_mount_root(path: &Path) -> bool {
    let (Ok(m), Some(Ok(p))) = (
        fs::symlink_metadata(path),
        path.parent().map(fs::symlink_metadata),
    ) else {
        return false;
    };
    m.is_dir() && m.dev() != p.dev()
}

/// Thaws the filesystem at `mount` if it is frozen (a daemon killed while a snapshot copied
/// leaves it so); nothing when it is not.
pub fn thaw(mount: &Path) -> bool {
    if !is_mount_root(mount) {
        return false;
    }
    match File::open(mount) {
        Ok(f) => thaw_fd(&f).is_ok(),
        Err(_) => false,
    }
}

/// Thaws every container disk and volume mounted for an instance (at daemon start: a daemon
/// killed while a snapshot copied leaves them frozen, and their writers waiting).
pub fn thaw_instance_mounts(disks: &crate::disk::Disks) {
    let root = disks.instance_dir("x");
    let Some(instances) = root.parent() else {
        return;
    };
    for inst in fs::read_dir(instances).into_iter().flatten().flatten() {
        let id = inst.file_name().to_string_lossy().into_owned();
        let mut mounts = vec![disks.disk_mount(&id)];
        let vols = inst.path().join("volumes");
        mounts.extend(
            fs::read_dir(&vols)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path()),
        );
        for m in mounts {
            if thaw(&m) {
                tracing::warn!(mount = %m.display(), "thawed a filesystem a killed snapshot left frozen");
            }
        }
    }
}

/// Bytes allocated to the files directly in `dir`.
pub fn allocated(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

impl Node {
    /// `<data>/snapshots`.
    pub fn snapshots_root(&self) -> PathBuf {
        self.cfg.data_dir.join("snapshots")
    }

    /// The directory of snapshot `sid` (whether or not it exists).
    pub fn snapshot_dir(&self, sid: &str) -> Result<PathBuf, NodeError> {
        check_id(sid)?;
        Ok(self.snapshots_root().join(sid))
    }

    /// Saves instance `id`'s disks (and, asked, a VM's running state) as snapshot `sid`:
    /// written into `.tmp-<sid>` and renamed into place once complete, so a snapshot directory
    /// is whole or absent. On error nothing is left.
    pub fn take_snapshot(
        &self,
        id: &str,
        sid: &str,
        ask: &SnapshotAsk,
    ) -> Result<SnapshotMeta, NodeError> {
        let dir = self.snapshot_dir(sid)?;
        let root = self.snapshots_root();
        let tmp = root.join(format!(".tmp-{sid}"));
        for d in [&root, &tmp] {
            if d == &tmp {
                remove_dir_if_exists(&tmp)?;
            }
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(d)
                .map_err(io(d))?;
            vm_group_only(d)?;
        }
        let req = SnapshotRequest {
            dir: tmp.clone(),
            home: dir.clone(),
            tenant: ask.tenant.clone(),
            image_digest: ask.image_digest.clone(),
            volumes: ask.volumes.clone(),
            memory: ask.memory,
            vcpus: ask.vcpus,
            memory_bytes: ask.memory_bytes,
        };
        let done = self
            .runtime_of(id)
            .snapshot(self, id, &req)
            .and_then(|mut meta| {
                meta.bytes = allocated(&tmp);
                meta.image_digest = ask.image_digest.clone();
                let path = tmp.join(META);
                let text = serde_json::to_vec_pretty(&meta).map_err(|e| {
                    io(&path)(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e.to_string(),
                    ))
                })?;
                fs::write(&path, text).map_err(io(&path))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io(&path))?;
                File::open(&tmp)
                    .and_then(|d| d.sync_all())
                    .map_err(io(&tmp))?;
                fs::rename(&tmp, &dir).map_err(io(&dir))?;
                File::open(&root)
                    .and_then(|d| d.sync_all())
                    .map_err(io(&root))?;
                Ok(meta)
            });
        if done.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        done
    }

    /// Cleans up after a snapshot of instance `id` that a killed daemon left pending (its
    /// files are removed by [`Node::remove_snapshot`]): a container's filesystems are thawed
    /// at start already; a VM's QEMU drops the copy's jobs and targets and resumes a guest
    /// the copy left paused.
    pub fn abandon_snapshot(&self, id: &str) -> Result<(), NodeError> {
        self.runtime_of(id).abandon_snapshot(self, id)
    }

    /// What snapshot `sid` holds.
    pub fn snapshot_meta(&self, sid: &str) -> Result<SnapshotMeta, NodeError> {
        let dir = self.snapshot_dir(sid)?;
        read_meta(&dir).map_err(io(&dir))
    }

    /// Deletes snapshot `sid`'s files (nothing when there are none).
    pub fn remove_snapshot(&self, sid: &str) -> Result<(), NodeError> {
        remove_dir_if_exists(&self.snapshot_dir(sid)?)
    }

    /// Ids of the snapshots on disk; removes what a killed snapshot left half written.
    pub fn snapshot_ids(&self) -> Vec<String> {
        let root = self.snapshots_root();
        let mut out = Vec::new();
        for e in fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                let _ = fs::remove_dir_all(e.path());
            } else if check_id(&name).is_ok() {
                out.push(name);
            }
        }
        out.sort();
        out
    }

    /// Rolls volumes `names` of `tenant` back to their content in snapshot `sid`. The volumes
    /// must not be in use (their instance stopped).
    pub fn restore_volumes(
        &self,
        sid: &str,
        tenant: &str,
        names: &[String],
    ) -> Result<(), NodeError> {
        let dir = self.snapshot_dir(sid)?;
        for name in names {
            let src = dir.join(volume_file(name));
            self.disks.replace_volume_image(tenant, name, &src)?;
        }
        Ok(())
    }
}

/// `dir` 0750 root:[`crate::vm::qemu::TEMPLATE_GID`], as the templates are: a VM's QEMU (in
/// that group) reaches the base, kernel and initrd links by path, nobody else does; the
/// tenant's files in it are 0600 root's.
fn vm_group_only(dir: &Path) -> Result<(), NodeError> {
    std::os::unix::fs::chown(dir, Some(0), Some(crate::vm::qemu::TEMPLATE_GID)).map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o750)).map_err(io(dir))
}

fn remove_dir_if_exists(dir: &Path) -> Result<(), NodeError> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(dir)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    /// A saved running state loads into its recorded machine; a snapshot from before the
    /// machine was recorded, into the one named at the head of its state; a machine type that
    /// could carry options is refused.
    #[test]
    fn a_saved_state_names_its_machine() {
        let d = tempfile::tempdir().unwrap();
        let meta = |machine: Option<&str>| SnapshotMeta {
            runtime: RuntimeKind::Vm,
            disk_size: 1 << 30,
            volumes: vec![],
            memory: true,
            consistency: "paused with memory".into(),
            cmdline: None,
            initrd: false,
            image_digest: String::new(),
            vcpus: 1,
            memory_bytes: 512 << 20,
            ram_pad: crate::vm::qemu::TCG_RAM_PAD,
            machine: machine.map(str::to_string),
            qemu_version: Some((10, 0)),
            bytes: 0,
        };
        let write = |m: &SnapshotMeta| {
            fs::write(d.path().join(META), serde_json::to_vec(m).unwrap()).unwrap();
        };
        let src = SnapshotSource {
            dir: d.path().to_path_buf(),
            memory: true,
        };
        let mut head = b"QEVM\0\0\0\x03\x07\0\0\0\x0apc-q35-7.2".to_vec();
        head.extend([1u8, 0, 0, 0, 2]);
        fs::write(d.path().join(MEMORY), &head).unwrap();
        write(&meta(Some("pc-q35-10.0")));
        assert_eq!(
            src.saved_shape(Some((10, 0))).unwrap(),
            (crate::vm::qemu::TCG_RAM_PAD, Some("pc-q35-10.0".into()))
        );
        write(&meta(None));
        assert_eq!(
            src.saved_shape(Some((10, 0))).unwrap().1,
            Some("pc-q35-7.2".into())
        );
        fs::write(d.path().join(MEMORY), b"not a state").unwrap();
        assert_eq!(src.saved_shape(Some((10, 0))).unwrap().1, None);
        write(&meta(Some("pc-q35-7.2,kernel=/x")));
        assert!(src.saved_shape(Some((10, 0))).is_err());
        // Not into an older QEMU than the one it ran in.
        write(&meta(Some("pc-q35-7.2")));
        let err = src.saved_shape(Some((7, 2))).unwrap_err().to_string();
        assert!(err.contains("older"), "{err}");
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let mut f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all(b"start").unwrap();
        f.seek(SeekFrom::Start(32 << 20)).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.seek(SeekFrom::Start((64 << 20) - 3)).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        let dst = d.path().join("dst");
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        let m = fs::metadata(&dst).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(
            m.blocks() * 512 < 8 << 20,
            "holes were filled: {}",
            m.blocks() * 512
        );
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        // An existing destination is never overwritten; replace_with_copy does, whole.
        assert!(sparse_copy(&src, &dst).is_err());
        fs::write(&dst, b"old").unwrap();
        replace_with_copy(&src, &dst).unwrap();
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        // An empty file and a file that is all hole.
        let empty = d.path().join("empty");
        File::create(&empty).unwrap().set_len(1 << 20).unwrap();
        let out = d.path().join("empty2");
        sparse_copy(&empty, &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), vec![0u8; 1 << 20]);
    }

    #[test]
    fn ids_are_hex() {
        assert!(check_id("0af9").is_ok());
        for bad in ["", "../x", "ABC", "a/b", &"a".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }
}
