//! [`VmRuntime`]: instances as QEMU micro-VMs behind the [`Runtime`] seam.
//!
//! Provisioning: template (once per image) → qcow2 overlay of the instance's disk size →
//! cloud-init seed → tap on the tenant bridge (opened here, passed to QEMU as an fd) → cgroup
//! → QEMU (own session, stdout into the instance's log relay) → vCPU threads pinned one to one.
//! Everything a later daemon needs is a file: `<data>/vm/run/<id>/` (root only) holds the
//! sockets the daemon bound for QEMU (QMP, agent, console), `main.pid` (written by the daemon:
//! QEMU writes nothing the daemon trusts), the seed and the volume list;
//! `<data>/vm/own/<id>/` is QEMU's own (VNC); `<data>/vm/disks/<id>.qcow2` is the overlay. So adoption after a daemon crash is reading
//! `main.pid` (checked against the instance's cgroup) and reconnecting to QMP; the orphan sweep
//! lists run dirs and overlays.

use super::qemu::{self, NetDev, RunPaths, VmSpec};
use super::qmp::Monitor;
use super::seed::{write_seed, SeedNet, SeedSpec};
use super::snapshot::Boot;
use super::template::Templates;
use super::{vio, VmConfig, VmError};
use crate::cgroup;
use crate::instance::{ExecTty, InstancePlan, Node, NodeError, StepTimer};
use crate::net::TenantNet;
use crate::runtime::{Runtime, RuntimeKind};
use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long QEMU may take to answer QMP after its start.
/// QEMU's pid, in the run dir (written by the daemon).
pub(super) const MAIN_PID: &str = "main.pid";
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(30);
/// This binary's hidden mode that runs an `instance exec` through the guest agent.
/// How often the guest's balloon driver reports its memory statistics.
pub(super) const BALLOON_STATS_SECS: u32 = 5;

pub const AGENT_EXEC_SUBCOMMAND: &str = "qga-exec";
/// How often `stop` presses the power button again while the guest runs.
const POWERDOWN_REPEAT: Duration = Duration::from_secs(3);

pub struct VmRuntime {
    pub cfg: VmConfig,
    pub templates: Templates,
    data_dir: PathBuf,
}

impl VmRuntime {
    pub fn new(cfg: VmConfig, data_dir: &Path) -> Self {
        Self {
            templates: Templates::new(data_dir, cfg.kernel.clone(), cfg.initrd.clone()),
            cfg,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// The version of the QEMU VMs start in now (`qemu --version`, read each time: the
    /// package may be upgraded while the daemon runs).
    pub(super) fn qemu_version(&self) -> Option<(i64, i64)> {
        qemu::binary_version(&self.cfg.qemu)
    }

    /// The pins of a VM placed on `cpus` (see [`qemu::CpuPins`]).
    pub(super) fn pins(&self, node: &Node, cpus: &[u32]) -> qemu::CpuPins {
        qemu::CpuPins::new(cpus, &node.cfg.reserved_cpus)
    }

    pub(super) fn run_root(&self) -> PathBuf {
        self.data_dir.join("vm").join("run")
    }

    fn disks_root(&self) -> PathBuf {
        self.data_dir.join("vm").join("disks")
    }

    /// Directories QEMU's user owns (one per VM: its VNC socket).
    pub(super) fn own_root(&self) -> PathBuf {
        self.data_dir.join("vm").join("own")
    }

    pub fn run_paths(&self, id: &str) -> RunPaths {
        RunPaths::new(self.run_root().join(id), self.own_root().join(id))
    }

    /// The VM directories' owners and modes, whatever the umask: `vm/` 0711; `run/` and
    /// `disks/` 0700 (root's: QEMU gets descriptors, never these paths); `templates/` 0750
    /// root:[`qemu::TEMPLATE_GID`] (the VM users read the bases, nobody else); `own/` 0711.
    fn prepare_dirs(&self) -> Result<(), VmError> {
        use std::os::unix::fs::PermissionsExt;
        let vm = self.data_dir.join("vm");
        let tpl = self.templates.root().to_path_buf();
        for (dir, mode, gid) in [
            (vm, 0o711, 0),
            (self.run_root(), 0o700, 0),
            (self.disks_root(), 0o700, 0),
            (tpl, 0o750, qemu::TEMPLATE_GID),
            (self.own_root(), 0o711, 0),
        ] {
            std::fs::create_dir_all(&dir).map_err(vio(&dir))?;
            std::os::unix::fs::chown(&dir, Some(0), Some(gid)).map_err(vio(&dir))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                .map_err(vio(&dir))?;
        }
        Ok(())
    }

    /// Who QEMU runs as (see [`qemu`]'s module doc): the VM's own user, or root (with the
    /// reason, logged) for passed-through GPUs or a `/dev/kvm` its group cannot open.
    pub(super) fn vm_user(
        &self,
        node: &Node,
        id: &str,
        gpus: bool,
    ) -> Result<Option<qemu::VmUser>, VmError> {
        use std::os::unix::fs::MetadataExt;
        if gpus {
            tracing::info!(
                id,
                "QEMU runs as root: VFIO GPUs are not handed to the VM user yet"
            );
            return Ok(None);
        }
        let mut extra = Vec::new();
        if matches!(self.cfg.accel, super::Accel::Kvm) {
            // The device's group only if it is the `kvm` group: a host whose /dev/kvm belongs
            // to some other group (one that also owns other files) does not lend it to QEMU.
            let kvm_group = |gid: u32| {
                std::fs::read_to_string(node.cfg.root.path("/etc/group"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        f.len() > 2 && f[0] == "kvm" && f[2] == gid.to_string()
                    })
            };
            match std::fs::metadata(node.cfg.root.path("/dev/kvm")) {
                Ok(m) if m.mode() & 0o060 == 0o060 && kvm_group(m.gid()) => extra.push(m.gid()),
                Ok(m) if m.mode() & 0o006 == 0o006 => {}
                _ => {
                    tracing::info!(
                        id,
                        "QEMU runs as root: /dev/kvm is neither world-accessible nor the kvm group's"
                    );
                    return Ok(None);
                }
            }
        }
        // Fails closed: never root for want of a user.
        qemu::VmUser::of(id, &extra)
            .map(Some)
            .ok_or_else(|| VmError::Start {
                id: id.to_string(),
                why: "no VM user can be made from this instance id".into(),
            })
    }

    /// The volume images VM `id` was started with (its run dir's `volumes` list); only paths
    /// under this daemon's volume store count.
    fn volume_images(&self, id: &str) -> Vec<PathBuf> {
        let list = std::fs::read_to_string(self.run_paths(id).volumes()).unwrap_or_default();
        list.lines()
            .map(PathBuf::from)
            .filter(|p| {
                p.starts_with(self.data_dir.join("volumes"))
                    && !p.to_string_lossy().contains("/../")
            })
            .collect()
    }

    pub fn overlay(&self, id: &str) -> PathBuf {
        self.disks_root().join(format!("{id}.qcow2"))
    }

    fn main_pid_file(&self, id: &str) -> PathBuf {
        self.run_paths(id).dir.join(MAIN_PID)
    }

    /// The QEMU pid recorded at spawn, if that process still runs in the instance's cgroup.
    pub(super) fn live_pid(&self, node: &Node, id: &str) -> Option<i32> {
        let pid = self.main_pid(node, id)?;
        (!ended(node, pid) && cgroup::holds(&node.cfg.root, id, pid)).then_some(pid)
    }

    fn provision_steps(
        &self,
        node: &Node,
        plan: &InstancePlan,
        t: &mut StepTimer,
    ) -> Result<(), VmError> {
        let id = plan.id.as_str();
        let run = self.run_paths(id);
        // Half-made or stopped: start from nothing (the tap, overlay and run dir are per run).
        self.remove_objects(node, id)?;
        self.prepare_dirs()?;
        let user = self.vm_user(node, id, !plan.gpus.is_empty())?;
        for dir in [&run.dir, &run.own] {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(vio(dir))?;
        }
        if let Some(u) = &user {
            // The uid comes from 28 bits of the id: another VM of this host whose id starts
            // alike would share it (and could ptrace this one). Refused, never shared.
            let prefix = id.get(..7).unwrap_or(id);
            if let Some(other) = std::fs::read_dir(self.own_root())
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|o| o != id && o.starts_with(prefix))
            {
                return Err(VmError::Start {
                    id: id.to_string(),
                    why: format!(
                        "its user id {} would be VM {other}'s too (ids starting {prefix}): recreate the instance for another id",
                        u.uid
                    ),
                });
            }
            std::os::unix::fs::chown(&run.own, Some(u.uid), Some(u.gid)).map_err(vio(&run.own))?;
        }
        t.mark("vm_clean");
        let layers: Vec<PathBuf> = plan
            .layers
            .iter()
            .rev()
            .map(|l| node.images.layer_dir(l))
            .collect();
        let overlay = self.overlay(id);
        // A restore or clone boots the snapshot's copy of the disk over its own links of the
        // template's files; otherwise a new overlay over the image's template (held until
        // QEMU has opened its base).
        let (boot, _template) = match &plan.from_snapshot {
            Some(src) => (
                super::snapshot::boot_from(src, &overlay, plan.disk_size)?,
                None,
            ),
            None => {
                let template = self.templates.ensure(&plan.image_digest, &layers)?;
                t.mark("vm_template");
                self.templates
                    .create_overlay(&template, &overlay, plan.disk_size)?;
                let boot = Boot {
                    base: template.base.clone(),
                    kernel: template.kernel.clone(),
                    initrd: template.initrd.clone(),
                    cmdline: template.cmdline.clone(),
                };
                (boot, Some(template))
            }
        };
        boot.write(&run.dir)?;
        t.mark("vm_overlay");
        let tnet = TenantNet {
            slot: plan.net_slot,
        };
        let addr = node.net.address(&tnet, plan.ip_host).map_err(net_err)?;
        let gw = node.net.gateway(&tnet).map_err(net_err)?;
        let prefix_len = node.cfg.net_plan.tenant_len();
        let (tap, mac) = node
            .net
            .setup_tap(id, &tnet, plan.ip_host)
            .map_err(net_err)?;
        t.mark("vm_tap");
        let volumes: Vec<(String, PathBuf)> = plan
            .volumes
            .iter()
            .map(|(name, _)| (name.clone(), node.disks.volume_image(&plan.tenant_id, name)))
            .collect();
        let list = run.volumes();
        let text: String = volumes
            .iter()
            .filter_map(|(_, p)| p.to_str().map(|p| format!("{p}\n")))
            .collect();
        std::fs::write(&list, text).map_err(vio(&list))?;
        let dns = crate::net::nameservers(&crate::instance::resolv_conf(&node.cfg.root))
            .into_iter()
            .map(std::net::IpAddr::V4)
            .collect();
        write_seed(
            &SeedSpec {
                instance_id: id.to_string(),
                hostname: plan.hostname.clone(),
                user: "gpuvisor".into(),
                ssh_keys: plan.ssh_keys.clone(),
                runcmd: plan.args.clone(),
                startup_script: plan.startup_script.clone(),
                packages: plan.packages.clone(),
                mounts: plan
                    .volumes
                    .iter()
                    .map(|(n, p)| (n.clone(), p.clone()))
                    .collect(),
                net: SeedNet {
                    mac: mac.clone(),
                    address: addr,
                    prefix_len,
                    gateway: gw,
                    dns,
                },
            },
            &run.seed(),
        )?;
        t.mark("vm_seed");
        let mask = std::net::Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix_len)));
        let vcpus = u32::try_from(plan.cpus.len()).unwrap_or(1).max(1);
        // Room to grow while it runs, except with passed-through GPUs (their MMIO window and
        // VFIO's pinned memory are laid out for the boot size).
        let (max_vcpus, max_memory) = if plan.gpus.is_empty() {
            super::resize::host_maximums(&node.cfg.root, vcpus, plan.memory)
        } else {
            (vcpus, plan.memory)
        };
        // Memory that can be hot-added comes online movable (so that it can be taken back).
        // Its range lies above 4 GiB, which would make the guest kernel set 64 MiB aside for
        // bounce buffers: none of this VM's devices needs them (virtio rings use guest
        // physical addresses; no passthrough device here), so none are made.
        let hotplug_args = if max_memory > plan.memory {
            " memhp_default_state=online_movable swiotlb=noforce"
        } else {
            ""
        };
        let cmdline = format!(
            "{} console=tty0 console=ttyS0 panic=-1{hotplug_args} ip={addr}::{gw}:{mask}:{}:eth0:off",
            boot.cmdline, plan.hostname
        );
        let version = self.qemu_version();
        let spec = VmSpec {
            id: id.to_string(),
            vcpus,
            memory: plan.memory,
            max_vcpus,
            max_memory,
            accel: self.cfg.accel.clone(),
            kernel: boot.kernel.clone(),
            initrd: boot.initrd.clone(),
            cmdline,
            root: overlay,
            root_size: plan.disk_size,
            volumes,
            seed: Some(run.seed()),
            net: Some(NetDev {
                fd: tap.as_raw_fd(),
                mac,
            }),
            vsock_cid: qemu::vsock_cid(&node.cfg.root, id),
            gpus: None,
            run: run.clone(),
            incoming: plan
                .from_snapshot
                .as_ref()
                .filter(|s| s.memory)
                .map(|s| qemu::Incoming::File(s.dir.join(crate::snapshot::MEMORY))),
            merge_all: node.cfg.manage_ksm,
            ram_pad: match &self.cfg.accel {
                super::Accel::Tcg { .. } => qemu::tcg_ram_pad(version),
                super::Accel::Kvm => 0,
            },
            machine: None,
            qemu_version: version,
        };
        // A saved running state loads only into RAM of its own length, in its own machine.
        let mut spec = spec;
        if let Some(s) = plan.from_snapshot.as_ref().filter(|s| s.memory) {
            (spec.ram_pad, spec.machine) = s.saved_shape(version).map_err(|e| VmError::Start {
                id: id.to_string(),
                why: e.to_string(),
            })?;
        }
        // Another host's migration: its QEMU's shape, waiting for the state.
        if let Some(src) = &plan.incoming {
            super::remote::receive_into(&mut spec, src)?;
        }
        // Whole GPUs by VFIO: their IOMMU groups' functions, OVMF (with this VM's own copy of
        // the variables store) and the 64-bit MMIO window; q35 either way.
        if let Some(p) = node.passthrough(&plan.gpus).map_err(|e| VmError::Start {
            id: id.to_string(),
            why: e.to_string(),
        })? {
            let vars = run.dir.join("OVMF_VARS.fd");
            std::fs::copy(&p.firmware.vars_template, &vars).map_err(vio(&vars))?;
            std::fs::set_permissions(&vars, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(vio(&vars))?;
            for n in &p.notes {
                tracing::info!(id, "GPU passthrough: {n}");
            }
            spec.gpus = Some(qemu::GpuPassthrough {
                args: p.args.clone(),
                ovmf_code: p.firmware.code.clone(),
                ovmf_vars: vars,
            });
        }
        t.mark("vm_gpus");
        if spec.incoming == Some(qemu::Incoming::Held) {
            // What a later migration starts from: this VM as it will run.
            VmSpec {
                incoming: None,
                ..spec.clone()
            }
            .write(&run.dir)?;
        } else {
            spec.write(&run.dir)?;
        }
        super::resize::Sizes {
            boot_vcpus: spec.vcpus,
            boot_memory: spec.memory >> 20 << 20,
            max_vcpus: spec.max_vcpus,
            max_memory: (spec.memory >> 20 << 20) + spec.hotplug_memory(),
            vcpus: spec.vcpus,
            memory: spec.memory >> 20 << 20,
        }
        .write(&run.dir)?;
        let pins = self.pins(node, &plan.cpus);
        let procs = qemu::make_cgroup(&node.cfg.root, id, &pins, spec.memory_limit())?;
        t.mark("vm_cgroup");
        let output = node.container_output(id).map_err(|e| VmError::Start {
            id: id.to_string(),
            why: format!("log relay: {e}"),
        })?;
        t.mark("log_relay");
        let (held, fds) = qemu::open_fds(&spec, &node.cfg.root)?;
        let mut keep: Vec<RawFd> = held.iter().map(AsRawFd::as_raw_fd).collect();
        keep.push(tap.as_raw_fd());
        let pid = qemu::spawn(
            &self.cfg.qemu,
            &spec,
            &fds,
            output,
            &procs,
            &keep,
            user.as_ref(),
            &pins.emulator,
            START_TIMEOUT,
        )?;
        // QEMU holds the tap, sockets and disks now; ours close here.
        drop((tap, held));
        let pid_file = self.main_pid_file(id);
        std::fs::write(&pid_file, format!("{pid}\n")).map_err(vio(&pid_file))?;
        t.mark("qemu_start");
        let mut mon = Monitor::connect(&run.qmp(), Duration::from_secs(5))?;
        if spec.incoming == Some(qemu::Incoming::Held) {
            // The new disk is written by the source's mirror; the rest comes with the state
            // (`remote::run_received`).
            mon.nbd_serve(&run.own.join(super::remote::NBD_SOCKET))?;
            mon.nbd_export(super::remote::ROOT_NODE, "root")?;
            std::os::unix::fs::chown(&run.own, Some(0), Some(0)).map_err(vio(&run.own))?;
            tracing::info!(id, pid, "VM waiting for a live migration's state");
            return Ok(());
        }
        if spec.incoming.is_some() {
            super::snapshot::await_incoming(&mut mon)?;
            t.mark("vm_resume_state");
        }
        // The guest's memory statistics for `instance get` (a guest without the balloon
        // driver reports none).
        mon.balloon_stats_every(BALLOON_STATS_SECS)?;
        // RAM beyond its size (`ram_pad`) is held back by the balloon: the guest has what it
        // asked for. A resumed state brings its balloon's target along.
        if spec.ram_pad > 0 && spec.incoming.is_none() {
            mon.set_balloon(spec.memory >> 20 << 20)?;
        }
        let vcpus = mon.vcpus()?;
        qemu::pin_vcpus(&node.cfg.root, pid, &vcpus, &plan.cpus)?;
        if !plan.disk_io.is_unlimited() {
            mon.throttle_disks(&plan.disk_io)?;
        }
        // QEMU's own directory was for its VNC socket, now made: it may write nowhere else.
        std::os::unix::fs::chown(&run.own, Some(0), Some(0)).map_err(vio(&run.own))?;
        t.mark("vcpu_pin");
        tracing::info!(id, pid, accel = self.cfg.accel.describe(), "VM started");
        Ok(())
    }

    /// Kills QEMU (every process in the instance's cgroup: also a QEMU whose start a killed
    /// daemon did not get to record) and removes the run dir, overlay and tap.
    fn remove_objects(&self, node: &Node, id: &str) -> Result<(), VmError> {
        // A migration's staging dirs too (its QEMU is in the instance's cgroup: killed here).
        self.remove_staged_dirs(id)?;
        let mut pids: Vec<i32> = cgroup::pids(&node.cfg.root, id);
        pids.extend(self.live_pid(node, id));
        kill_and_wait(node, id, &pids, Duration::from_secs(5));
        node.net.teardown_tap(id).map_err(net_err)?;
        let run = self.run_paths(id);
        for dir in [run.dir, run.own] {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(vio(&dir)(e)),
                _ => {}
            }
        }
        let ov = self.overlay(id);
        match std::fs::remove_file(&ov) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(vio(&ov)(e)),
            _ => {}
        }
        Ok(())
    }
}

fn net_err(e: crate::net::NetError) -> VmError {
    VmError::Tap {
        name: "network".into(),
        why: e.to_string(),
    }
}

/// Whether process `pid` has ended: gone, or a zombie with no thread left running. QEMU's main
/// thread can be a zombie while its other threads still wind down; until they are gone the
/// process has no exit status to reap.
fn ended(node: &Node, pid: i32) -> bool {
    let stat = std::fs::read_to_string(node.cfg.root.path(format!("/proc/{pid}/stat")))
        .unwrap_or_default();
    if stat.is_empty() {
        return true;
    }
    let zombie = stat
        .rsplit(')')
        .next()
        .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X']));
    zombie
        && std::fs::read_dir(node.cfg.root.path(format!("/proc/{pid}/task")))
            .map_or(true, |rd| rd.count() <= 1)
}

/// The QEMU pid recorded in run dir `dir` ([`MAIN_PID`]).
pub(super) fn pid_in(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join(MAIN_PID))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// SIGKILLs those of `pids` still in instance `id`'s cgroup (a pid learnt earlier may have
/// been recycled) and waits up to `wait` for each to end; returns the ones that did not.
pub(super) fn kill_and_wait(node: &Node, id: &str, pids: &[i32], wait: Duration) -> Vec<i32> {
    for &pid in pids {
        if cgroup::holds(&node.cfg.root, id, pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    pids.iter()
        .copied()
        .filter(|&pid| !wait_gone(node, pid, wait))
        .collect()
}

/// Waits up to `wait` for `pid` to have ended (the daemon reaps it).
pub(super) fn wait_gone(node: &Node, pid: i32, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if ended(node, pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unsupported(what: &str) -> NodeError {
    NodeError::Unsupported {
        kind: RuntimeKind::Vm,
        what: what.into(),
    }
}

impl Runtime for VmRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Vm
    }

    fn accel(&self) -> Option<String> {
        Some(self.cfg.accel.describe())
    }

    fn as_vm(&self) -> Option<&VmRuntime> {
        Some(self)
    }

    /// A run dir, QEMU's own dir or an overlay of ours for `id`.
    fn knows(&self, _node: &Node, id: &str) -> bool {
        let run = self.run_paths(id);
        run.dir.exists() || run.own.exists() || self.overlay(id).exists()
    }

    fn provision(
        &self,
        node: &Node,
        plan: &InstancePlan,
        t: &mut StepTimer,
    ) -> Result<(), NodeError> {
        if let Some(pid) = self.live_pid(node, &plan.id) {
            // Adopted (or asked again): its vCPUs pinned again, in case a daemon died between
            // QEMU's start and the pinning. Idempotent.
            let pinned = Monitor::connect(&self.run_paths(&plan.id).qmp(), Duration::from_secs(5))
                .and_then(|mut m| m.vcpus())
                .and_then(|v| qemu::pin_vcpus(&node.cfg.root, pid, &v, &plan.cpus));
            if let Err(e) = pinned {
                tracing::warn!(id = %plan.id, "re-pinning the vCPUs of a running VM: {e}");
            }
            // And its tap's anti-spoofing chain back if it was lost meanwhile.
            let net = TenantNet {
                slot: plan.net_slot,
            };
            if let Err(e) = node.net.repair_tap(&plan.id, &net, plan.ip_host) {
                tracing::warn!(id = %plan.id, "anti-spoofing rules of a running VM: {e}");
            }
            return Ok(());
        }
        self.provision_steps(node, plan, t).map_err(NodeError::from)
    }

    /// QEMU's throttling on the root disk and volume drives, over QMP.
    fn set_disk_io(
        &self,
        _node: &Node,
        id: &str,
        io: &gpuvisor_wire::DiskIo,
    ) -> Result<(), NodeError> {
        let mut mon = Monitor::connect(&self.run_paths(id).qmp(), Duration::from_secs(5))?;
        mon.throttle_disks(io)?;
        Ok(())
    }

    /// See [`super::snapshot`]: the disks by QEMU backup jobs (inside the guest agent's
    /// freeze), or with `memory` the running state by migration into a file, then the disks.
    fn snapshot(
        &self,
        node: &Node,
        id: &str,
        req: &crate::snapshot::SnapshotRequest,
    ) -> Result<crate::snapshot::SnapshotMeta, NodeError> {
        if self.live_pid(node, id).is_none() {
            return Err(VmError::Start {
                id: id.to_string(),
                why: "its QEMU is not running: snapshots are taken of a running VM".into(),
            }
            .into());
        }
        let run = self.run_paths(id);
        let volumes: Vec<(String, PathBuf)> = req
            .volumes
            .iter()
            .map(|n| (n.clone(), node.disks.volume_image(&req.tenant, n)))
            .collect();
        let passthrough = run.dir.join("OVMF_VARS.fd").exists();
        let mut mon = Monitor::connect(&run.qmp(), Duration::from_secs(5))?;
        Ok(super::snapshot::take(
            &mut mon,
            &run.agent(),
            &run.dir,
            &self.overlay(id),
            &volumes,
            req,
            passthrough,
        )?)
    }

    fn guest_memory(
        &self,
        node: &Node,
        id: &str,
    ) -> Result<Option<super::qmp::GuestMemory>, NodeError> {
        if self.live_pid(node, id).is_none() {
            return Ok(None);
        }
        let mut mon = Monitor::connect(&self.run_paths(id).qmp(), Duration::from_secs(2))?;
        let mut m = mon.guest_memory()?;
        // The balloon's figure leaves out what virtio-mem plugged (a VM grown while running).
        m.actual += mon.virtio_mem_size().unwrap_or(0);
        Ok(Some(m))
    }

    /// vCPUs hot-plugged, memory by virtio-mem and the balloon ([`super::resize`]).
    fn resize(&self, node: &Node, id: &str, cpus: &[u32], memory: u64) -> Result<(), NodeError> {
        let Some(pid) = self.live_pid(node, id) else {
            return Err(VmError::Start {
                id: id.to_string(),
                why: "its QEMU is not running".into(),
            }
            .into());
        };
        let overhead = match self.cfg.accel {
            super::Accel::Kvm => qemu::OVERHEAD_KVM,
            super::Accel::Tcg { .. } => qemu::OVERHEAD_TCG,
        };
        Ok(super::resize::resize(
            &node.cfg.root,
            id,
            &self.run_paths(id),
            pid,
            &self.pins(node, cpus),
            memory,
            overhead,
        )?)
    }

    /// A new QEMU process takes the running guest over ([`super::migrate`]).
    fn migrate(
        &self,
        node: &Node,
        id: &str,
        ask: &super::migrate::MigrateAsk,
    ) -> Result<gpuvisor_wire::MigrationReport, NodeError> {
        self.migrate_local(node, id, ask)
    }

    fn recover_migration(&self, node: &Node, ask: &super::migrate::MigrateAsk) -> Option<String> {
        VmRuntime::recover_migration(self, node, ask)
    }

    /// QEMU's leftovers of a cut-short snapshot ([`super::snapshot::abandon`]).
    fn abandon_snapshot(&self, node: &Node, id: &str) -> Result<(), NodeError> {
        if self.live_pid(node, id).is_none() {
            return Ok(());
        }
        let run = self.run_paths(id);
        let mut mon = Monitor::connect(&run.qmp(), Duration::from_secs(5))?;
        super::snapshot::abandon(
            &mut mon,
            &run.agent(),
            super::snapshot::volume_count(&run.dir),
        )?;
        Ok(())
    }

    /// ACPI power button over QMP, up to `grace` for the guest to power off, then `quit`, then
    /// SIGKILL. The button is pressed again every few seconds: a guest still booting (no
    /// handler listening yet) loses a press, as a real machine's OS would.
    fn stop(&self, node: &Node, id: &str, grace: Duration) -> Result<(), NodeError> {
        let Some(pid) = self.live_pid(node, id) else {
            return Ok(());
        };
        let qmp = self.run_paths(id).qmp();
        let deadline = Instant::now() + grace;
        let mut pressed = false;
        loop {
            match Monitor::connect(&qmp, Duration::from_secs(2)).and_then(|mut m| m.powerdown()) {
                Ok(()) => pressed = true,
                Err(e) if !pressed => {
                    tracing::warn!(id, "powerdown over QMP: {e}");
                    break;
                }
                Err(_) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if wait_gone(node, pid, left.min(POWERDOWN_REPEAT)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        tracing::info!(id, "the guest did not power off within the grace: quit");
        let _ = Monitor::connect(&qmp, Duration::from_secs(2)).and_then(|mut m| m.quit());
        if !wait_gone(node, pid, Duration::from_secs(3)) && cgroup::holds(&node.cfg.root, id, pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            wait_gone(node, pid, Duration::from_secs(5));
        }
        Ok(())
    }

    /// QEMU, its log relay, tap, run dir (sockets, pid files, seed) and overlay.
    fn teardown(&self, node: &Node, id: &str) -> Result<(), NodeError> {
        let known = self.knows(node, id);
        self.remove_objects(node, id)?;
        if known {
            node.stop_relay(id, Duration::from_secs(5));
        }
        Ok(())
    }

    /// Ids whose QEMU (from `main.pid`) runs in the instance's cgroup. Spawns nothing.
    fn running(&self, node: &Node) -> BTreeSet<String> {
        let Ok(rd) = std::fs::read_dir(self.run_root()) else {
            return BTreeSet::new();
        };
        rd.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|id| self.live_pid(node, id).is_some())
            .collect()
    }

    /// Host-side figures, never the guest's word: the root disk's size is its overlay's
    /// virtual size and its use what the guest has written into the overlay (allocated
    /// bytes, metadata included); a volume's size is its image's and its use the image's
    /// allocated bytes (blocks the guest freed stay counted until it discards them); network
    /// from the tap. The monitor is not asked (`query-blockstats`): it takes one client at a
    /// time and a lifecycle step must never wait behind a telemetry sample.
    fn usage(&self, node: &Node, id: &str) -> crate::telemetry::RuntimeUsage {
        use std::os::unix::fs::MetadataExt;
        let allocated = |p: &Path| std::fs::metadata(p).ok().map(|m| m.blocks() * 512);
        let overlay = self.overlay(id);
        let (disk_used, disk_total) = match super::qcow2::virtual_size(&overlay) {
            Ok(size) => (allocated(&overlay), Some(size)),
            Err(_) => (None, None),
        };
        let (mut volume_used, mut volume_total) = (0, 0);
        for image in self.volume_images(id) {
            if let (Some(used), Ok(m)) = (allocated(&image), std::fs::metadata(&image)) {
                volume_used += used;
                volume_total += m.len();
            }
        }
        let (net_rx_bytes, net_tx_bytes) =
            crate::telemetry::peer_net_counters(&node.cfg.root, &node.net.tap_name(id));
        crate::telemetry::RuntimeUsage {
            disk_used,
            disk_total,
            volume_used,
            volume_total,
            net_rx_bytes,
            net_tx_bytes,
        }
    }

    fn main_pid(&self, _node: &Node, id: &str) -> Option<i32> {
        pid_in(&self.run_paths(id).dir)
    }

    fn last_words(&self, _node: &Node, id: &str) -> Option<String> {
        self.run_paths(id).last_said()
    }

    /// Run dirs and overlays.
    fn local_ids(&self, _node: &Node) -> Result<BTreeSet<String>, NodeError> {
        let mut ids = BTreeSet::new();
        for root in [self.run_root(), self.own_root()] {
            if let Ok(rd) = std::fs::read_dir(root) {
                ids.extend(rd.flatten().map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    super::migrate::owner(&name).to_string()
                }));
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.disks_root()) {
            ids.extend(rd.flatten().filter_map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .strip_suffix(".qcow2")
                    .map(str::to_string)
            }));
        }
        Ok(ids)
    }

    /// `<this binary> qga-exec`: the command runs in the guest through the guest agent; its
    /// pid file (in the run dir, removed with it) holds the shim's pid, the guest's pid and the
    /// shim's start time.
    fn exec_command(
        &self,
        node: &Node,
        id: &str,
        args: &[String],
        env: &[String],
        stdin: bool,
    ) -> Result<(std::process::Command, PathBuf), NodeError> {
        if self.live_pid(node, id).is_none() {
            return Err(unsupported("exec on a VM that is not running"));
        }
        let shim = node.log_limits().relay.clone().ok_or_else(|| {
            unsupported("exec without the gpuvisor binary configured (daemon without a relay)")
        })?;
        let run = self.run_paths(id);
        let pid_file = run
            .dir
            .join(format!("exec-{}.pid", crate::instance::exec_tag()?));
        let mut cmd = std::process::Command::new(shim);
        cmd.arg(AGENT_EXEC_SUBCOMMAND)
            .arg("--socket")
            .arg(run.agent())
            .arg("--pid-file")
            .arg(&pid_file);
        for e in env {
            cmd.arg("--env").arg(e);
        }
        if stdin {
            cmd.arg("--stdin");
        }
        cmd.arg("--").args(args);
        crate::runtime::exec_stdio(&mut cmd, stdin);
        Ok((cmd, pid_file))
    }

    /// The same agent exec: there is no runtime process on the host to outlive the daemon.
    fn exec_pipes_command(
        &self,
        node: &Node,
        id: &str,
        args: &[String],
        env: &[String],
        stdin: bool,
    ) -> Result<(std::process::Command, PathBuf), NodeError> {
        self.exec_command(node, id, args, env, stdin)
    }

    fn exec_tty_command(
        &self,
        _node: &Node,
        _id: &str,
        _args: &[String],
        _env: &[String],
    ) -> Result<ExecTty, NodeError> {
        Err(unsupported(
            "exec on a terminal (-t): the guest agent has no terminals; use exec without -t, or `instance console NAME` for the serial console",
        ))
    }

    fn kill_exec(&self, node: &Node, _id: &str, pid_file: &Path) -> usize {
        super::qmp::kill_agent_exec(&node.cfg.root, pid_file)
    }

    fn kill_orphaned_exec(&self, node: &Node, _id: &str, pid_file: &Path) -> usize {
        super::qmp::kill_agent_exec(&node.cfg.root, pid_file)
    }

    /// The serial console's socket (QEMU's `-chardev socket,server=on`: one client at a time;
    /// what the guest writes also goes to the instance log, attached or not).
    fn console(&self, _node: &Node, id: &str) -> Result<PathBuf, NodeError> {
        Ok(self.run_paths(id).console())
    }

    /// QEMU's VNC server on its own socket (`-vnc unix:...`, no password: only the daemon,
    /// as root, reaches the socket; clients share the screen).
    fn display(&self, _node: &Node, id: &str) -> Result<PathBuf, NodeError> {
        Ok(self.run_paths(id).vnc())
    }
}
