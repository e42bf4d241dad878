//! Finding and removing gpuvisor's cgroups. The runtime creates them (`/gpuvisor/<id>` under
//! every controller on cgroup v1, one directory on v2) and normally removes them on delete; this
//! module exists for what a crash leaves behind: the reconciler lists what is there and removes
//! what no instance owns.

use crate::HostRoot;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default parent of the instance cgroups, relative to a controller root (a daemon's
/// own is `HostRoot::cgroup_parent`: `gpuvisor-<name>` for a second daemon of the host).
pub const PARENT: &str = "gpuvisor";

/// The cgroup path given to the runtime for an instance.
pub fn instance_path(root: &HostRoot, id: &str) -> PathBuf {
    PathBuf::from(format!("/{}/{id}", root.cgroup_parent()))
}

/// Directories `…/gpuvisor` under every mounted hierarchy (v1 controllers or the v2 root).
fn parents(root: &HostRoot) -> Vec<PathBuf> {
    let base = root.path("/sys/fs/cgroup");
    let mut out = Vec::new();
    let parent = root.cgroup_parent();
    if base.join(parent).is_dir() {
        out.push(base.join(parent));
    }
    if let Ok(rd) = std::fs::read_dir(&base) {
        for e in rd.flatten() {
            let p = e.path().join(parent);
            if p.is_dir() {
                out.push(p);
            }
        }
    }
    out
}

/// Instance ids that have a cgroup in any hierarchy.
pub fn instance_ids(root: &HostRoot) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for parent in parents(root) {
        if let Ok(rd) = std::fs::read_dir(parent) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    ids.insert(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
    }
    ids
}

/// Kills every process left in the instance's cgroups and removes them. Idempotent.
pub fn remove(root: &HostRoot, id: &str) -> std::io::Result<()> {
    for parent in parents(root) {
        let dir = parent.join(id);
        if dir.is_dir() {
            remove_tree(&dir)?;
        }
    }
    Ok(())
}

fn remove_tree(dir: &Path) -> std::io::Result<()> {
    // Children first: a cgroup with sub-cgroups cannot be removed.
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_tree(&e.path())?;
        }
    }
    for attempt in 0..50 {
        kill_procs(dir);
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if attempt == 49 => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    Ok(())
}

fn kill_procs(dir: &Path) {
    let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The instance whose cgroup holds process `pid` (read from `/proc/<pid>/cgroup`); `None` for
/// a process of no instance, or one that is gone.
pub fn instance_of(root: &HostRoot, pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(root.path(format!("/proc/{pid}/cgroup"))).ok()?;
    let marker = format!("/{}/", root.cgroup_parent());
    text.lines().find_map(|l| {
        let (_, rest) = l.split_once(&marker)?;
        let id = rest.split('/').next()?;
        (!id.is_empty()).then(|| id.to_string())
    })
}

/// Whether process `pid` is in instance `id`'s cgroup: checked right before the daemon signals
/// a pid it learnt earlier, so a recycled pid of another process is left alone.
pub fn holds(root: &HostRoot, id: &str, pid: i32) -> bool {
    instance_of(root, pid).as_deref() == Some(id)
}

/// Pids in the instance's cgroup (first hierarchy that has it), for `exec` checks and metering.
pub fn pids(root: &HostRoot, id: &str) -> Vec<i32> {
    for parent in parents(root) {
        if let Ok(text) = std::fs::read_to_string(parent.join(id).join("cgroup.procs")) {
            return text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        }
    }
    vec![]
}

/// Writes an instance's disk I/O throttles on `devices` (major, minor) into its cgroup: on
/// cgroup v2 `io.max` (`max` where unset), on v1 the blkio `throttle.*_device` files (0 where
/// unset, which removes the device's rule).
pub fn set_disk_io(
    root: &HostRoot,
    id: &str,
    devices: &[(u32, u32)],
    io: &gpuvisor_wire::DiskIo,
) -> std::io::Result<()> {
    let base = root.path("/sys/fs/cgroup");
    let rel = instance_path(root, id);
    let rel = rel.strip_prefix("/").unwrap_or(&rel);
    let v2 = base.join(rel);
    if v2.join("io.max").exists() {
        let max = |v: Option<u64>| v.map_or("max".to_string(), |v| v.to_string());
        for (major, minor) in devices {
            std::fs::write(
                v2.join("io.max"),
                format!(
                    "{major}:{minor} rbps={} wbps={} riops={} wiops={}",
                    max(io.read_bps),
                    max(io.write_bps),
                    max(io.read_iops),
                    max(io.write_iops)
                ),
            )?;
        }
        return Ok(());
    }
    let v1 = base.join("blkio").join(rel);
    if !v1.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "instance {id} has no io (v2) or blkio (v1) cgroup under {}",
                base.display()
            ),
        ));
    }
    let files = [
        ("blkio.throttle.read_iops_device", io.read_iops),
        ("blkio.throttle.write_iops_device", io.write_iops),
        ("blkio.throttle.read_bps_device", io.read_bps),
        ("blkio.throttle.write_bps_device", io.write_bps),
    ];
    for (file, v) in files {
        for (major, minor) in devices {
            std::fs::write(v1.join(file), format!("{major}:{minor} {}", v.unwrap_or(0)))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_of_a_process_from_its_cgroup_file() {
        let t = tempfile::tempdir().unwrap();
        let root = HostRoot::at(t.path());
        std::fs::create_dir_all(t.path().join("proc/7")).unwrap();
        std::fs::write(
            t.path().join("proc/7/cgroup"),
            "12:memory:/gpuvisor/abc123abc123\n0::/\n",
        )
        .unwrap();
        std::fs::create_dir_all(t.path().join("proc/8")).unwrap();
        std::fs::write(t.path().join("proc/8/cgroup"), "0::/user.slice\n").unwrap();
        assert_eq!(instance_of(&root, 7).as_deref(), Some("abc123abc123"));
        assert!(holds(&root, "abc123abc123", 7));
        assert!(!holds(&root, "abc123", 7), "a prefix is not the instance");
        assert_eq!(instance_of(&root, 8), None);
        assert_eq!(instance_of(&root, 9), None);
    }

    #[test]
    fn finds_and_removes_fixture_cgroups() {
        let t = tempfile::tempdir().unwrap();
        let root = HostRoot::at(t.path());
        for ctrl in ["memory", "cpuset"] {
            std::fs::create_dir_all(t.path().join(format!("sys/fs/cgroup/{ctrl}/gpuvisor/aaa")))
                .unwrap();
        }
        std::fs::create_dir_all(t.path().join("sys/fs/cgroup/memory/gpuvisor/bbb")).unwrap();
        assert_eq!(
            instance_ids(&root).into_iter().collect::<Vec<_>>(),
            ["aaa", "bbb"]
        );
        remove(&root, "aaa").unwrap();
        remove(&root, "aaa").unwrap();
        assert_eq!(instance_ids(&root).into_iter().collect::<Vec<_>>(), ["bbb"]);
        assert_eq!(
            instance_path(&HostRoot::real(), "x"),
            PathBuf::from("/gpuvisor/x")
        );
        let other = HostRoot::real().with_cgroup_parent("gpuvisor-gb".into());
        assert_eq!(instance_path(&other, "x"), PathBuf::from("/gpuvisor-gb/x"));
    }
}
