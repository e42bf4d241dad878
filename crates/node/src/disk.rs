//! Container disks, persistent volumes, loop devices and overlay mounts.
//!
//! Why: an instance's writable layer must have a hard size limit and must not share a filesystem
//! with the host or with other tenants, and a tenant's volume must outlive any instance. Both are
//! sparse ext4 images on loop devices; quotas on a shared filesystem would depend on how the
//! host's data dir was formatted.
//!
//! Layout under the data dir (every object carries the instance id, so a crashed daemon can find
//! orphans with [`Disks::instances_with_objects`]):
//!
//! ```text
//! <data>/disks/<id>.img                      container disk (ext4, sparse, exactly `size` bytes)
//! <data>/disks/.pool/<size>-<nonce>.img      a formatted container disk waiting for a create
//! <data>/instances/<id>/disk                 the container disk, mounted
//! <data>/instances/<id>/disk/{upper,work}    overlay upper and work dirs
//! <data>/instances/<id>/rootfs               overlay: image layers (lower) + upper = bundle rootfs
//! <data>/instances/<id>/volumes/<name>       an attached volume, mounted
//! <data>/volumes/<tenant>/<name>.img         persistent volume (ext4, sparse); never deleted here
//!                                            except by `remove_volume`
//! ```
//!
//! Key decisions:
//! - Loop devices are attached with the `LOOP_CONFIGURE` ioctl (kernel 5.8+) and the *autoclear*
//!   flag, and the device is mounted while our handle is still open. The loop device then lives
//!   exactly as long as the mount: unmounting frees it, and a crash between attach and mount frees
//!   it too (the kernel clears it when our descriptor closes). Teardown still clears any loop device
//!   whose backing file is ours, belt and braces.
//! - Images are built under `<name>.img.partial` and renamed into place after `mkfs.ext4`, so an
//!   image that exists is always a complete filesystem.
//! - A create runs no `mkfs.ext4`: container disks come formatted from a pool (see `Pool`), one
//!   rename; only a size the pool has not seen lately is made on the spot. Container disks have
//!   no journal (they are wiped whenever the instance stops, so a crash never needs their
//!   content) and are mounted `noinit_itable`; volumes keep their journal.
//! - A new instance (no instance dir, no disk image) is provisioned without reading the mount
//!   table or the loop devices, which grow with the host; anything half made goes the long,
//!   checking way.
//! - The same ext4 image must never be mounted through two loop devices (that corrupts it), so a
//!   volume with any loop device attached is "in use": attach and remove refuse it.
//! - Nothing is ever recursively deleted while something is still mounted beneath it: teardown
//!   re-reads `/proc/self/mountinfo` before removing the instance dir.
//! - Sizes are rounded up to a multiple of 512 bytes (a loop device's size is counted in
//!   sectors); any size given in whole KiB or MB is therefore kept exactly.
//!
//! Callers serialise operations on one instance id; operations on volumes are serialised in this
//! process by a lock so that two instances can never attach the same volume at once.

use nix::mount::{MntFlags, MsFlags};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Smallest container disk or volume accepted: below this, ext4's own metadata (journal, inode
/// tables) leaves almost nothing usable.
pub const MIN_SIZE: u64 = 16 * 1024 * 1024;

/// How long teardown waits for the kernel to release loop devices after their last unmount.
const LOOP_RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Serialises volume attach/detach/remove in this process (see the module docs).
static VOLUME_LOCK: Mutex<()> = Mutex::new(());

#[derive(Debug, Error)]
pub enum DiskError {
    #[error(transparent)]
    Cmd(#[from] crate::cmd::CmdError),
    #[error("io on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {target}: {source}")]
    Mount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("unmount {target}: {source}")]
    Unmount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "size {size} bytes is below the minimum of {min} bytes (16 MiB); ask for a larger disk"
    )]
    TooSmall { size: u64, min: u64 },
    #[error("{path} already exists with {existing} bytes, not the {requested} asked for; remove it first")]
    SizeMismatch {
        path: PathBuf,
        existing: u64,
        requested: u64,
    },
    #[error("volume {tenant}/{name} does not exist; create it first")]
    VolumeNotFound { tenant: String, name: String },
    #[error("{path} is in use ({by}); detach it first")]
    InUse { path: PathBuf, by: String },
    #[error("loop device {op} for {path}: {source}")]
    Loop {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("still mounted after unmounting: {0:?}")]
    StillMounted(Vec<PathBuf>),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Layout of gpuvisor's disks under the data dir.
#[derive(Debug, Clone)]
pub struct Disks {
    pub data_dir: PathBuf,
    /// Container disk images formatted ahead of time (off unless [`Disks::with_pool`]).
    pool: Arc<Pool>,
}

/// How many formatted images the pool keeps ready per size.
pub const POOL_DEPTH: usize = 4;
/// How many sizes the pool keeps images for: the most recently asked for.
const POOL_SIZES: usize = 4;
/// Larger container disks are never pooled (`mkfs` metadata grows with the size, and a tenant
/// choosing sizes must not make the daemon format huge images ahead).
const POOL_MAX_SIZE: u64 = 256 << 30;

/// Container disk images formatted ahead of time, per size, under `<data>/disks/.pool/` as
/// `<size>-<nonce>.img` (built as `.partial` and renamed, like every image). A create takes one
/// by renaming it to `<data>/disks/<id>.img` (no `mkfs.ext4` on the create path) and a
/// short-lived background thread, at the lowest CPU priority, makes a new one. A size nobody
/// asked for lately is dropped; a size not in the pool falls back to `mkfs.ext4` at once.
///
/// The pool's images are no instance's objects: the orphan sweep never sees them (`.pool` is
/// not an `<id>.img`, and they are never attached to a loop device while in the pool). At
/// start [`Disks::open_pool`] removes partial images and reuses the complete ones.
#[derive(Debug, Default)]
struct Pool {
    /// Images kept per size; 0: no pool.
    depth: usize,
    state: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    /// Sizes asked for, least recent first (at most [`POOL_SIZES`]).
    sizes: Vec<u64>,
    /// Ready images per size.
    ready: BTreeMap<u64, Vec<PathBuf>>,
    /// A refill thread is running.
    filling: bool,
    /// The pool dir was opened (stale partials removed, images indexed, dir made).
    open: bool,
}

/// A mounted instance root: overlay of image layers over the container disk.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRoot {
    /// The merged overlay (`<data>/instances/<id>/rootfs`), the bundle's rootfs.
    pub rootfs: PathBuf,
}

/// The data dir resolved to the absolute, symlink-free form the kernel reports in
/// `/proc/self/mountinfo` and loop `backing_file`s, so paths compare equal.
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn disks(&self) -> PathBuf {
        self.root.join("disks")
    }
    fn pool(&self) -> PathBuf {
        self.disks().join(".pool")
    }
    fn disk_image(&self, id: &str) -> PathBuf {
        self.disks().join(format!("{id}.img"))
    }
    fn instances(&self) -> PathBuf {
        self.root.join("instances")
    }
    fn instance(&self, id: &str) -> PathBuf {
        self.instances().join(id)
    }
    fn disk_mount(&self, id: &str) -> PathBuf {
        self.instance(id).join("disk")
    }
    fn rootfs(&self, id: &str) -> PathBuf {
        self.instance(id).join("rootfs")
    }
    fn volume_mounts(&self, id: &str) -> PathBuf {
        self.instance(id).join("volumes")
    }
    fn volumes(&self) -> PathBuf {
        self.root.join("volumes")
    }
    fn volume_image(&self, tenant: &str, name: &str) -> PathBuf {
        self.volumes().join(tenant).join(format!("{name}.img"))
    }
}

impl Disks {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            pool: Arc::new(Pool::default()),
        }
    }

    /// Keeps `depth` formatted container disk images ready per recently asked size (see
    /// [`Pool`]); takes effect once [`Disks::open_pool`] has run.
    #[must_use]
    pub fn with_pool(mut self, depth: usize) -> Self {
        self.pool = Arc::new(Pool {
            depth,
            state: Mutex::new(PoolState::default()),
        });
        self
    }

    /// Opens the pool dir: removes what a crash left half made (partial images, names that are
    /// not ours), reuses the complete images, and starts refilling the sizes found. Without a
    /// pool ([`Disks::with_pool`]), removes any pool dir an earlier run left.
    pub fn open_pool(&self) -> Result<(), DiskError> {
        let l = self.layout(true)?;
        let dir = l.pool();
        let depth = self.pool.depth;
        if depth == 0 {
            return match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(io_err(&dir)(e)),
                _ => Ok(()),
            };
        }
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut st = self.pool.state.lock().unwrap_or_else(|p| p.into_inner());
        for name in read_dir_names(&dir)? {
            let path = dir.join(&name);
            let size = pool_size_of(&name).filter(|size| {
                std::fs::symlink_metadata(&path)
                    .is_ok_and(|m| m.is_file() && m.len() == *size && *size <= POOL_MAX_SIZE)
            });
            let keep = size.is_some_and(|size| {
                if !st.sizes.contains(&size) && st.sizes.len() >= POOL_SIZES {
                    return false;
                }
                let ready = st.ready.entry(size).or_default();
                if ready.len() >= depth {
                    return false;
                }
                ready.push(path.clone());
                if !st.sizes.contains(&size) {
                    st.sizes.push(size);
                }
                true
            });
            if !keep {
                remove_file_if_exists(&path)?;
            }
        }
        st.open = true;
        let n: usize = st.ready.values().map(Vec::len).sum();
        tracing::info!(images = n, sizes = ?st.sizes, "container disk pool opened");
        self.start_refill(&mut st, l.pool());
        Ok(())
    }

    /// A formatted image of `size` bytes at `image`: one from the pool when it has one (and a
    /// refill is started), else `mkfs.ext4` now.
    fn new_disk_image(&self, l: &Layout, image: &Path, size: u64) -> Result<(), DiskError> {
        if self.pool.depth > 0 {
            let taken = {
                let mut st = self.pool.state.lock().unwrap_or_else(|p| p.into_inner());
                if !st.open {
                    None
                } else {
                    if size <= POOL_MAX_SIZE {
                        st.sizes.retain(|s| *s != size);
                        st.sizes.push(size);
                        // The least recent sizes go; the refill drops their images.
                        let over = st.sizes.len().saturating_sub(POOL_SIZES);
                        st.sizes.drain(..over);
                    }
                    let taken = st.ready.get_mut(&size).and_then(Vec::pop);
                    self.start_refill(&mut st, l.pool());
                    taken
                }
            };
            if let Some(from) = taken {
                match std::fs::rename(&from, image) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        tracing::warn!(image = %from.display(), "cannot take a pool image: {e}");
                        let _ = std::fs::remove_file(&from);
                    }
                }
            }
        }
        make_ext4_image(image, size, Ext4::ContainerDisk)
    }

    /// Starts the refill thread unless one runs; it makes images until every wanted size has
    /// [`Pool::depth`] of them, drops the images of sizes no longer wanted, and ends.
    fn start_refill(&self, st: &mut PoolState, dir: PathBuf) {
        if st.filling || self.pool.depth == 0 {
            return;
        }
        st.filling = true;
        let pool = self.pool.clone();
        let spawned = std::thread::Builder::new()
            .name("disk-pool".into())
            .spawn(move || refill(&pool, &dir));
        if let Err(e) = spawned {
            tracing::warn!("cannot start the container disk pool refill: {e}");
            st.filling = false;
        }
    }

    /// `<data>/disks/<id>.img`.
    pub fn disk_image(&self, id: &str) -> PathBuf {
        self.data_dir.join("disks").join(format!("{id}.img"))
    }

    /// `<data>/instances/<id>`: everything mounted for an instance lives below it.
    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("instances").join(id)
    }

    /// Where instance `id`'s container disk is mounted.
    pub fn disk_mount(&self, id: &str) -> PathBuf {
        self.instance_dir(id).join("disk")
    }

    /// Where volume `name` is mounted for instance `id`.
    pub fn volume_mount(&self, id: &str, name: &str) -> PathBuf {
        self.instance_dir(id).join("volumes").join(name)
    }

    /// Replaces the content of `tenant`'s volume `name` with a copy of `src` (a snapshot's
    /// image of it, the same size), whole or not at all. Refused while the volume is attached.
    pub fn replace_volume_image(
        &self,
        tenant: &str,
        name: &str,
        src: &Path,
    ) -> Result<(), DiskError> {
        check_name("tenant id", tenant)?;
        check_name("volume name", name)?;
        let l = self.layout(false)?;
        let image = l.volume_image(tenant, name);
        let check = || -> Result<(), DiskError> {
            let now = std::fs::metadata(&image).map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    DiskError::VolumeNotFound {
                        tenant: tenant.to_string(),
                        name: name.to_string(),
                    }
                } else {
                    io_err(&image)(e)
                }
            })?;
            let have = std::fs::metadata(src).map_err(io_err(src))?.len();
            if have != now.len() {
                return Err(DiskError::SizeMismatch {
                    path: image.clone(),
                    existing: now.len(),
                    requested: have,
                });
            }
            refuse_if_in_use(&image)
        };
        {
            let _guard = VOLUME_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            check()?;
        }
        // The copy outside the volume lock (every tenant's attach and teardown takes it), the
        // rename under it after checking again.
        let partial = partial_path(&image);
        let _ = std::fs::remove_file(&partial);
        crate::snapshot::sparse_copy(src, &partial).map_err(io_err(&partial))?;
        let _guard = VOLUME_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = check() {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, &image).map_err(io_err(&image))?;
        tracing::info!(tenant, name, from = %src.display(), "volume restored");
        Ok(())
    }

    /// `<data>/volumes/<tenant>/<name>.img`.
    pub fn volume_image(&self, tenant: &str, name: &str) -> PathBuf {
        self.data_dir
            .join("volumes")
            .join(tenant)
            .join(format!("{name}.img"))
    }

    /// Resolves the data dir; with `create`, makes it first (provisioning), otherwise a missing
    /// data dir is used as given (teardown and listing of nothing).
    fn layout(&self, create: bool) -> Result<Layout, DiskError> {
        if create {
            std::fs::create_dir_all(&self.data_dir).map_err(io_err(&self.data_dir))?;
        }
        let root = match std::fs::canonicalize(&self.data_dir) {
            Ok(p) => p,
            Err(e) if e.kind() == ErrorKind::NotFound && !create => {
                if self.data_dir.is_absolute() {
                    self.data_dir.clone()
                } else {
                    let cwd = std::env::current_dir().map_err(io_err(&self.data_dir))?;
                    cwd.join(&self.data_dir)
                }
            }
            Err(e) => return Err(io_err(&self.data_dir)(e)),
        };
        Ok(Layout { root })
    }

    /// Creates the container disk (ext4 of exactly `size` bytes on a loop device), mounts it,
    /// and mounts the overlay rootfs (lower = `layers`, top first) on it. Idempotent: an existing
    /// mounted rootfs is returned as is, and an existing disk image (after a host reboot) is
    /// mounted again with its content.
    ///
    /// On error, whatever was made stays for [`Disks::teardown_root`] to remove.
    pub fn provision_root(
        &self,
        id: &str,
        size: u64,
        layers_top_first: &[PathBuf],
    ) -> Result<InstanceRoot, DiskError> {
        self.provision_root_from(id, size, layers_top_first, None)
    }

    /// [`Disks::provision_root`] whose new disk is a copy of `base` (a snapshot's disk, of
    /// exactly `size` bytes) instead of an empty one.
    pub fn provision_root_from(
        &self,
        id: &str,
        size: u64,
        layers_top_first: &[PathBuf],
        base: Option<&Path>,
    ) -> Result<InstanceRoot, DiskError> {
        check_id(id)?;
        let size = checked_size(size)?;
        for layer in layers_top_first {
            check_overlay_path(layer)?;
            if !layer.is_dir() {
                return Err(DiskError::Invalid(format!(
                    "image layer {} is not a directory",
                    layer.display()
                )));
            }
        }
        let l = self.layout(true)?;
        check_overlay_path(&l.root)?;
        let rootfs = l.rootfs(id);
        let image = l.disk_image(id);
        // A fresh instance (no instance dir, no disk image) has nothing mounted, no loop device
        // and no image: skip the scans of the mount table and of every loop device, which grow
        // with the number of instances on the host. Anything half made goes the long way.
        let fresh = !exists(&l.instance(id))? && !exists(&image)?;
        let t0 = Instant::now();
        let (mut t_image, mut t_loop, mut t_mount) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        if !fresh && is_mount_point(&rootfs)? {
            return Ok(InstanceRoot { rootfs });
        }
        let disk_mnt = l.disk_mount(id);
        for dir in [l.disks(), disk_mnt.clone(), rootfs.clone()] {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }

        if fresh || !is_mount_point(&disk_mnt)? {
            if !fresh {
                // Not mounted here, so a loop device on the image is stale or used elsewhere; a
                // second one would mount the same ext4 twice.
                release_loops_backed_by(&image)?;
                refuse_if_in_use(&image)?;
                // An image left by a provisioning a crash cut short: no journal, maybe unclean,
                // and its content is to be wiped anyway. A new one is taken below.
                remove_file_if_exists(&image)?;
            }
            match std::fs::metadata(&image) {
                Ok(m) if m.len() == size => {}
                Ok(m) => {
                    return Err(DiskError::SizeMismatch {
                        path: image,
                        existing: m.len(),
                        requested: size,
                    })
                }
                Err(e) if e.kind() == ErrorKind::NotFound => match base {
                    None => self.new_disk_image(&l, &image, size)?,
                    Some(base) => {
                        let have = std::fs::metadata(base).map_err(io_err(base))?.len();
                        if have != size {
                            return Err(DiskError::SizeMismatch {
                                path: base.to_path_buf(),
                                existing: have,
                                requested: size,
                            });
                        }
                        crate::snapshot::replace_with_copy(base, &image).map_err(io_err(&image))?
                    }
                },
                Err(e) => return Err(io_err(&image)(e)),
            }
            t_image = t0.elapsed();
            // nosuid,nodev: what the tenant writes (a setuid-root binary, a device node) is inert
            // on the host side.
            t_loop = mount_image(
                &image,
                &disk_mnt,
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Ext4::ContainerDisk,
            )?;
            t_mount = t0.elapsed() - t_image;
            tracing::debug!(id, image = %image.display(), "container disk mounted");
        }

        let upper = disk_mnt.join("upper");
        let work = disk_mnt.join("work");
        for dir in [&upper, &work] {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let lower = if layers_top_first.is_empty() {
            // overlayfs needs at least one lower dir; an image with no layers starts empty.
            let empty = disk_mnt.join("empty");
            std::fs::create_dir_all(&empty).map_err(io_err(&empty))?;
            empty.display().to_string()
        } else {
            layers_top_first
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        };
        let opts = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            // The container's view keeps these flags (runc bind-mounts this mount as its root),
            // which costs nothing there: instances run with no_new_privs (setuid has no effect)
            // and their device nodes live on runc's own /dev.
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(opts.as_str()),
        )
        .map_err(|source| DiskError::Mount {
            target: rootfs.clone(),
            source,
        })?;
        tracing::debug!(
            target: "gpuvisor_timings",
            "disk {id} fresh={fresh} image_us={} loop_us={} mount_us={} overlay_us={}",
            t_image.as_micros(),
            t_loop.as_micros(),
            t_mount.saturating_sub(t_loop).as_micros(),
            (t0.elapsed() - t_image - t_mount).as_micros()
        );
        tracing::info!(
            id,
            size,
            layers = layers_top_first.len(),
            "instance root provisioned"
        );
        Ok(InstanceRoot { rootfs })
    }

    /// Unmounts and deletes everything `provision_root` made; wipes the disk. Volumes attached to
    /// the instance are unmounted (their images are kept). Idempotent, and works on a
    /// half-provisioned instance.
    pub fn teardown_root(&self, id: &str) -> Result<(), DiskError> {
        check_id(id)?;
        let l = self.layout(false)?;
        let dir = l.instance(id);
        let image = l.disk_image(id);
        // Volumes are unmounted here too; keep attach_volume from racing with that.
        let _guard = VOLUME_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        unmount_tree(&dir)?;
        release_loops_backed_by(&image)?;
        for path in [image.clone(), partial_path(&image)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        // remove_dir_all would walk into anything still mounted below; make sure nothing is.
        let left = mounts_under(&dir)?;
        if !left.is_empty() {
            return Err(DiskError::StillMounted(left));
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        tracing::info!(id, "instance root torn down");
        Ok(())
    }

    /// Creates a tenant's persistent volume: an ext4 image of exactly `size` bytes. Idempotent
    /// when a volume of that size exists; a different size is an error.
    pub fn create_volume(&self, tenant: &str, name: &str, size: u64) -> Result<(), DiskError> {
        check_name("tenant id", tenant)?;
        check_name("volume name", name)?;
        let size = checked_size(size)?;
        let l = self.layout(true)?;
        let image = l.volume_image(tenant, name);
        let _guard = VOLUME_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(parent) = image.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        match std::fs::metadata(&image) {
            Ok(m) if m.len() == size => Ok(()),
            Ok(m) => Err(DiskError::SizeMismatch {
                path: image,
                existing: m.len(),
                requested: size,
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                make_ext4_image(&image, size, Ext4::Volume)?;
                tracing::info!(tenant, name, size, "volume created");
                Ok(())
            }
            Err(e) => Err(io_err(&image)(e)),
        }
    }

    /// Deletes a volume's image and its data. Refused while the volume is attached anywhere (any
    /// loop device is backed by it). Idempotent: a missing volume is not an error.
    pub fn remove_volume(&self, tenant: &str, name: &str) -> Result<(), DiskError> {
        check_name("tenant id", tenant)?;
        check_name("volume name", name)?;
        let l = self.layout(false)?;
        let image = l.volume_image(tenant, name);
        let _guard = VOLUME_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        refuse_if_in_use(&image)?;
        for path in [image.clone(), partial_path(&image)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        if let Some(parent) = image.parent() {
            // Only succeeds once the tenant has no volume left.
            let _ = std::fs::remove_dir(parent);
        }
        tracing::info!(tenant, name, "volume removed");
        Ok(())
    }

    /// Mounts a volume for an instance and returns the host mount point
    /// (`<data>/instances/<id>/volumes/<name>`). Idempotent. Refused while the volume is
    /// attached elsewhere.
    /// The block devices (major, minor) holding an instance's disk and the volumes attached to
    /// it: what its disk I/O limits throttle.
    pub fn block_devices(&self, id: &str) -> Result<Vec<(u32, u32)>, DiskError> {
        check_id(id)?;
        let l = self.layout(false)?;
        let (disk, volumes) = (l.disk_mount(id), l.volume_mounts(id));
        let mut out: Vec<(u32, u32)> = Vec::new();
        for m in mount_table()? {
            let ours = m.mount_point == disk || m.mount_point.parent() == Some(volumes.as_path());
            if ours && m.source.starts_with("/dev/") && !out.contains(&m.dev_id) {
                out.push(m.dev_id);
            }
        }
        Ok(out)
    }

    pub fn attach_volume(&self, id: &str, tenant: &str, name: &str) -> Result<PathBuf, DiskError> {
        check_id(id)?;
        check_name("tenant id", tenant)?;
        check_name("volume name", name)?;
        let l = self.layout(false)?;
        let image = l.volume_image(tenant, name);
        let target = l.volume_mounts(id).join(name);
        let _guard = VOLUME_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        if !image.exists() {
            return Err(DiskError::VolumeNotFound {
                tenant: tenant.to_string(),
                name: name.to_string(),
            });
        }
        let table = mount_table()?;
        let loops = loops_backed_by(&image)?;
        if let Some(m) = table.iter().rev().find(|m| m.mount_point == target) {
            if loops.iter().any(|lp| lp.dev_id == m.dev_id) {
                return Ok(target);
            }
            return Err(DiskError::InUse {
                path: target,
                by: format!("{} is mounted there", m.source),
            });
        }
        refuse_if_in_use(&image)?;
        std::fs::create_dir_all(&target).map_err(io_err(&target))?;
        mount_image(
            &image,
            &target,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Ext4::Volume,
        )?;
        tracing::info!(id, tenant, name, "volume attached");
        Ok(target)
    }

    /// Unmounts all of an instance's volumes and frees their loop devices; the images are kept.
    /// Idempotent.
    pub fn detach_volumes(&self, id: &str) -> Result<(), DiskError> {
        check_id(id)?;
        let l = self.layout(false)?;
        let dir = l.volume_mounts(id);
        let _guard = VOLUME_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        unmount_tree(&dir)?;
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for e in entries.flatten() {
                    // rmdir, never a recursive delete: only empty mount points go.
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        Ok(())
    }

    /// Instance ids that have host objects (mounts, loop devices, disk images, dirs) here.
    pub fn instances_with_objects(&self) -> Result<Vec<String>, DiskError> {
        let l = self.layout(false)?;
        let mut ids = BTreeSet::new();
        let instances = l.instances();
        for entry in read_dir_names(&instances)? {
            ids.insert(entry);
        }
        for entry in read_dir_names(&l.disks())? {
            if let Some(id) = disk_id_from_file_name(&entry) {
                ids.insert(id.to_string());
            }
        }
        for lp in loops_backed_under(&l.disks())? {
            if let Some(id) = lp
                .backing_file
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(disk_id_from_file_name)
            {
                ids.insert(id.to_string());
            }
        }
        for mp in mounts_under(&instances)? {
            if let Ok(rest) = mp.strip_prefix(&instances) {
                if let Some(first) = rest.components().next() {
                    ids.insert(first.as_os_str().to_string_lossy().into_owned());
                }
            }
        }
        Ok(ids.into_iter().collect())
    }
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, DiskError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(io_err(dir)(e)),
    }
}

/// Whether `p` exists (a dangling link counts).
fn exists(p: &Path) -> Result<bool, DiskError> {
    match std::fs::symlink_metadata(p) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(p)(e)),
    }
}

fn remove_file_if_exists(p: &Path) -> Result<(), DiskError> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(io_err(p)(e)),
        _ => Ok(()),
    }
}

/// `<size>-<hex>.img` (a complete pool image) → size.
fn pool_size_of(name: &str) -> Option<u64> {
    let (size, nonce) = name.strip_suffix(".img")?.split_once('-')?;
    let hex = !nonce.is_empty() && nonce.bytes().all(|b| b.is_ascii_hexdigit());
    hex.then(|| size.parse().ok()).flatten()
}

/// Makes sure a free loop device exists for the next create: `LOOP_CTL_GET_FREE` adds one
/// when all are bound, which on a full host (a new device per instance) costs the create path
/// several milliseconds of device registration.
fn drop_lock_then_spare_loop(st: std::sync::MutexGuard<'_, PoolState>) {
    drop(st);
    if let Ok(ctl) = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
    {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and only returns an int; `ctl` is an
        // open descriptor of /dev/loop-control for the duration of the call.
        unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
    }
}

/// The refill thread of a [`Pool`] (see [`Disks::start_refill`]).
fn refill(pool: &Pool, dir: &Path) {
    // SAFETY: setpriority(2) on the calling thread (who = 0) only changes its nice value;
    // children it forks (mkfs.ext4) inherit it. No memory is passed.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
    // Idle I/O class too (ioprio_set(IOPRIO_WHO_PROCESS = 1, this thread, IDLE class 3 << 13)):
    // inherited by mkfs.ext4 like the nice value.
    // SAFETY: the ioprio_set syscall takes three integers and changes only this thread's I/O
    // priority; no memory is passed.
    unsafe {
        libc::syscall(libc::SYS_ioprio_set, 1, 0, 3 << 13);
    }
    loop {
        let (drop, next) = {
            let mut st = pool.state.lock().unwrap_or_else(|p| p.into_inner());
            let wanted = st.sizes.clone();
            let stale: Vec<u64> = st
                .ready
                .keys()
                .filter(|s| !wanted.contains(s))
                .copied()
                .collect();
            let drop: Vec<PathBuf> = stale
                .iter()
                .filter_map(|s| st.ready.remove(s))
                .flatten()
                .collect();
            // Most recently asked size first.
            let next = wanted
                .iter()
                .rev()
                .find(|s| st.ready.get(s).map_or(0, Vec::len) < pool.depth)
                .copied();
            if next.is_none() && drop.is_empty() {
                st.filling = false;
                drop_lock_then_spare_loop(st);
                return;
            }
            (drop, next)
        };
        for p in drop {
            let _ = std::fs::remove_file(p);
        }
        let Some(size) = next else {
            continue;
        };
        let made = random_hex().and_then(|nonce| {
            let path = dir.join(format!("{size}-{nonce}.img"));
            make_ext4_image(&path, size, Ext4::ContainerDisk).map(|()| path)
        });
        let mut st = pool.state.lock().unwrap_or_else(|p| p.into_inner());
        match made {
            Ok(path) => st.ready.entry(size).or_default().push(path),
            Err(e) => {
                // The data dir went away (a test's) or the disk is full: try again on the next take.
                tracing::warn!("container disk pool: {e}");
                st.filling = false;
                return;
            }
        }
    }
}

fn random_hex() -> Result<String, DiskError> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| DiskError::Invalid(format!("random: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// `<id>.img` or `<id>.img.partial` → `<id>`.
fn disk_id_from_file_name(name: &str) -> Option<&str> {
    let stem = name
        .strip_suffix(".img")
        .or_else(|| name.strip_suffix(".img.partial"))?;
    (!stem.is_empty()).then_some(stem)
}

pub(crate) fn partial_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Instance ids become path components, mount options and loop backing names: keep them plain.
fn check_id(id: &str) -> Result<(), DiskError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(DiskError::Invalid(format!(
            "invalid instance id {id:?}: use 1-64 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Tenant ids and volume names are validated by the caller; this only makes sure they cannot
/// escape their directory.
fn check_name(what: &str, name: &str) -> Result<(), DiskError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 200
        || name.contains(['/', '\\', '\0'])
    {
        return Err(DiskError::Invalid(format!(
            "invalid {what} {name:?}: must be a plain file name"
        )));
    }
    Ok(())
}

/// overlayfs splits its options at ',' and lower dirs at ':' (also used by `vm::template`).
pub(crate) fn check_overlay_path(p: &Path) -> Result<(), DiskError> {
    let s = p
        .to_str()
        .ok_or_else(|| DiskError::Invalid(format!("path {} is not valid UTF-8", p.display())))?;
    if s.contains([',', ':', '\\']) {
        return Err(DiskError::Invalid(format!(
            "path {s:?} cannot be used in an overlay mount: it contains ',', ':' or '\\'"
        )));
    }
    Ok(())
}

fn checked_size(size: u64) -> Result<u64, DiskError> {
    if size < MIN_SIZE {
        return Err(DiskError::TooSmall {
            size,
            min: MIN_SIZE,
        });
    }
    size.checked_add(511)
        .map(|s| s & !511)
        .ok_or_else(|| DiskError::Invalid(format!("size {size} is too large")))
}

/// Builds a sparse ext4 image of exactly `size` bytes at `image`, atomically (see module docs).
/// What an ext4 image is for, which decides how it is made and mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ext4 {
    /// An instance's writable layer: wiped whenever the instance stops, so a crash never needs
    /// its content. No journal (no jbd2 thread per mount: a mount costs ≈ 2 ms instead of ≈ 6),
    /// and mounted `noinit_itable` (no background zeroing of inode tables competing with
    /// creates; a fresh mkfs marks unused inodes as such).
    ContainerDisk,
    /// A tenant's persistent volume: journaled, mounted with the defaults.
    Volume,
}

fn make_ext4_image(image: &Path, size: u64, kind: Ext4) -> Result<(), DiskError> {
    let partial = partial_path(image);
    match std::fs::remove_file(&partial) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&partial)(e)),
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(io_err(&partial))?;
    if let Err(e) = file.set_len(size) {
        drop(file);
        let _ = std::fs::remove_file(&partial);
        return Err(io_err(&partial)(e));
    }
    drop(file);
    let made = crate::cmd::run(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-E".as_ref(),
            "lazy_itable_init=1,lazy_journal_init=1".as_ref(),
            "-m".as_ref(),
            "0".as_ref(),
            "-O".as_ref(),
            if kind == Ext4::ContainerDisk {
                "^has_journal".as_ref()
            } else {
                "has_journal".as_ref()
            },
            partial.as_os_str(),
        ],
    );
    if let Err(e) = made {
        let _ = std::fs::remove_file(&partial);
        return Err(e.into());
    }
    std::fs::rename(&partial, image).map_err(io_err(image))?;
    Ok(())
}

/// Attaches `image` to a free autoclear loop device and mounts it (ext4) at `target`.
/// Returns how long attaching the loop device took (for the create timings).
fn mount_image(
    image: &Path,
    target: &Path,
    flags: MsFlags,
    kind: Ext4,
) -> Result<Duration, DiskError> {
    let t0 = Instant::now();
    let (dev_file, dev_path) = attach_loop(image)?;
    let attached = t0.elapsed();
    let data = (kind == Ext4::ContainerDisk).then_some("noinit_itable");
    let mounted = nix::mount::mount(Some(&dev_path), target, Some("ext4"), flags, data);
    if let Err(source) = mounted {
        clear_loop_fd(&dev_file);
        return Err(DiskError::Mount {
            target: target.to_path_buf(),
            source,
        });
    }
    // Dropping our handle leaves the mount as the only user: the device goes with the mount.
    drop(dev_file);
    Ok(attached)
}

// Loop device ioctls and structures from <linux/loop.h>; the libc crate does not carry them.
const LOOP_CLR_FD: u64 = 0x4C01;
const LOOP_CONFIGURE: u64 = 0x4C0A;
const LOOP_CTL_GET_FREE: u64 = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Binds `image` to a free loop device with autoclear; returns the open device and its path.
/// The device stays bound while the returned file is open (or something else holds it).
fn attach_loop(image: &Path) -> Result<(File, PathBuf), DiskError> {
    let loop_err = |op: &'static str| {
        move |source: std::io::Error| DiskError::Loop {
            op,
            path: image.to_path_buf(),
            source,
        }
    };
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(image)
        .map_err(io_err(image))?;
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(loop_err("control"))?;
    let mut name = [0u8; LO_NAME_SIZE];
    let bytes = image.as_os_str().as_encoded_bytes();
    // The kernel keeps only a truncated copy; sysfs `backing_file` has the full path anyway.
    let tail = &bytes[bytes.len().saturating_sub(LO_NAME_SIZE - 1)..];
    name[..tail.len()].copy_from_slice(tail);
    let config = LoopConfig {
        fd: u32::try_from(backing.as_raw_fd())
            .map_err(|_| loop_err("configure")(std::io::Error::from_raw_os_error(libc::EBADF)))?,
        block_size: 0,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_AUTOCLEAR,
            lo_file_name: name,
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // Another process may take the device between GET_FREE and CONFIGURE (EBUSY): try again.
    let mut last = std::io::Error::from_raw_os_error(libc::EBUSY);
    for _ in 0..32 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and only returns an int; `ctl` is an open
        // descriptor of /dev/loop-control for the duration of the call.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(loop_err("get free")(std::io::Error::last_os_error()));
        }
        let dev_path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = open_loop_dev(&dev_path, n).map_err(loop_err("open"))?;
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `LoopConfig` mirrors with
        // #[repr(C)]; the pointer is valid for the call and the kernel does not keep it. The
        // backing descriptor stays open for the call (the kernel takes its own reference).
        let r = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                LOOP_CONFIGURE as _,
                &config as *const LoopConfig,
            )
        };
        if r == 0 {
            return Ok((dev, dev_path));
        }
        last = std::io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EBUSY) {
            return Err(loop_err("configure")(last));
        }
    }
    Err(loop_err("configure")(last))
}

/// Opens `/dev/loopN`, making the node if the host's /dev is not a devtmpfs (e.g. the daemon
/// itself runs in a container).
fn open_loop_dev(path: &Path, n: i32) -> std::io::Result<File> {
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
    };
    match open() {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let dev = std::fs::read_to_string(format!("/sys/block/loop{n}/dev"))?;
            let (major, minor) = parse_dev_id(dev.trim()).ok_or(e)?;
            nix::sys::stat::mknod(
                path,
                nix::sys::stat::SFlag::S_IFBLK,
                nix::sys::stat::Mode::from_bits_truncate(0o660),
                nix::sys::stat::makedev(major.into(), minor.into()),
            )
            .map_err(std::io::Error::from)?;
            open()
        }
        other => other,
    }
}

/// Asks the kernel to unbind a loop device (immediately if unused, else when its last user goes).
fn clear_loop_fd(dev: &File) -> bool {
    // SAFETY: LOOP_CLR_FD takes no argument; `dev` is an open loop device descriptor.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD as _, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)
}

fn clear_loop(lp: &LoopDevice) {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&lp.dev)
    {
        Ok(f) => {
            if !clear_loop_fd(&f) {
                tracing::warn!(dev = %lp.dev.display(), err = %std::io::Error::last_os_error(), "cannot clear loop device");
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dev = %lp.dev.display(), err = %e, "cannot open loop device"),
    }
}

/// Clears loop devices and waits a little for the kernel to let them go.
fn clear_loops_and_wait(loops: &[LoopDevice]) -> Result<(), DiskError> {
    if loops.is_empty() {
        return Ok(());
    }
    for lp in loops {
        clear_loop(lp);
    }
    let deadline = Instant::now() + LOOP_RELEASE_WAIT;
    loop {
        let still: Vec<LoopDevice> = loop_devices()?
            .into_iter()
            .filter(|l| {
                loops
                    .iter()
                    .any(|o| o.name == l.name && o.backing_file == l.backing_file)
            })
            .collect();
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            // Held by someone (another mount namespace, a lazy unmount): autoclear is set, so
            // the kernel frees it when they let go.
            tracing::warn!(loops = ?still.iter().map(|l| &l.name).collect::<Vec<_>>(), "loop devices still busy");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Clears every loop device backed by `image` that is not mounted in this namespace.
fn release_loops_backed_by(image: &Path) -> Result<(), DiskError> {
    let loops = loops_backed_by(image)?;
    if loops.is_empty() {
        return Ok(());
    }
    let table = mount_table()?;
    let unmounted: Vec<LoopDevice> = loops
        .into_iter()
        .filter(|lp| !table.iter().any(|m| m.dev_id == lp.dev_id))
        .collect();
    clear_loops_and_wait(&unmounted)
}

fn refuse_if_in_use(image: &Path) -> Result<(), DiskError> {
    let loops = loops_backed_by(image)?;
    if loops.is_empty() {
        return Ok(());
    }
    let table = mount_table()?;
    let by = loops
        .iter()
        .map(|lp| {
            let at: Vec<String> = table
                .iter()
                .filter(|m| m.dev_id == lp.dev_id)
                .map(|m| m.mount_point.display().to_string())
                .collect();
            if at.is_empty() {
                format!("attached to {}", lp.dev.display())
            } else {
                format!(
                    "attached to {}, mounted at {}",
                    lp.dev.display(),
                    at.join(", ")
                )
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    Err(DiskError::InUse {
        path: image.to_path_buf(),
        by,
    })
}

/// Unmounts everything at or below `dir`, deepest first (lazily if busy), then frees the loop
/// devices those mounts used.
fn unmount_tree(dir: &Path) -> Result<(), DiskError> {
    let mut loops_seen: Vec<LoopDevice> = Vec::new();
    let all_loops = loop_devices()?;
    for _round in 0..16 {
        let table = mount_table()?;
        let mut mine: Vec<&MountEntry> = table
            .iter()
            .filter(|m| m.mount_point.starts_with(dir))
            .collect();
        if mine.is_empty() {
            break;
        }
        // Deepest first; among stacked mounts on one point, the newest (last listed) first.
        mine.reverse();
        mine.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
        for m in mine {
            for lp in &all_loops {
                if lp.dev_id == m.dev_id && !loops_seen.iter().any(|o| o.name == lp.name) {
                    loops_seen.push(lp.clone());
                }
            }
            unmount(&m.mount_point)?;
        }
    }
    let left = mounts_under(dir)?;
    if !left.is_empty() {
        return Err(DiskError::StillMounted(left));
    }
    clear_loops_and_wait(&loops_seen)
}

fn unmount(target: &Path) -> Result<(), DiskError> {
    use nix::errno::Errno;
    match nix::mount::umount2(target, MntFlags::empty()) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EBUSY) => {
            tracing::warn!(target = %target.display(), "busy, unmounting lazily");
            match nix::mount::umount2(target, MntFlags::MNT_DETACH) {
                Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
                Err(source) => Err(DiskError::Unmount {
                    target: target.to_path_buf(),
                    source,
                }),
            }
        }
        Err(source) => Err(DiskError::Unmount {
            target: target.to_path_buf(),
            source,
        }),
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `(major, minor)` of the mounted device.
    pub dev_id: (u32, u32),
    /// The mount point, unescaped.
    pub mount_point: PathBuf,
    pub fstype: String,
    /// The mount source (`/dev/loop3`, `overlay`), unescaped.
    pub source: String,
}

/// Parses `/proc/self/mountinfo` text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut l = left.split(' ');
            let _id = l.next()?;
            let _parent = l.next()?;
            let dev_id = parse_dev_id(l.next()?)?;
            let _root = l.next()?;
            let mount_point = PathBuf::from(unescape_mount_field(l.next()?));
            let mut r = right.split(' ');
            let fstype = unescape_mount_field(r.next()?);
            let source = unescape_mount_field(r.next()?);
            Some(MountEntry {
                dev_id,
                mount_point,
                fstype,
                source,
            })
        })
        .collect()
}

/// Undoes the kernel's octal escapes (`\040` for a space, `\134` for a backslash, ...).
pub fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (u32::from(b[i + 1] - b'0') << 6)
                | (u32::from(b[i + 2] - b'0') << 3)
                | u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_dev_id(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The current mount table of this process's mount namespace.
pub fn mount_table() -> Result<Vec<MountEntry>, DiskError> {
    let path = Path::new("/proc/self/mountinfo");
    // Lossy: a foreign mount point that is not UTF-8 must not make ours unreadable (ours are).
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    Ok(parse_mountinfo(&String::from_utf8_lossy(&bytes)))
}

/// Mount points at or below `prefix` (an absolute, symlink-free path), in mount order.
pub fn mounts_under(prefix: &Path) -> Result<Vec<PathBuf>, DiskError> {
    Ok(mount_table()?
        .into_iter()
        .filter(|m| m.mount_point.starts_with(prefix))
        .map(|m| m.mount_point)
        .collect())
}

fn is_mount_point(path: &Path) -> Result<bool, DiskError> {
    Ok(mount_table()?.iter().any(|m| m.mount_point == path))
}

/// A bound loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `loop3`.
    pub name: String,
    /// `/dev/loop3`.
    pub dev: PathBuf,
    pub dev_id: (u32, u32),
    /// The backing file, without the kernel's ` (deleted)` suffix.
    pub backing_file: PathBuf,
    /// The backing file was deleted while the device was bound.
    pub deleted: bool,
}

/// Every bound loop device, from `/sys/block/loop*/loop/backing_file`.
pub fn loop_devices() -> Result<Vec<LoopDevice>, DiskError> {
    loop_devices_in(Path::new("/sys/block"))
}

/// [`loop_devices`] against a sysfs `block` dir (a fixture tree in tests).
pub fn loop_devices_in(sys_block: &Path) -> Result<Vec<LoopDevice>, DiskError> {
    let mut out = Vec::new();
    for name in read_dir_names(sys_block)? {
        if !name.starts_with("loop") {
            continue;
        }
        let base = sys_block.join(&name);
        // Unbound devices have no backing_file; a device can also vanish while we look.
        let Ok(backing) = std::fs::read_to_string(base.join("loop/backing_file")) else {
            continue;
        };
        let Some(dev_id) = std::fs::read_to_string(base.join("dev"))
            .ok()
            .and_then(|s| parse_dev_id(s.trim()))
        else {
            continue;
        };
        let backing = backing.trim_end_matches('\n');
        let (path, deleted) = match backing.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (backing, false),
        };
        out.push(LoopDevice {
            dev: PathBuf::from("/dev").join(&name),
            name,
            dev_id,
            backing_file: PathBuf::from(path),
            deleted,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Loop devices whose backing file is at or below `prefix` (an absolute, symlink-free path).
pub fn loops_backed_under(prefix: &Path) -> Result<Vec<LoopDevice>, DiskError> {
    Ok(loop_devices()?
        .into_iter()
        .filter(|l| l.backing_file.starts_with(prefix))
        .collect())
}

fn loops_backed_by(image: &Path) -> Result<Vec<LoopDevice>, DiskError> {
    Ok(loop_devices()?
        .into_iter()
        .filter(|l| l.backing_file == image)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_id() -> String {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).unwrap();
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// A data dir and an instance id, torn down on drop even when the test fails.
    struct Fixture {
        dir: tempfile::TempDir,
        disks: Disks,
        id: String,
        others: Vec<String>,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let disks = Disks::new(dir.path().canonicalize().unwrap());
            Self {
                dir,
                disks,
                id: random_id(),
                others: Vec::new(),
            }
        }
        fn data(&self) -> PathBuf {
            self.disks.data_dir.clone()
        }
        /// Nothing of ours left on the host.
        fn assert_clean(&self) {
            let data = self.data();
            assert_eq!(mounts_under(&data).unwrap(), Vec::<PathBuf>::new());
            wait_no_loops_under(&data);
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            for id in std::iter::once(&self.id).chain(&self.others) {
                let _ = self.disks.teardown_root(id);
            }
        }
    }

    fn wait_no_loops_under(prefix: &Path) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let loops = loops_backed_under(prefix).unwrap();
            if loops.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "loop devices left: {loops:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn layer(root: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let p = root.join("layers").join(name);
        std::fs::create_dir_all(&p).unwrap();
        for (f, content) in files {
            std::fs::write(p.join(f), content).unwrap();
        }
        p
    }

    #[test]
    fn mountinfo_parsing_and_unescaping() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 36 7:3 / /data/instances/abc/disk rw,relatime shared:5 - ext4 /dev/loop3 rw\n\
                    garbage line\n\
                    38 36 0:52 / /back\\134slash rw - overlay overlay rw,lowerdir=/a\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].mount_point, Path::new("/mnt/with space"));
        assert_eq!(m[0].dev_id, (98, 0));
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[1].fstype, "ext4");
        assert_eq!(m[1].dev_id, (7, 3));
        assert_eq!(m[2].mount_point, Path::new("/back\\slash"));
        assert_eq!(unescape_mount_field("a\\011b\\012"), "a\tb\n");
        assert_eq!(unescape_mount_field("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn loop_listing_from_fixture() {
        let root = tempfile::tempdir().unwrap();
        let sb = root.path();
        std::fs::create_dir_all(sb.join("loop0/loop")).unwrap();
        std::fs::write(sb.join("loop0/dev"), "7:0\n").unwrap();
        std::fs::write(
            sb.join("loop0/loop/backing_file"),
            "/d/disks/abc.img (deleted)\n",
        )
        .unwrap();
        std::fs::create_dir_all(sb.join("loop1")).unwrap(); // unbound
        std::fs::write(sb.join("loop1/dev"), "7:1\n").unwrap();
        std::fs::create_dir_all(sb.join("vda")).unwrap();
        let loops = loop_devices_in(sb).unwrap();
        assert_eq!(
            loops,
            vec![LoopDevice {
                name: "loop0".into(),
                dev: "/dev/loop0".into(),
                dev_id: (7, 0),
                backing_file: "/d/disks/abc.img".into(),
                deleted: true,
            }]
        );
    }

    #[test]
    fn validation() {
        let d = Disks::new("/nonexistent-gpuvisor-test");
        assert!(matches!(
            d.provision_root("abc", MIN_SIZE - 1, &[]),
            Err(DiskError::TooSmall { .. })
        ));
        assert!(matches!(
            d.teardown_root("../x"),
            Err(DiskError::Invalid(_))
        ));
        assert!(matches!(
            d.create_volume("t", "../v", MIN_SIZE),
            Err(DiskError::Invalid(_))
        ));
        assert!(matches!(
            d.create_volume("a/b", "v", MIN_SIZE),
            Err(DiskError::Invalid(_))
        ));
        assert!(matches!(
            d.remove_volume("..", "v"),
            Err(DiskError::Invalid(_))
        ));
        assert!(matches!(
            d.attach_volume("abc", "t", ""),
            Err(DiskError::Invalid(_))
        ));
        assert!(matches!(
            d.provision_root("abc", MIN_SIZE, &[PathBuf::from("/a:b")]),
            Err(DiskError::Invalid(_))
        ));
        assert_eq!(checked_size(MIN_SIZE + 1).unwrap(), MIN_SIZE + 512);
        assert_eq!(disk_id_from_file_name("abc.img"), Some("abc"));
        assert_eq!(disk_id_from_file_name("abc.img.partial"), Some("abc"));
        assert_eq!(disk_id_from_file_name("abc.txt"), None);
    }

    #[test]
    fn disk_has_exact_size_provision_is_idempotent_and_teardown_is_clean() {
        let f = Fixture::new();
        let size = 40 * 1024 * 1024 + 4096;
        let lower = layer(
            &f.dir.path().canonicalize().unwrap(),
            "base",
            &[("hello", "hi")],
        );
        let root = f
            .disks
            .provision_root(&f.id, size, std::slice::from_ref(&lower))
            .unwrap();
        assert_eq!(
            root.rootfs,
            f.data().join("instances").join(&f.id).join("rootfs")
        );

        let image = f.data().join("disks").join(format!("{}.img", f.id));
        assert_eq!(std::fs::metadata(&image).unwrap().len(), size);
        let loops = loops_backed_under(&f.data().join("disks")).unwrap();
        assert_eq!(loops.len(), 1, "{loops:?}");
        let sectors: u64 = std::fs::read_to_string(format!("/sys/block/{}/size", loops[0].name))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(sectors * 512, size);
        let st =
            nix::sys::statfs::statfs(&f.data().join("instances").join(&f.id).join("disk")).unwrap();
        let fs_bytes = st.blocks() * st.block_size() as u64;
        assert!(fs_bytes <= size && fs_bytes > size / 2, "{fs_bytes}");
        assert_eq!(
            std::fs::read_to_string(root.rootfs.join("hello")).unwrap(),
            "hi"
        );

        // Idempotent: same root, no second mount or loop device.
        let mounts_before = mounts_under(&f.data()).unwrap();
        let again = f.disks.provision_root(&f.id, size, &[lower]).unwrap();
        assert_eq!(again, root);
        assert_eq!(mounts_under(&f.data()).unwrap(), mounts_before);
        assert_eq!(loops_backed_under(&f.data()).unwrap().len(), 1);
        assert_eq!(
            f.disks.instances_with_objects().unwrap(),
            vec![f.id.clone()]
        );

        f.disks.teardown_root(&f.id).unwrap();
        f.assert_clean();
        assert!(!image.exists());
        assert!(!f.data().join("instances").join(&f.id).exists());
        assert_eq!(
            f.disks.instances_with_objects().unwrap(),
            Vec::<String>::new()
        );
        f.disks.teardown_root(&f.id).unwrap();
        f.assert_clean();
    }

    /// The pool's images, by inode.
    fn pool_images(data: &Path) -> BTreeMap<u64, PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let dir = data.join("disks").join(".pool");
        read_dir_names(&dir)
            .unwrap()
            .into_iter()
            .filter(|n| n.ends_with(".img"))
            .map(|n| {
                let p = dir.join(n);
                (std::fs::metadata(&p).unwrap().ino(), p)
            })
            .collect()
    }

    fn wait_pool(data: &Path, size: u64, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let have = pool_images(data)
                .values()
                .filter(|p| {
                    let name = p.file_name().unwrap().to_str().unwrap();
                    pool_size_of(name) == Some(size)
                })
                .count();
            if have == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pool has {have} of {size}, not {n}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn pool_images_are_taken_refilled_reused_at_start_and_never_swept() {
        use std::os::unix::fs::MetadataExt;
        let mut f = Fixture::new();
        let data = f.data();
        let size: u64 = 32 << 20;
        let pool = data.join("disks").join(".pool");
        // What a crash leaves: a partial image, a name that is not ours, a complete image.
        std::fs::create_dir_all(&pool).unwrap();
        let partial = pool.join(format!("{size}-00aa.img.partial"));
        let junk = pool.join("junk");
        let kept = pool.join(format!("{size}-00bb.img"));
        std::fs::write(&partial, b"").unwrap();
        std::fs::write(&junk, b"").unwrap();
        make_ext4_image(&kept, size, Ext4::ContainerDisk).unwrap();
        f.disks = Disks::new(data.clone()).with_pool(2);
        f.disks.open_pool().unwrap();
        assert!(!partial.exists() && !junk.exists() && kept.exists());
        wait_pool(&data, size, 2);
        // The orphan sweep never takes the pool's images for an instance's.
        assert_eq!(
            f.disks.instances_with_objects().unwrap(),
            Vec::<String>::new()
        );

        // A create takes one (the same inode: no mkfs), and the pool is refilled.
        let before = pool_images(&data);
        f.disks.provision_root(&f.id, size, &[]).unwrap();
        let image = data.join("disks").join(format!("{}.img", f.id));
        let ino = std::fs::metadata(&image).unwrap().ino();
        assert!(
            before.contains_key(&ino),
            "the disk was not taken from the pool"
        );
        assert!(!pool_images(&data).contains_key(&ino));
        assert_eq!(
            f.disks.instances_with_objects().unwrap(),
            vec![f.id.clone()]
        );
        wait_pool(&data, size, 2);

        // A size the pool does not have is made at once, and kept ready from then on.
        let other = random_id();
        f.others.push(other.clone());
        f.disks.provision_root(&other, 2 * size, &[]).unwrap();
        wait_pool(&data, 2 * size, 2);

        for id in [&f.id, &other] {
            f.disks.teardown_root(id).unwrap();
        }
        f.assert_clean();
        assert_eq!(
            pool_images(&data).len(),
            4,
            "teardown leaves the pool alone"
        );

        // Without a pool, a start removes what an earlier run left.
        Disks::new(data.clone()).open_pool().unwrap();
        assert!(!pool.exists());
    }

    /// A tenant choosing ever new sizes does not grow the pool: it keeps images of the 4 most
    /// recent sizes only.
    #[test]
    fn the_pool_keeps_only_the_most_recent_sizes() {
        let mut f = Fixture::new();
        let data = f.data();
        f.disks = Disks::new(data.clone()).with_pool(1);
        f.disks.open_pool().unwrap();
        let sizes: Vec<u64> = (0..6).map(|i| (32 + i) << 20).collect();
        for size in &sizes {
            let id = random_id();
            f.others.push(id.clone());
            f.disks.provision_root(&id, *size, &[]).unwrap();
            f.disks.teardown_root(&id).unwrap();
            wait_pool(&data, *size, 1);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let kept: BTreeSet<u64> = pool_images(&data)
                .values()
                .filter_map(|p| pool_size_of(p.file_name().unwrap().to_str().unwrap()))
                .collect();
            if kept.len() <= POOL_SIZES {
                assert!(kept.iter().all(|s| sizes[2..].contains(s)), "{kept:?}");
                break;
            }
            assert!(Instant::now() < deadline, "the pool keeps sizes {kept:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        f.assert_clean();
    }

    #[test]
    fn overlay_merges_layers_and_writes_land_in_upper() {
        let f = Fixture::new();
        let base = f.dir.path().canonicalize().unwrap();
        let top = layer(&base, "top", &[("a", "top-a"), ("shared", "top")]);
        let bottom = layer(&base, "bottom", &[("b", "bottom-b"), ("shared", "bottom")]);
        let root = f
            .disks
            .provision_root(&f.id, MIN_SIZE, &[top.clone(), bottom.clone()])
            .unwrap();
        let read = |n: &str| std::fs::read_to_string(root.rootfs.join(n)).unwrap();
        assert_eq!(read("a"), "top-a");
        assert_eq!(read("b"), "bottom-b");
        assert_eq!(read("shared"), "top");
        std::fs::write(root.rootfs.join("new"), "written").unwrap();
        std::fs::write(root.rootfs.join("b"), "changed").unwrap();
        let upper = f.data().join("instances").join(&f.id).join("disk/upper");
        assert_eq!(
            std::fs::read_to_string(upper.join("new")).unwrap(),
            "written"
        );
        assert_eq!(std::fs::read_to_string(upper.join("b")).unwrap(), "changed");
        assert_eq!(
            std::fs::read_to_string(bottom.join("b")).unwrap(),
            "bottom-b"
        );
        assert!(!top.join("new").exists());
        f.disks.teardown_root(&f.id).unwrap();
        f.assert_clean();
        // The layers are the image store's, never touched by teardown.
        assert!(bottom.join("b").exists());
    }

    /// After a reboot (or a provisioning a crash cut short) the container disk is not mounted:
    /// provisioning again makes a fresh one (journal-less, maybe unclean, and wiped anyway),
    /// of the size asked now.
    #[test]
    fn an_unmounted_container_disk_is_made_fresh_again() {
        let f = Fixture::new();
        let root = f.disks.provision_root(&f.id, MIN_SIZE, &[]).unwrap();
        std::fs::write(root.rootfs.join("kept"), "yes").unwrap();
        // A reboot drops every mount (and with them the autoclear loop devices).
        let instance = f.data().join("instances").join(&f.id);
        unmount_tree(&instance).unwrap();
        f.assert_clean();
        assert_eq!(
            f.disks.instances_with_objects().unwrap(),
            vec![f.id.clone()]
        );
        let again = f.disks.provision_root(&f.id, MIN_SIZE, &[]).unwrap();
        assert!(
            !again.rootfs.join("kept").exists(),
            "the old disk was reused"
        );
        unmount_tree(&instance).unwrap();
        f.disks.provision_root(&f.id, MIN_SIZE * 2, &[]).unwrap();
        let image = f.data().join("disks").join(format!("{}.img", f.id));
        assert_eq!(std::fs::metadata(image).unwrap().len(), MIN_SIZE * 2);
        f.disks.teardown_root(&f.id).unwrap();
        f.assert_clean();
    }

    #[test]
    fn no_layers_gives_an_empty_writable_root() {
        let f = Fixture::new();
        let root = f.disks.provision_root(&f.id, MIN_SIZE, &[]).unwrap();
        std::fs::write(root.rootfs.join("x"), "1").unwrap();
        f.disks.teardown_root(&f.id).unwrap();
        f.assert_clean();
    }

    #[test]
    fn teardown_of_half_provisioned_instances() {
        let f = Fixture::new();
        let data = f.data();
        // 1: only dirs and a partial image (crash during mkfs).
        std::fs::create_dir_all(data.join("instances").join(&f.id).join("rootfs")).unwrap();
        std::fs::create_dir_all(data.join("disks")).unwrap();
        std::fs::write(data.join("disks").join(format!("{}.img.partial", f.id)), "").unwrap();
        assert_eq!(
            f.disks.instances_with_objects().unwrap(),
            vec![f.id.clone()]
        );
        f.disks.teardown_root(&f.id).unwrap();
        f.assert_clean();
        assert_eq!(
            f.disks.instances_with_objects().unwrap(),
            Vec::<String>::new()
        );

        // 2: disk mounted, overlay not (crash before the overlay mount).
        let image = data.join("disks").join(format!("{}.img", f.id));
        make_ext4_image(&image, MIN_SIZE, Ext4::Volume).unwrap();
        let disk_mnt = data.join("instances").join(&f.id).join("disk");
        std::fs::create_dir_all(&disk_mnt).unwrap();
        mount_image(&image, &disk_mnt, MsFlags::empty(), Ext4::ContainerDisk).unwrap();
        assert_eq!(
            f.disks.instances_with_objects().unwrap(),
            vec![f.id.clone()]
        );
        f.disks.teardown_root(&f.id).unwrap();
        f.assert_clean();
        assert!(!image.exists());

        // 3: a loop device bound to the image but never mounted (without autoclear, as a
        // foreign tool would leave it).
        make_ext4_image(&image, MIN_SIZE, Ext4::Volume).unwrap();
        let dev = crate::cmd::run(
            "losetup",
            ["--find".as_ref(), "--show".as_ref(), image.as_os_str()],
        )
        .unwrap();
        assert!(dev.trim().starts_with("/dev/loop"));
        assert_eq!(
            f.disks.instances_with_objects().unwrap(),
            vec![f.id.clone()]
        );
        f.disks.teardown_root(&f.id).unwrap();
        f.assert_clean();
        assert_eq!(
            f.disks.instances_with_objects().unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn volume_survives_detach_and_reattach_and_cannot_be_removed_while_attached() {
        let mut f = Fixture::new();
        let other = random_id();
        f.others.push(other.clone());
        let tenant = format!("t{}", random_id());
        let size = 24 * 1024 * 1024;
        f.disks.create_volume(&tenant, "data", size).unwrap();
        f.disks.create_volume(&tenant, "data", size).unwrap(); // idempotent
        assert!(matches!(
            f.disks.create_volume(&tenant, "data", size * 2),
            Err(DiskError::SizeMismatch { .. })
        ));
        let image = f.data().join("volumes").join(&tenant).join("data.img");
        assert_eq!(std::fs::metadata(&image).unwrap().len(), size);

        let mp = f.disks.attach_volume(&f.id, &tenant, "data").unwrap();
        assert_eq!(
            mp,
            f.data().join("instances").join(&f.id).join("volumes/data")
        );
        assert_eq!(f.disks.attach_volume(&f.id, &tenant, "data").unwrap(), mp);
        assert_eq!(mounts_under(&mp).unwrap().len(), 1);
        std::fs::write(mp.join("keep"), "precious").unwrap();

        assert!(matches!(
            f.disks.remove_volume(&tenant, "data"),
            Err(DiskError::InUse { .. })
        ));
        assert!(matches!(
            f.disks.attach_volume(&other, &tenant, "data"),
            Err(DiskError::InUse { .. })
        ));
        assert!(matches!(
            f.disks.attach_volume(&f.id, &tenant, "missing"),
            Err(DiskError::VolumeNotFound { .. })
        ));

        f.disks.detach_volumes(&f.id).unwrap();
        f.disks.detach_volumes(&f.id).unwrap();
        assert!(image.exists());
        f.assert_clean();

        // Re-attached to another instance, the data is intact.
        let mp2 = f.disks.attach_volume(&other, &tenant, "data").unwrap();
        assert_eq!(
            std::fs::read_to_string(mp2.join("keep")).unwrap(),
            "precious"
        );
        assert!(f.disks.instances_with_objects().unwrap().contains(&other));
        // Teardown of the instance detaches the volume but keeps it.
        f.disks.teardown_root(&other).unwrap();
        f.assert_clean();
        assert!(image.exists());

        f.disks.remove_volume(&tenant, "data").unwrap();
        assert!(!image.exists());
        f.disks.remove_volume(&tenant, "data").unwrap();
    }
}
