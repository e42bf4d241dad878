//! The QEMU process of a VM: its command line ([`VmSpec::args`], golden-tested), its cgroup
//! (`gpuvisor/<id>`: the instance's CPUs and the host's reserved ones, guest RAM plus QEMU's own
//! overhead), the spawn (own session, so a daemon's death does not touch it; stdout is the log
//! relay's pipe, which the serial console's log writes to; stderr to a file the daemon reads on
//! a failed start; its threads on the reserved CPUs, [`CpuPins`]), vCPU pinning from
//! `query-cpus-fast`, and the KVM probe.
//!
//! Key decisions:
//! - One machine type, `q35`, for every VM: PCI virtio devices, ACPI power button for a clean
//!   stop, and the machine GPU passthrough needs anyway (OVMF, a 64-bit MMIO window). microvm
//!   would save a little boot time but needs two device models.
//! - `-sandbox on` with spawning, privilege elevation, obsolete calls and resource control
//!   denied, and QEMU started as an unprivileged user of its own ([`VmUser`]: uid and gid
//!   [`VM_UID_BASE`] + the first 28 bits of the instance id, no capabilities, no_new_privs)
//!   where the devices allow: the daemon drops to it between fork and exec, after writing
//!   the child into its cgroup (QEMU's own `-runas` would setuid after the seccomp filter is
//!   in place: SIGSYS). A VM with passed-through GPUs still runs as root (its VFIO group nodes
//!   and locked-memory limit are not handed over yet), as does a KVM VM where `/dev/kvm` is
//!   not group-accessible.
//! - QEMU opens no path of the daemon's: the QMP, console and agent sockets are bound by the
//!   daemon in its root-only run dir and passed as listening fds; the overlay, volumes, seed
//!   and OVMF variables are passed as fd sets (`/dev/fdset/N`, a read-write and a read-only
//!   descriptor each); the tap as an fd. By path it opens only the template's read-only base
//!   and kernel (group [`TEMPLATE_GID`], which every VM user has), its VNC socket in its own
//!   directory, `/dev/urandom`, OVMF's code and `/dev/kvm`. So a compromised QEMU cannot
//!   swap a socket for a link to another VM's, and reads no other VM's disks or seeds.
//! - The daemon keeps no thread per VM: everything it needs later is a file in the run dir
//!   (pid file, sockets), so a restarted daemon adopts a running VM by reading them.

use super::{vio, Accel, VmError};
use crate::HostRoot;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The balloon device's id (`/machine/peripheral/<id>` in QOM).
pub const BALLOON: &str = "balloon0";
/// The virtio-mem device's id: RAM added while the VM runs.
pub const VIRTIO_MEM: &str = "vmem0dev";
/// The boot RAM's memory backend: created on the command line ahead of every other RAM, so
/// that its block is the first in QEMU's RAM address space (offset 0: see
/// `migrate::CopyMode::Paused` for why that matters under TCG). Named as QEMU names the RAM of
/// a plain `-m` on PC machines, so VMs started either way migrate into each other.
pub const MAIN_RAM: &str = "pc.ram";

/// QEMU's memory beyond guest RAM allowed in the cgroup: the TCG translation buffer (bounded
/// with `tb-size`) and QEMU's own heap, device models and thread stacks.
///
/// Under TCG every vCPU runs on one host thread (`thread=single`). With a thread per vCPU
/// (MTTCG) QEMU splits the translation buffer into regions that the vCPU threads take as they
/// fill them and hand back only at the next whole flush; a vCPU hot-plugged while every region
/// is taken (an idle guest that translated most of the buffer at boot sits there for good)
/// aborts QEMU (`tcg_region_initial_alloc`: QEMU 7.2 asserts; not re-checked on 10.0, where
/// one thread is kept for the smaller buffer and what KSM saves). One thread has one region
/// and nothing to take at a hot-plug, so the buffer can be small: 32 MiB, private memory of
/// every TCG VM that KSM cannot merge (docs/bench/vm-operations.md, "KSM"). KVM has neither.
pub const TCG_TB_MIB: u64 = 32;
pub const OVERHEAD_TCG: u64 = 192 << 20;
/// Guest RAM a TCG VM gets above its size (`VmSpec::ram_pad`) from a QEMU before
/// [`TCG_DIRTY_SYNC_FIXED`]: two pages, so that its length is not a multiple of 256 KiB
/// (64 pages: one word of QEMU's dirty bitmap). See `migrate::CopyMode::Paused` for why.
pub const TCG_RAM_PAD: u64 = 8 << 10;
/// The first QEMU whose dirty-bitmap fast path resets TCG's TLB (9.0: "physmem: Fix
/// migration dirty bitmap coherency with TCG memory access"): from it on, a TCG guest's
/// writes are kept by a live copy of RAM of any length, and its first dirty sync resets the
/// TLB once per RAM block instead of once per page.
pub const TCG_DIRTY_SYNC_FIXED: (i64, i64) = (9, 0);

/// The RAM pad of a new TCG VM run by a QEMU of `version` (None: unknown, taken as one
/// before the fix): [`TCG_RAM_PAD`] before [`TCG_DIRTY_SYNC_FIXED`], none from it on (a pad
/// would only put the RAM on the page-by-page path, which stalls the guest at the first sync).
pub fn tcg_ram_pad(version: Option<(i64, i64)>) -> u64 {
    if version.is_some_and(|v| v >= TCG_DIRTY_SYNC_FIXED) {
        0
    } else {
        TCG_RAM_PAD
    }
}

/// The major and minor version `qemu --version` prints ("QEMU emulator version 10.0.2 (…)").
pub fn binary_version(qemu: &Path) -> Option<(i64, i64)> {
    let out = std::process::Command::new(qemu)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

fn parse_version(text: &str) -> Option<(i64, i64)> {
    let v = text.lines().next()?.split("version ").nth(1)?;
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}
// The pad keeps the RAM off whole bitmap words and is whole 8 KiB (what QEMU rounds RAM to).
const _: () = assert!(!TCG_RAM_PAD.is_multiple_of(64 << 12) && TCG_RAM_PAD.is_multiple_of(8 << 10));

/// Whether `pad` is a RAM pad this host makes (`VmSpec::ram_pad`): none, or `TCG_RAM_PAD`.
/// A running state from elsewhere (another daemon, a snapshot) with any other is refused.
pub fn known_ram_pad(pad: u64) -> bool {
    pad == 0 || pad == TCG_RAM_PAD
}
pub const OVERHEAD_KVM: u64 = 96 << 20;

/// First uid (and gid) of the VM users: uid = base + the instance id's first 28 bits, far above
/// any account or subordinate id range a distribution hands out.
pub const VM_UID_BASE: u32 = 3_000_000_000;
/// The group that may read VM templates (every VM user has it as a supplementary group).
pub const TEMPLATE_GID: u32 = VM_UID_BASE - 1;

/// The credentials QEMU runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl VmUser {
    /// The user of instance `id` (12 hex digits); `extra` supplementary groups beside the
    /// template group (e.g. `/dev/kvm`'s).
    pub fn of(id: &str, extra: &[u32]) -> Option<Self> {
        let n = u32::from_str_radix(id.get(..7)?, 16).ok()?;
        let uid = VM_UID_BASE + n;
        let mut groups = vec![TEMPLATE_GID];
        groups.extend(extra.iter().copied().filter(|g| *g != TEMPLATE_GID));
        Some(Self {
            uid,
            gid: uid,
            groups,
        })
    }
}

/// The files of one VM's QEMU: its run dir (root-only: sockets the daemon binds, pid file,
/// seed, OVMF variables, QEMU's stderr) and the directory QEMU itself writes (its VNC socket).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunPaths {
    pub dir: PathBuf,
    /// Owned by the VM's user: the only directory QEMU may create files in.
    pub own: PathBuf,
}

impl RunPaths {
    pub fn new(dir: PathBuf, own: PathBuf) -> Self {
        Self { dir, own }
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
        self.own.join("vnc.sock")
    }
    pub fn stderr(&self) -> PathBuf {
        self.dir.join("qemu.err")
    }
    /// The last line QEMU wrote to its stderr, quoted (at most 300 characters, from the
    /// file's last 4 KiB; control characters escaped: a compromised QEMU writes what it
    /// likes there), if any.
    pub fn last_said(&self) -> Option<String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(self.stderr()).ok()?;
        let len = f.metadata().ok()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
        let mut tail = Vec::with_capacity(4096);
        f.take(4096).read_to_end(&mut tail).ok()?;
        let text = String::from_utf8_lossy(&tail);
        let line = text.lines().map(str::trim).rfind(|l| !l.is_empty())?;
        let line: String = line.chars().take(300).collect();
        Some(format!("QEMU said {line:?}"))
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GpuPassthrough {
    pub args: Vec<String>,
    pub ovmf_code: PathBuf,
    /// The VM's own copy of the OVMF variables store.
    pub ovmf_vars: PathBuf,
}

/// The descriptors QEMU inherits for what [`VmSpec`] names (numbers in the child): see
/// [`open_fds`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmFds {
    /// Listening sockets.
    pub qmp: RawFd,
    pub console: RawFd,
    pub agent: RawFd,
    /// (read-write, read-only) descriptors of each disk, for its fd set.
    pub root: (RawFd, RawFd),
    pub volumes: Vec<(RawFd, RawFd)>,
    pub seed: Option<RawFd>,
    pub ovmf_vars: Option<(RawFd, RawFd)>,
    /// `/dev/vhost-vsock`, opened by the daemon.
    pub vhost_vsock: Option<RawFd>,
    /// The saved state to resume (read-only), for `-incoming fd:N`.
    pub incoming: Option<RawFd>,
}

/// The tap the daemon opened for the VM (passed to QEMU as an inherited fd).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetDev {
    pub fd: RawFd,
    pub mac: String,
}

/// Everything that decides one VM's command line. Kept in the run dir (`spec.json`): a live
/// migration starts its destination from the very spec the source was started with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmSpec {
    pub id: String,
    pub vcpus: u32,
    /// Guest RAM, bytes (rounded down to MiB).
    pub memory: u64,
    /// Most vCPUs and RAM the VM can grow to while it runs (`instance scale`): vCPUs are
    /// hot-plugged up to `max_vcpus`, RAM above `memory` is a virtio-mem device of
    /// `max_memory - memory` bytes that plugs none at boot.
    pub max_vcpus: u32,
    pub max_memory: u64,
    pub accel: Accel,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// The qcow2 overlay (root disk) and its virtual size.
    pub root: PathBuf,
    pub root_size: u64,
    /// (virtio serial, raw image): persistent volumes.
    pub volumes: Vec<(String, PathBuf)>,
    /// The cloud-init seed (ISO9660), attached read-only.
    pub seed: Option<PathBuf>,
    pub net: Option<NetDev>,
    /// The vsock CID, where the host has `/dev/vhost-vsock`.
    pub vsock_cid: Option<u32>,
    pub gpus: Option<GpuPassthrough>,
    pub run: RunPaths,
    /// A running state to resume instead of booting.
    pub incoming: Option<Incoming>,
    /// All of QEMU's anonymous memory is mergeable by KSM (`PR_SET_MEMORY_MERGE`), not only
    /// guest RAM (`mem-merge`): the copies of the kernel and initrd QEMU keeps for the
    /// firmware, device buffers and heap pages that are the same in every VM. Set when the
    /// daemon manages KSM.
    #[serde(default)]
    pub merge_all: bool,
    /// Bytes of guest RAM above `memory` (`TCG_RAM_PAD` under TCG with a QEMU before 9.0,
    /// else 0: [`tcg_ram_pad`]), which the balloon holds back from the guest. It makes the
    /// RAM's length not a multiple of 256 KiB, which keeps those QEMUs' dirty-page sync off
    /// the fast path that loses TCG guest writes during a live copy (`migrate::CopyMode`). A
    /// destination or a restored state takes it from its source (a VM started before it
    /// existed has none).
    #[serde(default)]
    pub ram_pad: u64,
    /// The versioned machine type (`pc-q35-7.2`): the one the source runs, for a destination
    /// or a restored running state (a running state loads only into the machine it was saved
    /// from, so a QEMU upgraded since starts the old one); None: `q35`, this QEMU's newest.
    #[serde(default)]
    pub machine: Option<String>,
    /// The QEMU version (major, minor) the VM runs in: the host's when it starts; for a
    /// migration, the source's (`query-version`), which the destination must not be older
    /// than (its CPU model `max` may lack features the guest has seen and uses).
    #[serde(default)]
    pub qemu_version: Option<(i64, i64)>,
}

/// Why a VM running in a QEMU of version `source` cannot move into one of version `here`:
/// an older one (the guest may use CPU features that one's `max` CPU lacks); None when it
/// can (or either is unknown).
pub fn older_qemu(source: Option<(i64, i64)>, here: Option<(i64, i64)>) -> Option<String> {
    match (source, here) {
        (Some(s), Some(h)) if h < s => Some(format!(
            "it runs in QEMU {}.{} and the destination's is older ({}.{}): the guest may use \
             CPU features the older QEMU does not emulate",
            s.0, s.1, h.0, h.1
        )),
        _ => None,
    }
}

/// The machine type a saved running state (`migrate` into a file) was taken from: its stream
/// starts with `QEVM`, version 3, then the configuration section (0x07, a big-endian u32
/// length, the name). None for another start or a name that is not a [`known_machine`].
pub fn stream_machine(head: &[u8]) -> Option<String> {
    let rest = head.strip_prefix(b"QEVM\0\0\0\x03\x07")?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(rest.get(4..4 + len)?).ok()?;
    known_machine(name).then(|| name.to_string())
}

/// Whether `m` is a machine type a VM of this host may be started with: a versioned q35
/// (`pc-q35-<major>.<minor>`). A running state from elsewhere with another is refused.
pub fn known_machine(m: &str) -> bool {
    m.strip_prefix("pc-q35-")
        .and_then(|v| v.split_once('.'))
        .is_some_and(|(a, b)| {
            [a, b]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|c| c.is_ascii_digit()))
        })
}

/// Where a VM's running state comes from instead of a boot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Incoming {
    /// A snapshot's saved state (QEMU's migration stream in a file): `-incoming fd:N`.
    File(PathBuf),
    /// A live migration's destination: `-incoming defer` (the channel given later over QMP)
    /// and `-S`: the guest never runs on its own, not even once the state is in; the daemon
    /// resumes it once it has recorded that the destination has the guest (locally: the
    /// `took-over` mark, [`super::migrate`]; from another host: when the source's daemon
    /// says so, [`super::remote`]).
    Held,
}

impl VmSpec {
    fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("spec.json")
    }

    /// Into the run dir (root's): what a live migration starts its destination from.
    pub fn write(&self, run_dir: &Path) -> Result<(), VmError> {
        super::write_json(&Self::path(run_dir), self)
    }

    pub fn read(run_dir: &Path) -> Result<Self, VmError> {
        super::read_json(&Self::path(run_dir))
    }
}

fn s(v: &str) -> String {
    v.to_string()
}

impl VmSpec {
    /// QEMU's arguments (without the binary), for the descriptors `fds` it inherits.
    pub fn args(&self, fds: &VmFds) -> Vec<String> {
        let p = |x: &Path| x.display().to_string();
        // Fd sets: 1 the root overlay, 2 the seed, 3 the OVMF variables, 10 + i volume i.
        let mut a: Vec<String> = Vec::new();
        let mut fdset = |set: u32, fd: RawFd| {
            a.extend([s("-add-fd"), format!("fd={fd},set={set}")]);
        };
        fdset(1, fds.root.0);
        fdset(1, fds.root.1);
        if let Some(fd) = fds.seed {
            fdset(2, fd);
        }
        if let Some((rw, ro)) = fds.ovmf_vars {
            fdset(3, rw);
            fdset(3, ro);
        }
        for (i, (rw, ro)) in fds.volumes.iter().enumerate() {
            fdset(10 + i as u32, *rw);
            fdset(10 + i as u32, *ro);
        }
        let sets = a;
        // `-m` and the boot RAM's backend, of the same size: whole MiB where it is (unpadded
        // RAM), else KiB.
        let size = |kib: u64| match kib % 1024 {
            0 => format!("{}M", kib >> 10),
            _ => format!("{kib}K"),
        };
        let boot = (self.memory >> 20 << 10) + (self.ram_pad >> 10);
        let ram = match self.hotplug_memory() >> 10 {
            0 => size(boot),
            more => format!("{},maxmem={}", size(boot), size(boot + more)),
        };
        let main_ram = format!(
            "memory-backend-ram,id={MAIN_RAM},size={},merge=on",
            size(boot)
        );
        let mut a: Vec<String> = vec![
            s("-name"),
            format!("gpuvisor-{},debug-threads=on", self.id),
            s("-nodefaults"),
            s("-no-user-config"),
            s("-sandbox"),
            s("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"),
            s("-machine"),
            // q35 for every VM (see the module header); the MMIO window for GPUs comes with
            // the passthrough arguments. Guest RAM is mergeable (KSM, `crate::ksm`).
            format!(
                "{},mem-merge=on,memory-backend={MAIN_RAM}",
                // Every source of a machine type checks it; a spec read back from elsewhere
                // with another starts `q35` (the state then does not load: refused safely).
                self.machine
                    .as_deref()
                    .filter(|m| known_machine(m))
                    .unwrap_or("q35")
            ),
            s("-accel"),
            match self.accel {
                Accel::Kvm => s("kvm"),
                Accel::Tcg { .. } => format!("tcg,thread=single,tb-size={TCG_TB_MIB}"),
            },
            s("-cpu"),
            s(match self.accel {
                Accel::Kvm => "host",
                Accel::Tcg { .. } => "max",
            }),
            s("-smp"),
            format!("{},maxcpus={}", self.vcpus, self.max_vcpus.max(self.vcpus)),
            s("-m"),
            ram,
            // Before any other RAM (virtio-mem's below): the boot RAM's block at offset 0.
            s("-object"),
            main_ram,
            s("-no-reboot"),
            // A guest panic (pvpanic) ends QEMU with status 1: the instance fails.
            s("-action"),
            s("panic=exit-failure"),
            s("-display"),
            s("none"),
            s("-chardev"),
            format!("socket,id=qmp,fd={},server=on,wait=off", fds.qmp),
            s("-mon"),
            s("chardev=qmp,mode=control"),
        ];
        a.extend(sets);
        if let Some(g) = &self.gpus {
            a.extend([
                s("-drive"),
                format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    p(&g.ovmf_code)
                ),
                s("-drive"),
                s("if=pflash,format=raw,unit=1,file=/dev/fdset/3"),
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
                "socket,id=console,fd={},server=on,wait=off,logfile=/proc/self/fd/1,logappend=on",
                fds.console
            ),
            s("-serial"),
            s("chardev:console"),
        ]);
        // Disks: root overlay, volumes by serial, seed read-only. No image locking on the
        // fd-set disks: the lock of one fd set's read-only descriptor (taken when QEMU drops
        // write access, as at the end of a migration into a snapshot) is the same open file
        // description as the set's, so it would outlive QEMU's release of it and refuse the
        // guest's resume ("Failed to get write lock"). The daemon alone hands these files out,
        // one VM each.
        a.extend([
            s("-drive"),
            s("if=none,id=root,node-name=gvroot,format=qcow2,file=/dev/fdset/1,file.locking=off,discard=unmap"),
            s("-device"),
            s("virtio-blk-pci,drive=root,serial=root"),
        ]);
        for (i, (serial, _)) in self.volumes.iter().enumerate() {
            a.extend([
                s("-drive"),
                format!(
                    "if=none,id=vol{i},node-name=gvvol{i},format=raw,file=/dev/fdset/{},file.locking=off",
                    10 + i
                ),
                s("-device"),
                format!("virtio-blk-pci,drive=vol{i},serial={serial}"),
            ]);
        }
        if self.seed.is_some() {
            a.extend([
                s("-drive"),
                s("if=none,id=seed,format=raw,readonly=on,file=/dev/fdset/2"),
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
            // The balloon: the guest hands back the pages it frees (free page reporting: the
            // host's RSS follows the guest's use down) and reports its memory statistics
            // (`instance get`).
            s("-device"),
            format!("virtio-balloon-pci,id={BALLOON},free-page-reporting=on"),
        ]);
        if self.hotplug_memory() > 0 {
            a.extend([
                s("-object"),
                format!(
                    "memory-backend-ram,id=vmem0,size={}M,merge=on,reserve=off",
                    self.hotplug_memory() >> 20
                ),
                s("-device"),
                format!("virtio-mem-pci,id={VIRTIO_MEM},memdev=vmem0,requested-size=0"),
            ]);
        }
        a.extend([
            s("-chardev"),
            format!("socket,id=qga,fd={},server=on,wait=off", fds.agent),
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
            a.extend([
                s("-device"),
                match fds.vhost_vsock {
                    Some(fd) => format!("vhost-vsock-pci,guest-cid={cid},vhostfd={fd}"),
                    None => format!("vhost-vsock-pci,guest-cid={cid}"),
                },
            ]);
        }
        if let Some(g) = &self.gpus {
            a.extend(g.args.iter().cloned());
        }
        if let Some(fd) = fds.incoming {
            a.extend([s("-incoming"), format!("fd:{fd}")]);
        } else if self.incoming == Some(Incoming::Held) {
            a.extend([s("-incoming"), s("defer"), s("-S")]);
        }
        a
    }

    /// QEMU's largest file (`RLIMIT_FSIZE`): its overlay at full size with qcow2's metadata
    /// and room for cluster churn (an eighth more and 256 MiB), its largest volume, or its
    /// saved running state (a snapshot with `--memory`: the guest's RAM and device state).
    pub fn file_limit(&self) -> u64 {
        let grown = |n: u64| n.saturating_add(n / 8).saturating_add(256 << 20);
        let root = grown(self.root_size).max(grown(self.memory));
        self.volumes
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok().map(|m| m.len()))
            .fold(root, u64::max)
    }

    /// RAM the VM can gain while it runs: its virtio-mem device's size (whole 128 MiB, what
    /// virtio-mem and the guest's memory blocks are aligned to).
    pub fn hotplug_memory(&self) -> u64 {
        let mem = self.memory >> 20 << 20;
        self.max_memory.saturating_sub(mem) >> 27 << 27
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

/// A VM's CPU pins: vCPU `i` on `vcpus[i]`, QEMU's other threads (main loop, I/O workers, a
/// live copy's threads) on `emulator`: the host's reserved CPUs (`serve --reserved-cpus`, which
/// placement gives no instance; libvirt's emulatorpin, OpenStack's `cpu_shared_set`). Empty
/// where the host reserves none: they then run anywhere in the cgroup's cpuset, the VM's own
/// CPUs, and follow it when it grows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuPins {
    pub vcpus: Vec<u32>,
    pub emulator: Vec<u32>,
}

impl CpuPins {
    /// The pins of a VM placed on `cpus` on a host that reserves `reserved`. An unpinned VM
    /// (`cpus` empty) pins nothing.
    pub fn new(cpus: &[u32], reserved: &[u32]) -> Self {
        let emulator = if cpus.is_empty() {
            Vec::new()
        } else {
            reserved.to_vec()
        };
        Self {
            vcpus: cpus.to_vec(),
            emulator,
        }
    }

    /// The cgroup's cpuset: both sets.
    pub fn cpuset(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self.vcpus.iter().chain(&self.emulator).copied().collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// The instance's cgroup for QEMU: made in every hierarchy we use (cgroup v1: cpuset, memory,
/// pids, cpu, cpuacct; v2: one directory), its cpuset both of `pins`' sets, its memory
/// `memory` bytes. Returns the open `cgroup.procs` files the child writes itself into
/// before exec.
pub fn make_cgroup(
    root: &HostRoot,
    id: &str,
    pins: &CpuPins,
    memory: u64,
) -> Result<Vec<OwnedFd>, VmError> {
    let base = root.path("/sys/fs/cgroup");
    let write = |path: PathBuf, v: &str| std::fs::write(&path, v).map_err(cg_err(&path));
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap_or_default();
    let cpus = pins.cpuset();
    let dirs = cgroup_dirs(root, id);
    if matches!(dirs.first(), Some(("v2", _))) {
        // Enable the controllers down to gpuvisor/<id>.
        let parent = base.join(root.cgroup_parent());
        std::fs::create_dir_all(&parent).map_err(cg_err(&parent))?;
        for dir in [&base, &parent] {
            for c in ["+cpuset", "+memory", "+pids", "+cpu"] {
                let _ = std::fs::write(dir.join("cgroup.subtree_control"), c);
            }
        }
    }
    // Threads already pinned keep their affinity where it stays within the new cpuset (kernel
    // 6.2 and later; callers pin again after this).
    for (ctrl, dir) in &dirs {
        std::fs::create_dir_all(dir).map_err(cg_err(dir))?;
        match *ctrl {
            "v2" => {
                if !cpus.is_empty() {
                    write(
                        dir.join("cpuset.cpus"),
                        &crate::host::format_cpu_list(&cpus),
                    )?;
                }
                write(dir.join("memory.max"), &memory.to_string())?;
                let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            }
            "cpuset" => {
                // v1 cpusets start empty: the parent takes the root's, the child its own (the
                // parent's CPUs when it has no pins).
                let parent = dir.parent().unwrap_or(dir);
                let hier = base.join("cpuset");
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    if read(parent.join(f)).trim().is_empty() {
                        write(parent.join(f), read(hier.join(f)).trim())?;
                    }
                }
                let list = if cpus.is_empty() {
                    read(parent.join("cpuset.cpus")).trim().to_string()
                } else {
                    crate::host::format_cpu_list(&cpus)
                };
                write(dir.join("cpuset.cpus"), &list)?;
                write(
                    dir.join("cpuset.mems"),
                    read(parent.join("cpuset.mems")).trim(),
                )?;
            }
            "memory" => write(dir.join("memory.limit_in_bytes"), &memory.to_string())?,
            _ => {}
        }
    }
    dirs.iter()
        .map(|(_, d)| {
            let f = d.join("cgroup.procs");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&f)
                .map(OwnedFd::from)
                .map_err(cg_err(&f))
        })
        .collect()
}

/// The instance's cgroup directories, each with its controller: `("v2", dir)` on cgroup v2;
/// on v1 every mounted hierarchy once, whatever its name (`cpu,cpuacct` is one hierarchy on
/// most hosts, with `cpu` and `cpuacct` links to it, and two on others).
fn cgroup_dirs(root: &HostRoot, id: &str) -> Vec<(&'static str, PathBuf)> {
    let base = root.path("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![("v2", base.join(root.cgroup_parent()).join(id))];
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for ctrl in ["cpuset", "memory", "pids", "cpu,cpuacct", "cpu", "cpuacct"] {
        let hier = base.join(ctrl);
        let Ok(real) = hier.canonicalize() else {
            continue;
        };
        if hier.is_dir() && seen.insert(real) {
            out.push((ctrl, hier.join(root.cgroup_parent()).join(id)));
        }
    }
    out
}

fn cg_err(path: &Path) -> impl FnOnce(std::io::Error) -> VmError {
    let path = path.to_path_buf();
    move |source| VmError::Cgroup { path, source }
}

/// Opens what `spec` names for QEMU to inherit: its QMP, console and agent sockets bound in
/// the run dir (mode 0600, the daemon's), its overlay, volumes and OVMF variables read-write
/// and read-only, its seed read-only, `/dev/vhost-vsock` when it gets a vsock. The owned
/// descriptors stay open until QEMU has started.
pub fn open_fds(spec: &VmSpec, root: &HostRoot) -> Result<(Vec<OwnedFd>, VmFds), VmError> {
    use std::os::unix::fs::PermissionsExt;
    let mut owned: Vec<OwnedFd> = Vec::new();
    let mut keep = |fd: OwnedFd| {
        let raw = fd.as_raw_fd();
        owned.push(fd);
        raw
    };
    let listen = |path: &Path| -> Result<OwnedFd, VmError> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(vio(path)(e)),
            _ => {}
        }
        let l = std::os::unix::net::UnixListener::bind(path).map_err(vio(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(vio(path))?;
        Ok(OwnedFd::from(l))
    };
    let open = |path: &Path, write: bool| -> Result<OwnedFd, VmError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map(OwnedFd::from)
            .map_err(vio(path))
    };
    let mut fds = VmFds {
        qmp: keep(listen(&spec.run.qmp())?),
        console: keep(listen(&spec.run.console())?),
        agent: keep(listen(&spec.run.agent())?),
        ..VmFds::default()
    };
    fds.root = (
        keep(open(&spec.root, true)?),
        keep(open(&spec.root, false)?),
    );
    for (_, path) in &spec.volumes {
        fds.volumes
            .push((keep(open(path, true)?), keep(open(path, false)?)));
    }
    if let Some(seed) = &spec.seed {
        fds.seed = Some(keep(open(seed, false)?));
    }
    if let Some(g) = &spec.gpus {
        fds.ovmf_vars = Some((
            keep(open(&g.ovmf_vars, true)?),
            keep(open(&g.ovmf_vars, false)?),
        ));
    }
    if spec.vsock_cid.is_some() {
        fds.vhost_vsock = Some(keep(open(&root.path("/dev/vhost-vsock"), true)?));
    }
    if let Some(Incoming::File(state)) = &spec.incoming {
        fds.incoming = Some(keep(open(state, false)?));
    }
    Ok((owned, fds))
}

/// Starts QEMU for `spec`: its own session, in the instance's cgroup (`procs`), as `user`
/// when given (see the module doc), stdout to `output` (the log relay), stderr to the run
/// dir's `qemu.err`, `keep` fds inherited (the tap and [`open_fds`]'s). Waits until QMP
/// answers (or QEMU exits: the error names QEMU's message). Returns the pid.
///
/// Whoever it runs as, QEMU gets its own network (nothing but the tap it is handed), IPC and
/// mount namespaces: private, size-capped `/tmp` and `/dev/shm`, a `/proc` that hides other
/// users' processes; and a file size limit (`RLIMIT_FSIZE` = [`VmSpec::file_limit`]), so
/// neither its overlay nor its stderr grows past what its disks need.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    qemu: &Path,
    spec: &VmSpec,
    fds: &VmFds,
    output: OwnedFd,
    procs: &[OwnedFd],
    keep: &[RawFd],
    user: Option<&VmUser>,
    emulator: &[u32],
    timeout: Duration,
) -> Result<i32, VmError> {
    use std::os::unix::process::CommandExt;
    let err_path = spec.run.stderr();
    let stderr = std::fs::File::create(&err_path).map_err(vio(&err_path))?;
    let mut cmd = std::process::Command::new(qemu);
    cmd.args(spec.args(fds))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(output))
        .stderr(std::process::Stdio::from(stderr));
    let procs: Vec<RawFd> = procs.iter().map(AsRawFd::as_raw_fd).collect();
    let keep = keep.to_vec();
    let user = user.cloned();
    let fsize = libc::rlim_t::from(spec.file_limit());
    let merge_all = spec.merge_all;
    // Every thread QEMU starts takes this affinity: its vCPUs are pinned later.
    let affinity = (!emulator.is_empty())
        .then(|| cpu_set(emulator))
        .transpose()?;
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // calls (setsid, write, sched_setaffinity, fcntl, unshare, mount, setrlimit, fchown, prctl,
    // setgroups, setgid, setuid) on fds that stay open in the parent until spawn returns, and on
    // memory (`user.groups`, the C strings of the mounts, the CPU set) made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::setsid())?;
            check(libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC,
            ))?;
            // Nothing mounted here reaches the host's namespace.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            let hardened = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            for dir in [c"/tmp", c"/dev/shm"] {
                check(libc::mount(
                    c"tmpfs".as_ptr(),
                    dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    hardened,
                    c"size=16m,nr_inodes=1k,mode=1777".as_ptr().cast(),
                ))?;
            }
            check(libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                hardened,
                c"hidepid=2".as_ptr().cast(),
            ))?;
            let limit = libc::rlimit {
                rlim_cur: fsize,
                rlim_max: fsize,
            };
            check(libc::setrlimit(libc::RLIMIT_FSIZE, &limit))?;
            if merge_all {
                // Needs CAP_SYS_RESOURCE (still root here); kept across exec. A kernel
                // without it (before 6.4) merges guest RAM only.
                const PR_SET_MEMORY_MERGE: libc::c_int = 67;
                let _ = libc::prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0);
            }
            for &fd in &procs {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // After joining the cpuset, which holds these CPUs.
            if let Some(set) = &affinity {
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), set)?;
            }
            for &fd in &keep {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                check(flags)?;
                check(libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC))?;
            }
            if let Some(u) = &user {
                // The console log reopens stdout (the log relay's pipe) through /proc. Only a
                // pipe is handed over: a log file stays the daemon's.
                let mut st: libc::stat = std::mem::zeroed();
                check(libc::fstat(1, &mut st))?;
                if st.st_mode & libc::S_IFMT == libc::S_IFIFO {
                    check(libc::fchown(1, u.uid, u.gid))?;
                }
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                check(libc::setgroups(u.groups.len(), u.groups.as_ptr()))?;
                check(libc::setgid(u.gid))?;
                check(libc::setuid(u.uid))?;
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

/// Pins vCPU `i` to `cpus[i]` (one to one; nothing to pin without CPUs). A thread that runs
/// several vCPUs (TCG's single thread runs them all) may run on each of their CPUs. QEMU's
/// other threads keep the emulator CPUs [`spawn`] gave the process.
/// Only threads of QEMU process `pid` are pinned: the thread ids come from QEMU, which a guest
/// that escaped into it controls, and the daemon must not move another process's threads.
/// QEMU cannot move its own threads (`-sandbox …,resourcecontrol=deny`).
pub fn pin_vcpus(
    root: &HostRoot,
    pid: i32,
    vcpus: &[super::qmp::Vcpu],
    cpus: &[u32],
) -> Result<(), VmError> {
    for (thread, wanted) in thread_cpus(vcpus, cpus) {
        let task = root.path(format!("/proc/{pid}/task/{thread}"));
        if thread <= 0 || !task.exists() {
            return Err(VmError::Cgroup {
                path: task,
                source: std::io::Error::other(format!(
                    "QEMU reported a vCPU on thread {thread}, which is not one of its threads"
                )),
            });
        }
        set_affinity(thread, &wanted)?;
    }
    Ok(())
}

/// `cpus` as an affinity mask.
fn cpu_set(cpus: &[u32]) -> Result<nix::sched::CpuSet, VmError> {
    let mut set = nix::sched::CpuSet::new();
    for cpu in cpus {
        set.set(*cpu as usize).map_err(|e| VmError::Cgroup {
            path: format!("cpu {cpu}").into(),
            source: e.into(),
        })?;
    }
    Ok(set)
}

/// Lets thread `thread` run on `cpus` only.
fn set_affinity(thread: i32, cpus: &[u32]) -> Result<(), VmError> {
    let set = cpu_set(cpus)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(thread), &set).map_err(|e| {
        VmError::Cgroup {
            path: format!("QEMU thread {thread}").into(),
            source: e.into(),
        }
    })
}

/// Each vCPU thread and the CPUs it may run on: vCPU `i`'s `cpus[i]`, gathered per thread
/// in the order the threads first appear.
fn thread_cpus(vcpus: &[super::qmp::Vcpu], cpus: &[u32]) -> Vec<(i32, Vec<u32>)> {
    let mut out: Vec<(i32, Vec<u32>)> = Vec::new();
    for (v, cpu) in vcpus.iter().zip(cpus) {
        match out.iter_mut().find(|(t, _)| *t == v.thread_id) {
            Some((_, set)) => set.push(*cpu),
            None => out.push((v.thread_id, vec![*cpu])),
        }
    }
    out
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
pub(crate) mod tests {
    use super::*;

    /// Machine types: versioned q35s only, nothing that could carry options; a saved
    /// state's from its stream's head; versions only upwards.
    #[test]
    fn machine_types_and_versions_are_checked() {
        for ok in ["pc-q35-7.2", "pc-q35-10.0", "pc-q35-123.456"] {
            assert!(known_machine(ok), "{ok}");
        }
        for bad in [
            "q35",
            "pc-q35-7",
            "pc-q35-7.",
            "pc-q35-.2",
            "pc-q35-7.2,kernel=/x",
            "pc-q35-7.2 ",
            "pc-i440fx-7.2",
            "pc-q35-1234.0",
            "pc-q35-7.2.1",
            "",
        ] {
            assert!(!known_machine(bad), "{bad}");
        }
        let head = |name: &str| {
            let mut h = b"QEVM\0\0\0\x03\x07".to_vec();
            h.extend((name.len() as u32).to_be_bytes());
            h.extend(name.as_bytes());
            h.extend(b"\x01\0\0\0\x02\x03ram");
            h
        };
        assert_eq!(
            stream_machine(&head("pc-q35-7.2")),
            Some("pc-q35-7.2".into())
        );
        assert_eq!(stream_machine(&head("pc-q35-7.2,x=y")), None);
        assert_eq!(stream_machine(&head("pc-q35-10.0")[..20]), None);
        assert_eq!(stream_machine(b"QEVM\0\0\0\x02\x07"), None);
        assert_eq!(stream_machine(b""), None);
        assert_eq!(older_qemu(Some((10, 0)), Some((10, 0))), None);
        assert_eq!(older_qemu(Some((7, 2)), Some((10, 0))), None);
        assert_eq!(older_qemu(None, Some((7, 2))), None);
        assert_eq!(older_qemu(Some((10, 0)), None), None);
        assert!(older_qemu(Some((10, 0)), Some((7, 2))).is_some());
        assert!(older_qemu(Some((10, 1)), Some((10, 0))).is_some());
    }

    /// `qemu --version` read; the pad follows the version (unknown: padded).
    #[test]
    fn the_ram_pad_follows_the_qemu_version() {
        let v = parse_version(
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright",
        );
        assert_eq!(v, Some((10, 0)));
        assert_eq!(
            parse_version("QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u18)"),
            Some((7, 2))
        );
        assert_eq!(parse_version("qemu-system-x86_64: bad option"), None);
        assert_eq!(parse_version(""), None);
        assert_eq!(tcg_ram_pad(Some((7, 2))), TCG_RAM_PAD);
        assert_eq!(tcg_ram_pad(Some((8, 2))), TCG_RAM_PAD);
        assert_eq!(tcg_ram_pad(None), TCG_RAM_PAD);
        assert_eq!(tcg_ram_pad(Some((9, 0))), 0);
        assert_eq!(tcg_ram_pad(Some((10, 0))), 0);
    }

    /// QEMU's last words: the last non-empty line of a long stderr, quoted with its control
    /// characters escaped; nothing when it said nothing.
    #[test]
    fn last_said_quotes_the_last_line_of_the_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunPaths::new(tmp.path().to_path_buf(), tmp.path().join("own"));
        assert_eq!(run.last_said(), None);
        std::fs::write(run.stderr(), "").unwrap();
        assert_eq!(run.last_said(), None);
        let mut text = "qemu-system-x86_64: warning: old\n"
            .repeat(10_000)
            .into_bytes();
        text.extend_from_slice(b"qemu-system-x86_64: fatal \x1b[31mred\x07 \xff end\n\n");
        std::fs::write(run.stderr(), &text).unwrap();
        let said = run.last_said().unwrap();
        assert!(
            said.starts_with("QEMU said \"qemu-system-x86_64: fatal "),
            "{said}"
        );
        assert!(said.contains("\\u{1b}[31mred\\u{7}"), "{said}");
        assert!(!said.chars().any(|c| c.is_control()), "{said}");
        assert!(said.ends_with("end\""), "{said}");
    }

    pub(crate) fn spec() -> VmSpec {
        VmSpec {
            id: "0123456789ab".into(),
            vcpus: 2,
            memory: 512 << 20,
            max_vcpus: 2,
            max_memory: 512 << 20,
            accel: Accel::Tcg {
                reason: "test".into(),
            },
            kernel: "/t/vmlinuz".into(),
            initrd: Some("/t/initrd.img".into()),
            cmdline: "root=/dev/vda rw console=ttyS0".into(),
            root: "/d/vm/disks/0123456789ab.qcow2".into(),
            root_size: 4 << 30,
            volumes: vec![("data".into(), "/d/volumes/t/data.img".into())],
            seed: Some("/d/vm/run/0123456789ab/seed.iso".into()),
            net: Some(NetDev {
                fd: 7,
                mac: "02:01:23:45:67:89".into(),
            }),
            vsock_cid: None,
            gpus: None,
            run: RunPaths::new(
                "/d/vm/run/0123456789ab".into(),
                "/d/vm/own/0123456789ab".into(),
            ),
            incoming: None,
            merge_all: false,
            ram_pad: 0,
            machine: None,
            qemu_version: None,
        }
    }

    fn fds() -> VmFds {
        VmFds {
            qmp: 10,
            console: 11,
            agent: 12,
            root: (13, 14),
            volumes: vec![(15, 16)],
            seed: Some(17),
            ovmf_vars: None,
            vhost_vsock: None,
            incoming: None,
        }
    }

    const GOLDEN: &str = "\
-name gpuvisor-0123456789ab,debug-threads=on -nodefaults -no-user-config \
-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
-machine q35,mem-merge=on,memory-backend=pc.ram -accel tcg,thread=single,tb-size=32 -cpu max -smp 2,maxcpus=2 -m 512M \
-object memory-backend-ram,id=pc.ram,size=512M,merge=on -no-reboot \
-action panic=exit-failure -display none \
-chardev socket,id=qmp,fd=10,server=on,wait=off -mon chardev=qmp,mode=control \
-add-fd fd=13,set=1 -add-fd fd=14,set=1 -add-fd fd=17,set=2 \
-add-fd fd=15,set=10 -add-fd fd=16,set=10 \
-kernel /t/vmlinuz -initrd /t/initrd.img -append root=/dev/vda rw console=ttyS0 \
-chardev socket,id=console,fd=11,server=on,wait=off,logfile=/proc/self/fd/1,logappend=on \
-serial chardev:console \
-drive if=none,id=root,node-name=gvroot,format=qcow2,file=/dev/fdset/1,file.locking=off,discard=unmap \
-device virtio-blk-pci,drive=root,serial=root \
-drive if=none,id=vol0,node-name=gvvol0,format=raw,file=/dev/fdset/10,file.locking=off \
-device virtio-blk-pci,drive=vol0,serial=data \
-drive if=none,id=seed,format=raw,readonly=on,file=/dev/fdset/2 \
-device virtio-blk-pci,drive=seed,serial=cidata \
-netdev tap,id=net0,fd=7 -device virtio-net-pci,netdev=net0,mac=02:01:23:45:67:89 \
-object rng-random,id=rng0,filename=/dev/urandom -device virtio-rng-pci,rng=rng0 \
-device pvpanic-pci \
-device virtio-balloon-pci,id=balloon0,free-page-reporting=on \
-chardev socket,id=qga,fd=12,server=on,wait=off \
-device virtio-serial-pci,id=vser0 \
-device virtserialport,bus=vser0.0,chardev=qga,name=org.qemu.guest_agent.0 \
-device VGA,vgamem_mb=4 -vnc unix:/d/vm/own/0123456789ab/vnc.sock";

    #[test]
    fn command_line_golden() {
        assert_eq!(spec().args(&fds()).join(" "), GOLDEN);
        // A restore of a saved running state takes it from an inherited descriptor.
        let mut f = fds();
        f.incoming = Some(30);
        let a = spec().args(&f).join(" ");
        assert!(a.ends_with(" -incoming fd:30"), "{a}");
        // Room to grow: CPU slots, and a virtio-mem device for RAM above the boot size (whole
        // 128 MiB).
        let mut g = spec();
        g.max_vcpus = 4;
        g.max_memory = (1536 << 20) + (100 << 20);
        let a = g.args(&fds()).join(" ");
        for want in [
            " -smp 2,maxcpus=4 ",
            " -m 512M,maxmem=1536M ",
            " -object memory-backend-ram,id=vmem0,size=1024M,merge=on,reserve=off -device virtio-mem-pci,id=vmem0dev,memdev=vmem0,requested-size=0 ",
        ] {
            assert!(a.contains(want), "{want:?} not in {a}");
        }
        // The boot RAM's backend comes before virtio-mem's: its block is the first.
        let (main, vmem) = (
            a.find("memory-backend-ram,id=pc.ram,size=512M,").unwrap(),
            a.find("memory-backend-ram,id=vmem0").unwrap(),
        );
        assert!(main < vmem, "{a}");
        // Padded RAM (TCG): the boot RAM two pages longer, not a multiple of 256 KiB; the
        // device memory above it as before.
        g.ram_pad = TCG_RAM_PAD;
        let a = g.args(&fds()).join(" ");
        assert!(a.contains(" -m 524296K,maxmem=1572872K "), "{a}");
        assert!(a.contains(",id=pc.ram,size=524296K,merge=on "), "{a}");
        g.max_memory = 512 << 20;
        let a = g.args(&fds()).join(" ");
        assert!(a.contains(" -m 524296K "), "{a}");
    }

    /// A spec recorded before `ram_pad` existed reads as unpadded (its QEMU's RAM length).
    #[test]
    fn an_old_spec_has_no_ram_pad() {
        let mut v = serde_json::to_value(spec()).unwrap();
        v.as_object_mut().unwrap().remove("ram_pad");
        let old: VmSpec = serde_json::from_value(v).unwrap();
        assert_eq!(old.ram_pad, 0);
    }

    /// One thread per vCPU (KVM, MTTCG): one CPU each; one thread for all (TCG): all their
    /// CPUs; vCPUs beyond the CPUs given are left alone.
    #[test]
    fn vcpu_threads_get_the_cpus_of_their_vcpus() {
        use crate::vm::qmp::Vcpu;
        let v = |index, thread_id| Vcpu { index, thread_id };
        assert_eq!(
            thread_cpus(&[v(0, 10), v(1, 11)], &[4, 5]),
            vec![(10, vec![4]), (11, vec![5])]
        );
        assert_eq!(
            thread_cpus(&[v(0, 10), v(1, 10), v(2, 10)], &[4, 5, 7]),
            vec![(10, vec![4, 5, 7])]
        );
        assert_eq!(
            thread_cpus(&[v(0, 10), v(1, 11)], &[4]),
            vec![(10, vec![4])]
        );
    }

    #[test]
    fn emulator_threads_run_on_the_reserved_cpus() {
        let p = CpuPins::new(&[2, 3], &[0]);
        assert_eq!((p.vcpus.clone(), p.emulator.clone()), (vec![2, 3], vec![0]));
        assert_eq!(p.cpuset(), vec![0, 2, 3]);
        // Nothing reserved: no affinity of their own, the cpuset is the VM's CPUs.
        let own = CpuPins::new(&[3, 1], &[]);
        assert!(own.emulator.is_empty());
        assert_eq!(own.cpuset(), vec![1, 3]);
        // Unpinned: nothing pinned.
        let none = CpuPins::new(&[], &[0]);
        assert!(none.emulator.is_empty() && none.cpuset().is_empty());
    }

    #[test]
    fn the_cgroup_cpuset_holds_both_sets() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::at(dir.path());
        // cgroup v1: a cpuset hierarchy whose root has CPUs 0-3 and memory node 0.
        let hier = dir.path().join("sys/fs/cgroup/cpuset");
        std::fs::create_dir_all(&hier).unwrap();
        std::fs::write(hier.join("cpuset.cpus"), "0-3\n").unwrap();
        std::fs::write(hier.join("cpuset.mems"), "0\n").unwrap();
        let child = hier.join(root.cgroup_parent()).join("vm1");
        std::fs::create_dir_all(&child).unwrap();
        std::fs::write(child.join("cgroup.procs"), "").unwrap();
        drop(make_cgroup(&root, "vm1", &CpuPins::new(&[2, 3], &[0]), 1 << 30).unwrap());
        let read = |f: &str| std::fs::read_to_string(child.join(f)).unwrap();
        assert_eq!(read("cpuset.cpus"), "0,2-3");
        assert_eq!(read("cpuset.mems"), "0");
        // An unpinned VM gets the parent's CPUs.
        drop(make_cgroup(&root, "vm1", &CpuPins::new(&[], &[0]), 1 << 30).unwrap());
        assert_eq!(read("cpuset.cpus"), "0-3");
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
        let mut f = fds();
        f.ovmf_vars = Some((20, 21));
        f.vhost_vsock = Some(22);
        let a = s.args(&f).join(" ");
        assert!(a.contains("-accel kvm -cpu host "), "{a}");
        assert!(
            a.contains("-add-fd fd=20,set=3 -add-fd fd=21,set=3 "),
            "{a}"
        );
        assert!(a.contains(
            "-drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
             -drive if=pflash,format=raw,unit=1,file=/dev/fdset/3 -kernel"
        ));
        assert!(a.ends_with(
            "-device vhost-vsock-pci,guest-cid=42,vhostfd=22 -device vfio-pci,host=0000:3b:00.0"
        ));
        assert_eq!(s.memory_limit(), (512 << 20) + OVERHEAD_KVM);
    }

    #[test]
    fn each_vm_has_its_own_user() {
        let u = VmUser::of("0123456789ab", &[108]).unwrap();
        assert_eq!(
            (u.uid, u.gid),
            (VM_UID_BASE + 0x0123456, VM_UID_BASE + 0x0123456)
        );
        assert_eq!(u.groups, vec![TEMPLATE_GID, 108]);
        let other = VmUser::of("0123457789ab", &[]).unwrap();
        assert_ne!(other.uid, u.uid);
        // The largest id stays a valid uid (below the 32-bit "no uid" value).
        assert!(VmUser::of("ffffffffffff", &[]).unwrap().uid < u32::MAX - 1);
        assert_eq!(VmUser::of("xyz", &[]), None);
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
