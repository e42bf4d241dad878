//! Fractional GPUs on this host: for each instance with a GPU share, the limiter's shared
//! accounting region, its read-only config, and the bind mounts that inject
//! `libgpuvisor_limiter.so` into every process of the instance through `/etc/ld.so.preload`.
//!
//! Key decisions: the preload file, the config, the library and the region's *limits* file are
//! bound *read-only* from the host, so root inside the instance cannot write them (it has no
//! CAP_SYS_ADMIN and seccomp refuses mount/umount); only the *usage* file (charges, launch gate,
//! process slots) is bound read-write. The library reads its config only at the fixed path it is
//! bound to (no environment override).
//!
//! Read-only binds are not enough on their own: Linux refuses to rename a mount point, but not a
//! directory that merely *contains* one, so `mv /etc /etc.o; mkdir /etc` (or the same with the
//! directory of the config) would move the binds aside and let root put its own files at their
//! paths. So every ancestor of what the limiter reads is a mount point: `/etc` is bound onto
//! itself, the config, the limits and the library sit in one read-only *directory* bind at
//! `/etc/gpuvisor` (the library file bound over a placeholder in it), and `/etc/ld.so.preload`
//! is a bind in the self-bound `/etc`. None of them can be renamed, removed or shadowed.
//!
//! Host layout: `<data>/limiter/<id>/` (config, limits, library placeholder; the directory bound
//! at `/etc/gpuvisor`), `<data>/limiter/<id>.usage`, `<data>/limiter/<id>.preload`; everything
//! is named by the instance id like every other host object, so the orphan sweep finds it.

use crate::oci::BindMount;
use gpuvisor_limiter::config::Config;
use gpuvisor_limiter::shm::{DeviceLimit, DeviceUsage, Priority, Region, RegionSpec};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where the library, region and config appear inside an instance. The first three are in the
/// read-only directory bind `CONTAINER_DIR`.
pub const CONTAINER_DIR: &str = "/etc/gpuvisor";
pub const CONTAINER_LIB: &str = "/etc/gpuvisor/libgpuvisor_limiter.so";
pub const CONTAINER_LIMITS: &str = "/etc/gpuvisor/limiter.limits";
pub const CONTAINER_USAGE: &str = "/run/gpuvisor/limiter.usage";
pub const CONTAINER_CONFIG: &str = gpuvisor_limiter::config::PATH;
pub const LIB_NAME: &str = "libgpuvisor_limiter.so";

/// GPU memory the daemon's outside check allows beyond the quota for each process of an
/// instance when the limiter charges a context footprint (`limiter_context_bytes`): driver
/// rounding and allocation granularity.
pub const OVER_QUOTA_SLACK: u64 = 64 << 20;
/// The same when the limiter charges no context footprint: the driver's own context (about
/// 300-500 MiB per process on current GPUs) is then outside what the library counts.
pub const OVER_QUOTA_SLACK_UNCHARGED_CONTEXT: u64 = 640 << 20;

/// Processes of one instance on one GPU that get the per-process allowance above; more add
/// nothing. Without it, an instance could hold `quota + N x allowance` (uncharged contexts: about
/// 0.5 GiB each) simply by starting N processes. Charging the context in the library
/// (`limiter_context_bytes`, per GPU model) is what makes contexts count against the quota.
pub const MAX_SLACK_PROCESSES: usize = 8;

/// What the daemon does when the driver shows an instance holding more GPU memory than its
/// quota (a process that bypassed the limiter: a static binary, `dlmopen`, raw ioctls, a forged
/// usage file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverQuotaAction {
    /// SIGKILL the instance's processes that hold memory on that GPU, and record an event.
    #[default]
    Kill,
    /// Only record an event.
    Event,
}

impl std::str::FromStr for OverQuotaAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(OverQuotaAction::Kill),
            "event" => Ok(OverQuotaAction::Event),
            _ => Err(format!(
                "limiter_over_quota {s:?}: expected \"kill\" or \"event\""
            )),
        }
    }
}

/// An instance over its VRAM quota on one GPU, by the driver's per-process count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverQuota {
    pub id: String,
    pub uuid: String,
    /// Bytes its processes hold on the GPU.
    pub used: u64,
    pub quota: u64,
    /// Its processes holding memory there (host pids).
    pub pids: Vec<u32>,
}

/// One GPU's limits for an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuShare {
    pub vram: u64,
    /// Thousandths of the GPU's compute.
    pub milli: u32,
}

#[derive(Debug, Clone)]
pub struct Limiters {
    dir: PathBuf,
    lib: Option<PathBuf>,
    /// Bytes charged per process for its CUDA context.
    context_bytes: u64,
}

/// Finds the library: the configured path, else beside the `gpuvisor` binary, else the
/// install locations.
pub fn locate_library(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = configured {
        return p.is_file().then(|| p.to_path_buf());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(LIB_NAME)));
    beside
        .into_iter()
        .chain([
            PathBuf::from("/usr/local/lib/gpuvisor").join(LIB_NAME),
            PathBuf::from("/usr/lib/gpuvisor").join(LIB_NAME),
        ])
        .find(|p| p.is_file())
}

/// Per-GPU usage from a mapped region.
pub fn region_usage(r: &Region) -> Option<Vec<DeviceUsage>> {
    (0..r.devices()).map(|d| r.usage(d).ok()).collect()
}

fn io_err(path: &Path, source: std::io::Error) -> crate::NodeError {
    crate::NodeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Limiters {
    pub fn new(data_dir: &Path, lib: Option<PathBuf>, context_bytes: u64) -> Self {
        Self {
            dir: data_dir.join("limiter"),
            lib,
            context_bytes,
        }
    }

    /// The library to inject, if this host has one.
    pub fn library(&self) -> Option<&Path> {
        self.lib.as_deref()
    }

    /// The directory bound read-only at [`CONTAINER_DIR`].
    fn ro_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }
    fn limits_path(&self, id: &str) -> PathBuf {
        self.ro_dir(id).join("limiter.limits")
    }
    fn usage_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.usage"))
    }
    fn open(&self, id: &str) -> std::io::Result<Region> {
        Region::open(&self.limits_path(id), &self.usage_path(id))
    }
    fn config_path(&self, id: &str) -> PathBuf {
        self.ro_dir(id).join("limiter.conf")
    }
    fn preload_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.preload"))
    }

    /// Creates the region (GPUs in the instance's CUDA order), the config and the preload file,
    /// and returns the binds that put them and the library into the instance, starting with
    /// `rootfs_etc` (the instance's `/etc` on the host) bound onto itself (see the module doc).
    /// Idempotent: an existing region keeps its accounting and gets the new limits.
    pub fn prepare(
        &self,
        id: &str,
        gpus: &[GpuShare],
        priority: Priority,
        rootfs_etc: &Path,
    ) -> Result<Vec<BindMount>, crate::NodeError> {
        let lib = self.lib.clone().ok_or_else(|| {
            io_err(
                Path::new(LIB_NAME),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the GPU limiter library is not installed: build it with `cargo build --release -p gpuvisor-limiter` and copy it to /usr/local/lib/gpuvisor/",
                ),
            )
        })?;
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        let ro = self.ro_dir(id);
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::create_dir_all(&ro).map_err(|e| io_err(&ro, e))?;
            // Readable by the instance's users (any uid), writable by nobody but host root.
            std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| io_err(&ro, e))?;
            let placeholder = ro.join(LIB_NAME);
            if !placeholder.exists() {
                std::fs::write(&placeholder, b"").map_err(|e| io_err(&placeholder, e))?;
            }
        }
        let devices: Vec<DeviceLimit> = gpus
            .iter()
            .map(|g| DeviceLimit {
                quota_bytes: g.vram,
                share_bp: g
                    .milli
                    .saturating_mul(10)
                    .min(gpuvisor_limiter::shm::FULL_SHARE_BP),
            })
            .collect();
        let (limits, usage) = (self.limits_path(id), self.usage_path(id));
        match self.open(id) {
            Ok(r) if r.devices() == devices.len() => {
                for (i, d) in devices.iter().enumerate() {
                    r.set_limit(i, *d).map_err(|e| io_err(&limits, e))?;
                }
                r.set_priority(priority);
            }
            _ => {
                Region::create(&limits, &usage, &RegionSpec { devices, priority })
                    .map_err(|e| io_err(&limits, e))?;
            }
        }
        let config = self.config_path(id);
        Config {
            limits: PathBuf::from(CONTAINER_LIMITS),
            usage: PathBuf::from(CONTAINER_USAGE),
            context_bytes: self.context_bytes,
        }
        .write(&config)
        .map_err(|e| io_err(&config, e))?;
        let preload = self.preload_path(id);
        std::fs::write(&preload, format!("{CONTAINER_LIB}\n")).map_err(|e| io_err(&preload, e))?;
        let bind = |source: PathBuf, dest: &str, readonly: bool| BindMount {
            source,
            destination: PathBuf::from(dest),
            readonly,
        };
        let _ = limits;
        Ok(vec![
            // Order matters: each bind lands inside the ones before it.
            BindMount {
                source: rootfs_etc.to_path_buf(),
                destination: PathBuf::from("/etc"),
                readonly: false,
            },
            bind(ro, CONTAINER_DIR, true),
            bind(lib, CONTAINER_LIB, true),
            bind(usage, CONTAINER_USAGE, false),
            bind(preload, "/etc/ld.so.preload", true),
        ])
    }

    /// The instance's region, mapped; `None` when it has none. The sampler maps it once per
    /// tick and reads the priority and usage and feeds the controller through it.
    pub fn region(&self, id: &str) -> Option<Region> {
        self.open(id).ok()
    }

    /// Per-GPU usage for `instance get`; `None` when the instance has no region.
    pub fn usage(&self, id: &str) -> Option<Vec<DeviceUsage>> {
        region_usage(&self.region(id)?)
    }

    /// Removes the instance's region, config and preload file. Idempotent.
    pub fn remove(&self, id: &str) -> Result<(), crate::NodeError> {
        let ro = self.ro_dir(id);
        match std::fs::remove_dir_all(&ro) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&ro, e)),
        }
        for p in [
            // Files of the layout before the read-only directory.
            self.dir.join(format!("{id}.limits")),
            self.dir.join(format!("{id}.conf")),
            self.usage_path(id),
            // The single region file of layout 1 (daemons before the split).
            self.dir.join(format!("{id}.region")),
            self.preload_path(id),
        ] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p, e)),
            }
        }
        Ok(())
    }

    /// Instance ids that have limiter files here (for the orphan sweep).
    pub fn ids(&self) -> BTreeSet<String> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return BTreeSet::new();
        };
        rd.flatten()
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                // `<id>` (the read-only directory) or `<id>.<kind>`.
                name.split_once('.')
                    .map_or(name.as_str(), |(id, _)| id)
                    .to_string()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_writes_region_config_and_binds_then_removes() {
        let d = tempfile::tempdir().unwrap();
        let lib = d.path().join(LIB_NAME);
        std::fs::write(&lib, b"not really a library").unwrap();
        let l = Limiters::new(d.path(), Some(lib.clone()), 0);
        let share = GpuShare {
            vram: 20 << 30,
            milli: 250,
        };
        let etc = d.path().join("rootfs-etc");
        let binds = l
            .prepare("abc123abc123", &[share], Priority::Low, &etc)
            .unwrap();
        // Every ancestor of what the library reads is a mount point, in this order.
        let dests: Vec<_> = binds.iter().map(|b| b.destination.clone()).collect();
        assert_eq!(
            dests,
            [
                "/etc",
                CONTAINER_DIR,
                CONTAINER_LIB,
                CONTAINER_USAGE,
                "/etc/ld.so.preload"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(binds[0].source, etc);
        // Only the usage file (and /etc itself, bound onto itself) is writable from inside.
        let writable: Vec<_> = binds.iter().filter(|b| !b.readonly).collect();
        assert_eq!(writable.len(), 2);
        assert_eq!(writable[1].destination, Path::new(CONTAINER_USAGE));
        let mode = |p: &str| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(d.path().join("limiter").join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("abc123abc123/limiter.limits"), 0o644);
        assert_eq!(mode("abc123abc123"), 0o755);
        assert!(d
            .path()
            .join("limiter/abc123abc123")
            .join(LIB_NAME)
            .is_file());
        assert!(binds
            .iter()
            .any(|b| b.destination == Path::new("/etc/ld.so.preload") && b.readonly));
        assert!(binds.iter().any(|b| b.source == lib && b.readonly));
        let usage = l.usage("abc123abc123").unwrap();
        assert_eq!(usage[0].quota_bytes, 20 << 30);
        assert_eq!(usage[0].share_bp, 2500);
        let conf =
            std::fs::read_to_string(d.path().join("limiter/abc123abc123/limiter.conf")).unwrap();
        assert!(conf.contains(CONTAINER_LIMITS), "{conf}");
        assert!(conf.contains(CONTAINER_USAGE), "{conf}");
        // Re-prepare with a new share keeps the region and updates the limit.
        l.prepare(
            "abc123abc123",
            &[GpuShare {
                vram: 10 << 30,
                milli: 500,
            }],
            Priority::High,
            &etc,
        )
        .unwrap();
        assert_eq!(l.usage("abc123abc123").unwrap()[0].share_bp, 5000);
        assert_eq!(l.ids().into_iter().collect::<Vec<_>>(), ["abc123abc123"]);
        l.remove("abc123abc123").unwrap();
        l.remove("abc123abc123").unwrap();
        assert!(l.usage("abc123abc123").is_none());
        assert!(l.ids().is_empty());
    }

    #[test]
    fn missing_library_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let l = Limiters::new(d.path(), None, 0);
        let e = l
            .prepare(
                "x",
                &[GpuShare {
                    vram: 1,
                    milli: 100,
                }],
                Priority::Low,
                Path::new("/nonexistent/etc"),
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("limiter library is not installed"),
            "{e}"
        );
    }
}
