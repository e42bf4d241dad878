//! Host preflight (`gpuvisor host check`): is this host ready to virtualise its GPUs, and if not,
//! what exactly to fix. Operators lose days to IOMMU off, a GPU sharing its IOMMU group with a
//! SATA controller, a driver whose kernel module and user-space library disagree; each check here
//! names the problem and the remedy.
//!
//! Key decisions:
//! - Everything is read through [`HostRoot`], so every check runs against fixture trees; the few
//!   facts only NVML knows (CUDA version, MIG mode) are passed in as [`NvmlFacts`], gathered by
//!   [`NvmlFacts::probe`] on the real host and left empty in tests and on hosts without NVML.
//! - The checks only read. They never load modules or change settings; remedies say what to run.
//! - Status semantics: `fail` means a gpuvisor feature (passthrough, GPU containers, micro-VMs)
//!   cannot work; `warn` means it works with a risk or a degraded mode; `skip` means the check
//!   does not apply to this host (no NVSwitch, no SR-IOV). `host check` exits 1 on any `fail`.
//! - MIG mode without NVML comes from procfs: the driver creates
//!   `/proc/driver/nvidia/capabilities/gpu<minor>/mig/` for MIG-capable GPUs, and a `gi<N>`
//!   entry under it for every GPU instance, which exist only in MIG mode. A capable GPU without
//!   `gi*` entries is reported as "MIG off or no GPU instances" (procfs cannot tell them apart).

use crate::gpu::{scan_sysfs, GpuDevice};
use crate::vfio::{self, PciFunction};
use crate::HostRoot;
use serde::Serialize;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
    Skip,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
            Status::Skip => "skip",
        }
    }
}

/// One preflight result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable id (`kernel`, `iommu`, `iommu_group:0000:3b:00.0`), for scripts.
    pub id: String,
    pub title: String,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it; empty when nothing needs doing.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub remedy: String,
}

fn mk(
    id: impl Into<String>,
    title: impl Into<String>,
    status: Status,
    detail: impl Into<String>,
    remedy: impl Into<String>,
) -> Check {
    Check {
        id: id.into(),
        title: title.into(),
        status,
        detail: detail.into(),
        remedy: remedy.into(),
    }
}

/// MIG mode of one GPU as NVML reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigModes {
    pub current: bool,
    pub pending: bool,
}

/// What only NVML can tell; empty where NVML is not loaded (tests, hosts without the driver).
#[derive(Debug, Clone, Default)]
pub struct NvmlFacts {
    /// CUDA driver API version, `12.4`.
    pub cuda_version: Option<String>,
    /// NVML's driver version, `550.54.15`.
    pub driver_version: Option<String>,
    /// By PCI address; `None` for GPUs without MIG support.
    pub mig: BTreeMap<String, Option<MigModes>>,
    /// Active NVLinks by GPU PCI address: the PCI address at the other end of each (a GPU, or
    /// an NVSwitch). Only GPUs on the nvidia driver are seen.
    pub nvlink: BTreeMap<String, Vec<String>>,
}

impl NvmlFacts {
    /// Asks NVML on the real host; empty facts when the root is a fixture or NVML is missing.
    pub fn probe(root: &HostRoot) -> Self {
        let mut facts = Self::default();
        if !root.is_real() {
            return facts;
        }
        let Ok(nvml) = nvml_wrapper::Nvml::init() else {
            return facts;
        };
        if let Ok(v) = nvml.sys_cuda_driver_version() {
            facts.cuda_version = Some(format!(
                "{}.{}",
                nvml_wrapper::cuda_driver_version_major(v),
                nvml_wrapper::cuda_driver_version_minor(v)
            ));
        }
        facts.driver_version = nvml.sys_driver_version().ok();
        let count = nvml.device_count().unwrap_or(0);
        for i in 0..count {
            let Ok(dev) = nvml.device_by_index(i) else {
                continue;
            };
            let Some(pci) = dev
                .pci_info()
                .ok()
                .and_then(|p| crate::gpu::normalise_pci_address(&p.bus_id))
            else {
                continue;
            };
            let modes = dev.mig_mode().ok().map(|m| MigModes {
                current: m.current == 1,
                pending: m.pending == 1,
            });
            let mut remotes = Vec::new();
            for link in 0..nvml_wrapper_sys::bindings::NVML_NVLINK_MAX_LINKS {
                let l = dev.link_wrapper_for(link);
                match l.is_active() {
                    Ok(true) => {}
                    Ok(false) => continue,
                    // No NVLink on this GPU (or no more links).
                    Err(_) => break,
                }
                if let Some(remote) = l
                    .remote_pci_info()
                    .ok()
                    .and_then(|p| crate::gpu::normalise_pci_address(&p.bus_id))
                {
                    if !remotes.contains(&remote) {
                        remotes.push(remote);
                    }
                }
            }
            if !remotes.is_empty() {
                facts.nvlink.insert(pci.clone(), remotes);
            }
            facts.mig.insert(pci, modes);
        }
        facts
    }
}

/// Runs every check against the host under `root`, in a fixed order.
pub fn check(root: &HostRoot, nvml: &NvmlFacts) -> Vec<Check> {
    let gpus = scan_sysfs(root).unwrap_or_default();
    let mut out = vec![kernel(root), iommu(root)];
    out.extend(iommu_groups(root, &gpus));
    out.push(vfio_pci(root));
    out.extend(passthrough(root, &gpus));
    out.push(ovmf(root, &gpus));
    out.extend(sriov(root, &gpus));
    out.extend(bars(root, &gpus));
    out.push(driver(root, &gpus, nvml));
    out.extend(mig(root, &gpus, nvml));
    out.push(fabricmanager(root));
    out.push(nvlink(root, &gpus, nvml));
    out.push(persistenced(root, &gpus));
    out.push(security(root));
    out.push(device_modes(root));
    out.push(cgroups(root));
    out.push(kvm(root));
    out.push(vm_accel(root));
    out.push(vsock(root));
    out
}

/// True when no check failed.
pub fn passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.status != Status::Fail)
}

/// `6.1.0-18-amd64` → (6, 1).
fn parse_kernel(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

fn kernel(root: &HostRoot) -> Check {
    let title = "kernel ≥ 5.15";
    let Some(release) = root.read_trimmed("/proc/sys/kernel/osrelease") else {
        return mk(
            "kernel",
            title,
            Status::Warn,
            "cannot read /proc/sys/kernel/osrelease",
            "",
        );
    };
    match parse_kernel(&release) {
        Some(v) if v >= (5, 15) => mk(
            "kernel",
            title,
            Status::Pass,
            format!("Linux {release}"),
            "",
        ),
        Some(_) => mk(
            "kernel",
            title,
            Status::Fail,
            format!("Linux {release} is older than 5.15"),
            "upgrade the kernel to 5.15 or newer (cgroup v2 features, VFIO fixes)",
        ),
        None => mk(
            "kernel",
            title,
            Status::Warn,
            format!("cannot parse kernel release {release:?}"),
            "",
        ),
    }
}

fn dir_entries(root: &HostRoot, host_path: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.path(host_path))
        .map(|e| {
            e.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn iommu(root: &HostRoot) -> Check {
    let title = "IOMMU enabled";
    let cmdline = root.read_trimmed("/proc/cmdline").unwrap_or_default();
    let flags: Vec<&str> = cmdline
        .split_whitespace()
        .filter(|w| {
            w.starts_with("intel_iommu=") || w.starts_with("amd_iommu=") || w.starts_with("iommu=")
        })
        .collect();
    let units = dir_entries(root, "/sys/class/iommu");
    let groups = dir_entries(root, "/sys/kernel/iommu_groups").len();
    let off = flags.iter().any(|f| f.ends_with("=off"));
    let detail = format!(
        "command line: {}; IOMMU units: {}; {groups} IOMMU groups",
        if flags.is_empty() {
            "no iommu flag".to_string()
        } else {
            flags.join(" ")
        },
        if units.is_empty() {
            "none".to_string()
        } else {
            units.join(", ")
        },
    );
    let remedy = "enable VT-d (Intel) or AMD-Vi/IOMMU (AMD) in firmware, add intel_iommu=on iommu=pt (or amd_iommu=on iommu=pt) to the kernel command line, reboot";
    if groups == 0 || units.is_empty() || off {
        return mk("iommu", title, Status::Fail, detail, remedy);
    }
    if !flags.iter().any(|f| {
        f.starts_with("intel_iommu=on") || f.starts_with("amd_iommu=on") || *f == "iommu=pt"
    }) && units.iter().any(|u| u.starts_with("dmar"))
    {
        // Intel IOMMU enabled by the distribution's default: works, but says nothing about pt.
        return mk("iommu", title, Status::Warn, detail, "add intel_iommu=on iommu=pt to the kernel command line so it stays on across kernel updates");
    }
    mk("iommu", title, Status::Pass, detail, "")
}

fn iommu_groups(root: &HostRoot, gpus: &[GpuDevice]) -> Vec<Check> {
    if gpus.is_empty() {
        return vec![mk(
            "iommu_group",
            "GPU IOMMU groups",
            Status::Skip,
            "no NVIDIA GPU found",
            "",
        )];
    }
    gpus.iter()
        .map(|g| {
            let id = format!("iommu_group:{}", g.pci_address);
            let title = format!("IOMMU group of GPU {} ({})", g.index, g.pci_address);
            let v = match vfio::group_verdict(root, &g.pci_address, &[]) {
                Ok(v) => v,
                Err(vfio::VfioError::NoIommuGroup { .. }) => {
                    return mk(id, title, Status::Fail, "in no IOMMU group (IOMMU off)", "enable the IOMMU (see the iommu check)")
                }
                Err(e) => return mk(id, title, Status::Fail, e.to_string(), "passthrough refuses a group it cannot read whole"),
            };
            let group = v.group;
            let companions: Vec<String> =
                v.pass.iter().filter(|m| m.address != g.pci_address).map(PciFunction::describe).collect();
            let with = if companions.is_empty() { String::new() } else { format!(" with its own {}", companions.join(", ")) };
            let bridges = if v.host_bridges.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = v.host_bridges.iter().map(PciFunction::describe).collect();
                format!("; {} stays on the host", list.join(", "))
            };
            if !v.blockers.is_empty() {
                let list: Vec<String> = v.blockers.iter().map(vfio::blocker_text).collect();
                return mk(
                    id,
                    title,
                    Status::Fail,
                    format!("group {group} shared with {}", list.join(", ")),
                    "passthrough needs the whole group: move the GPU to a slot with its own group, enable ACS in firmware, or use a kernel with the ACS override (at your own risk)",
                );
            }
            if !v.other_gpus.is_empty() {
                let list: Vec<String> = v.other_gpus.iter().map(PciFunction::describe).collect();
                return mk(
                    id,
                    title,
                    Status::Warn,
                    format!("group {group} shared with other GPUs: {}{bridges}", list.join(", ")),
                    "these GPUs can only be passed through together; enable ACS or use another slot",
                );
            }
            mk(id, title, Status::Pass, format!("group {group}{with}{bridges}"), "")
        })
        .collect()
}

fn vfio_pci(root: &HostRoot) -> Check {
    let title = "vfio-pci available";
    if root.path("/sys/bus/pci/drivers/vfio-pci").exists()
        || root.path("/sys/module/vfio_pci").exists()
    {
        return mk(
            "vfio_pci",
            title,
            Status::Pass,
            "vfio-pci driver loaded",
            "",
        );
    }
    let release = root
        .read_trimmed("/proc/sys/kernel/osrelease")
        .unwrap_or_default();
    let builtin = root
        .read_trimmed(format!("/lib/modules/{release}/modules.builtin"))
        .is_some_and(|t| t.lines().any(|l| l.ends_with("/vfio-pci.ko")));
    if builtin {
        return mk(
            "vfio_pci",
            title,
            Status::Pass,
            "vfio-pci built into the kernel",
            "",
        );
    }
    let module = ["ko", "ko.xz", "ko.zst", "ko.gz"].iter().any(|ext| {
        root.path(format!(
            "/lib/modules/{release}/kernel/drivers/vfio/pci/vfio-pci.{ext}"
        ))
        .exists()
    });
    if module {
        return mk(
            "vfio_pci",
            title,
            Status::Warn,
            "vfio-pci module installed but not loaded",
            "modprobe vfio-pci (and add it to /etc/modules-load.d/ to load it at boot)",
        );
    }
    mk(
        "vfio_pci",
        title,
        Status::Fail,
        "no vfio-pci driver, built-in or module",
        "install the kernel's extra modules (vfio-pci) or build a kernel with CONFIG_VFIO_PCI",
    )
}

/// Per GPU: its driver now and whether it can go to a VM (whole, by VFIO passthrough), with
/// the plan `vm::passthrough` would make for it when it is bound to vfio-pci.
fn passthrough(root: &HostRoot, gpus: &[GpuDevice]) -> Vec<Check> {
    use crate::vm::passthrough::{plan_passthrough, PassthroughError};
    gpus.iter()
        .map(|g| {
            let pci = &g.pci_address;
            let id = format!("passthrough:{pci}");
            let title = format!("GPU {} ({pci}): driver and VM passthrough", g.index);
            let bind = format!("`gpuvisor gpu bind-vfio {pci}` (admin) gives it to VMs");
            match g.driver.as_deref() {
                Some(vfio::VFIO_DRIVER) => {
                    // GPUs sharing the group go to one VM together: plan them as one.
                    let together: Vec<String> = match vfio::group_verdict(root, pci, &[]) {
                        Ok(v) => std::iter::once(pci.clone()).chain(v.other_gpus.iter().map(|o| o.address.clone())).collect(),
                        Err(_) => vec![pci.clone()],
                    };
                    let with = if together.len() > 1 {
                        format!(" together with GPU {} (same IOMMU group: a VM gets them with --gpus {})", together[1..].join(", "), together.len())
                    } else {
                        String::new()
                    };
                    match plan_passthrough(root, &together) {
                        Ok(p) => {
                            let groups: Vec<String> = p.groups.iter().map(|g| g.to_string()).collect();
                            let detail = format!(
                                "on vfio-pci: for VMs only{with}; IOMMU group {}: {}; 64-bit MMIO window {}; guest needs {} physical address bits",
                                groups.join(", "),
                                p.devices.join(", "),
                                gpuvisor_wire::format_size(p.window),
                                p.min_phys_bits
                            );
                            if together.len() > 1 {
                                mk(id, title, Status::Warn, detail, "placement gives GPUs one by one: a VM asking for fewer GPUs than the group holds is refused at create; enable ACS or use another slot to pass them separately")
                            } else {
                                mk(id, title, Status::Pass, detail, "")
                            }
                        }
                        // The GPU itself is fine; the firmware has its own check.
                        Err(PassthroughError::NoFirmware { .. }) => mk(id, title, Status::Pass, format!("on vfio-pci: for VMs only{with} (firmware: see the ovmf check)"), ""),
                        Err(e) => mk(id, title, Status::Fail, format!("on vfio-pci but a VM cannot get it: {e}"), "fix what the detail names; `gpuvisor gpu release` gives the GPU back to containers meanwhile"),
                    }
                }
                Some("nvidia") => {
                    let v = match vfio::group_verdict(root, pci, &[]) {
                        Ok(v) => v,
                        Err(vfio::VfioError::NoIommuGroup { .. }) => {
                            return mk(id, title, Status::Warn, "on nvidia: for containers; cannot go to a VM: in no IOMMU group", "enable the IOMMU (see the iommu check) to pass GPUs through to VMs")
                        }
                        Err(e) => return mk(id, title, Status::Warn, format!("on nvidia: for containers; cannot go to a VM: {e}"), "see the iommu_group check"),
                    };
                    let blocking: Vec<String> = v.other_gpus.iter().chain(&v.blockers).map(vfio::blocker_text).collect();
                    if blocking.is_empty() {
                        mk(id, title, Status::Pass, format!("on nvidia: for containers; can go to VMs (IOMMU group {}): {bind}", v.group), "")
                    } else {
                        mk(id, title, Status::Warn, format!("on nvidia: for containers; cannot go to a VM alone: IOMMU group {} also holds {}", v.group, blocking.join(", ")), "see the iommu_group check")
                    }
                }
                Some(other) => mk(id, title, Status::Warn, format!("on {other}: neither containers (they need nvidia) nor VMs (they need vfio-pci) can use it"), format!("load the nvidia driver for containers, or {bind}")),
                None => mk(id, title, Status::Warn, "no driver: neither containers nor VMs can use it", format!("load the nvidia driver for containers, or {bind}")),
            }
        })
        .collect()
}

/// UEFI firmware for VMs with GPUs (Debian's `ovmf`).
fn ovmf(root: &HostRoot, gpus: &[GpuDevice]) -> Check {
    use crate::vm::passthrough::{OVMF_CODE, OVMF_VARS};
    let title = "OVMF firmware for VMs with GPUs";
    let missing: Vec<&str> = [OVMF_CODE, OVMF_VARS]
        .into_iter()
        .filter(|p| !root.path(p).is_file())
        .collect();
    if missing.is_empty() {
        return mk(
            "ovmf",
            title,
            Status::Pass,
            format!("{OVMF_CODE}, {OVMF_VARS}"),
            "",
        );
    }
    let detail = format!("missing {}", missing.join(", "));
    let remedy = "apt-get install ovmf (scripts/install-deps installs it)";
    if gpus.iter().any(GpuDevice::is_vfio) {
        mk(
            "ovmf",
            title,
            Status::Fail,
            format!("{detail}: VMs with the GPUs bound to vfio-pci cannot start"),
            remedy,
        )
    } else {
        mk(
            "ovmf",
            title,
            Status::Warn,
            format!("{detail}: VMs cannot be given GPUs"),
            remedy,
        )
    }
}

/// NVLink and NVSwitch: what passthrough means when GPUs are linked. NVSwitches are PCI devices
/// (class 0x0680); links between GPUs come from NVML (GPUs on the nvidia driver only).
fn nvlink(root: &HostRoot, gpus: &[GpuDevice], nvml: &NvmlFacts) -> Check {
    let title = "NVLink / NVSwitch and VM passthrough";
    let switches = nvswitches(root);
    let name = |pci: &str| {
        gpus.iter()
            .find(|g| g.pci_address == pci)
            .map_or_else(|| pci.to_string(), |g| format!("GPU {} ({pci})", g.index))
    };
    let mut pairs: Vec<String> = Vec::new();
    for (gpu, remotes) in &nvml.nvlink {
        for r in remotes.iter().filter(|r| !switches.contains(r)) {
            let (a, b) = if gpu < r { (gpu, r) } else { (r, gpu) };
            let pair = format!("{} ↔ {}", name(a), name(b));
            if !pairs.contains(&pair) {
                pairs.push(pair);
            }
        }
    }
    let vfio: Vec<String> = gpus
        .iter()
        .filter(|g| g.is_vfio())
        .map(|g| format!("GPU {}", g.index))
        .collect();
    if !switches.is_empty() {
        let linked = nvml
            .nvlink
            .values()
            .filter(|r| r.iter().any(|x| switches.contains(x)))
            .count();
        let detail = format!(
            "{} NVSwitches ({}){}: the GPUs form one NVLink fabric; passthrough there means all GPUs and NVSwitches to one VM (the fabric manager then runs in the guest), or NVSwitches kept on the host with nvidia-fabricmanager in shared-NVSwitch mode activating a partition for a VM's GPUs before it starts",
            switches.len(),
            switches.join(", "),
            if linked > 0 { format!(", {linked} GPUs linked to them") } else { String::new() },
        );
        return if vfio.is_empty() {
            mk("nvlink", title, Status::Pass, detail, "")
        } else {
            mk(
                "nvlink",
                title,
                Status::Warn,
                format!("{detail}; bound to vfio-pci: {}", vfio.join(", ")),
                "gpuvisor passes GPUs, not NVSwitches: run nvidia-fabricmanager with FABRIC_MODE=1 (shared NVSwitch) and activate the partition of each VM's GPUs, or a VM's CUDA cannot initialise; VMs get NVLink only between the GPUs of one partition",
            )
        };
    }
    if pairs.is_empty() {
        return mk(
            "nvlink",
            title,
            Status::Skip,
            "no NVSwitch, no active NVLink seen (NVML sees GPUs on the nvidia driver only)",
            "",
        );
    }
    let detail = format!(
        "NVLink peers: {}; a VM keeps NVLink only when it has both GPUs of a pair",
        pairs.join(", ")
    );
    if vfio.is_empty() {
        mk("nvlink", title, Status::Pass, detail, "")
    } else {
        mk("nvlink", title, Status::Warn, format!("{detail}; bound to vfio-pci: {}; placement does not know NVLink: two peers may go to VMs of different tenants, each then without NVLink (and the link between them left to the hardware's isolation)", vfio.join(", ")), "bind NVLink peers to vfio-pci together and give them to one VM (`--gpus 2`), or the VM runs without NVLink")
    }
}

fn sriov(root: &HostRoot, gpus: &[GpuDevice]) -> Vec<Check> {
    gpus.iter()
        .map(|g| {
            let dev = format!("/sys/bus/pci/devices/{}", g.pci_address);
            let id = format!("sriov:{}", g.pci_address);
            let title = format!("SR-IOV on GPU {}", g.index);
            match root
                .read_trimmed(format!("{dev}/sriov_totalvfs"))
                .and_then(|v| v.parse::<u32>().ok())
            {
                Some(total) if total > 0 => {
                    let enabled = root
                        .read_trimmed(format!("{dev}/sriov_numvfs"))
                        .unwrap_or_else(|| "0".into());
                    mk(
                        id,
                        title,
                        Status::Pass,
                        format!("{total} virtual functions possible, {enabled} enabled"),
                        "",
                    )
                }
                _ => mk(
                    id,
                    title,
                    Status::Skip,
                    "no SR-IOV capability (needed only for vGPU)",
                    "",
                ),
            }
        })
        .collect()
}

const IORESOURCE_PREFETCH: u64 = 0x2000;
const IORESOURCE_MEM_64: u64 = 0x0010_0000;
const FOUR_GIB: u64 = 1 << 32;

/// One memory BAR from a `resource` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub index: usize,
    pub start: u64,
    pub size: u64,
    pub is_64bit: bool,
    pub prefetchable: bool,
}

/// Parses a PCI `resource` file: the first six lines are BAR0..5 (`start end flags`, hex).
pub fn parse_bars(text: &str) -> Vec<Bar> {
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    text.lines()
        .take(6)
        .enumerate()
        .filter_map(|(index, line)| {
            let mut it = line.split_whitespace();
            let (start, end, flags) = (hex(it.next()?)?, hex(it.next()?)?, hex(it.next()?)?);
            (end > start).then_some(Bar {
                index,
                start,
                size: end - start + 1,
                is_64bit: flags & IORESOURCE_MEM_64 != 0,
                prefetchable: flags & IORESOURCE_PREFETCH != 0,
            })
        })
        .collect()
}

fn human(bytes: u64) -> String {
    gpuvisor_wire::format_size(bytes)
}

fn bars(root: &HostRoot, gpus: &[GpuDevice]) -> Vec<Check> {
    gpus.iter()
        .map(|g| {
            let id = format!("bars:{}", g.pci_address);
            let title = format!("BARs and above-4G decoding on GPU {}", g.index);
            let Some(text) = root.read_trimmed(format!("/sys/bus/pci/devices/{}/resource", g.pci_address)) else {
                return mk(id, title, Status::Skip, "no resource file", "");
            };
            let bars = parse_bars(&text);
            if bars.is_empty() {
                return mk(id, title, Status::Warn, "no memory BAR assigned", "enable 'Above 4G decoding' in firmware and check the slot");
            }
            let list: Vec<String> = bars
                .iter()
                .map(|b| {
                    let mut s = format!("BAR{} {}", b.index, human(b.size));
                    if b.is_64bit && b.prefetchable {
                        s += " (64-bit prefetchable";
                        s += if b.start >= FOUR_GIB { ", above 4 GiB)" } else { ")" };
                    }
                    s
                })
                .collect();
            let detail = list.join(", ");
            let above = bars.iter().any(|b| b.start >= FOUR_GIB);
            let biggest = bars.iter().map(|b| b.size).max().unwrap_or(0);
            if above {
                mk(id, title, Status::Pass, detail, "")
            } else if biggest <= 256 << 20 {
                mk(
                    id,
                    title,
                    Status::Warn,
                    format!("{detail}: every BAR below 4 GiB and at most 256 MiB; above-4G decoding looks off"),
                    "enable 'Above 4G decoding' (and Resizable BAR) in firmware; VMs need the large BAR1 for passthrough",
                )
            } else {
                mk(id, title, Status::Pass, detail, "")
            }
        })
        .collect()
}

/// The first token that looks like a driver version (`550.54.15`).
fn version_token(text: &str) -> Option<String> {
    text.split_whitespace()
        .find(|t| {
            t.contains('.')
                && t.split('.')
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        })
        .map(str::to_string)
}

/// The driver version in the name of the user-space library (`libcuda.so.550.54.15`).
fn libcuda_version(root: &HostRoot) -> Option<String> {
    crate::gpu::driver_files(root)
        .into_iter()
        .find_map(|(_, container)| {
            let name = container.file_name()?.to_str()?.to_string();
            let v = name.strip_prefix("libcuda.so.")?;
            (v.matches('.').count() >= 1).then(|| v.to_string())
        })
}

fn driver(root: &HostRoot, gpus: &[GpuDevice], nvml: &NvmlFacts) -> Check {
    let title = "NVIDIA driver and CUDA versions";
    let kmod = root
        .read_trimmed("/proc/driver/nvidia/version")
        .and_then(|t| t.lines().next().and_then(version_token))
        .or_else(|| root.read_trimmed("/sys/module/nvidia/version"));
    let lib = libcuda_version(root).or_else(|| nvml.driver_version.clone());
    let cuda = nvml
        .cuda_version
        .as_deref()
        .map(|c| format!(", CUDA {c}"))
        .unwrap_or_default();
    let on_host_driver = gpus.iter().any(|g| g.driver.as_deref() == Some("nvidia"));
    match (kmod, lib) {
        (None, None) if gpus.is_empty() || !on_host_driver => {
            mk("driver", title, Status::Skip, "no NVIDIA driver (no GPU on the host driver)", "")
        }
        (None, _) => mk(
            "driver",
            title,
            Status::Fail,
            "NVIDIA kernel module not loaded",
            "install the NVIDIA driver (kernel module) matching the user-space libraries, then modprobe nvidia",
        ),
        (Some(k), None) => mk(
            "driver",
            title,
            Status::Warn,
            format!("kernel module {k}, but no libcuda.so.<version> found"),
            "install the driver's user-space libraries (libcuda, libnvidia-ml) of the same version; GPU containers need them",
        ),
        (Some(k), Some(l)) if k == l => {
            mk("driver", title, Status::Pass, format!("kernel module {k}, libcuda {l}{cuda}"), "")
        }
        (Some(k), Some(l)) => mk(
            "driver",
            title,
            Status::Fail,
            format!("kernel module {k} but libcuda {l}{cuda}: versions differ"),
            "reinstall the driver so module and libraries match, or reboot if the module was upgraded but the old one is still loaded",
        ),
    }
}

/// The GPU minors the driver has MIG capabilities for, with their `gi*` entries.
fn proc_mig(root: &HostRoot, minor: u32) -> Option<usize> {
    let dir = format!("/proc/driver/nvidia/capabilities/gpu{minor}/mig");
    if !root.path(&dir).is_dir() {
        return None;
    }
    Some(
        dir_entries(root, &dir)
            .iter()
            .filter(|e| e.starts_with("gi"))
            .count(),
    )
}

fn mig(root: &HostRoot, gpus: &[GpuDevice], nvml: &NvmlFacts) -> Vec<Check> {
    gpus.iter()
        .filter(|g| g.driver.as_deref() != Some("vfio-pci"))
        .map(|g| {
            let id = format!("mig:{}", g.pci_address);
            let title = format!("MIG mode on GPU {}", g.index);
            let create = "create GPU instances with `gpuvisor gpu mig create`, or turn MIG off (`nvidia-smi -i <gpu> -mig 0`) to use the GPU whole";
            match nvml.mig.get(&g.pci_address) {
                Some(None) => return mk(id, title, Status::Skip, "MIG not supported", ""),
                Some(Some(m)) if m.current != m.pending => {
                    return mk(
                        id,
                        title,
                        Status::Warn,
                        format!("MIG {} now, {} pending", on_off(m.current), on_off(m.pending)),
                        "reset the GPU (nvidia-smi -r -i <gpu>, with nothing running on it) or reboot to apply the pending mode",
                    )
                }
                Some(Some(m)) => {
                    let gis = proc_mig(root, g.index).unwrap_or(0);
                    return if m.current && gis == 0 && root.path("/proc/driver/nvidia/capabilities").exists() {
                        mk(id, title, Status::Warn, "MIG on, no GPU instances: the GPU cannot run work", create)
                    } else {
                        mk(id, title, Status::Pass, format!("MIG {}", on_off(m.current)), "")
                    };
                }
                None => {}
            }
            match proc_mig(root, g.index) {
                None => mk(id, title, Status::Skip, "not MIG-capable (or driver not loaded)", ""),
                Some(0) => mk(id, title, Status::Pass, "MIG-capable; MIG off or no GPU instances", ""),
                Some(n) => mk(id, title, Status::Pass, format!("MIG on, {n} GPU instances"), ""),
            }
        })
        .collect()
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Names of running processes (`/proc/<pid>/comm`).
fn processes(root: &HostRoot) -> Vec<String> {
    dir_entries(root, "/proc")
        .into_iter()
        .filter(|p| p.chars().all(|c| c.is_ascii_digit()))
        .filter_map(|p| root.read_trimmed(format!("/proc/{p}/comm")))
        .collect()
}

/// NVSwitch bridges (vendor 0x10de, class 0x0680).
fn nvswitches(root: &HostRoot) -> Vec<String> {
    dir_entries(root, "/sys/bus/pci/devices")
        .into_iter()
        .filter_map(|a| PciFunction::read(root, &a))
        .filter(|f| f.is_nvidia() && f.class.starts_with("0x0680"))
        .map(|f| f.address)
        .collect()
}

fn fabricmanager(root: &HostRoot) -> Check {
    let title = "nvidia-fabricmanager on NVSwitch systems";
    let switches = nvswitches(root);
    if switches.is_empty() {
        return mk("fabricmanager", title, Status::Skip, "no NVSwitch", "");
    }
    if processes(root)
        .iter()
        .any(|p| p == "nv-fabricmanager" || p == "nvidia-fabricmanager")
    {
        mk(
            "fabricmanager",
            title,
            Status::Pass,
            format!("{} NVSwitches, fabric manager running", switches.len()),
            "",
        )
    } else {
        mk(
            "fabricmanager",
            title,
            Status::Fail,
            format!("{} NVSwitches but no fabric manager: CUDA fails to initialise on these GPUs", switches.len()),
            "install nvidia-fabricmanager of the driver's version and `systemctl enable --now nvidia-fabricmanager`",
        )
    }
}

fn persistenced(root: &HostRoot, gpus: &[GpuDevice]) -> Check {
    let title = "NVIDIA persistence daemon";
    if !gpus.iter().any(|g| g.driver.as_deref() == Some("nvidia")) {
        return mk(
            "persistenced",
            title,
            Status::Skip,
            "no GPU on the nvidia driver",
            "",
        );
    }
    if processes(root).iter().any(|p| p == "nvidia-persistenced") {
        mk(
            "persistenced",
            title,
            Status::Pass,
            "nvidia-persistenced running",
            "",
        )
    } else {
        mk(
            "persistenced",
            title,
            Status::Warn,
            "nvidia-persistenced not running: each container start re-initialises the GPU (seconds)",
            "systemctl enable --now nvidia-persistenced",
        )
    }
}

fn security(root: &HostRoot) -> Check {
    let title = "AppArmor / SELinux";
    let apparmor = root
        .read_trimmed("/sys/module/apparmor/parameters/enabled")
        .is_some_and(|v| v == "Y");
    let selinux = root.read_trimmed("/sys/fs/selinux/enforce");
    match (apparmor, selinux.as_deref()) {
        (true, _) => mk("lsm", title, Status::Pass, "AppArmor enabled: instances get the gpuvisor-default profile", ""),
        (false, Some("1")) => mk("lsm", title, Status::Pass, "SELinux enforcing", ""),
        (false, Some(_)) => mk("lsm", title, Status::Warn, "SELinux permissive, no AppArmor", "set SELinux to enforcing for an extra confinement layer"),
        (false, None) => mk(
            "lsm",
            title,
            Status::Warn,
            "neither AppArmor nor SELinux: instances rely on namespaces, seccomp and capabilities only",
            "enable AppArmor (apparmor=1 security=apparmor) if the kernel has it",
        ),
    }
}

fn device_modes(root: &HostRoot) -> Check {
    let title = "GPU and VFIO device permissions";
    let mut open = Vec::new();
    let mut scan = |dir: &str, keep: &dyn Fn(&str) -> bool| {
        for name in dir_entries(root, dir).into_iter().filter(|n| keep(n)) {
            let host = format!("{dir}/{name}");
            if let Ok(md) = std::fs::metadata(root.path(&host)) {
                if md.permissions().mode() & 0o006 != 0 {
                    open.push(format!("{host} ({:o})", md.permissions().mode() & 0o777));
                }
            }
        }
    };
    scan("/dev", &|n| n.starts_with("nvidia") && n != "nvidia-caps");
    // /dev/vfio/vfio is the container node, world-accessible by design; groups must not be.
    scan("/dev/vfio", &|n| n != "vfio");
    if open.is_empty() {
        mk(
            "device_modes",
            title,
            Status::Pass,
            "no world-accessible /dev/nvidia* or /dev/vfio/<group>",
            "",
        )
    } else {
        mk(
            "device_modes",
            title,
            Status::Warn,
            format!("world-accessible: {}", open.join(", ")),
            "any local user can use these GPUs outside gpuvisor: set NVreg_DeviceFileMode=0660 (options nvidia in /etc/modprobe.d) and chmod o-rw the /dev/vfio groups",
        )
    }
}

/// `v2`, `hybrid` or `v1`, from the cgroup mounts in mountinfo.
pub fn cgroup_layout(root: &HostRoot) -> Option<&'static str> {
    let text = std::fs::read_to_string(root.path("/proc/self/mountinfo")).ok()?;
    let mut v2_at = Vec::new();
    let mut v1 = false;
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split_whitespace().nth(4).unwrap_or("");
        match right.split_whitespace().next() {
            Some("cgroup2") => v2_at.push(mount_point.to_string()),
            Some("cgroup") => v1 = true,
            _ => {}
        }
    }
    match (v1, v2_at.iter().any(|m| m == "/sys/fs/cgroup")) {
        (false, true) => Some("v2"),
        (true, _) if !v2_at.is_empty() => Some("hybrid"),
        (true, _) => Some("v1"),
        (false, false) if !v2_at.is_empty() => Some("v2"),
        _ => None,
    }
}

fn cgroups(root: &HostRoot) -> Check {
    let title = "cgroup layout";
    match cgroup_layout(root) {
        Some("v2") => mk("cgroup", title, Status::Pass, "cgroup v2 (unified)", ""),
        Some("hybrid") => mk(
            "cgroup",
            title,
            Status::Warn,
            "hybrid (v1 controllers, v2 for systemd): runc works, crun refuses",
            "boot with systemd.unified_cgroup_hierarchy=1 for cgroup v2",
        ),
        Some(_) => mk(
            "cgroup",
            title,
            Status::Warn,
            "cgroup v1 only",
            "boot with systemd.unified_cgroup_hierarchy=1 for cgroup v2",
        ),
        None => mk(
            "cgroup",
            title,
            Status::Fail,
            "no cgroup filesystem mounted",
            "mount cgroup2 on /sys/fs/cgroup",
        ),
    }
}

fn kvm(root: &HostRoot) -> Check {
    let title = "KVM for micro-VMs";
    if root.path("/dev/kvm").exists() {
        mk("kvm", title, Status::Pass, "/dev/kvm present", "")
    } else {
        mk(
            "kvm",
            title,
            Status::Warn,
            "no /dev/kvm: micro-VM instances are unavailable (containers work)",
            "enable VT-x/AMD-V in firmware and load kvm_intel or kvm_amd",
        )
    }
}

/// How micro-VMs run here: the verdict of the daemon's KVM probe (a tiny guest booted once per
/// host boot under KVM; cached in /run/gpuvisor).
fn vm_accel(root: &HostRoot) -> Check {
    let title = "micro-VM acceleration (KVM probe)";
    match crate::vm::qemu::cached_accel(root) {
        Some(crate::vm::Accel::Kvm) => mk(
            "vm_accel",
            title,
            Status::Pass,
            "kvm: a probe guest booted under KVM",
            "",
        ),
        Some(crate::vm::Accel::Tcg { reason }) => mk(
            "vm_accel",
            title,
            Status::Warn,
            format!("tcg: {reason}"),
            "VMs run under TCG emulation (slow); use a host with working hardware virtualisation",
        ),
        None => mk(
            "vm_accel",
            title,
            Status::Skip,
            "not probed on this boot: `gpuvisor serve` boots a probe guest at start (with --vm-kernel)",
            "",
        ),
    }
}

/// vsock for VMs (a CID per instance) needs /dev/vhost-vsock.
fn vsock(root: &HostRoot) -> Check {
    let title = "vsock for micro-VMs";
    match crate::vm::qemu::vsock_missing(root) {
        None => mk("vsock", title, Status::Pass, "/dev/vhost-vsock present", ""),
        Some(why) => mk(
            "vsock",
            title,
            Status::Warn,
            why,
            "load the vhost_vsock module (VMs start without a vsock device meanwhile)",
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::testfx::{Fx, Pci, GPU, GPU_AUDIO};

    fn run(fx: &Fx) -> Vec<Check> {
        check(&fx.root(), &NvmlFacts::default())
    }

    fn get<'a>(checks: &'a [Check], id: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.id == id)
            .unwrap_or_else(|| panic!("no check {id}: {checks:#?}"))
    }

    fn status(checks: &[Check], id: &str) -> Status {
        get(checks, id).status
    }

    #[test]
    fn clean_host_passes() {
        let fx = Fx::clean();
        let c = run(&fx);
        for c in &c {
            assert_ne!(c.status, Status::Fail, "{c:?}");
        }
        assert!(passed(&c));
        let ids: Vec<&str> = c.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(
            ids,
            vec![
                "kernel",
                "iommu",
                "iommu_group:0000:3b:00.0",
                "vfio_pci",
                "passthrough:0000:3b:00.0",
                "ovmf",
                "sriov:0000:3b:00.0",
                "bars:0000:3b:00.0",
                "driver",
                "mig:0000:3b:00.0",
                "fabricmanager",
                "nvlink",
                "persistenced",
                "lsm",
                "device_modes",
                "cgroup",
                "kvm",
                "vm_accel",
                "vsock",
            ]
        );
        assert_eq!(status(&c, "kernel"), Status::Pass);
        assert_eq!(get(&c, "kernel").detail, "Linux 6.1.0-18-amd64");
        assert_eq!(status(&c, "iommu"), Status::Pass);
        let g = get(&c, "iommu_group:0000:3b:00.0");
        assert_eq!(g.status, Status::Pass);
        assert_eq!(
            g.detail,
            "group 17 with its own 0000:3b:00.1 (audio, snd_hda_intel)"
        );
        assert_eq!(status(&c, "vfio_pci"), Status::Pass);
        assert_eq!(status(&c, "sriov:0000:3b:00.0"), Status::Skip);
        let b = get(&c, "bars:0000:3b:00.0");
        assert_eq!(b.status, Status::Pass);
        assert!(
            b.detail
                .contains("BAR1 128GiB (64-bit prefetchable, above 4 GiB)"),
            "{}",
            b.detail
        );
        let d = get(&c, "driver");
        assert_eq!(d.status, Status::Pass);
        assert_eq!(d.detail, "kernel module 550.54.15, libcuda 550.54.15");
        assert_eq!(status(&c, "mig:0000:3b:00.0"), Status::Skip);
        assert_eq!(status(&c, "fabricmanager"), Status::Skip);
        assert_eq!(status(&c, "persistenced"), Status::Pass);
        assert_eq!(status(&c, "lsm"), Status::Pass);
        assert_eq!(status(&c, "device_modes"), Status::Pass);
        assert_eq!(get(&c, "cgroup").detail, "cgroup v2 (unified)");
        assert_eq!(status(&c, "kvm"), Status::Pass);
        for c in c.iter().filter(|c| c.status == Status::Pass) {
            assert!(c.remedy.is_empty(), "{c:?}");
        }
    }

    #[test]
    fn shared_group_fails_and_names_the_sata_controller() {
        let c = run(&Fx::shared_group());
        let g = get(&c, "iommu_group:0000:3b:00.0");
        assert_eq!(g.status, Status::Fail);
        assert_eq!(
            g.detail,
            "group 17 shared with 0000:3a:00.0 (SATA controller, ahci)"
        );
        assert!(g.remedy.contains("ACS"));
        assert!(!passed(&c));
    }

    #[test]
    fn group_shared_with_a_bridge_or_another_gpu() {
        let fx = Fx::clean();
        fx.pci(&Pci {
            addr: "0000:3c:00.0",
            vendor: "0x10de",
            device: "0x2330",
            class: "0x030200",
            driver: Some("nvidia"),
            group: Some(17),
        });
        let c = run(&fx);
        let g = get(&c, "iommu_group:0000:3b:00.0");
        assert_eq!(g.status, Status::Warn, "{g:?}");
        assert!(g.detail.contains("other GPUs: 0000:3c:00.0"));
        fx.pci(&Pci {
            addr: "0000:00:01.0",
            vendor: "0x8086",
            device: "0x1901",
            class: "0x060400",
            driver: Some("pcieport"),
            group: Some(17),
        });
        // A bridge may share a VM's group: it stays on the host, the other GPU still warns.
        let g = run(&fx)
            .into_iter()
            .find(|c| c.id == "iommu_group:0000:3b:00.0")
            .unwrap();
        assert_eq!(g.status, Status::Warn);
        assert!(
            g.detail
                .contains("0000:00:01.0 (PCI bridge, pcieport) stays on the host"),
            "{}",
            g.detail
        );
        // A bridge alone in the GPU's group passes.
        let fx = Fx::clean();
        fx.pci(&Pci {
            addr: "0000:00:01.0",
            vendor: "0x8086",
            device: "0x1901",
            class: "0x060400",
            driver: Some("pcieport"),
            group: Some(17),
        });
        let c = run(&fx);
        let g = get(&c, "iommu_group:0000:3b:00.0");
        assert_eq!(g.status, Status::Pass, "{g:?}");
        assert_eq!(status(&c, "passthrough:0000:3b:00.0"), Status::Pass);
    }

    fn vfio_host() -> Fx {
        let fx = Fx::clean();
        fx.set_driver(GPU, Some("vfio-pci"));
        fx.set_driver(GPU_AUDIO, Some("vfio-pci"));
        fx.file("/dev/vfio/17", "");
        fx.file(crate::vm::passthrough::OVMF_CODE, "");
        fx.file(crate::vm::passthrough::OVMF_VARS, "");
        fx
    }

    /// Review findings 1 and 5 in host check: an NVMe drive on vfio-pci, or a bridge on a
    /// driver other than pcieport, in the GPU's group fails both checks (it passed).
    #[test]
    fn a_vfio_bound_stranger_or_a_bound_bridge_fails_the_group() {
        for (addr, class, driver, what) in [
            (
                "0000:3c:00.0",
                "0x010802",
                "vfio-pci",
                "0000:3c:00.0 (NVMe controller, vfio-pci)",
            ),
            (
                "0000:00:01.0",
                "0x060400",
                "some_other_drv",
                "0000:00:01.0 (PCI bridge, some_other_drv)",
            ),
        ] {
            let fx = vfio_host();
            fx.pci(&Pci {
                addr,
                vendor: "0x8086",
                device: "0x1901",
                class,
                driver: Some(driver),
                group: Some(17),
            });
            let c = run(&fx);
            let g = get(&c, "iommu_group:0000:3b:00.0");
            assert_eq!(g.status, Status::Fail, "{g:?}");
            assert!(g.detail.contains(what), "{}", g.detail);
            let p = get(&c, "passthrough:0000:3b:00.0");
            assert_eq!(p.status, Status::Fail, "{p:?}");
            assert!(p.detail.contains(what), "{}", p.detail);
        }
    }

    /// Review finding 11: two vfio-pci GPUs sharing a group can go to one VM together
    /// (`--gpus 2`): a warning saying so, not a failure each.
    #[test]
    fn two_vfio_gpus_sharing_a_group_warn_and_say_together() {
        let fx = vfio_host();
        fx.pci(&Pci {
            addr: "0000:3c:00.0",
            vendor: "0x10de",
            device: "0x2330",
            class: "0x030200",
            driver: Some("vfio-pci"),
            group: Some(17),
        });
        fx.bars("0000:3c:00.0", 0x48_0000_0000, 128 << 30);
        let c = run(&fx);
        let p = get(&c, "passthrough:0000:3b:00.0");
        assert_eq!(p.status, Status::Warn, "{p:?}");
        assert!(
            p.detail.contains(
                "together with GPU 0000:3c:00.0 (same IOMMU group: a VM gets them with --gpus 2)"
            ) && p
                .detail
                .contains("0000:3b:00.0, 0000:3b:00.1, 0000:3c:00.0"),
            "{}",
            p.detail
        );
    }

    /// Per GPU: its driver and whether it can go to a VM, with the passthrough plan when bound.
    #[test]
    fn gpu_driver_and_vm_passthrough() {
        let fx = Fx::clean();
        let p = get(&run(&fx), "passthrough:0000:3b:00.0").clone();
        assert_eq!(p.title, "GPU 0 (0000:3b:00.0): driver and VM passthrough");
        assert_eq!(
            (p.status, p.detail.as_str()),
            (
                Status::Pass,
                "on nvidia: for containers; can go to VMs (IOMMU group 17): `gpuvisor gpu bind-vfio 0000:3b:00.0` (admin) gives it to VMs"
            )
        );

        // Bound with its audio function, group device and firmware present.
        fx.set_driver(GPU, Some("vfio-pci"));
        fx.set_driver(GPU_AUDIO, Some("vfio-pci"));
        fx.file("/dev/vfio/17", "");
        fx.file(crate::vm::passthrough::OVMF_CODE, "");
        fx.file(crate::vm::passthrough::OVMF_VARS, "");
        let c = run(&fx);
        let p = get(&c, "passthrough:0000:3b:00.0");
        assert_eq!(
            (p.status, p.detail.as_str()),
            (
                Status::Pass,
                "on vfio-pci: for VMs only; IOMMU group 17: 0000:3b:00.0, 0000:3b:00.1; 64-bit MMIO window 256GiB; guest needs 39 physical address bits"
            )
        );
        assert_eq!(status(&c, "ovmf"), Status::Pass);

        // Its audio function left on the host driver: no VM can get the GPU.
        fx.set_driver(GPU_AUDIO, Some("snd_hda_intel"));
        let p = get(&run(&fx), "passthrough:0000:3b:00.0").clone();
        assert_eq!(p.status, Status::Fail);
        assert!(
            p.detail.contains("0000:3b:00.1 (audio, snd_hda_intel)"),
            "{}",
            p.detail
        );

        // Firmware missing with a GPU bound: fail; without one bound: warn.
        fx.remove(crate::vm::passthrough::OVMF_VARS);
        let o = get(&run(&fx), "ovmf").clone();
        assert_eq!(o.status, Status::Fail);
        assert!(o.remedy.contains("apt-get install ovmf"), "{o:?}");
        assert_eq!(status(&run(&Fx::clean()), "ovmf"), Status::Warn);

        // A group shared with a SATA controller; no driver at all.
        let c = run(&Fx::shared_group());
        let p = get(&c, "passthrough:0000:3b:00.0");
        assert_eq!(p.status, Status::Warn);
        assert!(
            p.detail.contains("0000:3a:00.0 (SATA controller, ahci)"),
            "{}",
            p.detail
        );
        let fx = Fx::clean();
        fx.set_driver(GPU, None);
        let p = get(&run(&fx), "passthrough:0000:3b:00.0").clone();
        assert_eq!(
            (p.status, p.detail.as_str()),
            (
                Status::Warn,
                "no driver: neither containers nor VMs can use it"
            )
        );
        assert!(p.remedy.contains("gpuvisor gpu bind-vfio 0000:3b:00.0"));
    }

    #[test]
    fn nvlink_and_nvswitch_notes() {
        // Nothing linked: skip.
        assert_eq!(status(&run(&Fx::clean()), "nvlink"), Status::Skip);

        // Two GPUs linked by an NVLink bridge (NVML's view).
        let fx = Fx::clean();
        fx.pci(&Pci {
            addr: "0000:5e:00.0",
            vendor: "0x10de",
            device: "0x2330",
            class: "0x030200",
            driver: Some("nvidia"),
            group: Some(18),
        });
        let mut facts = NvmlFacts::default();
        facts.nvlink.insert(GPU.into(), vec!["0000:5e:00.0".into()]);
        facts.nvlink.insert("0000:5e:00.0".into(), vec![GPU.into()]);
        let n = get(&check(&fx.root(), &facts), "nvlink").clone();
        assert_eq!(
            (n.status, n.detail.as_str()),
            (
                Status::Pass,
                "NVLink peers: GPU 0 (0000:3b:00.0) ↔ GPU 1 (0000:5e:00.0); a VM keeps NVLink only when it has both GPUs of a pair"
            )
        );
        fx.set_driver("0000:5e:00.0", Some("vfio-pci"));
        let n = get(&check(&fx.root(), &facts), "nvlink").clone();
        assert_eq!(n.status, Status::Warn);
        assert!(
            n.detail.contains("bound to vfio-pci: GPU 1;")
                && n.detail.contains("may go to VMs of different tenants"),
            "{}",
            n.detail
        );

        // An NVSwitch system: the fabric, and what passthrough needs there.
        let fx = Fx::clean();
        fx.pci(&Pci {
            addr: "0000:c1:00.0",
            vendor: "0x10de",
            device: "0x22a3",
            class: "0x068000",
            driver: None,
            group: Some(90),
        });
        let mut facts = NvmlFacts::default();
        facts.nvlink.insert(GPU.into(), vec!["0000:c1:00.0".into()]);
        let n = get(&check(&fx.root(), &facts), "nvlink").clone();
        assert_eq!(n.status, Status::Pass);
        assert!(
            n.detail.starts_with("1 NVSwitches (0000:c1:00.0), 1 GPUs linked to them: the GPUs form one NVLink fabric"),
            "{}",
            n.detail
        );
        assert!(n.detail.contains("shared-NVSwitch mode"), "{}", n.detail);
        fx.set_driver(GPU, Some("vfio-pci"));
        let n = get(&run(&fx), "nvlink").clone();
        assert_eq!(n.status, Status::Warn);
        assert!(n.remedy.contains("FABRIC_MODE=1"), "{}", n.remedy);
    }

    #[test]
    fn iommu_off_fails() {
        let c = run(&Fx::iommu_off());
        let i = get(&c, "iommu");
        assert_eq!(i.status, Status::Fail);
        assert_eq!(
            i.detail,
            "command line: no iommu flag; IOMMU units: none; 0 IOMMU groups"
        );
        assert!(i.remedy.contains("intel_iommu=on"));
        assert_eq!(status(&c, "iommu_group:0000:3b:00.0"), Status::Fail);

        // Groups exist (default-on Intel IOMMU) without the flag: works, warned.
        let fx = Fx::clean();
        fx.file("/proc/cmdline", "ro quiet\n");
        assert_eq!(status(&run(&fx), "iommu"), Status::Warn);
        fx.file("/proc/cmdline", "ro intel_iommu=off\n");
        assert_eq!(status(&run(&fx), "iommu"), Status::Fail);
    }

    #[test]
    fn sriov_reports_virtual_functions() {
        let c = run(&Fx::sriov());
        let s = get(&c, "sriov:0000:3b:00.0");
        assert_eq!(s.status, Status::Pass);
        assert_eq!(s.detail, "16 virtual functions possible, 4 enabled");
    }

    #[test]
    fn mig_from_procfs_and_nvml() {
        let fx = Fx::mig();
        let c = run(&fx);
        let m = get(&c, "mig:0000:3b:00.0");
        assert_eq!(
            (m.status, m.detail.as_str()),
            (Status::Pass, "MIG on, 2 GPU instances")
        );

        // NVML: a pending change warns; MIG on without instances warns.
        let mut facts = NvmlFacts::default();
        facts.mig.insert(
            GPU.into(),
            Some(MigModes {
                current: false,
                pending: true,
            }),
        );
        let c = check(&fx.root(), &facts);
        assert_eq!(status(&c, "mig:0000:3b:00.0"), Status::Warn);
        let fx = Fx::clean();
        fx.mkdir("/proc/driver/nvidia/capabilities/gpu0/mig");
        facts.mig.insert(
            GPU.into(),
            Some(MigModes {
                current: true,
                pending: true,
            }),
        );
        let m = check(&fx.root(), &facts)
            .into_iter()
            .find(|c| c.id.starts_with("mig:"))
            .unwrap();
        assert_eq!(m.status, Status::Warn);
        assert!(m.remedy.contains("gpuvisor gpu mig create"));
        assert_eq!(status(&run(&fx), "mig:0000:3b:00.0"), Status::Pass);
        facts.mig.insert(GPU.into(), None);
        assert_eq!(
            status(&check(&fx.root(), &facts), "mig:0000:3b:00.0"),
            Status::Skip
        );
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_kernel("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel("garbage"), None);
        let fx = Fx::clean();
        fx.file("/proc/sys/kernel/osrelease", "5.4.0-150-generic\n");
        let k = run(&fx).remove(0);
        assert_eq!(k.status, Status::Fail);
        fx.file("/proc/sys/kernel/osrelease", "5.15.0\n");
        assert_eq!(run(&fx).remove(0).status, Status::Pass);
        fx.remove("/proc/sys/kernel/osrelease");
        assert_eq!(run(&fx).remove(0).status, Status::Warn);
    }

    #[test]
    fn vfio_module_states() {
        let fx = Fx::clean();
        fx.remove("/sys/bus/pci/drivers/vfio-pci");
        fx.remove("/sys/module/vfio_pci");
        let c = run(&fx);
        assert_eq!(status(&c, "vfio_pci"), Status::Fail);
        fx.file(
            "/lib/modules/6.1.0-18-amd64/kernel/drivers/vfio/pci/vfio-pci.ko.xz",
            "",
        );
        let v = get(&run(&fx), "vfio_pci").clone();
        assert_eq!(v.status, Status::Warn);
        assert!(v.remedy.contains("modprobe vfio-pci"));
        fx.file(
            "/lib/modules/6.1.0-18-amd64/modules.builtin",
            "kernel/drivers/vfio/vfio.ko\nkernel/drivers/vfio/pci/vfio-pci.ko\n",
        );
        assert_eq!(status(&run(&fx), "vfio_pci"), Status::Pass);
    }

    #[test]
    fn bars_without_above_4g_decoding() {
        let fx = Fx::clean();
        fx.bars(GPU, 0xc000_0000, 256 << 20);
        let b = get(&run(&fx), "bars:0000:3b:00.0").clone();
        assert_eq!(b.status, Status::Warn, "{b:?}");
        assert!(b.remedy.contains("Above 4G decoding"));
        let bars = parse_bars("0x00000000c0000000 0x00000000cfffffff 0x000000000014220c\n");
        assert_eq!(
            bars,
            vec![Bar {
                index: 0,
                start: 0xc000_0000,
                size: 256 << 20,
                is_64bit: true,
                prefetchable: true
            }]
        );
    }

    #[test]
    fn driver_mismatch_and_absence() {
        let fx = Fx::clean();
        fx.file("/usr/lib/x86_64-linux-gnu/libcuda.so.535.104.05", "elf");
        fx.remove("/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15");
        let mut facts = NvmlFacts {
            cuda_version: Some("12.4".into()),
            ..Default::default()
        };
        let d = get(&check(&fx.root(), &facts), "driver").clone();
        assert_eq!(d.status, Status::Fail);
        assert_eq!(
            d.detail,
            "kernel module 550.54.15 but libcuda 535.104.05, CUDA 12.4: versions differ"
        );
        // /sys/module/nvidia/version when procfs has none; NVML's version when no libcuda file.
        fx.remove("/proc/driver/nvidia/version");
        fx.remove("/usr/lib/x86_64-linux-gnu/libcuda.so.535.104.05");
        facts.driver_version = Some("550.54.15".into());
        assert_eq!(status(&check(&fx.root(), &facts), "driver"), Status::Pass);
        assert_eq!(status(&run(&fx), "driver"), Status::Warn);
        fx.remove("/sys/module/nvidia/version");
        assert_eq!(status(&run(&fx), "driver"), Status::Fail);
        assert_eq!(
            version_token("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue"),
            Some("550.54.15".into())
        );
    }

    #[test]
    fn no_gpus_skips_gpu_checks() {
        let fx = Fx::clean();
        fx.remove("/sys/bus/pci/devices");
        let c = run(&fx);
        assert_eq!(status(&c, "iommu_group"), Status::Skip);
        assert_eq!(status(&c, "persistenced"), Status::Skip);
        assert!(!c.iter().any(|c| c.id.starts_with("bars:")));
    }

    #[test]
    fn fabricmanager_on_nvswitch_hosts() {
        let fx = Fx::clean();
        fx.pci(&Pci {
            addr: "0000:c1:00.0",
            vendor: "0x10de",
            device: "0x22a3",
            class: "0x068000",
            driver: None,
            group: Some(90),
        });
        let f = get(&run(&fx), "fabricmanager").clone();
        assert_eq!(f.status, Status::Fail);
        assert!(f.remedy.contains("nvidia-fabricmanager"));
        fx.process(900, "nv-fabricmanager");
        assert_eq!(status(&run(&fx), "fabricmanager"), Status::Pass);
    }

    #[test]
    fn persistenced_missing_warns() {
        let fx = Fx::clean();
        fx.remove("/proc/812");
        assert_eq!(status(&run(&fx), "persistenced"), Status::Warn);
    }

    #[test]
    fn security_modules() {
        let fx = Fx::clean();
        fx.remove("/sys/module/apparmor");
        assert_eq!(status(&run(&fx), "lsm"), Status::Warn);
        fx.file("/sys/fs/selinux/enforce", "1");
        assert_eq!(get(&run(&fx), "lsm").detail, "SELinux enforcing");
        fx.file("/sys/fs/selinux/enforce", "0");
        assert_eq!(status(&run(&fx), "lsm"), Status::Warn);
    }

    #[test]
    fn world_accessible_devices_warn() {
        let fx = Fx::clean();
        fx.chmod("/dev/nvidiactl", 0o666);
        fx.file("/dev/vfio/17", "");
        fx.chmod("/dev/vfio/17", 0o666);
        let d = get(&run(&fx), "device_modes").clone();
        assert_eq!(d.status, Status::Warn);
        assert_eq!(
            d.detail,
            "world-accessible: /dev/nvidiactl (666), /dev/vfio/17 (666)"
        );
    }

    #[test]
    fn cgroup_layouts() {
        let fx = Fx::clean();
        fx.file(
            "/proc/self/mountinfo",
            "30 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n\
             31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
             32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
        );
        assert_eq!(cgroup_layout(&fx.root()), Some("hybrid"));
        assert_eq!(status(&run(&fx), "cgroup"), Status::Warn);
        fx.file(
            "/proc/self/mountinfo",
            "32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
        );
        assert_eq!(cgroup_layout(&fx.root()), Some("v1"));
        fx.file(
            "/proc/self/mountinfo",
            "25 1 8:1 / / rw - ext4 /dev/sda1 rw\n",
        );
        assert_eq!(status(&run(&fx), "cgroup"), Status::Fail);
    }

    #[test]
    fn vm_accel_and_vsock_are_reported_with_the_reason() {
        let fx = Fx::clean();
        let c = run(&fx);
        assert_eq!(status(&c, "vm_accel"), Status::Skip);
        assert_eq!(status(&c, "vsock"), Status::Warn);
        let boot = "0f0f0f0f-aaaa-bbbb-cccc-000000000001";
        fx.file("/proc/sys/kernel/random/boot_id", &format!("{boot}\n"));
        fx.file(
            &format!("/run/gpuvisor/vm-accel-{boot}.json"),
            r#"{"accel":"tcg","reason":"guests hang under KVM"}"#,
        );
        fx.file("/dev/vhost-vsock", "");
        let c = run(&fx);
        let a = get(&c, "vm_accel");
        assert_eq!(a.status, Status::Warn);
        assert_eq!(a.detail, "tcg: guests hang under KVM");
        assert_eq!(status(&c, "vsock"), Status::Pass);
    }

    #[test]
    fn kvm_missing_warns() {
        let fx = Fx::clean();
        fx.remove("/dev/kvm");
        assert_eq!(status(&run(&fx), "kvm"), Status::Warn);
    }

    #[test]
    fn serialises_for_json_output() {
        let c = mk("kvm", "KVM", Status::Pass, "ok", "");
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(j["status"], "pass");
        assert!(j.get("remedy").is_none());
    }
}
