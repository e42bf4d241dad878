//! Finding and removing gpuvisor's cgroups. The runtime creates them (`/gpuvisor/<id>` under
//! every controller on cgroup v1, one directory on v2) and normally removes them on delete; this
//! module exists for what a crash leaves behind: the reconciler lists what is there and removes
//! what no instance owns.

use crate::HostRoot;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The parent of every instance cgroup, relative to a controller root.
pub const PARENT: &str = "gpuvisor";

/// The cgroup path given to the runtime for an instance.
pub fn instance_path(id: &str) -> PathBuf {
    PathBuf::from(format!("/{PARENT}/{id}"))
}

/// Directories `…/gpuvisor` under every mounted hierarchy (v1 controllers or the v2 root).
fn parents(root: &HostRoot) -> Vec<PathBuf> {
    let base = root.path("/sys/fs/cgroup");
    let mut out = Vec::new();
    if base.join(PARENT).is_dir() {
        out.push(base.join(PARENT));
    }
    if let Ok(rd) = std::fs::read_dir(&base) {
        for e in rd.flatten() {
            let p = e.path().join(PARENT);
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

/// Pids in the instance's cgroup (first hierarchy that has it), for `exec` checks and metering.
pub fn pids(root: &HostRoot, id: &str) -> Vec<i32> {
    for parent in parents(root) {
        if let Ok(text) = std::fs::read_to_string(parent.join(id).join("cgroup.procs")) {
            return text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        }
    }
    vec![]
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(instance_path("x"), PathBuf::from("/gpuvisor/x"));
    }
}
