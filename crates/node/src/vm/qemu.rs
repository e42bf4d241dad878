//! The QEMU process of a VM: its command line ([`VmSpec::args`], golden-tested), its cgroup
//! (`gpuvisor/<id>`: the instance's CPUs, guest RAM plus QEMU's own overhead), the spawn
//! (own session, so a daemon's death does not touch it; stdout is the log relay's pipe, which
//! the serial console's log writes to; stderr to a file the daemon reads on a failed start),
//! vCPU pinning from `query-cpus-fast`, and the KVM probe.
//!
//! Key decisions:
//! - One machine type, `q35`, for every VM: PCI virtio devices, ACPI power button for a clean
//!   stop, and the machine GPU passthrough needs anyway (OVMF, a 64-bit MMIO window). microvm
//!   would save a little boot time but needs two device models.
//! - `-sandbox on` with spawning, privilege elevation, obsolete calls and resource control
//!   denied. QEMU 7.2 cannot drop to another user under `elevateprivileges=deny` (`-runas`
//!   calls setuid after the filter is in place: SIGSYS), so QEMU runs as root, confined by the
//!   seccomp filter and its cgroup; the tap is opened by the daemon and passed as an fd.
//! - The daemon keeps no thread per VM: everything it needs later is a file in the run dir
//!   (pid file, sockets), so a restarted daemon adopts a running VM by reading them.

use super::{vio, Accel, VmError};
use crate::cgroup;
use crate::HostRoot;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// QEMU's memory beyond guest RAM allowed in the cgroup: the TCG translation buffer (bounded
/// with `tb-size`) and QEMU's own heap, device models and thread stacks.
pub const TCG_TB_MIB: u64 = 64;
pub const OVERHEAD_TCG: u64 = 192 << 20;
pub const OVERHEAD_KVM: u64 = 96 << 20;

/// The files of one VM's QEMU in its run dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    pub dir: PathBuf,
}

impl RunPaths {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn agent(&self) -> PathBuf {
        self.dir.join("qga.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    pub fn vnc(&self) -> PathBuf {
        self.dir.join("vnc.sock")
    }
    pub fn pid(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    pub fn stderr(&self) -> PathBuf {
        self.dir.join("qemu.err")
    }
    /// The volume images the VM was started with, one path per line (for telemetry).
    pub fn volumes(&self) -> PathBuf {
        self.dir.join("volumes")
    }
    pub fn seed(&self) -> PathBuf {
        self.dir.join("seed.iso")
    }
}

/// A whole-GPU passthrough: the vfio-pci device arguments and the OVMF firmware pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuPassthrough {
    pub args: Vec<String>,
    pub ovmf_code: PathBuf,
    /// The VM's own copy of the OVMF variables store.
    pub ovmf_vars: PathBuf,
}

/// The tap the daemon opened for the VM (passed to QEMU as an inherited fd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDev {
    pub fd: RawFd,
    pub mac: String,
}

/// Everything that decides one VM's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub id: String,
    pub vcpus: u32,
    /// Guest RAM, bytes (rounded down to MiB).
    pub memory: u64,
    pub accel: Accel,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// The qcow2 overlay (root disk).
    pub root: PathBuf,
    /// (virtio serial, raw image): persistent volumes.
    pub volumes: Vec<(String, PathBuf)>,
    /// The cloud-init seed (ISO9660), attached read-only.
    pub seed: Option<PathBuf>,
    pub net: Option<NetDev>,
    /// The vsock CID, where the host has `/dev/vhost-vsock`.
    pub vsock_cid: Option<u32>,
    pub gpus: Option<GpuPassthrough>,
    pub run: RunPaths,
}

fn s(v: &str) -> String {
    v.to_string()
}

impl VmSpec {
    /// QEMU's arguments (without the binary).
    pub fn args(&self) -> Vec<String> {
        let p = |x: &Path| x.display().to_string();
        let mut a: Vec<String> = vec![
            s("-name"),
            format!("gpuvisor-{},debug-threads=on", self.id),
            s("-nodefaults"),
            s("-no-user-config"),
            s("-sandbox"),
            s("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"),
            s("-machine"),
            // q35 for every VM (see the module header); the MMIO window for GPUs comes with
            // the passthrough arguments.
            s("q35"),
            s("-accel"),
            match self.accel {
                Accel::Kvm => s("kvm"),
                Accel::Tcg { .. } => format!("tcg,tb-size={TCG_TB_MIB}"),
            },
            s("-cpu"),
            s(match self.accel {
                Accel::Kvm => "host",
                Accel::Tcg { .. } => "max",
            }),
            s("-smp"),
            self.vcpus.to_string(),
            s("-m"),
            format!("{}M", self.memory >> 20),
            s("-no-reboot"),
            // A guest panic (pvpanic) ends QEMU with status 1: the instance fails.
            s("-action"),
            s("panic=exit-failure"),
            s("-display"),
            s("none"),
            s("-pidfile"),
            p(&self.run.pid()),
            s("-qmp"),
            format!("unix:{},server=on,wait=off", p(&self.run.qmp())),
        ];
        if let Some(g) = &self.gpus {
            a.extend([
                s("-drive"),
                format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    p(&g.ovmf_code)
                ),
                s("-drive"),
                format!("if=pflash,format=raw,unit=1,file={}", p(&g.ovmf_vars)),
            ]);
        }
        a.extend([s("-kernel"), p(&self.kernel)]);
        if let Some(i) = &self.initrd {
            a.extend([s("-initrd"), p(i)]);
        }
        a.extend([s("-append"), self.cmdline.clone()]);
        // Serial console: a socket to attach to, and a log into QEMU's stdout (the instance's
        // log relay), reopened through /proc so it needs no extra fd.
        a.extend([
            s("-chardev"),
            format!(
                "socket,id=console,path={},server=on,wait=off,logfile=/proc/self/fd/1,logappend=on",
                p(&self.run.console())
            ),
            s("-serial"),
            s("chardev:console"),
        ]);
        // Disks: root overlay, volumes by serial, seed read-only.
        a.extend([
            s("-drive"),
            format!(
                "if=none,id=root,format=qcow2,file={},discard=unmap",
                p(&self.root)
            ),
            s("-device"),
            s("virtio-blk-pci,drive=root,serial=root"),
        ]);
        for (i, (serial, path)) in self.volumes.iter().enumerate() {
            a.extend([
                s("-drive"),
                format!("if=none,id=vol{i},format=raw,file={}", p(path)),
                s("-device"),
                format!("virtio-blk-pci,drive=vol{i},serial={serial}"),
            ]);
        }
        if let Some(seed) = &self.seed {
            a.extend([
                s("-drive"),
                format!("if=none,id=seed,format=raw,readonly=on,file={}", p(seed)),
                s("-device"),
                s("virtio-blk-pci,drive=seed,serial=cidata"),
            ]);
        }
        if let Some(n) = &self.net {
            a.extend([
                s("-netdev"),
                format!("tap,id=net0,fd={}", n.fd),
                s("-device"),
                format!("virtio-net-pci,netdev=net0,mac={}", n.mac),
            ]);
        }
        a.extend([
            s("-object"),
            s("rng-random,id=rng0,filename=/dev/urandom"),
            s("-device"),
            s("virtio-rng-pci,rng=rng0"),
            s("-device"),
            s("pvpanic-pci"),
            s("-chardev"),
            format!(
                "socket,id=qga,path={},server=on,wait=off",
                p(&self.run.agent())
            ),
            s("-device"),
            s("virtio-serial-pci,id=vser0"),
            s("-device"),
            s("virtserialport,bus=vser0.0,chardev=qga,name=org.qemu.guest_agent.0"),
            s("-device"),
            s("VGA,vgamem_mb=4"),
            s("-vnc"),
            format!("unix:{}", p(&self.run.vnc())),
        ]);
        if let Some(cid) = self.vsock_cid {
            a.extend([s("-device"), format!("vhost-vsock-pci,guest-cid={cid}")]);
        }
        if let Some(g) = &self.gpus {
            a.extend(g.args.iter().cloned());
        }
        a
    }

    /// The cgroup's memory limit: guest RAM plus QEMU's overhead for the accelerator.
    pub fn memory_limit(&self) -> u64 {
        self.memory.saturating_add(match self.accel {
            Accel::Kvm => OVERHEAD_KVM,
            Accel::Tcg { .. } => OVERHEAD_TCG,
        })
    }
}

/// The vsock CID of an instance: 3 and up (0-2 are reserved), from its id, where the host has
/// `/dev/vhost-vsock`.
pub fn vsock_cid(root: &HostRoot, id: &str) -> Option<u32> {
    if !root.path("/dev/vhost-vsock").exists() {
        return None;
    }
    let n = u32::from_str_radix(id.get(..7)?, 16).ok()?;
    Some(3 + n)
}

/// Why a VM has no vsock device on this host, for `host check`.
pub fn vsock_missing(root: &HostRoot) -> Option<String> {
    (!root.path("/dev/vhost-vsock").exists()).then(|| {
        "no /dev/vhost-vsock (module vhost_vsock not loaded or not available): VMs get no vsock device".to_string()
    })
}

/// The instance's cgroup for QEMU: made in every hierarchy we use (cgroup v1: cpuset, memory,
/// pids, cpu; v2: one directory), limited to `cpus` and `memory` bytes. Returns the open
/// `cgroup.procs` files the child writes itself into before exec.
pub fn make_cgroup(
    root: &HostRoot,
    id: &str,
    cpus: &[u32],
    memory: u64,
) -> Result<Vec<OwnedFd>, VmError> {
    let base = root.path("/sys/fs/cgroup");
    let cpulist = cpus
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VmError::Cgroup { path, source }
    };
    let write = |path: PathBuf, v: &str| std::fs::write(&path, v).map_err(err(&path));
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap_or_default();
    let mut dirs = Vec::new();
    if base.join("cgroup.controllers").exists() {
        // v2: enable the controllers down to gpuvisor/<id>.
        let parent = base.join(cgroup::PARENT);
        std::fs::create_dir_all(&parent).map_err(err(&parent))?;
        for dir in [&base, &parent] {
            for c in ["+cpuset", "+memory", "+pids", "+cpu"] {
                let _ = std::fs::write(dir.join("cgroup.subtree_control"), c);
            }
        }
        let dir = parent.join(id);
        std::fs::create_dir_all(&dir).map_err(err(&dir))?;
        if !cpus.is_empty() {
            write(dir.join("cpuset.cpus"), &cpulist)?;
        }
        write(dir.join("memory.max"), &memory.to_string())?;
        let _ = std::fs::write(dir.join("memory.swap.max"), "0");
        dirs.push(dir);
    } else {
        for ctrl in ["cpuset", "memory", "pids", "cpu,cpuacct"] {
            let hier = base.join(ctrl);
            if !hier.is_dir() {
                continue;
            }
            let parent = hier.join(cgroup::PARENT);
            std::fs::create_dir_all(&parent).map_err(err(&parent))?;
            let dir = parent.join(id);
            std::fs::create_dir_all(&dir).map_err(err(&dir))?;
            match ctrl {
                "cpuset" => {
                    // v1 cpusets start empty: the parent takes the root's, the child its own.
                    for f in ["cpuset.cpus", "cpuset.mems"] {
                        if read(parent.join(f)).trim().is_empty() {
                            write(parent.join(f), read(hier.join(f)).trim())?;
                        }
                    }
                    let cpus_v = if cpus.is_empty() {
                        read(parent.join("cpuset.cpus")).trim().to_string()
                    } else {
                        cpulist.clone()
                    };
                    write(dir.join("cpuset.cpus"), &cpus_v)?;
                    write(
                        dir.join("cpuset.mems"),
                        read(parent.join("cpuset.mems")).trim(),
                    )?;
                }
                "memory" => write(dir.join("memory.limit_in_bytes"), &memory.to_string())?,
                _ => {}
            }
            dirs.push(dir);
        }
    }
    dirs.iter()
        .map(|d| {
            let f = d.join("cgroup.procs");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&f)
                .map(OwnedFd::from)
                .map_err(err(&f))
        })
        .collect()
}

/// Starts QEMU for `spec`: its own session, in the instance's cgroup (`procs`), stdout to
/// `output` (the log relay), stderr to the run dir's `qemu.err`, `keep` fds inherited (the
/// tap). Waits until QMP answers (or QEMU exits: the error names QEMU's message). Returns the
/// pid.
pub fn spawn(
    qemu: &Path,
    spec: &VmSpec,
    output: OwnedFd,
    procs: &[OwnedFd],
    keep: &[RawFd],
    timeout: Duration,
) -> Result<i32, VmError> {
    use std::os::unix::process::CommandExt;
    let err_path = spec.run.stderr();
    let stderr = std::fs::File::create(&err_path).map_err(vio(&err_path))?;
    let mut cmd = std::process::Command::new(qemu);
    cmd.args(spec.args())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(output))
        .stderr(std::process::Stdio::from(stderr));
    let procs: Vec<RawFd> = procs.iter().map(AsRawFd::as_raw_fd).collect();
    let keep = keep.to_vec();
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // calls (setsid, write, fcntl) on fds that stay open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for &fd in &procs {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for &fd in &keep {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| VmError::Start {
        id: spec.id.clone(),
        why: format!("{}: {e}", qemu.display()),
    })?;
    let pid = i32::try_from(child.id()).unwrap_or(0);
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let msg = std::fs::read_to_string(&err_path).unwrap_or_default();
            return Err(VmError::Start {
                id: spec.id.clone(),
                why: format!("QEMU exited ({status}): {}", msg.trim()),
            });
        }
        if super::qmp::Monitor::connect(&spec.run.qmp(), Duration::from_secs(2)).is_ok() {
            // Not waited for here: the daemon (child subreaper) reaps it as the instance's
            // main process.
            std::mem::forget(child);
            return Ok(pid);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(VmError::Start {
                id: spec.id.clone(),
                why: format!("QMP did not answer within {timeout:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pins vCPU `i` to `cpus[i]` (one to one; nothing to pin without CPUs).
pub fn pin_vcpus(vcpus: &[super::qmp::Vcpu], cpus: &[u32]) -> Result<(), VmError> {
    for (v, cpu) in vcpus.iter().zip(cpus) {
        let mut set = nix::sched::CpuSet::new();
        set.set(*cpu as usize).map_err(|e| VmError::Cgroup {
            path: format!("cpu {cpu}").into(),
            source: e.into(),
        })?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(v.thread_id), &set).map_err(
            |e| VmError::Cgroup {
                path: format!("vCPU {} thread {}", v.index, v.thread_id).into(),
                source: e.into(),
            },
        )?;
    }
    Ok(())
}

/// Where the KVM verdict of this boot is cached: host-wide, per boot id.
fn probe_cache(root: &HostRoot) -> Option<PathBuf> {
    let boot = root.read_trimmed("/proc/sys/kernel/random/boot_id")?;
    Some(root.path(format!("/run/gpuvisor/vm-accel-{boot}.json")))
}

/// The verdict the daemon's probe cached for this boot, if any (for `host check`).
pub fn cached_accel(root: &HostRoot) -> Option<Accel> {
    let c = probe_cache(root)?;
    serde_json::from_slice(&std::fs::read(c).ok()?).ok()
}

/// KVM or TCG for this host: TCG without `/dev/kvm` or without a kernel to probe with;
/// otherwise a tiny guest (the kernel alone, no disk: it prints its banner and panics for lack
/// of a root) is booted once under KVM with a short timeout. A guest that prints nothing (KVM
/// exists but guests hang, as under broken nested virtualisation) means TCG. The verdict is
/// cached per boot id.
pub fn probe_accel(root: &HostRoot, qemu: &Path, kernel: Option<&Path>) -> Accel {
    if !root.path("/dev/kvm").exists() {
        return Accel::Tcg {
            reason: "no /dev/kvm on this host".into(),
        };
    }
    let cache = probe_cache(root);
    if let Some(c) = &cache {
        if let Some(a) = std::fs::read(c)
            .ok()
            .and_then(|b| serde_json::from_slice::<Accel>(&b).ok())
        {
            return a;
        }
    }
    let Some(kernel) = kernel else {
        return Accel::Tcg {
            reason: "KVM not probed: no default VM kernel configured (vm.kernel)".into(),
        };
    };
    let verdict = boot_probe(qemu, kernel, Duration::from_secs(8));
    if let Some(c) = &cache {
        if let Some(d) = c.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        if let Ok(b) = serde_json::to_vec(&verdict) {
            let tmp = c.with_extension("tmp");
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(&tmp, c);
            }
        }
    }
    verdict
}

fn boot_probe(qemu: &Path, kernel: &Path, timeout: Duration) -> Accel {
    use std::io::Read;
    let child = std::process::Command::new(qemu)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-machine",
            "q35",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "128M",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-append",
            "console=ttyS0 panic=-1",
            "-kernel",
        ])
        .arg(kernel)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return Accel::Tcg {
                reason: format!("KVM probe: cannot run {}: {e}", qemu.display()),
            }
        }
    };
    let Some(mut out) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Accel::Tcg {
            reason: "KVM probe: no output pipe".into(),
        };
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(13).any(|w| w == b"Linux version") {
                let _ = tx.send(true);
                return;
            }
        }
        let _ = tx.send(false);
    });
    let booted = rx.recv_timeout(timeout).unwrap_or(false);
    let _ = child.kill();
    let status = child.wait();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if booted {
        Accel::Kvm
    } else if !err.trim().is_empty() && status.is_ok_and(|s| s.code().is_some()) {
        Accel::Tcg {
            reason: format!("KVM probe guest failed: {}", err.trim()),
        }
    } else {
        Accel::Tcg {
            reason: format!(
                "/dev/kvm exists but a probe guest printed nothing within {}s under KVM (guests hang: nested virtualisation does not work here)",
                timeout.as_secs()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            id: "0123456789ab".into(),
            vcpus: 2,
            memory: 512 << 20,
            accel: Accel::Tcg {
                reason: "test".into(),
            },
            kernel: "/t/vmlinuz".into(),
            initrd: Some("/t/initrd.img".into()),
            cmdline: "root=/dev/vda rw console=ttyS0".into(),
            root: "/d/vm/disks/0123456789ab.qcow2".into(),
            volumes: vec![("data".into(), "/d/volumes/t/data.img".into())],
            seed: Some("/d/vm/run/0123456789ab/seed.iso".into()),
            net: Some(NetDev {
                fd: 7,
                mac: "02:01:23:45:67:89".into(),
            }),
            vsock_cid: None,
            gpus: None,
            run: RunPaths::new("/d/vm/run/0123456789ab".into()),
        }
    }

    const GOLDEN: &str = "\
-name gpuvisor-0123456789ab,debug-threads=on -nodefaults -no-user-config \
-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
-machine q35 -accel tcg,tb-size=64 -cpu max -smp 2 -m 512M -no-reboot \
-action panic=exit-failure -display none -pidfile /d/vm/run/0123456789ab/qemu.pid \
-qmp unix:/d/vm/run/0123456789ab/qmp.sock,server=on,wait=off \
-kernel /t/vmlinuz -initrd /t/initrd.img -append root=/dev/vda rw console=ttyS0 \
-chardev socket,id=console,path=/d/vm/run/0123456789ab/console.sock,server=on,wait=off,logfile=/proc/self/fd/1,logappend=on \
-serial chardev:console \
-drive if=none,id=root,format=qcow2,file=/d/vm/disks/0123456789ab.qcow2,discard=unmap \
-device virtio-blk-pci,drive=root,serial=root \
-drive if=none,id=vol0,format=raw,file=/d/volumes/t/data.img \
-device virtio-blk-pci,drive=vol0,serial=data \
-drive if=none,id=seed,format=raw,readonly=on,file=/d/vm/run/0123456789ab/seed.iso \
-device virtio-blk-pci,drive=seed,serial=cidata \
-netdev tap,id=net0,fd=7 -device virtio-net-pci,netdev=net0,mac=02:01:23:45:67:89 \
-object rng-random,id=rng0,filename=/dev/urandom -device virtio-rng-pci,rng=rng0 \
-device pvpanic-pci \
-chardev socket,id=qga,path=/d/vm/run/0123456789ab/qga.sock,server=on,wait=off \
-device virtio-serial-pci,id=vser0 \
-device virtserialport,bus=vser0.0,chardev=qga,name=org.qemu.guest_agent.0 \
-device VGA,vgamem_mb=4 -vnc unix:/d/vm/run/0123456789ab/vnc.sock";

    #[test]
    fn command_line_golden() {
        assert_eq!(spec().args().join(" "), GOLDEN);
    }

    #[test]
    fn kvm_vsock_and_passthrough_lines() {
        let mut s = spec();
        s.accel = Accel::Kvm;
        s.vsock_cid = Some(42);
        s.gpus = Some(GpuPassthrough {
            args: vec!["-device".into(), "vfio-pci,host=0000:3b:00.0".into()],
            ovmf_code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            ovmf_vars: "/d/vm/run/0123456789ab/OVMF_VARS.fd".into(),
        });
        let a = s.args().join(" ");
        assert!(a.contains("-accel kvm -cpu host "), "{a}");
        assert!(a.contains(
            "-drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
             -drive if=pflash,format=raw,unit=1,file=/d/vm/run/0123456789ab/OVMF_VARS.fd -kernel"
        ));
        assert!(
            a.ends_with("-device vhost-vsock-pci,guest-cid=42 -device vfio-pci,host=0000:3b:00.0")
        );
        assert_eq!(s.memory_limit(), (512 << 20) + OVERHEAD_KVM);
    }

    #[test]
    fn vsock_only_with_the_device() {
        let t = tempfile::tempdir().unwrap();
        let root = HostRoot::at(t.path());
        assert_eq!(vsock_cid(&root, "0123456789ab"), None);
        assert!(vsock_missing(&root).unwrap().contains("/dev/vhost-vsock"));
        std::fs::create_dir_all(t.path().join("dev")).unwrap();
        std::fs::write(t.path().join("dev/vhost-vsock"), "").unwrap();
        assert_eq!(vsock_cid(&root, "0123456789ab"), Some(3 + 0x0123456));
        assert_eq!(vsock_missing(&root), None);
    }

    #[test]
    fn no_kvm_device_means_tcg_with_the_reason() {
        let t = tempfile::tempdir().unwrap();
        let root = HostRoot::at(t.path());
        let a = probe_accel(&root, Path::new("/nonexistent/qemu"), None);
        assert_eq!(
            a,
            Accel::Tcg {
                reason: "no /dev/kvm on this host".into()
            }
        );
        assert_eq!(a.describe(), "tcg (no /dev/kvm on this host)");
    }
}
