//! Containers through an OCI runtime binary (`runc` by default). We write the bundle's
//! `config.json` with `oci-spec` and drive the runtime's CLI, the way containerd's shim does,
//! because the runtime binary is what operators already trust and audit.
//!
//! Key decision: containers run *detached* (`runc run -d`) with stdio passed to the instance's
//! log relay (a pipe; see [`crate::logs`]), so the container never depends on the daemon's process: a SIGKILLed daemon leaves its
//! instances running, and on restart adopts them with `runc state`. The runtime keeps its state
//! under our own `--root`, so `list()` sees only gpuvisor's containers.

use crate::cmd::{self, CmdError};
use crate::gpu::DeviceNode;
use crate::host::format_cpu_list;
use oci_spec::runtime::{
    Capability, LinuxBlockIoBuilder, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxDeviceBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder,
    LinuxThrottleDevice, LinuxThrottleDeviceBuilder, MountBuilder, PosixRlimitBuilder,
    PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};
use oci_spec::OciSpecError;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("oci spec: {0}")]
    Spec(#[from] OciSpecError),
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("io on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("OCI runtime {binary:?} not usable: {why}")]
    Unavailable { binary: String, why: String },
    #[error("cannot parse runtime output: {0}")]
    Parse(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A host path bound into the container.
#[derive(Debug, Clone, PartialEq)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: PathBuf,
    pub readonly: bool,
}

/// Everything the engine decided about one container; turned into `config.json` by
/// [`build_spec`].
#[derive(Debug, Clone, Default)]
pub struct BundleSpec {
    pub id: String,
    pub rootfs: PathBuf,
    pub hostname: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    /// Working directory of the process (`/` when empty).
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    /// Host CPUs to pin to.
    pub cpus: Vec<u32>,
    /// Memory limit in bytes (swap is not allowed beyond it).
    pub memory: u64,
    pub pids_limit: i64,
    /// Network namespace to join (prepared by the node's network module).
    pub netns: Option<PathBuf>,
    /// Device nodes to create and allow (GPUs, nvidiactl, ...).
    pub devices: Vec<DeviceNode>,
    pub binds: Vec<BindMount>,
    /// Cgroup path relative to the controllers' roots: `/gpuvisor/<id>`.
    pub cgroup_path: PathBuf,
    /// Disk I/O limits, applied to each of `block_devices` (the disk's, the volumes').
    pub disk_io: gpuvisor_wire::DiskIo,
    pub block_devices: Vec<(u32, u32)>,
    /// AppArmor profile, only where the host has AppArmor.
    pub apparmor_profile: Option<String>,
    pub seccomp: bool,
}

/// The cgroup's throttles for `io` on each device (runc writes them: blkio on cgroup v1,
/// io.max on v2).
fn block_io(
    io: &gpuvisor_wire::DiskIo,
    devices: &[(u32, u32)],
) -> Result<oci_spec::runtime::LinuxBlockIo, OciSpecError> {
    let per_device = |rate: Option<u64>| -> Result<Option<Vec<LinuxThrottleDevice>>, OciSpecError> {
        let Some(rate) = rate else { return Ok(None) };
        devices
            .iter()
            .map(|&(major, minor)| {
                LinuxThrottleDeviceBuilder::default()
                    .major(i64::from(major))
                    .minor(i64::from(minor))
                    .rate(rate)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    };
    let mut b = LinuxBlockIoBuilder::default();
    if let Some(v) = per_device(io.read_bps)? {
        b = b.throttle_read_bps_device(v);
    }
    if let Some(v) = per_device(io.write_bps)? {
        b = b.throttle_write_bps_device(v);
    }
    if let Some(v) = per_device(io.read_iops)? {
        b = b.throttle_read_iops_device(v);
    }
    if let Some(v) = per_device(io.write_iops)? {
        b = b.throttle_write_iops_device(v);
    }
    b.build()
}

/// Capabilities kept by default (Docker's set): enough for package managers and servers, none of
/// the ones that reach the host (SYS_ADMIN, NET_ADMIN, SYS_MODULE, ...).
pub const DEFAULT_CAPS: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Paths masked (bound to /dev/null or an empty tmpfs) and made read-only, as Docker does.
const MASKED: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn mount(
    dest: &str,
    typ: &str,
    src: &str,
    opts: &[&str],
) -> Result<oci_spec::runtime::Mount, OciSpecError> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(src)
        .options(strings(opts))
        .build()
}

/// Open-file limit for instance processes: Docker's 1048576, capped at the daemon's own hard
/// limit (the runtime cannot raise a limit above what it was given).
fn nofile_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard.min(1_048_576))
        .unwrap_or(1024)
}

/// Builds the OCI runtime spec for one instance.
pub fn build_spec(b: &BundleSpec) -> Result<Spec, RuntimeError> {
    let caps: HashSet<Capability> = DEFAULT_CAPS.iter().copied().collect();
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(b.uid).gid(b.gid).build()?)
        .args(b.args.clone())
        .env(b.env.clone())
        .cwd(if b.cwd.is_empty() {
            "/"
        } else {
            b.cwd.as_str()
        })
        .no_new_privileges(true)
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(caps.clone())
                .effective(caps.clone())
                .permitted(caps)
                .inheritable(HashSet::new())
                .ambient(HashSet::new())
                .build()?,
        )
        .rlimits(vec![PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .hard(nofile_limit())
            .soft(nofile_limit())
            .build()?]);
    let process = match &b.apparmor_profile {
        Some(p) => process.apparmor_profile(p.clone()),
        None => process,
    }
    .build()?;

    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        )?,
    ];
    for bind in &b.binds {
        let mut opts = vec!["rbind", "nosuid", "nodev"];
        opts.push(if bind.readonly { "ro" } else { "rw" });
        mounts.push(
            MountBuilder::default()
                .destination(bind.destination.clone())
                .typ("bind")
                .source(bind.source.clone())
                .options(strings(&opts))
                .build()?,
        );
    }

    let mut namespaces = Vec::new();
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Cgroup,
    ] {
        namespaces.push(LinuxNamespaceBuilder::default().typ(typ).build()?);
    }
    let net = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network);
    namespaces.push(match &b.netns {
        Some(p) => net.path(p.clone()).build()?,
        None => net.build()?,
    });

    let mut devices = Vec::new();
    let mut allow = vec![LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()?];
    for d in &b.devices {
        devices.push(
            LinuxDeviceBuilder::default()
                .path(d.container_path.clone())
                .typ(LinuxDeviceType::C)
                .major(i64::from(d.major))
                .minor(i64::from(d.minor))
                .file_mode(0o666u32)
                .uid(0u32)
                .gid(0u32)
                .build()?,
        );
        allow.push(
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(LinuxDeviceType::C)
                .major(i64::from(d.major))
                .minor(i64::from(d.minor))
                .access("rwm")
                .build()?,
        );
    }
    let mem = i64::try_from(b.memory).unwrap_or(i64::MAX);
    let resources = LinuxResourcesBuilder::default()
        .devices(allow)
        .memory(LinuxMemoryBuilder::default().limit(mem).swap(mem).build()?)
        .cpu(
            LinuxCpuBuilder::default()
                .cpus(format_cpu_list(&b.cpus))
                .build()?,
        )
        .pids(LinuxPidsBuilder::default().limit(b.pids_limit).build()?)
        .block_io(block_io(&b.disk_io, &b.block_devices)?)
        .build()?;

    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .devices(devices)
        .resources(resources)
        .cgroups_path(b.cgroup_path.clone())
        .masked_paths(strings(MASKED))
        .readonly_paths(strings(READONLY))
        .rootfs_propagation("private");
    if b.seccomp {
        linux = linux.seccomp(crate::seccomp::default_profile()?);
    }

    Ok(SpecBuilder::default()
        .version("1.0.2-dev")
        .root(
            RootBuilder::default()
                .path(b.rootfs.clone())
                .readonly(false)
                .build()?,
        )
        .hostname(b.hostname.clone())
        .process(process)
        .mounts(mounts)
        .linux(linux.build()?)
        .build()?)
}

/// Writes `<dir>/config.json`; the rootfs lives elsewhere (absolute path in the spec).
pub fn write_bundle(dir: &Path, b: &BundleSpec) -> Result<(), RuntimeError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let spec = build_spec(b)?;
    let path = dir.join("config.json");
    let tmp = dir.join("config.json.tmp");
    spec.save(&tmp)?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// What the runtime reports about one container.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ContainerState {
    pub id: String,
    /// `created`, `running`, `paused`, `stopped`.
    pub status: String,
    #[serde(default)]
    pub pid: i32,
}

/// An OCI runtime binary with its own state root.
#[derive(Debug, Clone)]
pub struct OciRuntime {
    binary: String,
    root: PathBuf,
}

impl OciRuntime {
    /// Checks that the binary runs (`--version`) and prepares the state root.
    pub fn probe(binary: &str, root: &Path) -> Result<Self, RuntimeError> {
        cmd::run(binary, ["--version"]).map_err(|e| RuntimeError::Unavailable {
            binary: binary.to_string(),
            why: e.to_string(),
        })?;
        std::fs::create_dir_all(root).map_err(io(root))?;
        Ok(Self {
            binary: binary.to_string(),
            root: root.to_path_buf(),
        })
    }

    pub fn binary(&self) -> &str {
        &self.binary
    }

    fn base(&self) -> Vec<String> {
        vec!["--root".into(), self.root.to_string_lossy().into_owned()]
    }

    fn run<const N: usize>(&self, args: [&str; N]) -> Result<String, RuntimeError> {
        let mut all = self.base();
        all.extend(args.iter().map(|s| s.to_string()));
        Ok(cmd::run(&self.binary, all)?)
    }

    /// Starts the container detached; its stdout and stderr go to `output` (the write end of
    /// the instance's log relay pipe, or a file). The runtime's own errors go to
    /// `<bundle>/runc.log` as well, whose tail a failure shows.
    pub fn run_detached(
        &self,
        id: &str,
        bundle: &Path,
        output: std::os::fd::OwnedFd,
    ) -> Result<(), RuntimeError> {
        let err = output.try_clone().map_err(io(bundle))?;
        let pid_file = bundle.join("pid");
        let runc_log = bundle.join("runc.log");
        let status = Command::new(&self.binary)
            .args(self.base())
            .arg("--log")
            .arg(&runc_log)
            .args(["run", "--detach", "--bundle"])
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::from(output))
            .stderr(Stdio::from(err))
            .status()
            .map_err(|source| RuntimeError::Io {
                path: PathBuf::from(&self.binary),
                source,
            })?;
        if status.success() {
            return Ok(());
        }
        let tail = std::fs::read_to_string(&runc_log).unwrap_or_default();
        let tail: String = tail.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        Err(RuntimeError::Cmd(CmdError::Failed {
            command: format!("{} run {id}", self.binary),
            status: status.to_string(),
            stderr: tail,
        }))
    }

    /// Whether the runtime may know container `id`: runc (and crun) keep a directory per
    /// container under `--root` from `create` until `delete`. `false` means `state` would
    /// answer `None`, without running the runtime (≈ 7 ms a run on a 2-core host).
    pub fn may_know(&self, id: &str) -> bool {
        !id.is_empty() && !id.contains('/') && self.root.join(id).exists()
    }

    /// The container's state, `None` if the runtime does not know it.
    pub fn state(&self, id: &str) -> Result<Option<ContainerState>, RuntimeError> {
        match self.run(["state", id]) {
            Ok(out) => serde_json::from_str(&out)
                .map(Some)
                .map_err(|e| RuntimeError::Parse(e.to_string())),
            Err(RuntimeError::Cmd(CmdError::Failed { stderr, .. }))
                if stderr.contains("does not exist") || stderr.contains("not exist") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Every container under our root.
    pub fn list(&self) -> Result<Vec<ContainerState>, RuntimeError> {
        let out = self.run(["list", "--format", "json"])?;
        let trimmed = out.trim();
        if trimmed.is_empty() || trimmed == "null" {
            return Ok(vec![]);
        }
        serde_json::from_str(trimmed).map_err(|e| RuntimeError::Parse(e.to_string()))
    }

    /// Sends a signal to the container's init (`TERM`, `KILL`); `all` signals every process.
    pub fn kill(&self, id: &str, signal: &str, all: bool) -> Result<(), RuntimeError> {
        let r = if all {
            self.run(["kill", "--all", id, signal])
        } else {
            self.run(["kill", id, signal])
        };
        match r {
            Ok(_) => Ok(()),
            // Already gone or not running: nothing to signal.
            Err(RuntimeError::Cmd(CmdError::Failed { stderr, .. }))
                if stderr.contains("not running")
                    || stderr.contains("does not exist")
                    || stderr.contains("process already finished") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Pins the running container to `cpus` and limits its memory (and memory+swap, as
    /// [`build_spec`] does) to `memory` bytes, in place.
    pub fn update(&self, id: &str, cpus: &[u32], memory: u64) -> Result<(), RuntimeError> {
        let cpus = format_cpu_list(cpus);
        let mem = memory.to_string();
        self.run([
            "update",
            "--cpuset-cpus",
            &cpus,
            "--memory",
            &mem,
            "--memory-swap",
            &mem,
            id,
        ])
        .map(drop)
    }

    /// Freezes every process of the container (the cgroup freezer): no CPU, memory kept.
    pub fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.run(["pause", id]).map(drop)
    }

    /// Thaws a paused container; one that is not paused is left as it is.
    pub fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        match self.run(["resume", id]) {
            Ok(_) => Ok(()),
            Err(RuntimeError::Cmd(CmdError::Failed { stderr, .. }))
                if stderr.contains("not paused") || stderr.contains("not exist") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes the container (its cgroup with it); `force` kills it first. Idempotent.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let r = if force {
            self.run(["delete", "--force", id])
        } else {
            self.run(["delete", id])
        };
        match r {
            Ok(_) => Ok(()),
            Err(RuntimeError::Cmd(CmdError::Failed { stderr, .. }))
                if stderr.contains("does not exist") || stderr.contains("not exist") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The `runc exec` command line for `args` in container `id`: stdin piped when `stdin`
    /// (closed otherwise), stdout and stderr piped, the pid of the command (as seen from the
    /// host) written to `pid_file`. The caller runs it asynchronously, bounds it, and ends it
    /// with [`kill_exec_tree`].
    pub fn exec_command(
        &self,
        id: &str,
        args: &[String],
        env: &[String],
        pid_file: &Path,
        stdin: bool,
    ) -> Command {
        let argv = self.exec_argv(id, args, env, pid_file);
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..])
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// The argv of a foreground `runc exec` of `args` in container `id` that writes the
    /// command's host pid to `pid_file`.
    pub fn exec_argv(
        &self,
        id: &str,
        args: &[String],
        env: &[String],
        pid_file: &Path,
    ) -> Vec<String> {
        self.exec_argv_with(id, args, env, pid_file, &[])
    }

    /// `runc [base] exec [opts] --pid-file F [--env E]... ID ARGS...`.
    fn exec_argv_with(
        &self,
        id: &str,
        args: &[String],
        env: &[String],
        pid_file: &Path,
        opts: &[String],
    ) -> Vec<String> {
        let mut v = vec![self.binary.clone()];
        v.extend(self.base());
        v.push("exec".into());
        v.extend(opts.iter().cloned());
        v.extend(["--pid-file".into(), pid_file.to_string_lossy().into_owned()]);
        for e in env {
            v.push("--env".into());
            v.push(e.clone());
        }
        v.push(id.into());
        v.extend(args.iter().cloned());
        v
    }

    /// The argv of a detached `runc exec --tty` of `args` in container `id` that sends the pty
    /// master to `console_socket` and writes the command's host pid to `pid_file` (run by the
    /// exec shim, [`crate::console`]).
    pub fn exec_tty_argv(
        &self,
        id: &str,
        args: &[String],
        env: &[String],
        pid_file: &Path,
        console_socket: &Path,
    ) -> Vec<String> {
        let opts = [
            "--detach".into(),
            "--tty".into(),
            "--console-socket".into(),
            console_socket.to_string_lossy().into_owned(),
        ];
        self.exec_argv_with(id, args, env, pid_file, &opts)
    }
}

/// Kills an exec'd command and every process it started that is still its descendant: stops
/// them all first (SIGSTOP, repeated until no new child appears, so nothing forks while the
/// tree is collected), then SIGKILLs them. `pid` is only trusted while it is in the instance's
/// cgroup (a recycled pid is left alone). Processes that detached themselves from the tree
/// (double fork) belong to the instance like any it starts itself and end with it. Returns how
/// many processes were killed.
pub fn kill_exec_tree(root: &crate::HostRoot, id: &str, pid: i32) -> usize {
    kill_exec_tree_pids(root, id, pid).len()
}

/// [`kill_exec_tree`], returning the pids it killed.
pub fn kill_exec_tree_pids(root: &crate::HostRoot, id: &str, pid: i32) -> Vec<i32> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let in_instance = |p: i32| crate::cgroup::holds(root, id, p);
    if pid <= 1 || !in_instance(pid) {
        return Vec::new();
    }
    let mut tree: Vec<i32> = vec![pid];
    let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
    // Bounded: each round stops what it finds; a tree that keeps growing is cut at the limit.
    for _ in 0..64 {
        let parents = proc_parents(root);
        let mut grew = false;
        for (child, parent) in parents {
            if tree.contains(&parent) && !tree.contains(&child) && in_instance(child) {
                let _ = kill(Pid::from_raw(child), Signal::SIGSTOP);
                tree.push(child);
                grew = true;
            }
        }
        if !grew {
            break;
        }
    }
    for p in &tree {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
    tree
}

/// (pid, parent pid) of every process.
pub(crate) fn proc_parents(root: &crate::HostRoot) -> Vec<(i32, i32)> {
    let Ok(rd) = std::fs::read_dir(root.path("/proc")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
            let rest = stat.rsplit_once(')')?.1;
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BundleSpec {
        BundleSpec {
            id: "abc".into(),
            rootfs: "/tmp/rootfs".into(),
            hostname: "abc".into(),
            args: vec!["sh".into()],
            env: vec!["A=1".into()],
            cwd: "/work".into(),
            uid: 1000,
            gid: 100,
            cpus: vec![0, 1],
            memory: 256 << 20,
            pids_limit: 1024,
            netns: Some("/var/run/netns/gv-abc".into()),
            devices: vec![DeviceNode {
                container_path: "/dev/nvidia1".into(),
                host_path: "/x/nvidia1".into(),
                major: 195,
                minor: 1,
            }],
            binds: vec![BindMount {
                source: "/data/vol".into(),
                destination: "/workspace".into(),
                readonly: false,
            }],
            cgroup_path: "/gpuvisor/abc".into(),
            disk_io: gpuvisor_wire::DiskIo {
                read_iops: Some(100),
                write_bps: Some(1 << 20),
                ..Default::default()
            },
            block_devices: vec![(7, 3), (259, 1)],
            apparmor_profile: None,
            seccomp: true,
        }
    }

    /// The fast "fresh container" check agrees with runc's own view: no state directory, no
    /// container; a real `runc run` makes one (when runc is installed, as in CI).
    #[test]
    fn may_know_follows_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let rt = OciRuntime::probe("true", dir.path()).unwrap();
        assert!(!rt.may_know("abc"));
        std::fs::create_dir(dir.path().join("abc")).unwrap();
        assert!(rt.may_know("abc"));
        assert!(!rt.may_know("../abc") && !rt.may_know(""));
        if let Ok(runc) = OciRuntime::probe("runc", &dir.path().join("runc")) {
            assert!(!runc.may_know("nope"));
            assert_eq!(runc.state("nope").unwrap(), None);
        }
    }

    #[test]
    fn spec_carries_isolation_and_limits() {
        let spec = build_spec(&sample()).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        let linux = &json["linux"];
        assert_eq!(linux["resources"]["cpu"]["cpus"], "0-1");
        assert_eq!(linux["resources"]["memory"]["limit"], 256 << 20);
        assert_eq!(linux["resources"]["pids"]["limit"], 1024);
        assert_eq!(linux["cgroupsPath"], "/gpuvisor/abc");
        let ns: Vec<&str> = linux["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        for t in ["pid", "mount", "uts", "ipc", "network", "cgroup"] {
            assert!(ns.contains(&t), "{t} namespace missing");
        }
        assert_eq!(linux["devices"][0]["major"], 195);
        // devices cgroup: deny all first, then the GPU
        assert_eq!(linux["resources"]["devices"][0]["allow"], false);
        assert_eq!(linux["resources"]["devices"][1]["minor"], 1);
        assert_eq!(json["process"]["noNewPrivileges"], true);
        assert_eq!(json["process"]["cwd"], "/work");
        assert_eq!(json["process"]["user"]["uid"], 1000);
        let caps = json["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap();
        assert!(!caps.iter().any(|c| c == "CAP_SYS_ADMIN"));
        assert!(caps.iter().any(|c| c == "CAP_CHOWN"));
        assert!(linux["seccomp"]["syscalls"].as_array().unwrap().len() >= 3);
        assert!(linux["maskedPaths"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "/proc/kcore"));
    }
}
