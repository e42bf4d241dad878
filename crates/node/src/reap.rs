//! Exit codes of containers, for restart policies. `runc run --detach` leaves the container's
//! init an orphan; with the daemon as the *child subreaper* ([`become_subreaper`]) that orphan
//! becomes the daemon's child instead of the host init's, so the daemon can read its exit status
//! with `waitpid` — the one fact about an exit that `/proc` cannot tell afterwards.
//!
//! Key decision: the daemon reaps only pids it can name — an instance's init (from the bundle's
//! pid file, and only while `/proc` shows it in that instance's cgroup) and its log relays (the
//! pid and start time seen while they ran) — never `waitpid(-1)`, which would steal the status of
//! the host tools (`runc`, `ip`, ...) that the daemon runs and waits for itself. An init started
//! by an earlier daemon process is not our child: its status is unknown (`NotOurs`).

use crate::{cgroup, Node, NodeError};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// Makes this process the child subreaper: orphaned descendants (detached container inits, log
/// relays) become its children.
pub fn become_subreaper() -> Result<(), NodeError> {
    nix::sys::prctl::set_child_subreaper(true).map_err(|e| NodeError::Io {
        path: "prctl(PR_SET_CHILD_SUBREAPER)".into(),
        source: e.into(),
    })
}

/// What [`reap`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaped {
    /// The process ended with this code (128 + N for signal N, as shells report it).
    Exited(i32),
    /// Still running after the wait.
    Running,
    /// Not a child of this process (started under an earlier daemon, or already reaped).
    NotOurs,
}

/// Waits up to `wait` for child `pid` to end and reaps it.
fn reap_pid(pid: i32, wait: Duration) -> Reaped {
    let deadline = Instant::now() + wait;
    loop {
        match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Reaped::Exited(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Reaped::Exited(128 + sig as i32),
            Ok(_) => {
                if Instant::now() >= deadline {
                    return Reaped::Running;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return Reaped::NotOurs,
        }
    }
}

/// An instance's init process, named by pid and start time (together they name one process
/// for its whole life, zombie included, so a recycled pid is never waited for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Init {
    pub pid: i32,
    start: u64,
}

/// Start time (clock ticks since boot, field 22 of `/proc/<pid>/stat`) and whether the process
/// is a zombie.
fn stat(node: &Node, pid: i32) -> Option<(u64, bool, i32)> {
    stat_at(&node.cfg.root, pid)
}

/// Start time of process `pid` (clock ticks since boot): with the pid, it names one process for
/// its whole life, so a recycled pid is told apart.
pub fn start_time(root: &crate::HostRoot, pid: i32) -> Option<u64> {
    stat_at(root, pid).map(|(start, _, _)| start)
}

fn stat_at(root: &crate::HostRoot, pid: i32) -> Option<(u64, bool, i32)> {
    let stat = std::fs::read_to_string(root.path(format!("/proc/{pid}/stat"))).ok()?;
    // Fields after the command name, which may hold spaces: state is field 3, ppid 4, start 22.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let zombie = rest.first()?.starts_with(['Z', 'X']);
    Some((
        rest.get(19)?.parse().ok()?,
        zombie,
        rest.get(1)?.parse().ok()?,
    ))
}

/// Instance `id`'s main process as its runtime recorded it (a container's init, QEMU), if `/proc` still
/// shows that pid in the instance's cgroup (a zombie keeps its cgroup path until reaped).
///
/// A zombie that is this daemon's own child also counts, wherever `/proc` places it: on some
/// kernels (cgroup v1) a multi-threaded process such as QEMU loses its cgroup path at exit, and
/// a child's pid cannot be reused before its parent reaps it.
pub fn init(node: &Node, id: &str) -> Option<Init> {
    let pid = node.main_pid(id)?;
    let (start, zombie, ppid) = stat(node, pid)?;
    let our_zombie = zombie && u32::try_from(ppid).is_ok_and(|p| p == std::process::id());
    if !our_zombie && !cgroup::holds(&node.cfg.root, id, pid) {
        return None;
    }
    Some(Init { pid, start })
}

/// Reaps `init` once it has ended, waiting up to `wait`.
pub fn reap(node: &Node, init: &Init, wait: Duration) -> Reaped {
    let deadline = Instant::now() + wait;
    loop {
        match stat(node, init.pid) {
            Some((start, _, _)) if start == init.start => {}
            _ => return Reaped::NotOurs,
        }
        match reap_pid(init.pid, Duration::ZERO) {
            Reaped::Running if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            r => return r,
        }
    }
}

/// Children the daemon waits for itself (exec's `runc exec`, session shims), by pid: the
/// stale-zombie sweep leaves them alone, whatever the time they spend as zombies before their
/// waiter gets to them. A pid stays registered only until its waiter reaped it (the guard is
/// dropped after the wait), so a recycled pid is never confused with it for long.
static WAITED: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

/// Registration of a child some task waits for; dropped once it was reaped.
#[derive(Debug)]
pub struct Waited(i32);

impl Waited {
    /// Registers child `pid` (`None`: already reaped, nothing to register).
    pub fn new(pid: Option<u32>) -> Option<Self> {
        let pid = i32::try_from(pid?).ok()?;
        WAITED.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
        Some(Self(pid))
    }
}

impl Drop for Waited {
    fn drop(&mut self) {
        let mut w = WAITED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = w.iter().position(|p| *p == self.0) {
            w.swap_remove(i);
        }
    }
}

fn waited(pid: i32) -> bool {
    WAITED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&pid)
}

/// Reaps the zombie children of this process that were zombies at the previous call too (`seen`
/// carries them from call to call) and are no instance's init: ended log relays, and processes
/// of an `exec` whose `runc exec` died first — orphans the subreaper inherits and nobody waits
/// for. A child that the daemon itself waits for is left to its waiter: a host tool is reaped
/// within moments, never left a zombie between two calls; an exec's runtime or shim, which may
/// wait as a zombie until its command's output closes, is registered ([`Waited`]); an
/// instance's init is left to [`reap`], which reads its exit code.
pub fn reap_stale_zombies(node: &Node, seen: &mut std::collections::HashSet<(i32, u64)>) {
    let me = std::process::id() as i32;
    let mut now = std::collections::HashSet::new();
    let inits: std::collections::HashSet<i32> =
        std::fs::read_dir(node.cfg.data_dir.join("bundles"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path().join("pid")).ok())
                    .filter_map(|p| p.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default();
    let Ok(rd) = std::fs::read_dir(node.cfg.root.path("/proc")) else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let Some((start, zombie, ppid)) = stat(node, pid) else {
            continue;
        };
        if !zombie || ppid != me || inits.contains(&pid) || waited(pid) {
            continue;
        }
        if seen.contains(&(pid, start)) {
            let _ = reap_pid(pid, Duration::ZERO);
        } else {
            now.insert((pid, start));
        }
    }
    *seen = now;
}
