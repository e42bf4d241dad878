//! One root prefix for every host path gpuvisor reads (`/sys`, `/proc`, `/dev`), so that tests
//! point the node layer at a fixture tree instead of the real host.

pub use gpuvisor_wire::{format_cpu_list, parse_cpu_list};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoot {
    root: PathBuf,
    /// The parent of this daemon's instance cgroups (`cgroup_parent` in the config).
    cgroup_parent: String,
}

impl Default for HostRoot {
    fn default() -> Self {
        Self::real()
    }
}

impl HostRoot {
    /// The real host (`/`).
    pub fn real() -> Self {
        Self::at("/")
    }

    /// A fixture tree standing in for `/`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            cgroup_parent: crate::cgroup::PARENT.to_string(),
        }
    }

    /// This daemon's instance cgroups live under `parent`.
    pub fn with_cgroup_parent(mut self, parent: String) -> Self {
        self.cgroup_parent = parent;
        self
    }

    /// The parent of the instance cgroups, relative to a controller root.
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    pub fn is_real(&self) -> bool {
        self.root == Path::new("/")
    }

    /// Maps an absolute host path (`/sys/bus/pci`) into this root.
    pub fn path(&self, host_path: impl AsRef<Path>) -> PathBuf {
        let p = host_path.as_ref();
        let rel = p.strip_prefix("/").unwrap_or(p);
        self.root.join(rel)
    }

    /// Reads a small host file, trimmed; `None` if it does not exist or cannot be read.
    pub fn read_trimmed(&self, host_path: impl AsRef<Path>) -> Option<String> {
        std::fs::read_to_string(self.path(host_path))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Total memory of the host in bytes, from `/proc/meminfo`.
    pub fn mem_total(&self) -> Option<u64> {
        self.meminfo("MemTotal")
    }

    /// Memory the host can give without swapping (`MemAvailable`), bytes.
    pub fn mem_available(&self) -> Option<u64> {
        self.meminfo("MemAvailable")
    }

    /// One `/proc/meminfo` field (kB there), in bytes.
    fn meminfo(&self, field: &str) -> Option<u64> {
        let text = std::fs::read_to_string(self.path("/proc/meminfo")).ok()?;
        let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    }

    /// Online CPUs of the host, from `/sys/devices/system/cpu/online` (e.g. `0-3,6`).
    pub fn online_cpus(&self) -> Option<Vec<u32>> {
        parse_cpu_list(&self.read_trimmed("/sys/devices/system/cpu/online")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_into_root() {
        let r = HostRoot::at("/tmp/fx");
        assert_eq!(r.path("/sys/bus"), PathBuf::from("/tmp/fx/sys/bus"));
        assert!(HostRoot::real().is_real());
    }
}
