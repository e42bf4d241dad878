//! Fractional GPUs on this host: for each instance with a GPU share, the limiter's shared
//! accounting region, its read-only config, and the bind mounts that inject
//! `libgpuvisor_limiter.so` into every process of the instance through `/etc/ld.so.preload`.
//!
//! Key decision: the preload file, the config and the library are bound *read-only* from the
//! host, so root inside the instance cannot remove the limiter (it has no CAP_SYS_ADMIN and
//! seccomp refuses mount/umount). The region file lives under `<data>/limiter/<id>.region` and is
//! named by the instance id like every other host object, so the orphan sweep finds it.

use crate::runtime::BindMount;
use gpuvisor_limiter::config::Config;
use gpuvisor_limiter::shm::{DeviceLimit, DeviceUsage, Priority, Region, RegionSpec};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where the library, region and config appear inside an instance.
pub const CONTAINER_LIB: &str = "/usr/lib/gpuvisor/libgpuvisor_limiter.so";
pub const CONTAINER_REGION: &str = "/run/gpuvisor/limiter.region";
pub const CONTAINER_CONFIG: &str = gpuvisor_limiter::config::DEFAULT_PATH;
pub const LIB_NAME: &str = "libgpuvisor_limiter.so";

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

    fn region_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.region"))
    }
    fn config_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.conf"))
    }
    fn preload_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.preload"))
    }

    /// Creates the region (GPUs in the instance's CUDA order), the config and the preload file,
    /// and returns the binds that put them and the library into the instance. Idempotent: an
    /// existing region keeps its accounting and gets the new limits.
    pub fn prepare(
        &self,
        id: &str,
        gpus: &[GpuShare],
        priority: Priority,
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
        let region = self.region_path(id);
        match Region::open(&region) {
            Ok(r) if r.devices() == devices.len() => {
                for (i, d) in devices.iter().enumerate() {
                    r.set_limit(i, *d).map_err(|e| io_err(&region, e))?;
                }
                r.set_priority(priority);
            }
            _ => {
                Region::create(&region, &RegionSpec { devices, priority })
                    .map_err(|e| io_err(&region, e))?;
            }
        }
        let config = self.config_path(id);
        Config {
            region: PathBuf::from(CONTAINER_REGION),
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
        Ok(vec![
            bind(lib, CONTAINER_LIB, true),
            bind(config, CONTAINER_CONFIG, true),
            bind(region, CONTAINER_REGION, false),
            bind(preload, "/etc/ld.so.preload", true),
        ])
    }

    /// Per-GPU usage for `instance get`; `None` when the instance has no region.
    pub fn usage(&self, id: &str) -> Option<Vec<DeviceUsage>> {
        let r = Region::open(&self.region_path(id)).ok()?;
        (0..r.devices()).map(|d| r.usage(d).ok()).collect()
    }

    /// Feeds the instance's compute-share controller: `util_bp` is the instance's SM utilisation
    /// of its `dev`-th GPU, `high_util_bp` that of high-priority instances on the same GPU.
    pub fn publish(
        &self,
        id: &str,
        dev: usize,
        util_bp: u32,
        high_util_bp: u32,
    ) -> Result<(), crate::NodeError> {
        let path = self.region_path(id);
        let r = Region::open(&path).map_err(|e| io_err(&path, e))?;
        r.publish_sample(dev, util_bp, high_util_bp)
            .map_err(|e| io_err(&path, e))
    }

    /// Removes the instance's region, config and preload file. Idempotent.
    pub fn remove(&self, id: &str) -> Result<(), crate::NodeError> {
        for p in [
            self.region_path(id),
            self.config_path(id),
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
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.split_once('.').map(|(id, _)| id.to_string())
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
        let binds = l.prepare("abc123abc123", &[share], Priority::Low).unwrap();
        assert_eq!(binds.len(), 4);
        assert!(binds
            .iter()
            .any(|b| b.destination == Path::new("/etc/ld.so.preload") && b.readonly));
        assert!(binds.iter().any(|b| b.source == lib && b.readonly));
        let usage = l.usage("abc123abc123").unwrap();
        assert_eq!(usage[0].quota_bytes, 20 << 30);
        assert_eq!(usage[0].share_bp, 2500);
        let conf = std::fs::read_to_string(d.path().join("limiter/abc123abc123.conf")).unwrap();
        assert!(conf.contains(CONTAINER_REGION), "{conf}");
        // Re-prepare with a new share keeps the region and updates the limit.
        l.prepare(
            "abc123abc123",
            &[GpuShare {
                vram: 10 << 30,
                milli: 500,
            }],
            Priority::High,
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
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("limiter library is not installed"),
            "{e}"
        );
    }
}
