//! The runtime seam: what the reconciler asks of whatever runs an instance. Containers
//! ([`crate::container`], runc) and micro-VMs (QEMU) are implementations; the [`Node`] owns the
//! host objects they share (disks, network, cgroups, GPU inventory, limiter regions, logs) and
//! picks the runtime of an instance: by the plan on provision, by the host objects an instance
//! left (`knows`) afterwards, so teardown and adoption after a daemon crash need no store.
//!
//! Every method is idempotent and tolerant of half-made state: the reconciler calls
//! `provision` or `teardown` again after a crash at any point and converges.

use crate::instance::{ExecTty, InstancePlan, Node, NodeError, StepTimer};
pub use gpuvisor_wire::RuntimeKind;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The stdio of an exec's host-side command (the exec shim, the guest-agent shim): stdin piped
/// when the caller streams input (else null), stdout and stderr piped, and its own process
/// group, so a ^C at the daemon's terminal is not for it.
pub(crate) fn exec_stdio(cmd: &mut std::process::Command, stdin: bool) {
    use std::os::unix::process::CommandExt;
    cmd.stdin(if stdin {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    })
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .process_group(0);
}

/// One way of running instances. Implementations hold only their own state (a binary, a
/// state directory); the [`Node`] is passed in for the shared host objects.
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;

    /// How this runtime runs instances on this host, where that varies (VMs: `kvm`, or `tcg
    /// (reason)`), for `instance get`.
    fn accel(&self) -> Option<String> {
        None
    }

    /// Whether this runtime left host objects for instance `id` (files only: no process is
    /// spawned). Decides which runtime stops, execs into and tears down an instance.
    fn knows(&self, node: &Node, id: &str) -> bool;

    /// Creates what the instance needs beyond the shared objects and starts it. A running
    /// instance is left alone; a stopped or half-made one is replaced.
    fn provision(
        &self,
        node: &Node,
        plan: &InstancePlan,
        t: &mut StepTimer,
    ) -> Result<(), NodeError>;

    /// Asks the instance to end (SIGTERM, ACPI power button), waits up to `grace`, then ends it.
    fn stop(&self, node: &Node, id: &str, grace: Duration) -> Result<(), NodeError>;

    /// Removes this runtime's objects of `id` (process state, bundle, sockets, overlays).
    /// Never fails on what is already gone.
    fn teardown(&self, node: &Node, id: &str) -> Result<(), NodeError>;

    /// Ids of this runtime's instances whose main process runs. Spawns no process: the
    /// reconciler calls it every second.
    fn running(&self, node: &Node) -> BTreeSet<String>;

    /// The pid of the instance's main process as the runtime recorded it (container init,
    /// QEMU), for the daemon to reap it.
    fn main_pid(&self, node: &Node, id: &str) -> Option<i32>;

    /// What the instance's main process said last on its way out, where the runtime keeps
    /// it (a VM: the last line QEMU wrote to its stderr), for the event of its exit. Read
    /// before the teardown removes it.
    fn last_words(&self, _node: &Node, _id: &str) -> Option<String> {
        None
    }

    /// What the runtime reads of the instance's storage and network for telemetry (the
    /// cgroup's CPU and memory are read by the node for every runtime).
    fn usage(&self, node: &Node, id: &str) -> crate::telemetry::RuntimeUsage;

    /// Ids with objects in this daemon's data dir or runtime state (for the orphan sweep).
    fn local_ids(&self, node: &Node) -> Result<BTreeSet<String>, NodeError>;

    /// A command that runs `args` in the instance and exits with its status (stdout and stderr
    /// piped by the caller), and the file it records the command's pid in.
    fn exec_command(
        &self,
        node: &Node,
        id: &str,
        args: &[String],
        env: &[String],
        stdin: bool,
    ) -> Result<(std::process::Command, PathBuf), NodeError>;

    /// [`Runtime::exec_command`] run under the exec shim, so that the command's tree dies with
    /// the daemon.
    fn exec_pipes_command(
        &self,
        node: &Node,
        id: &str,
        args: &[String],
        env: &[String],
        stdin: bool,
    ) -> Result<(std::process::Command, PathBuf), NodeError>;

    /// An exec on a terminal.
    fn exec_tty_command(
        &self,
        node: &Node,
        id: &str,
        args: &[String],
        env: &[String],
    ) -> Result<ExecTty, NodeError>;

    /// Kills an exec's process tree (its pid from `pid_file`, which is removed); how many
    /// processes were killed.
    fn kill_exec(&self, node: &Node, id: &str, pid_file: &Path) -> usize;

    /// [`Runtime::kill_exec`] of an exec whose shim died.
    fn kill_orphaned_exec(&self, node: &Node, id: &str, pid_file: &Path) -> usize;

    /// Changes the CPUs the running instance is pinned to and its memory limit in place
    /// (`instance scale`). Runtimes that cannot refuse; the engine then asks for a restart.
    fn resize(
        &self,
        _node: &Node,
        _id: &str,
        _cpus: &[u32],
        _memory: u64,
    ) -> Result<(), NodeError> {
        Err(NodeError::Unsupported {
            kind: self.kind(),
            what: "changing vCPUs or memory while it runs".into(),
        })
    }

    /// New disk I/O limits for the running instance (`instance scale --disk-*`), on each of
    /// its disks. Runtimes that cannot refuse.
    fn set_disk_io(
        &self,
        _node: &Node,
        _id: &str,
        _io: &gpuvisor_wire::DiskIo,
    ) -> Result<(), NodeError> {
        Err(NodeError::Unsupported {
            kind: self.kind(),
            what: "changing disk I/O limits while it runs".into(),
        })
    }

    /// Saves the running instance's disks (and, asked, its running state) into `req.dir`
    /// ([`crate::snapshot`]) and says what was saved. Runtimes that cannot refuse.
    fn snapshot(
        &self,
        _node: &Node,
        _id: &str,
        _req: &crate::snapshot::SnapshotRequest,
    ) -> Result<crate::snapshot::SnapshotMeta, NodeError> {
        Err(NodeError::Unsupported {
            kind: self.kind(),
            what: "snapshots".into(),
        })
    }

    /// A VM's memory as its balloon sees it (`instance get`); `None` for runtimes without one
    /// or an instance not running.
    fn guest_memory(
        &self,
        _node: &Node,
        _id: &str,
    ) -> Result<Option<crate::vm::qmp::GuestMemory>, NodeError> {
        Ok(None)
    }

    /// The micro-VM runtime itself, for what only VMs do (migration to another host).
    fn as_vm(&self) -> Option<&crate::vm::runtime::VmRuntime> {
        None
    }

    /// Moves the running instance to a new process of this host without stopping it (live
    /// migration, [`crate::vm::migrate`]). Runtimes that cannot refuse.
    fn migrate(
        &self,
        _node: &Node,
        _id: &str,
        _ask: &crate::vm::migrate::MigrateAsk,
    ) -> Result<gpuvisor_wire::MigrationReport, NodeError> {
        Err(NodeError::Unsupported {
            kind: self.kind(),
            what: "live migration (a container's processes carry no state that can be moved: \
                   stop it and start it again; its volumes stay)"
                .into(),
        })
    }

    /// Finishes or undoes a migration of the instance that a killed daemon left half done;
    /// says what it did (`None`: nothing to do).
    fn recover_migration(
        &self,
        _node: &Node,
        _ask: &crate::vm::migrate::MigrateAsk,
    ) -> Option<String> {
        None
    }

    /// Undoes what a snapshot of the instance cut short (a daemon killed mid-copy) left in
    /// the running instance. Nothing to do by default.
    fn abandon_snapshot(&self, _node: &Node, _id: &str) -> Result<(), NodeError> {
        Ok(())
    }

    /// The unix socket of the instance's graphical console (a VM's VNC server, raw RFB), for
    /// the web console's viewer. Runtimes without one refuse.
    fn display(&self, _node: &Node, _id: &str) -> Result<PathBuf, NodeError> {
        Err(NodeError::Unsupported {
            kind: self.kind(),
            what: "a graphical console (VMs only)".into(),
        })
    }

    /// The unix socket of the instance's interactive console (a VM's serial port), for
    /// `instance console`. Runtimes without one refuse.
    fn console(&self, _node: &Node, _id: &str) -> Result<PathBuf, NodeError> {
        Err(NodeError::Unsupported {
            kind: self.kind(),
            what: "an interactive console (`instance console`; use `instance exec -it NAME -- sh`)"
                .into(),
        })
    }
}
