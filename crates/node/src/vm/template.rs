//! VM templates: an image of the image store turned, once per image digest, into what a
//! micro-VM boots: a read-only raw ext4 base disk holding the image's flattened layers, a kernel
//! and an initrd. Every VM of the image gets its own qcow2 overlay backed by the base
//! ([`Templates::create_overlay`]), so one template serves any number of VMs.
//!
//! ```text
//! <data>/vm/templates/<algo>-<hex>/<build>/base.ext4      read-only base disk (raw ext4)
//! <data>/vm/templates/<algo>-<hex>/<build>/vmlinuz        kernel (the image's /boot, else the default)
//! <data>/vm/templates/<algo>-<hex>/<build>/initrd.img     initrd, when there is one
//! <data>/vm/templates/<algo>-<hex>/<build>/template.json  what the rest was built from
//! <data>/vm/templates/<algo>-<hex>/<build>/lease          flock: shared by every live Template
//! <data>/vm/templates/.locks/<algo>-<hex>.lock            flock: one build per digest at a time
//! <data>/vm/templates/.tmp-<algo>-<hex>-<rand>/           a build in progress (renamed into place)
//! ```
//!
//! `<build>` is a random id never reused: a rebuild (other layers, another builder
//! [`FORMAT_VERSION`], the operator's `--kernel`/`--initrd` changed) goes to a new directory,
//! so an overlay always points at the base it was made over or at nothing. A build is removed
//! only while no [`Template`] of it is held and no process has its base open.
//! Overlays and seeds are 0600 (QEMU gets descriptors); the base, kernel and initrd are 0444
//! in directories the VM users reach through the templates root (0750, `qemu::TEMPLATE_GID`).
//!
//! Building: the layers (overlayfs form, as [`crate::image`] unpacks them: whiteouts are 0/0
//! character devices, opaque directories carry `trusted.overlay.opaque`) are stacked in a
//! read-only, `nosuid,nodev` overlay mount, which resolves whiteouts exactly as a container's
//! rootfs does; `mkfs.ext4 -d` copies the merged tree into the base (symlinks stay symlinks,
//! nothing is followed; device nodes, fifos, hard links, xattrs and sparse files are kept: they
//! are the guest's own business inside its disk). The image is untrusted: its size is summed
//! with `lstat` before anything is written (bounded by [`MAX_BASE_BYTES`]), the kernel and initrd
//! are taken only from regular files directly in a real `/boot` directory (never through a
//! symlink), opened with `O_NOFOLLOW` and read up to [`MAX_KERNEL_BYTES`] /
//! [`MAX_INITRD_BYTES`]. A build happens in a staging directory renamed into place at the end,
//! under a per-digest `flock`, so concurrent [`Templates::ensure`] calls (threads or processes)
//! build once and a failed or killed build leaves nothing that is ever used (its leftovers are
//! removed by the next build of that digest).

use crate::cmd::CmdError;
use nix::fcntl::{Flock, FlockArg};
use nix::mount::{MntFlags, MsFlags};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Largest flattened image (bytes, as allocated on the host) a template is built from.
pub const MAX_BASE_BYTES: u64 = 256 << 30;
/// Largest kernel taken from an image's /boot.
pub const MAX_KERNEL_BYTES: u64 = 128 << 20;
/// Largest initrd taken from an image's /boot.
pub const MAX_INITRD_BYTES: u64 = 1 << 30;
/// Most files (inodes) in one image.
pub const MAX_INODES: u64 = 16 << 20;

const BASE: &str = "base.ext4";
const KERNEL: &str = "vmlinuz";
const INITRD: &str = "initrd.img";
const META: &str = "template.json";
const LEASE: &str = "lease";
/// The kernel command line every template needs: the overlay is the guest's /dev/vda, a whole
/// disk holding ext4 without a partition table.
const CMDLINE: &str = "root=/dev/vda rw";

#[derive(Debug, Error)]
pub enum TemplateError {
    #[error("invalid template request: {0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("cannot mount the image layers at {target}: {source}")]
    Mount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "image {digest} has no kernel in /boot (vmlinuz or vmlinuz-<version>) and no default \
         kernel is configured (give the daemon --kernel)"
    )]
    NoKernel { digest: String },
    #[error("image {digest}: {what} is too large ({size} bytes, at most {max})")]
    TooLarge {
        digest: String,
        what: String,
        size: u64,
        max: u64,
    },
    #[error(
        "disk size {size} bytes is smaller than the template's base disk ({base} bytes); ask for \
         at least that"
    )]
    OverlayTooSmall { size: u64, base: u64 },
    #[error("VM template build {path} is in use ({why}); stop its VMs first")]
    InUse { path: PathBuf, why: String },
    #[error(
        "not enough free space for the VM template: {need} bytes needed, {free} free at {path}"
    )]
    NoSpace { path: PathBuf, need: u64, free: u64 },
    #[error("template {digest} on disk is unreadable: {why}")]
    Corrupt { digest: String, why: String },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A VM template: one build per image digest and what it was built from, shared read-only by
/// every VM of the image.
///
/// While any clone of a `Template` lives it holds a shared lease (`flock`) on its build, and
/// [`Templates::remove`] refuses to delete a build that is leased or that a process (QEMU) has
/// open: keep the `Template` until QEMU has opened its disks.
#[derive(Debug, Clone)]
pub struct Template {
    pub digest: String,
    /// What the build was made from: sha256 over the builder's format version and the ordered
    /// layers (see [`Templates::ensure`]).
    pub key: String,
    /// Read-only base disk (raw ext4 holding the image's flattened layers). Its path is unique
    /// to this build and never reused, so an overlay can never point at another build's base.
    pub base: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command line arguments the template needs (e.g. `root=/dev/vda rw`);
    /// CORE appends console, network (`ip=`) and its own.
    pub cmdline: String,
    #[allow(dead_code)] // held for its lock, released when the last clone drops
    lease: Option<std::sync::Arc<Lease>>,
}

impl PartialEq for Template {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.digest,
            &self.key,
            &self.base,
            &self.kernel,
            &self.initrd,
            &self.cmdline,
        ) == (&o.digest, &o.key, &o.base, &o.kernel, &o.initrd, &o.cmdline)
    }
}
impl Eq for Template {}

/// A shared `flock` on a build's lease file.
struct Lease(#[allow(dead_code)] Flock<File>);

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lease")
    }
}

/// Bumped whenever what a build produces changes (layout, mkfs recipe, kernel selection):
/// templates of another format are rebuilt.
pub const FORMAT_VERSION: u32 = 2;

/// What `template.json` records.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    #[serde(default)]
    format: u32,
    digest: String,
    /// sha256 over the format version and the ordered layers.
    #[serde(default)]
    key: String,
    #[serde(default)]
    layers: Vec<String>,
    /// `image` (the image's /boot) or `default` (the operator's kernel).
    kernel_from: String,
    /// The file name the kernel had in /boot, or the default kernel's path.
    kernel_source: String,
    /// For `default`: the operator's kernel and initrd as they were (path, size, mtime, inode).
    #[serde(default)]
    default_identity: Option<String>,
    initrd: bool,
    cmdline: String,
    base_bytes: u64,
}

/// The templates of one daemon (`<data>/vm/templates`).
#[derive(Debug, Clone)]
pub struct Templates {
    root: PathBuf,
    default_kernel: Option<PathBuf>,
    default_initrd: Option<PathBuf>,
}

impl Templates {
    pub fn new(
        data_dir: &Path,
        default_kernel: Option<PathBuf>,
        default_initrd: Option<PathBuf>,
    ) -> Self {
        Templates {
            root: data_dir.join("vm").join("templates"),
            default_kernel,
            default_initrd,
        }
    }

    /// `<data>/vm/templates`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Builds (once; concurrent callers wait; atomic) or returns the template of an image.
    /// `layers`: the image's unpacked layer dirs, top first (as ContainerRuntime passes them to
    /// Disks::provision_root). Kernel: the image's /boot/vmlinuz* (+ initrd*), else the default.
    ///
    /// A build on disk is used only if it was made by this builder format from these layers
    /// in this order and, when it took the operator's kernel, from the operator's current
    /// `--kernel`/`--initrd` (same path, size, mtime and inode); otherwise a new build is made
    /// in a new directory and the old ones are removed once nothing uses them.
    pub fn ensure(&self, digest: &str, layers: &[PathBuf]) -> Result<Template, TemplateError> {
        let name = dir_name(digest)?;
        let key = build_key(layers)?;
        let identity = self.default_identity()?;
        if let Some(t) = self.find(digest, &name, &key, &identity)? {
            // Stale builds beside it go once nothing uses them (never waiting for a build).
            if self.builds(&name).len() > 1 {
                if let Ok(Some(_lock)) = self.try_lock(&name) {
                    self.drop_stale(&name, &key, &identity);
                }
            }
            return Ok(t);
        }
        let _lock = self.lock(&name)?;
        // Built by another caller while this one waited for the lock.
        if let Some(t) = self.find(digest, &name, &key, &identity)? {
            self.drop_stale(&name, &t.key, &identity);
            return Ok(t);
        }
        self.clear_staging(&name)?;
        // The image store's shared lock: its gc (exclusive) cannot delete the layers mid-copy.
        let _store = image_store_lock(layers)?;
        let t0 = std::time::Instant::now();
        let build_id = random_hex()?;
        let staging = Staging::new(self.root.join(format!(".tmp-{name}-{build_id}")))?;
        self.build(digest, &key, layers, &identity, &staging.path)?;
        let parent = self.root.join(&name);
        fs::create_dir_all(&parent).map_err(io_at(&parent))?;
        // Open inside: the templates root (0750, group of the VM users) is the gate.
        set_mode(&parent, 0o755)?;
        let dir = parent.join(&build_id);
        fs::rename(&staging.path, &dir).map_err(io_at(&dir))?;
        staging.disarm();
        sync_dir(&parent)?;
        sync_dir(&self.root)?;
        tracing::info!(
            digest,
            layers = layers.len(),
            ms = t0.elapsed().as_millis() as u64,
            "VM template built"
        );
        let t =
            self.find(digest, &name, &key, &identity)?
                .ok_or_else(|| TemplateError::Corrupt {
                    digest: digest.to_string(),
                    why: "vanished right after it was built".into(),
                })?;
        self.drop_stale(&name, &key, &identity);
        Ok(t)
    }

    /// The operator's kernel and initrd as they are now (`None` without a default kernel).
    fn default_identity(&self) -> Result<Option<String>, TemplateError> {
        let Some(k) = &self.default_kernel else {
            return Ok(None);
        };
        let mut out = String::new();
        for p in std::iter::once(k).chain(self.default_initrd.iter()) {
            let m = fs::metadata(p).map_err(io_at(p))?;
            out.push_str(&format!(
                "{}\0{}\0{}.{}\0{}:{}\0",
                p.display(),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
                m.dev(),
                m.ino()
            ));
        }
        Ok(Some(out))
    }

    /// A qcow2 overlay backed by the template's base, virtual size exactly `size` bytes.
    /// Written ([`super::qcow2`]) beside `path` and renamed into place; refuses a size that is
    /// not a multiple of 512 or is smaller than the base disk (the guest would see a cut
    /// filesystem).
    pub fn create_overlay(
        &self,
        t: &Template,
        path: &Path,
        size: u64,
    ) -> Result<(), TemplateError> {
        if size == 0 || !size.is_multiple_of(512) {
            return Err(TemplateError::Invalid(format!(
                "disk size {size} bytes is not a positive multiple of 512"
            )));
        }
        let base = fs::metadata(&t.base).map_err(io_at(&t.base))?.len();
        if size < base {
            return Err(TemplateError::OverlayTooSmall { size, base });
        }
        let file_name = path
            .file_name()
            .ok_or_else(|| TemplateError::Invalid(format!("overlay path {path:?} has no name")))?;
        let tmp = path.with_file_name(format!(
            ".{}.tmp-{}",
            file_name.to_string_lossy(),
            random_hex()?
        ));
        // The overlay records the backing path as given: it must not depend on a cwd.
        if !t.base.is_absolute() {
            return Err(TemplateError::Invalid(format!(
                "template base {} is not an absolute path",
                t.base.display()
            )));
        }
        let res = OpenOptions::new()
            .write(true)
            .create_new(true)
            // The guest's disk: root only (QEMU is handed a descriptor; see vm::qemu).
            .mode(0o600)
            .open(&tmp)
            .and_then(|f| super::qcow2::write(&f, &t.base, size))
            .map_err(io_at(&tmp))
            .and_then(|()| fs::rename(&tmp, path).map_err(io_at(path)));
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Digests with a template on disk (for sweeps). Also clears what killed builds left for
    /// digests nobody is building now (a build in progress holds the digest's lock).
    pub fn digests(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        let mut stale: Vec<&str> = names
            .iter()
            .filter_map(|n| n.strip_prefix(".tmp-"))
            .filter_map(|rest| rest.rsplit_once('-').map(|(name, _)| name))
            .filter(|name| name.split_once('-').is_some())
            .collect();
        stale.sort_unstable();
        stale.dedup();
        for name in stale {
            if let Ok(Some(_lock)) = self.try_lock(name) {
                if let Err(e) = self.clear_staging(name) {
                    tracing::warn!(template = name, error = %e, "cannot clear a template build's leftovers");
                }
            }
        }
        let mut out: Vec<String> = names
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .filter(|n| !self.builds(n).is_empty())
            .filter_map(|n| {
                let (algo, hex) = n.split_once('-')?;
                let digest = format!("{algo}:{hex}");
                dir_name(&digest).ok().map(|_| digest)
            })
            .collect();
        out.sort();
        out
    }

    /// Removes the template of `digest` (nothing if there is none). Refuses
    /// ([`TemplateError::InUse`]) while a [`Template`] of it is held or a process has its base
    /// open; a VM started later needs [`Templates::ensure`] again, which makes a new build in a
    /// new directory (a path is never reused).
    pub fn remove(&self, digest: &str) -> Result<(), TemplateError> {
        let name = dir_name(digest)?;
        let _lock = self.lock(&name)?;
        self.clear_staging(&name)?;
        let parent = self.root.join(&name);
        match fs::symlink_metadata(&parent) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_at(&parent)(e)),
            Ok(_) => {}
        }
        for build in self.builds(&name) {
            self.remove_build(&name, &build)?;
        }
        // Leftovers of the one-directory layout of format 1 (nothing ever reuses these paths).
        for f in [BASE, KERNEL, INITRD, META] {
            let _ = fs::remove_file(parent.join(f));
        }
        match fs::remove_dir(&parent) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_at(&parent)(e)),
            _ => Ok(()),
        }
    }

    /// The build directories of `name` (each holding a `template.json`).
    fn builds(&self, name: &str) -> Vec<PathBuf> {
        let parent = self.root.join(name);
        let Ok(entries) = fs::read_dir(&parent) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .filter(|p| p.join(META).is_file())
            .collect();
        out.sort();
        out
    }

    /// Deletes one build unless it is leased or open (caller holds the digest's lock).
    fn remove_build(&self, name: &str, build: &Path) -> Result<(), TemplateError> {
        let lease_path = build.join(LEASE);
        let lease = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lease_path)
            .map_err(io_at(&lease_path))?;
        let _excl = match Flock::lock(lease, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(TemplateError::InUse {
                    path: build.to_path_buf(),
                    why: "a VM being created holds it".into(),
                })
            }
            Err((_, e)) => return Err(io_at(&lease_path)(e.into())),
        };
        if let Some(pid) = open_by_process(&build.join(BASE)) {
            return Err(TemplateError::InUse {
                path: build.to_path_buf(),
                why: format!("process {pid} has its base disk open"),
            });
        }
        // Renamed first so that no reader ever sees half a template.
        let doomed = self.root.join(format!(".tmp-{name}-{}", random_hex()?));
        fs::rename(build, &doomed).map_err(io_at(build))?;
        fs::remove_dir_all(&doomed).map_err(io_at(&doomed))?;
        Ok(())
    }

    /// Removes the builds of `name` other than the current one, where nothing uses them.
    fn drop_stale(&self, name: &str, key: &str, identity: &Option<String>) {
        for build in self.builds(name) {
            if self
                .read_meta(&build)
                .is_ok_and(|m| self.valid(&m, key, identity))
            {
                continue;
            }
            match self.remove_build(name, &build) {
                Ok(()) => {}
                Err(TemplateError::InUse { .. }) => {}
                Err(e) => {
                    tracing::warn!(build = %build.display(), error = %e, "cannot remove a stale VM template")
                }
            }
        }
        let parent = self.root.join(name);
        for f in [BASE, KERNEL, INITRD, META] {
            let _ = fs::remove_file(parent.join(f));
        }
    }

    fn read_meta(&self, build: &Path) -> Result<Meta, String> {
        let bytes = fs::read(build.join(META)).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    }

    /// Whether a build's record matches the current builder, layers and default kernel.
    fn valid(&self, m: &Meta, key: &str, identity: &Option<String>) -> bool {
        m.format == FORMAT_VERSION
            && m.key == key
            && (m.kernel_from != "default" || m.default_identity == *identity)
    }

    /// The valid build of `digest`, leased.
    fn find(
        &self,
        digest: &str,
        name: &str,
        key: &str,
        identity: &Option<String>,
    ) -> Result<Option<Template>, TemplateError> {
        for dir in self.builds(name) {
            let Ok(meta) = self.read_meta(&dir) else {
                continue;
            };
            if meta.digest != digest || !self.valid(&meta, key, identity) {
                continue;
            }
            // The lease: shared, and only if the build is still in place once we hold it
            // (a remove renames the build away while holding the lease exclusively).
            let lease_path = dir.join(LEASE);
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&lease_path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_at(&lease_path)(e)),
            };
            let lease = Flock::lock(file, FlockArg::LockShared)
                .map_err(|(_, e)| io_at(&lease_path)(e.into()))?;
            let held = lease.metadata().map_err(io_at(&lease_path))?;
            match fs::metadata(&lease_path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {}
                _ => continue,
            }
            return Ok(Some(Template {
                digest: digest.to_string(),
                key: key.to_string(),
                base: dir.join(BASE),
                kernel: dir.join(KERNEL),
                initrd: meta.initrd.then(|| dir.join(INITRD)),
                cmdline: meta.cmdline,
                lease: Some(std::sync::Arc::new(Lease(lease))),
            }));
        }
        Ok(None)
    }

    fn lock(&self, name: &str) -> Result<Flock<File>, TemplateError> {
        let (file, path) = self.lock_file(name)?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| TemplateError::Io {
            path,
            source: e.into(),
        })
    }

    /// The digest's lock if nobody holds it (`None` while a build runs).
    fn try_lock(&self, name: &str) -> Result<Option<Flock<File>>, TemplateError> {
        let (file, path) = self.lock_file(name)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(Some(l)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(TemplateError::Io {
                path,
                source: e.into(),
            }),
        }
    }

    fn lock_file(&self, name: &str) -> Result<(File, PathBuf), TemplateError> {
        let locks = self.root.join(".locks");
        fs::create_dir_all(&locks).map_err(io_at(&locks))?;
        // The daemon's alone: a VM user (who may read the templates) must not hold a lock.
        set_mode(&locks, 0o700)?;
        let path = locks.join(format!("{name}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_at(&path))?;
        Ok((file, path))
    }

    /// Removes what a killed build of `name` left (caller holds the digest's lock).
    fn clear_staging(&self, name: &str) -> Result<(), TemplateError> {
        let prefix = format!(".tmp-{name}-");
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Ok(());
        };
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                Staging {
                    path: e.path(),
                    armed: true,
                }
                .cleanup();
            }
        }
        Ok(())
    }

    /// Builds the template's files into `out` (an empty staging directory).
    fn build(
        &self,
        digest: &str,
        key: &str,
        layers: &[PathBuf],
        identity: &Option<String>,
        out: &Path,
    ) -> Result<(), TemplateError> {
        for l in layers {
            crate::disk::check_overlay_path(l)
                .map_err(|e| TemplateError::Invalid(format!("layer: {e}")))?;
            let s = l.display();
            if !l.is_absolute() {
                return Err(TemplateError::Invalid(format!(
                    "layer path {s} is not absolute"
                )));
            }
            if !fs::symlink_metadata(l).map_err(io_at(l))?.is_dir() {
                return Err(TemplateError::Invalid(format!(
                    "layer {s:?} is not a directory"
                )));
            }
        }
        let mnt = out.join("root");
        let empty = out.join("empty");
        let empty2 = out.join("empty2");
        for d in [&mnt, &empty, &empty2] {
            fs::create_dir(d).map_err(io_at(d))?;
        }
        // Empty bottom layers: a read-only overlay wants two lower dirs on older kernels, so a
        // one-layer or layerless image mounts the same way as any other.
        let mut lower: Vec<String> = layers.iter().map(|l| l.display().to_string()).collect();
        lower.push(empty.display().to_string());
        if layers.is_empty() {
            lower.push(empty2.display().to_string());
        }
        mount_layers(&lower, &mnt)?;
        let res = self.build_mounted(digest, &mnt, out).map(|mut meta| {
            meta.key = key.to_string();
            meta.layers = layers.iter().map(|l| l.display().to_string()).collect();
            if meta.kernel_from == "default" {
                meta.default_identity = identity.clone();
            }
            meta
        });
        let unmounted =
            nix::mount::umount2(&mnt, MntFlags::empty()).map_err(|source| TemplateError::Mount {
                target: mnt.clone(),
                source,
            });
        let meta = res?;
        unmounted?;
        for d in [&mnt, &empty, &empty2] {
            fs::remove_dir(d).map_err(io_at(d))?;
        }
        let meta_path = out.join(META);
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| TemplateError::Invalid(format!("cannot encode template metadata: {e}")))?;
        write_synced(&meta_path, &json)?;
        write_synced(&out.join(LEASE), b"")?;
        sync_dir(out)?;
        Ok(())
    }

    fn build_mounted(&self, digest: &str, mnt: &Path, out: &Path) -> Result<Meta, TemplateError> {
        // Kernel and initrd: the image's own, else the operator's.
        let (kernel_from, kernel_source, initrd) = match find_boot(mnt)? {
            Some((kernel, initrd)) => {
                copy_capped(
                    &mnt.join("boot").join(&kernel),
                    &out.join(KERNEL),
                    MAX_KERNEL_BYTES,
                    digest,
                    "kernel",
                )?;
                if let Some(i) = &initrd {
                    copy_capped(
                        &mnt.join("boot").join(i),
                        &out.join(INITRD),
                        MAX_INITRD_BYTES,
                        digest,
                        "initrd",
                    )?;
                }
                ("image", kernel, initrd.is_some())
            }
            None => {
                let Some(kernel) = &self.default_kernel else {
                    return Err(TemplateError::NoKernel {
                        digest: digest.to_string(),
                    });
                };
                // The operator's files: trusted, but copied so the template never changes.
                fs::copy(kernel, out.join(KERNEL)).map_err(io_at(kernel))?;
                if let Some(i) = &self.default_initrd {
                    fs::copy(i, out.join(INITRD)).map_err(io_at(i))?;
                }
                (
                    "default",
                    kernel.display().to_string(),
                    self.default_initrd.is_some(),
                )
            }
        };

        let usage = measure(mnt, digest, MAX_BASE_BYTES)?;
        let base_bytes = base_size(&usage);
        // The base is written in full by mkfs (data and metadata): refuse before filling the
        // disk the daemon's other state lives on.
        let st = nix::sys::statvfs::statvfs(out).map_err(|e| io_at(out)(e.into()))?;
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        let need = usage.bytes.saturating_add(64 << 20);
        if need > free {
            return Err(TemplateError::NoSpace {
                path: out.to_path_buf(),
                need,
                free,
            });
        }
        let base = out.join(BASE);
        let file = File::create(&base).map_err(io_at(&base))?;
        file.set_len(base_bytes).map_err(io_at(&base))?;
        drop(file);
        let inodes = (usage.inodes * 3 / 2 + 4096).to_string();
        let args: Vec<&std::ffi::OsStr> = vec![
            "-q".as_ref(),
            "-F".as_ref(),
            "-m".as_ref(),
            "0".as_ref(),
            // 4 KiB blocks whatever the size (mke2fs would pick 1 KiB below 512 MiB): the
            // guest grows this filesystem to its disk, up to 16 TiB.
            "-b".as_ref(),
            "4096".as_ref(),
            "-N".as_ref(),
            inodes.as_ref(),
            "-L".as_ref(),
            "gpuvisor-root".as_ref(),
            "-E".as_ref(),
            "root_owner=0:0".as_ref(),
            "-d".as_ref(),
            mnt.as_os_str(),
            base.as_os_str(),
        ];
        run_mkfs(&args, &out.join("mkfs.log"), mkfs_deadline(usage.bytes))?;
        // Read-only for everyone: VMs write to their overlays only.
        set_mode(&base, 0o444)?;
        File::open(&base)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&base))?;
        for f in [KERNEL, INITRD] {
            let p = out.join(f);
            if p.exists() {
                set_mode(&p, 0o444)?;
                File::open(&p)
                    .and_then(|f| f.sync_all())
                    .map_err(io_at(&p))?;
            }
        }
        Ok(Meta {
            format: FORMAT_VERSION,
            key: String::new(),
            layers: Vec::new(),
            default_identity: None,
            digest: digest.to_string(),
            kernel_from: kernel_from.to_string(),
            kernel_source,
            initrd,
            cmdline: CMDLINE.to_string(),
            base_bytes,
        })
    }
}

/// The read-only, `nosuid,nodev` overlay of `lower` (top first) at `mnt`: the image's set-id
/// files and device nodes are never usable on the host while mkfs reads them.
fn mount_layers(lower: &[String], mnt: &Path) -> Result<(), TemplateError> {
    let opts = format!("lowerdir={}", lower.join(":"));
    nix::mount::mount(
        Some("overlay"),
        mnt,
        Some("overlay"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|source| TemplateError::Mount {
        target: mnt.to_path_buf(),
        source,
    })
}

/// sha256 over the builder's format version and the ordered layer directories (the image
/// store names each by its diff id, so the list identifies the flattened contents).
fn build_key(layers: &[PathBuf]) -> Result<String, TemplateError> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"gpuvisor-vm-template\0");
    h.update(FORMAT_VERSION.to_le_bytes());
    for l in layers {
        let s = l.to_str().ok_or_else(|| {
            TemplateError::Invalid(format!("layer path {} is not UTF-8", l.display()))
        })?;
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The image store's shared lock (`<images>/lock`, taken exclusively by its gc) when the
/// layers live in an image store (`<images>/layers/<id>`); `None` otherwise (tests, benches).
fn image_store_lock(layers: &[PathBuf]) -> Result<Option<Flock<File>>, TemplateError> {
    let Some(store) = layers
        .first()
        .and_then(|l| l.parent())
        .filter(|p| p.file_name().is_some_and(|n| n == "layers"))
        .and_then(|p| p.parent())
    else {
        return Ok(None);
    };
    let path = store.join("lock");
    if !path.is_file() {
        return Ok(None);
    }
    let file = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io_at(&path))?;
    Flock::lock(file, FlockArg::LockShared)
        .map(Some)
        .map_err(|(_, e)| io_at(&path)(e.into()))
}

/// A process holding `path` open (scans `/proc/*/fd`), if any.
fn open_by_process(path: &Path) -> Option<u32> {
    let procs = fs::read_dir("/proc").ok()?;
    for p in procs.filter_map(|e| e.ok()) {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.filter_map(|e| e.ok()) {
            if fs::read_link(fd.path()).is_ok_and(|t| t == path) {
                return Some(pid);
            }
        }
    }
    None
}

/// `sha256:<hex>` → `sha256-<hex>`; anything else is refused (the name becomes a path).
fn dir_name(digest: &str) -> Result<String, TemplateError> {
    let bad = || TemplateError::Invalid(format!("{digest:?} is not an image digest"));
    let (algo, hex) = digest.split_once(':').ok_or_else(bad)?;
    let algo_ok = !algo.is_empty()
        && algo.len() <= 16
        && algo
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let hex_ok = (32..=128).contains(&hex.len())
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if algo_ok && hex_ok {
        Ok(format!("{algo}-{hex}"))
    } else {
        Err(bad())
    }
}

pub(crate) fn random_hex() -> Result<String, TemplateError> {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).map_err(|e| TemplateError::Invalid(format!("random: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A staging directory removed (after unmounting what is mounted in it) unless disarmed.
struct Staging {
    path: PathBuf,
    armed: bool,
}

impl Staging {
    fn new(path: PathBuf) -> Result<Self, TemplateError> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        fs::create_dir(&path).map_err(io_at(&path))?;
        set_mode(&path, 0o755)?;
        Ok(Staging { path, armed: true })
    }

    fn disarm(mut self) {
        self.armed = false;
    }

    fn cleanup(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        // A build killed mid-way may have left its overlay mounted.
        if let Ok(mounts) = crate::disk::mounts_under(&self.path) {
            for m in mounts.iter().rev() {
                if let Err(e) = nix::mount::umount2(m, MntFlags::MNT_DETACH) {
                    tracing::warn!(mount = %m.display(), error = %e, "cannot unmount a template build's leftover");
                }
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a template build's leftovers");
            }
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// The kernel (and its initrd) in the merged image's /boot: regular files only, found without
/// following any symlink. Highest version first: `vmlinuz-6.1.0-9` before `vmlinuz-6.1.0-10`
/// compares numerically.
fn find_boot(mnt: &Path) -> Result<Option<(String, Option<String>)>, TemplateError> {
    let boot = mnt.join("boot");
    match fs::symlink_metadata(&boot) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Ok(None), // a symlink or a file: not followed
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_at(&boot)(e)),
    }
    let mut files = Vec::new();
    // At most 10,000 entries of any kind are looked at (an image's /boot holds a handful).
    for e in fs::read_dir(&boot).map_err(io_at(&boot))?.take(10_000) {
        let e = e.map_err(io_at(&boot))?;
        let ft = e.file_type().map_err(io_at(&boot))?;
        if !ft.is_file() {
            continue;
        }
        if let Ok(name) = e.file_name().into_string() {
            files.push(name);
        }
    }
    let mut kernels: Vec<&String> = files
        .iter()
        .filter(|n| *n == "vmlinuz" || n.starts_with("vmlinuz-"))
        .collect();
    kernels.sort_by(|a, b| version_cmp(b, a));
    let Some(kernel) = kernels.first() else {
        return Ok(None);
    };
    let version = kernel.strip_prefix("vmlinuz").unwrap_or("");
    let candidates = [
        format!("initrd.img{version}"),
        format!("initramfs{version}.img"),
        format!("initrd{version}"),
        format!("initrd{version}.img"),
    ];
    let initrd = candidates.into_iter().find(|c| files.contains(c));
    Ok(Some(((*kernel).clone(), initrd)))
}

/// Compares names piecewise, digit runs as numbers.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn pieces(s: &str) -> Vec<(bool, String)> {
        let mut out: Vec<(bool, String)> = Vec::new();
        for c in s.chars() {
            let d = c.is_ascii_digit();
            match out.last_mut() {
                Some((kind, p)) if *kind == d => p.push(c),
                _ => out.push((d, c.to_string())),
            }
        }
        out
    }
    let (pa, pb) = (pieces(a), pieces(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != std::cmp::Ordering::Equal {
            return ord;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Copies a file of the untrusted image: never through a symlink, at most `max` bytes.
fn copy_capped(
    src: &Path,
    dst: &Path,
    max: u64,
    digest: &str,
    what: &str,
) -> Result<(), TemplateError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(src)
        .map_err(io_at(src))?;
    let meta = file.metadata().map_err(io_at(src))?;
    if !meta.is_file() {
        return Err(TemplateError::Invalid(format!(
            "image {digest}: {} is not a regular file",
            src.display()
        )));
    }
    let too_large = |size| TemplateError::TooLarge {
        digest: digest.to_string(),
        what: what.to_string(),
        size,
        max,
    };
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(dst)
        .map_err(io_at(dst))?;
    let copied = io::copy(&mut file.take(max + 1), &mut out).map_err(io_at(dst))?;
    if copied > max {
        return Err(too_large(copied));
    }
    out.flush().map_err(io_at(dst))?;
    Ok(())
}

#[derive(Debug, Default)]
struct Usage {
    bytes: u64,
    inodes: u64,
}

/// Deepest directory nesting an image may have (the walk keeps one open directory per level).
pub const MAX_DEPTH: usize = 256;

/// Allocated bytes and inodes of the merged tree, by `lstat` (no link followed), bounded:
/// depth first with one open directory per level (at most [`MAX_DEPTH`]), so memory does not
/// grow with the number of entries.
fn measure(mnt: &Path, digest: &str, max_bytes: u64) -> Result<Usage, TemplateError> {
    measure_capped(mnt, digest, max_bytes, MAX_INODES)
}

fn measure_capped(
    mnt: &Path,
    digest: &str,
    max_bytes: u64,
    max_inodes: u64,
) -> Result<Usage, TemplateError> {
    let mut usage = Usage::default();
    let mut stack: Vec<(PathBuf, fs::ReadDir)> =
        vec![(mnt.to_path_buf(), fs::read_dir(mnt).map_err(io_at(mnt))?)];
    while let Some((dir, iter)) = stack.last_mut() {
        let Some(e) = iter.next() else {
            stack.pop();
            continue;
        };
        let e = e.map_err(io_at(dir))?;
        let path = e.path();
        let m = fs::symlink_metadata(&path).map_err(io_at(&path))?;
        usage.inodes += 1;
        // Allocated blocks (holes cost nothing; mkfs keeps them) plus a block of metadata.
        usage.bytes = usage.bytes.saturating_add(m.blocks() * 512 + 4096);
        if usage.bytes > max_bytes {
            return Err(TemplateError::TooLarge {
                digest: digest.to_string(),
                what: "the flattened image".into(),
                size: usage.bytes,
                max: max_bytes,
            });
        }
        if usage.inodes > max_inodes {
            return Err(TemplateError::TooLarge {
                digest: digest.to_string(),
                what: "the number of files".into(),
                size: usage.inodes,
                max: max_inodes,
            });
        }
        if m.is_dir() {
            if stack.len() > MAX_DEPTH {
                return Err(TemplateError::TooLarge {
                    digest: digest.to_string(),
                    what: "the directory nesting".into(),
                    size: stack.len() as u64 + 1,
                    max: MAX_DEPTH as u64,
                });
            }
            let iter = fs::read_dir(&path).map_err(io_at(&path))?;
            stack.push((path, iter));
        }
    }
    Ok(usage)
}

/// How long mkfs may copy `bytes` (at idle I/O priority): 10 minutes plus a minute per GiB.
fn mkfs_deadline(bytes: u64) -> std::time::Duration {
    std::time::Duration::from_secs(600 + 60 * bytes.div_ceil(1 << 30))
}

/// Runs `mkfs.ext4 args` at nice 19 and idle I/O priority (like the container disk pool's
/// refill), killed when `deadline` passes. Its stderr goes to `log` (read on failure, then
/// removed) so no pipe can fill up while we wait.
fn run_mkfs(
    args: &[&std::ffi::OsStr],
    log: &Path,
    deadline: std::time::Duration,
) -> Result<(), TemplateError> {
    use std::os::unix::process::CommandExt;
    let describe = || {
        let mut c = String::from("mkfs.ext4");
        for a in args {
            c.push(' ');
            c.push_str(&a.to_string_lossy());
        }
        c
    };
    let err_file = File::create(log).map_err(io_at(log))?;
    let mut command = std::process::Command::new("mkfs.ext4");
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err_file);
    // SAFETY: runs in the forked child before exec; setpriority(2) and ioprio_set(2) are
    // async-signal-safe syscalls on the child itself (who = 0) taking only integers.
    unsafe {
        command.pre_exec(|| {
            libc::setpriority(libc::PRIO_PROCESS, 0, 19);
            libc::syscall(libc::SYS_ioprio_set, 1, 0, 3 << 13);
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| {
        TemplateError::Cmd(CmdError::Spawn {
            program: "mkfs.ext4".into(),
            source,
        })
    })?;
    let start = std::time::Instant::now();
    let status = loop {
        match child.try_wait().map_err(io_at(log))? {
            Some(st) => break st,
            None if start.elapsed() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = fs::remove_file(log);
                return Err(TemplateError::Cmd(CmdError::Failed {
                    command: describe(),
                    status: format!("killed after {} s", deadline.as_secs()),
                    stderr: String::new(),
                }));
            }
            None => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    };
    let stderr = fs::read_to_string(log).unwrap_or_default();
    fs::remove_file(log).map_err(io_at(log))?;
    if status.success() {
        Ok(())
    } else {
        Err(TemplateError::Cmd(CmdError::Failed {
            command: describe(),
            status: status.to_string(),
            stderr: stderr.trim().to_string(),
        }))
    }
}

/// The base disk's size: the data, its inodes and the journal with room to spare, in MiB.
fn base_size(u: &Usage) -> u64 {
    const MIB: u64 = 1 << 20;
    let inode_tables = (u.inodes * 3 / 2 + 4096) * 256;
    let raw = u.bytes + u.bytes / 8 + inode_tables + 16 * MIB;
    raw.div_ceil(MIB) * MIB
}

fn set_mode(path: &Path, mode: u32) -> Result<(), TemplateError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_at(path))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TemplateError> {
    let mut f = File::create(path).map_err(io_at(path))?;
    f.write_all(bytes).map_err(io_at(path))?;
    f.sync_all().map_err(io_at(path))
}

fn sync_dir(dir: &Path) -> Result<(), TemplateError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_at(dir))
}

#[cfg(test)]
mod tests;
