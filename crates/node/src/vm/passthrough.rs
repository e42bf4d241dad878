//! Whole GPUs for a micro-VM by VFIO passthrough: the QEMU arguments (`-device vfio-pci` for
//! every function of the GPUs' IOMMU groups, behind PCIe root ports), the OVMF firmware, and a
//! 64-bit MMIO window large enough for the GPUs' BARs.
//!
//! Why here: what a VM may be given is decided by the host's IOMMU topology and by what the
//! drivers hold, both read from sysfs; the QEMU command line builder (`vm::qemu`) only appends
//! what [`plan_passthrough`] returns. Everything is read through a [`HostRoot`], so the full
//! argument list is golden-tested over fixture trees and produced for simulated GPUs too.
//!
//! Key decisions:
//! - The IOMMU group is the unit, sorted by the one rule of [`vfio::group_verdict`] (shared with
//!   `gpu bind-vfio` and `host check`): a VM gets its GPUs and their own functions (NVIDIA
//!   functions in a GPU's slot, its HD audio), each bound to vfio-pci (`gpu bind-vfio` moves
//!   them together), or the plan is refused naming the device. PCI bridges (class
//!   0x0604/0x0609) stay on the host only on `pcieport` or no driver, as the kernel allows; any
//!   other member (storage, a NIC, even on vfio-pci) refuses the group, as does a GPU the VM was
//!   not given: two VMs can never share a group. Group members are read fail-closed (an
//!   unreadable group or a name that is not a PCI address refuses it).
//! - Functions of one host slot stay together in one guest slot (function 0 `multifunction=on`),
//!   each slot behind its own `pcie-root-port` (chassis 64 and up, ids `gvrp<N>`, devices
//!   `gvpt<N>f<F>`; the ports take the first free slots of `pcie.0`): the guest driver sees a
//!   PCIe device, as on the host. The machine must be q35 (the VM runtime that consumes the plan
//!   is written separately).
//! - The 64-bit MMIO window: OVMF's default aperture (32 GiB) cannot map an H100's 128 GiB BAR1,
//!   and a guest without the BAR mapped sees no GPU. The 64-bit memory BARs of every function
//!   (sysfs `resource`) are packed as the firmware packs them (per root port: the port's BARs,
//!   largest first, the port window aligned to its largest BAR; ports largest alignment first),
//!   1 GiB of headroom is added for the VM's own devices, and the result is rounded up to a
//!   power of two (at least 32 GiB), all in checked arithmetic (BARs too large for any window
//!   are refused). It is given to both QEMU (`-global q35-pcihost.pci-hole64-size`) and OVMF
//!   (`-fw_cfg opt/ovmf/X-PciMmio64Mb`); a window beyond the host CPU's physical address bits
//!   (`/proc/cpuinfo` "address sizes") is refused, and [`Passthrough::min_phys_bits`] tells the
//!   VM runtime what the guest CPU needs.
//! - Firmware is Debian's `ovmf` package (`OVMF_CODE_4M.fd` read-only, a per-VM copy of
//!   `OVMF_VARS_4M.fd`); a missing file is an error naming the package.
//! - [`Node::passthrough`] maps an instance's GPU UUIDs to PCI addresses. On simulated GPUs it
//!   plans over the simulated backend's sysfs tree (`GpuBackend::passthrough_root`) and, since
//!   no device exists, moves the `-device` arguments into the notes: the plan is produced and
//!   checked, nothing is attached. The engine runs it at create, under the placement lock, so
//!   a VM whose GPUs cannot be passed is refused there with the plan's error.

use crate::hostcheck::parse_bars;
use crate::vfio::{self, PciFunction, VFIO_DRIVER};
use crate::{HostRoot, Node};
use gpuvisor_wire::format_size;
use std::path::PathBuf;
use thiserror::Error;

/// Debian's OVMF (package `ovmf`): the code, mapped read-only.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// The variable store template; each VM gets its own writable copy.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The smallest 64-bit window given (QEMU's and OVMF's own default for q35).
pub const MIN_MMIO64: u64 = 32 << 30;
/// Room in the window beyond the GPUs' BARs, for the VM's own devices' 64-bit BARs.
pub const MMIO64_HEADROOM: u64 = 1 << 30;
/// Root ports for passed-through slots are numbered from this chassis.
pub const CHASSIS_BASE: u32 = 64;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Debug, Error)]
pub enum PassthroughError {
    #[error("no GPU to pass through")]
    NoGpus,
    /// The host's side: a bad address, no such device, no IOMMU group, an unreadable group, a
    /// group shared with devices that are not the GPUs' ([`vfio::group_verdict`]).
    #[error(transparent)]
    Host(#[from] vfio::VfioError),
    #[error("GPU {0} is given twice")]
    Duplicate(String),
    #[error("{pci} ({what}) is not a GPU")]
    NotAGpu { pci: String, what: &'static str },
    #[error("no GPU {0} on this host (see `gpuvisor gpu list`)")]
    UnknownGpu(String),
    #[error("GPU {uuid} names two GPUs ({first} and {second}): the VM is given neither")]
    AmbiguousGpu {
        uuid: String,
        first: String,
        second: String,
    },
    #[error("{uuid} is a MIG slice of GPU {parent}: a VM takes whole GPUs only")]
    MigSlice { uuid: String, parent: String },
    #[error("GPU {pci} is on {driver}, not vfio-pci: a VM takes a GPU by passthrough only; an admin binds it with `gpuvisor gpu bind-vfio {pci}`")]
    GpuNotVfio { pci: String, driver: String },
    #[error("IOMMU group {group} of GPU {gpu} also holds {member}, not on vfio-pci: a VM gets the whole group; {remedy}")]
    GroupNotVfio {
        gpu: String,
        group: u32,
        /// The device as `vfio` describes it: `0000:3a:00.0 (SATA controller, ahci)`.
        member: String,
        driver: String,
        remedy: String,
    },
    #[error("IOMMU group {group} of GPU {gpu} also holds GPU {other}, which this VM was not given: GPUs sharing a group go to one VM together")]
    ForeignGpu {
        gpu: String,
        group: u32,
        other: String,
    },
    #[error("the VFIO group device {path} of GPU {gpu} does not exist: is vfio-pci bound (`gpuvisor gpu bind-vfio`) and the vfio module loaded?")]
    NoGroupDevice { gpu: String, path: PathBuf },
    #[error("cannot read the BARs of GPU {pci} ({path})")]
    NoBars { pci: String, path: PathBuf },
    #[error("the GPUs' 64-bit BARs ({bars}) are too large for any MMIO window")]
    BarsTooLarge { bars: String },
    #[error("the GPUs need a {} 64-bit MMIO window, so a guest with {needed} physical address bits, but this host's CPUs have {host}: the guest could not map the BARs", format_size(*.window))]
    WindowBeyondHost { window: u64, needed: u32, host: u32 },
    #[error("OVMF firmware {} is missing: install Debian's ovmf package (`apt-get install ovmf`; scripts/install-deps does)", .path.display())]
    NoFirmware { path: PathBuf },
}

/// What a VM needs for its GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passthrough {
    /// QEMU arguments: the vfio-pci devices (the GPUs and their own functions), the 64-bit
    /// MMIO window.
    pub args: Vec<String>,
    /// OVMF code (read-only) and a per-VM copy of the vars, to pass as pflash drives.
    pub firmware: Firmware,
    /// The PCI functions passed, in guest order (none attached on simulated GPUs).
    pub devices: Vec<String>,
    /// The IOMMU groups used: QEMU opens `/dev/vfio/vfio` and `/dev/vfio/<group>` for each.
    pub groups: Vec<u32>,
    /// The 64-bit MMIO window, bytes (`pci-hole64-size`).
    pub window: u64,
    /// The guest CPU needs at least this many physical address bits to map the window: the
    /// VM runtime gives `-cpu ...,host-phys-bits=on` (the plan already refused a host with
    /// fewer) or `phys-bits=` at least this.
    pub min_phys_bits: u32,
    /// What was checked, human-readable (the VM runtime may log them).
    pub notes: Vec<String>,
}

/// The UEFI firmware a passthrough VM boots with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firmware {
    pub code: PathBuf,
    pub vars_template: PathBuf,
}

/// For the PCI addresses of the instance's GPUs (all bound to vfio-pci), under a HostRoot
/// (fixture sysfs trees in tests).
pub fn plan_passthrough(root: &HostRoot, gpus: &[String]) -> Result<Passthrough, PassthroughError> {
    plan_with(root, root, gpus)
}

/// [`plan_passthrough`] with the devices read under `sys` and the firmware under `fw` (a
/// simulated backend's sysfs tree with the real host's OVMF).
pub fn plan_with(
    sys: &HostRoot,
    fw: &HostRoot,
    gpus: &[String],
) -> Result<Passthrough, PassthroughError> {
    if gpus.is_empty() {
        return Err(PassthroughError::NoGpus);
    }
    let mut wanted: Vec<String> = Vec::new();
    for g in gpus {
        let pci = crate::gpu::normalise_pci_address(g)
            .ok_or_else(|| vfio::VfioError::BadAddress(g.clone()))?;
        if wanted.contains(&pci) {
            return Err(PassthroughError::Duplicate(pci));
        }
        wanted.push(pci);
    }
    let mut notes = Vec::new();
    let mut groups_done: Vec<u32> = Vec::new();
    // Host slots in the order the guest gets them: (slot, functions sorted by address).
    let mut slots: Vec<(String, Vec<PciFunction>)> = Vec::new();
    for pci in &wanted {
        let gpu =
            PciFunction::read(sys, pci).ok_or_else(|| vfio::VfioError::NoDevice(pci.clone()))?;
        if !gpu.is_gpu() {
            return Err(PassthroughError::NotAGpu {
                pci: pci.clone(),
                what: vfio::class_name(&gpu.class),
            });
        }
        if gpu.driver.as_deref() != Some(VFIO_DRIVER) {
            return Err(PassthroughError::GpuNotVfio {
                pci: pci.clone(),
                driver: driver_name(&gpu.driver),
            });
        }
        let v = vfio::group_verdict(sys, pci, &wanted)?;
        let group = v.group;
        if groups_done.contains(&group) {
            continue; // another of the VM's GPUs brought this group in
        }
        groups_done.push(group);
        if let Some(other) = v.other_gpus.first() {
            return Err(PassthroughError::ForeignGpu {
                gpu: pci.clone(),
                group,
                other: other.address.clone(),
            });
        }
        if let Some(e) = v.refusal(pci) {
            return Err(e.into());
        }
        let dev = format!("/dev/vfio/{group}");
        if !sys.path(&dev).exists() {
            return Err(PassthroughError::NoGroupDevice {
                gpu: pci.clone(),
                path: PathBuf::from(dev),
            });
        }
        for b in &v.host_bridges {
            notes.push(format!(
                "IOMMU group {group}: {} stays on the host (a bridge on pcieport or no driver may share a VM's group)",
                b.describe()
            ));
        }
        if let Some(m) = v
            .pass
            .iter()
            .find(|m| m.driver.as_deref() != Some(VFIO_DRIVER))
        {
            return Err(PassthroughError::GroupNotVfio {
                gpu: pci.clone(),
                group,
                member: m.describe(),
                driver: driver_name(&m.driver),
                remedy: format!(
                    "an admin's `gpuvisor gpu bind-vfio {}` moves the GPU's own functions with it",
                    vfio::slot(&m.address).to_string() + ".0"
                ),
            });
        }
        notes.push(format!(
            "IOMMU group {group} ({dev}): {}",
            v.pass
                .iter()
                .map(PciFunction::describe)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        for f in v.pass {
            let s = vfio::slot(&f.address).to_string();
            match slots.iter_mut().find(|(k, _)| *k == s) {
                Some((_, fs)) => fs.push(f),
                None => slots.push((s, vec![f])),
            }
        }
    }
    for (_, fs) in &mut slots {
        fs.sort_by(|a, b| a.address.cmp(&b.address));
    }

    // The 64-bit BARs behind each root port.
    let mut ports = Vec::new();
    let mut all_bars: Vec<u64> = Vec::new();
    for (_, fs) in &slots {
        let mut sizes = Vec::new();
        for f in fs {
            let path = format!("/sys/bus/pci/devices/{}/resource", f.address);
            match std::fs::read_to_string(sys.path(&path)) {
                Ok(text) => sizes.extend(
                    parse_bars(&text)
                        .into_iter()
                        .filter(|b| b.is_64bit)
                        .map(|b| b.size),
                ),
                // A GPU without readable BARs cannot be sized; other functions have none.
                Err(_) if f.is_gpu() => {
                    return Err(PassthroughError::NoBars {
                        pci: f.address.clone(),
                        path: PathBuf::from(path),
                    })
                }
                Err(_) => {}
            }
        }
        all_bars.extend(&sizes);
        ports.push(port_window(&sizes));
    }
    let too_large = || PassthroughError::BarsTooLarge {
        bars: all_bars
            .iter()
            .map(|b| format_size(*b))
            .collect::<Vec<_>>()
            .join(" + "),
    };
    let bar_total = all_bars
        .iter()
        .try_fold(0u64, |t, b| t.checked_add(*b))
        .ok_or_else(too_large)?;
    let ports: Vec<(u64, u64)> = ports
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(too_large)?;
    let packed = pack(&ports).ok_or_else(too_large)?;
    let window = mmio64_window(packed).ok_or_else(too_large)?;
    let min_phys_bits = window.trailing_zeros() + 1;
    if let Some(host) = host_phys_bits(fw) {
        if min_phys_bits > host {
            return Err(PassthroughError::WindowBeyondHost {
                window,
                needed: min_phys_bits,
                host,
            });
        }
    }

    let firmware = Firmware {
        code: fw.path(OVMF_CODE),
        vars_template: fw.path(OVMF_VARS),
    };
    for p in [&firmware.code, &firmware.vars_template] {
        if !p.is_file() {
            return Err(PassthroughError::NoFirmware { path: p.clone() });
        }
    }

    let mut args = Vec::new();
    for (i, (_, fs)) in slots.iter().enumerate() {
        args.push("-device".to_string());
        args.push(format!(
            "pcie-root-port,id=gvrp{i},bus=pcie.0,chassis={}",
            CHASSIS_BASE + i as u32
        ));
        for (f, func) in fs.iter().zip(0u32..) {
            let mut dev = format!(
                "vfio-pci,host={},id=gvpt{i}f{func},bus=gvrp{i},addr=00.{func}",
                f.address
            );
            if func == 0 && fs.len() > 1 {
                dev.push_str(",multifunction=on");
            }
            args.push("-device".to_string());
            args.push(dev);
        }
    }
    args.push("-global".to_string());
    args.push(format!("q35-pcihost.pci-hole64-size={}G", window / GIB));
    args.push("-fw_cfg".to_string());
    args.push(format!(
        "name=opt/ovmf/X-PciMmio64Mb,string={}",
        window / MIB
    ));
    notes.push(format!(
        "64-bit MMIO window {} for {} of 64-bit BARs ({} packed, plus {} headroom): the guest CPU needs at least {min_phys_bits} physical address bits",
        format_size(window),
        format_size(bar_total),
        format_size(packed),
        format_size(MMIO64_HEADROOM),
    ));
    notes.push(
        "VFIO pins all guest memory: QEMU's RLIMIT_MEMLOCK must cover the guest's RAM".to_string(),
    );
    notes.push(format!(
        "QEMU opens /dev/vfio/vfio and {} (an unprivileged QEMU needs them chowned to it)",
        {
            let mut g = groups_done.clone();
            g.sort_unstable();
            g
        }
        .iter()
        .map(|g| format!("/dev/vfio/{g}"))
        .collect::<Vec<_>>()
        .join(", ")
    ));
    notes.push(format!(
        "firmware: {} (read-only) and a per-VM copy of {}",
        firmware.code.display(),
        firmware.vars_template.display()
    ));
    let devices = slots
        .iter()
        .flat_map(|(_, fs)| fs.iter().map(|f| f.address.clone()))
        .collect();
    Ok(Passthrough {
        args,
        firmware,
        devices,
        groups: groups_done,
        window,
        min_phys_bits,
        notes,
    })
}

/// The host CPU's physical address bits (`/proc/cpuinfo`: "address sizes : 46 bits physical,
/// 57 bits virtual"); `None` when not told.
pub fn host_phys_bits(root: &HostRoot) -> Option<u32> {
    let text = std::fs::read_to_string(root.path("/proc/cpuinfo")).ok()?;
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == "address sizes")
        .and_then(|(_, v)| v.trim().split_once(" bits physical"))
        .and_then(|(n, _)| n.trim().parse().ok())
}

fn driver_name(d: &Option<String>) -> String {
    d.clone().unwrap_or_else(|| "no driver".to_string())
}

/// A root port's prefetchable window: (size, alignment). Its BARs (powers of two) packed largest
/// first fill it without gaps; bridge windows have a 1 MiB granularity. `None` on overflow.
fn port_window(bars: &[u64]) -> Option<(u64, u64)> {
    let size = bars.iter().try_fold(0u64, |t, b| t.checked_add(*b))?;
    let largest = bars.iter().copied().max().unwrap_or(0);
    Some((size.checked_next_multiple_of(MIB)?, largest.max(MIB)))
}

/// The end of the ports' windows packed from 0, largest alignment first, each aligned. `None`
/// on overflow.
fn pack(ports: &[(u64, u64)]) -> Option<u64> {
    let mut sorted: Vec<(u64, u64)> = ports.iter().copied().filter(|(s, _)| *s > 0).collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    sorted.into_iter().try_fold(0u64, |end, (size, align)| {
        end.checked_next_multiple_of(align)?.checked_add(size)
    })
}

/// The window for `packed` bytes of BAR windows: plus headroom, a power of two, at least 32 GiB.
/// `None` when no 64-bit window can hold it.
pub fn mmio64_window(packed: u64) -> Option<u64> {
    Some(
        packed
            .checked_add(MMIO64_HEADROOM)?
            .checked_next_power_of_two()?
            .max(MIN_MMIO64),
    )
}

impl Node {
    /// The passthrough plan of an instance's GPUs, by UUID (`InstancePlan::gpus`); `None` when
    /// it has none. Real GPUs are read from the host's sysfs; simulated ones from the simulated
    /// backend's sysfs tree, with the `-device` arguments moved into the notes (nothing is
    /// attached) and the host's OVMF.
    pub fn passthrough(&self, uuids: &[String]) -> Result<Option<Passthrough>, PassthroughError> {
        if uuids.is_empty() {
            return Ok(None);
        }
        let inventory = self.gpus();
        let mut pcis = Vec::new();
        for u in uuids {
            let mut named = inventory.iter().filter(|d| d.uuid == *u);
            let d = named
                .next()
                .ok_or_else(|| PassthroughError::UnknownGpu(u.clone()))?;
            // One UUID on two GPUs would hand a VM whichever came first: refused.
            if let Some(other) = named.next() {
                return Err(PassthroughError::AmbiguousGpu {
                    uuid: u.clone(),
                    first: d.pci_address.clone(),
                    second: other.pci_address.clone(),
                });
            }
            if let Some(m) = &d.mig {
                return Err(PassthroughError::MigSlice {
                    uuid: u.clone(),
                    parent: m.slice.parent_uuid.clone(),
                });
            }
            pcis.push(d.pci_address.clone());
        }
        match self.gpu.passthrough_root() {
            None => plan_passthrough(&self.cfg.root, &pcis).map(Some),
            Some(sim) => plan_with(&sim, &self.cfg.root, &pcis).map(|p| Some(detached(p))),
        }
    }
}

/// A simulated plan: the `-device` arguments go to the notes, the rest stays.
pub fn detached(p: Passthrough) -> Passthrough {
    let mut args = Vec::new();
    let mut devices = Vec::new();
    let mut it = p.args.into_iter();
    while let Some(a) = it.next() {
        if a == "-device" {
            devices.extend(it.next().map(|d| format!("-device {d}")));
        } else {
            args.push(a);
        }
    }
    let mut notes = vec![format!(
        "simulated GPUs: not attached; a host with these GPUs gets {}",
        devices.join(" ")
    )];
    notes.extend(p.notes);
    Passthrough { args, notes, ..p }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::testfx::{Fx, Pci, GPU, GPU_AUDIO, SATA};

    const GPU2: &str = "0000:5e:00.0";
    const GPU2_AUDIO: &str = "0000:5e:00.1";
    const BRIDGE: &str = "0000:00:01.0";

    /// A host with OVMF, vfio-pci loaded and no PCI device yet.
    fn host() -> Fx {
        let fx = Fx::empty();
        fx.file(OVMF_CODE, "code");
        fx.file(OVMF_VARS, "vars");
        fx.mkdir("/sys/bus/pci/drivers/vfio-pci");
        fx.file("/dev/vfio/vfio", "");
        fx
    }

    /// An H100 (128 GiB BAR1) at `addr` in `group`, on `driver`, with its group device.
    fn h100(fx: &Fx, addr: &str, group: u32, driver: &str) {
        fx.pci(&Pci {
            addr,
            vendor: "0x10de",
            device: "0x2330",
            class: "0x030200",
            driver: Some(driver),
            group: Some(group),
        });
        fx.bars(addr, 0x38_0000_0000, 128 << 30);
        fx.file(&format!("/dev/vfio/{group}"), "");
    }

    fn audio(fx: &Fx, addr: &str, group: u32, driver: &str) {
        fx.pci(&Pci {
            addr,
            vendor: "0x10de",
            device: "0x22a3",
            class: "0x040300",
            driver: Some(driver),
            group: Some(group),
        });
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn plan(fx: &Fx, gpus: &[&str]) -> Result<Passthrough, PassthroughError> {
        let gpus: Vec<String> = gpus.iter().map(|s| s.to_string()).collect();
        plan_passthrough(&fx.root(), &gpus)
    }

    #[test]
    fn an_h100_alone_in_its_group() {
        let fx = host();
        h100(&fx, GPU, 17, "vfio-pci");
        let p = plan(&fx, &[GPU]).unwrap();
        assert_eq!(
            p.args,
            args(&[
                "-device",
                "pcie-root-port,id=gvrp0,bus=pcie.0,chassis=64",
                "-device",
                "vfio-pci,host=0000:3b:00.0,id=gvpt0f0,bus=gvrp0,addr=00.0",
                "-global",
                "q35-pcihost.pci-hole64-size=256G",
                "-fw_cfg",
                "name=opt/ovmf/X-PciMmio64Mb,string=262144",
            ])
        );
        assert_eq!(
            p.firmware,
            Firmware {
                code: fx.path(OVMF_CODE),
                vars_template: fx.path(OVMF_VARS),
            }
        );
        assert_eq!(
            p.notes[0],
            "IOMMU group 17 (/dev/vfio/17): 0000:3b:00.0 (GPU, vfio-pci)"
        );
        assert_eq!(
            p.notes[1],
            "64-bit MMIO window 256GiB for 128.03GiB of 64-bit BARs (128.03GiB packed, plus 1GiB headroom): the guest CPU needs at least 39 physical address bits"
        );
        assert!(p.notes.iter().any(|n| n.contains("RLIMIT_MEMLOCK")));
    }

    #[test]
    fn a_gpu_and_its_audio_function_share_a_guest_slot() {
        let fx = host();
        h100(&fx, GPU, 17, "vfio-pci");
        audio(&fx, GPU_AUDIO, 17, "vfio-pci");
        let p = plan(&fx, &["0000:3B:00.0"]).unwrap();
        assert_eq!(
            p.args,
            args(&[
                "-device",
                "pcie-root-port,id=gvrp0,bus=pcie.0,chassis=64",
                "-device",
                "vfio-pci,host=0000:3b:00.0,id=gvpt0f0,bus=gvrp0,addr=00.0,multifunction=on",
                "-device",
                "vfio-pci,host=0000:3b:00.1,id=gvpt0f1,bus=gvrp0,addr=00.1",
                "-global",
                "q35-pcihost.pci-hole64-size=256G",
                "-fw_cfg",
                "name=opt/ovmf/X-PciMmio64Mb,string=262144",
            ])
        );
        assert_eq!(
            p.notes[0],
            "IOMMU group 17 (/dev/vfio/17): 0000:3b:00.0 (GPU, vfio-pci), 0000:3b:00.1 (audio, vfio-pci)"
        );
    }

    #[test]
    fn a_group_member_on_another_driver_is_refused_by_name() {
        // The GPU's own audio function still on its host driver: bind-vfio fixes it.
        let fx = host();
        h100(&fx, GPU, 17, "vfio-pci");
        audio(&fx, GPU_AUDIO, 17, "snd_hda_intel");
        let err = plan(&fx, &[GPU]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "IOMMU group 17 of GPU 0000:3b:00.0 also holds 0000:3b:00.1 (audio, snd_hda_intel), not on vfio-pci: a VM gets the whole group; an admin's `gpuvisor gpu bind-vfio 0000:3b:00.0` moves the GPU's own functions with it"
        );

        // A SATA controller the host uses: only the hardware can fix it.
        let fx = host();
        h100(&fx, GPU, 17, "vfio-pci");
        fx.pci(&Pci {
            addr: SATA,
            vendor: "0x8086",
            device: "0xa182",
            class: "0x010601",
            driver: Some("ahci"),
            group: Some(17),
        });
        let err = plan(&fx, &[GPU]).unwrap_err();
        match &err {
            PassthroughError::Host(vfio::VfioError::SharedGroup { others, group, .. }) => {
                assert_eq!(
                    others,
                    &vec!["0000:3a:00.0 (SATA controller, ahci)".to_string()]
                );
                assert_eq!(*group, 17);
            }
            e => panic!("{e:?}"),
        }
        assert!(err.to_string().contains("enable ACS"), "{err}");

        // Unbound or on vfio-pci, it is still not the GPU's: refused the same.
        for driver in [None, Some("vfio-pci")] {
            fx.set_driver(SATA, driver);
            let err = plan(&fx, &[GPU]).unwrap_err();
            assert!(
                err.to_string()
                    .contains("also holds 0000:3a:00.0 (SATA controller"),
                "{err}"
            );
        }
    }

    /// Review finding 1 (the attack): an NVMe drive in the GPU's group, bound to vfio-pci,
    /// went into the VM as `-device vfio-pci,host=0000:3c:00.0`. Now the plan is refused,
    /// naming it, as bind-vfio refuses it.
    #[test]
    fn a_vfio_bound_nvme_in_the_group_is_refused_not_passed() {
        let fx = host();
        h100(&fx, GPU, 17, "vfio-pci");
        fx.pci(&Pci {
            addr: "0000:3c:00.0",
            vendor: "0x144d",
            device: "0xa808",
            class: "0x010802",
            driver: Some("vfio-pci"),
            group: Some(17),
        });
        let err = plan(&fx, &[GPU]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "IOMMU group 17 of 0000:3b:00.0 also holds 0000:3c:00.0 (NVMe controller, vfio-pci): a VM can only get a whole group; move the GPU to another slot or enable ACS"
        );
    }

    /// Review finding 5: a bridge on a driver other than pcieport makes the group not viable
    /// (QEMU: "group not viable"); the plan refuses it instead of skipping it.
    #[test]
    fn a_bridge_on_another_driver_is_refused() {
        let fx = host();
        h100(&fx, GPU, 17, "vfio-pci");
        fx.pci(&Pci {
            addr: BRIDGE,
            vendor: "0x8086",
            device: "0x1901",
            class: "0x060400",
            driver: Some("some_other_drv"),
            group: Some(17),
        });
        let err = plan(&fx, &[GPU]).unwrap_err();
        assert!(
            err.to_string().contains(
                "0000:00:01.0 (PCI bridge, some_other_drv) (a bridge may share a VM's group only on pcieport or no driver)"
            ),
            "{err}"
        );
        fx.set_driver(BRIDGE, None);
        assert!(plan(&fx, &[GPU]).is_ok());
    }

    /// Review finding 6 (the attack): a group entry named like an address with a QEMU option
    /// appended went into `-device vfio-pci,host=...` verbatim; an unreadable group read as
    /// the GPU alone. Both refuse the plan now.
    #[test]
    fn group_entries_cannot_inject_qemu_options_and_reads_fail_closed() {
        let fx = host();
        h100(&fx, GPU, 17, "vfio-pci");
        audio(&fx, GPU_AUDIO, 17, "vfio-pci");
        let gdir = fx.path("/sys/kernel/iommu_groups/17/devices");
        let evil = "0000:3b:00.1,x-igd-opregion=on";
        std::fs::rename(gdir.join(GPU_AUDIO), gdir.join(evil)).unwrap();
        // What sysfs describes under that name, so only the name check stands in the way.
        let real = fx.path(&format!("/sys/devices/pci0000:00/{GPU_AUDIO}"));
        std::os::unix::fs::symlink(&real, fx.path(&format!("/sys/bus/pci/devices/{evil}")))
            .unwrap();
        let err = plan(&fx, &[GPU]).unwrap_err();
        assert!(
            matches!(&err, PassthroughError::Host(vfio::VfioError::BadGroupEntry { name, .. }) if name == evil),
            "{err:?}"
        );
        std::fs::remove_file(gdir.join(evil)).unwrap();
        std::fs::remove_dir_all(&gdir).unwrap();
        std::fs::write(&gdir, "").unwrap();
        let err = plan(&fx, &[GPU]).unwrap_err();
        assert!(
            matches!(
                &err,
                PassthroughError::Host(vfio::VfioError::GroupUnreadable { group: 17, .. })
            ),
            "{err:?}"
        );
    }

    /// Review finding 7: the window arithmetic is checked (it panicked in debug, wrapped in
    /// release), and a window beyond the host CPU's physical address bits is refused.
    #[test]
    fn absurd_bars_and_too_few_address_bits_are_refused() {
        assert_eq!(mmio64_window(u64::MAX - 10), None);
        assert_eq!(port_window(&[1 << 63, 1 << 63]), None);
        assert_eq!(pack(&[(1 << 63, 1 << 63), (1 << 63, 1 << 63)]), None);
        assert_eq!(mmio64_window(1 << 63), None);
        let fx = host();
        h100(&fx, GPU, 17, "vfio-pci");
        fx.bars(GPU, 0x38_0000_0000, 1 << 63);
        let err = plan(&fx, &[GPU]).unwrap_err();
        assert!(
            matches!(err, PassthroughError::BarsTooLarge { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("too large for any MMIO window"),
            "{err}"
        );

        let fx = host();
        h100(&fx, GPU, 17, "vfio-pci");
        let p = plan(&fx, &[GPU]).unwrap();
        assert_eq!((p.window, p.min_phys_bits), (256 << 30, 39));
        assert_eq!(p.groups, vec![17]);
        assert_eq!(p.devices, vec![GPU.to_string()]);
        fx.file(
            "/proc/cpuinfo",
            "processor\t: 0\naddress sizes\t: 39 bits physical, 48 bits virtual\n",
        );
        assert!(plan(&fx, &[GPU]).is_ok(), "39 bits are enough");
        fx.file(
            "/proc/cpuinfo",
            "processor\t: 0\naddress sizes\t: 36 bits physical, 48 bits virtual\n",
        );
        let err = plan(&fx, &[GPU]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the GPUs need a 256GiB 64-bit MMIO window, so a guest with 39 physical address bits, but this host's CPUs have 36: the guest could not map the BARs"
        );
    }

    #[test]
    fn a_bridge_in_the_group_stays_on_the_host() {
        let fx = host();
        h100(&fx, GPU, 17, "vfio-pci");
        fx.pci(&Pci {
            addr: BRIDGE,
            vendor: "0x8086",
            device: "0x1901",
            class: "0x060400",
            driver: Some("pcieport"),
            group: Some(17),
        });
        let p = plan(&fx, &[GPU]).unwrap();
        assert_eq!(
            p.args,
            args(&[
                "-device",
                "pcie-root-port,id=gvrp0,bus=pcie.0,chassis=64",
                "-device",
                "vfio-pci,host=0000:3b:00.0,id=gvpt0f0,bus=gvrp0,addr=00.0",
                "-global",
                "q35-pcihost.pci-hole64-size=256G",
                "-fw_cfg",
                "name=opt/ovmf/X-PciMmio64Mb,string=262144",
            ])
        );
        assert_eq!(
            p.notes[0],
            "IOMMU group 17: 0000:00:01.0 (PCI bridge, pcieport) stays on the host (a bridge on pcieport or no driver may share a VM's group)"
        );
        assert_eq!(
            p.notes[1],
            "IOMMU group 17 (/dev/vfio/17): 0000:3b:00.0 (GPU, vfio-pci)"
        );
    }

    #[test]
    fn two_gpus_each_behind_its_own_root_port() {
        let fx = host();
        h100(&fx, GPU, 17, "vfio-pci");
        audio(&fx, GPU_AUDIO, 17, "vfio-pci");
        h100(&fx, GPU2, 18, "vfio-pci");
        audio(&fx, GPU2_AUDIO, 18, "vfio-pci");
        // In the order asked: the guest's first GPU is the second host GPU.
        let p = plan(&fx, &[GPU2, GPU]).unwrap();
        assert_eq!(
            p.args,
            args(&[
                "-device",
                "pcie-root-port,id=gvrp0,bus=pcie.0,chassis=64",
                "-device",
                "vfio-pci,host=0000:5e:00.0,id=gvpt0f0,bus=gvrp0,addr=00.0,multifunction=on",
                "-device",
                "vfio-pci,host=0000:5e:00.1,id=gvpt0f1,bus=gvrp0,addr=00.1",
                "-device",
                "pcie-root-port,id=gvrp1,bus=pcie.0,chassis=65",
                "-device",
                "vfio-pci,host=0000:3b:00.0,id=gvpt1f0,bus=gvrp1,addr=00.0,multifunction=on",
                "-device",
                "vfio-pci,host=0000:3b:00.1,id=gvpt1f1,bus=gvrp1,addr=00.1",
                "-global",
                "q35-pcihost.pci-hole64-size=512G",
                "-fw_cfg",
                "name=opt/ovmf/X-PciMmio64Mb,string=524288",
            ])
        );
        assert_eq!(p.notes.len(), 6, "{:#?}", p.notes);
        assert_eq!(
            p.notes[4],
            "QEMU opens /dev/vfio/vfio and /dev/vfio/17, /dev/vfio/18 (an unprivileged QEMU needs them chowned to it)"
        );
    }

    #[test]
    fn two_gpus_sharing_a_group_go_together_or_not_at_all() {
        let fx = host();
        h100(&fx, GPU, 17, "vfio-pci");
        h100(&fx, GPU2, 17, "vfio-pci");
        let err = plan(&fx, &[GPU]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "IOMMU group 17 of GPU 0000:3b:00.0 also holds GPU 0000:5e:00.0, which this VM was not given: GPUs sharing a group go to one VM together"
        );
        let p = plan(&fx, &[GPU, GPU2]).unwrap();
        let devices: Vec<&String> = p
            .args
            .iter()
            .filter(|a| a.starts_with("vfio-pci"))
            .collect();
        assert_eq!(devices.len(), 2, "the group once: {:?}", p.args);
    }

    #[test]
    fn a_gpu_on_the_host_driver_is_refused_with_the_bind_command() {
        let fx = host();
        h100(&fx, GPU, 17, "nvidia");
        let err = plan(&fx, &[GPU]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "GPU 0000:3b:00.0 is on nvidia, not vfio-pci: a VM takes a GPU by passthrough only; an admin binds it with `gpuvisor gpu bind-vfio 0000:3b:00.0`"
        );
    }

    #[test]
    fn missing_firmware_group_device_iommu_and_bad_input() {
        let fx = host();
        h100(&fx, GPU, 17, "vfio-pci");
        audio(&fx, GPU_AUDIO, 17, "vfio-pci");

        fx.remove(OVMF_VARS);
        let err = plan(&fx, &[GPU]).unwrap_err();
        assert!(
            matches!(err, PassthroughError::NoFirmware { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("OVMF_VARS_4M.fd"), "{err}");
        assert!(err.to_string().contains("ovmf package"), "{err}");
        fx.file(OVMF_VARS, "vars");

        fx.remove("/dev/vfio/17");
        let err = plan(&fx, &[GPU]).unwrap_err();
        assert!(err.to_string().contains("/dev/vfio/17"), "{err}");
        fx.file("/dev/vfio/17", "");

        fx.remove(&format!("/sys/devices/pci0000:00/{GPU}/resource"));
        let err = plan(&fx, &[GPU]).unwrap_err();
        assert!(matches!(err, PassthroughError::NoBars { .. }), "{err:?}");
        fx.bars(GPU, 0x38_0000_0000, 128 << 30);

        for (input, want) in [
            (vec![], "no GPU to pass through"),
            (vec!["gpu0"], "\"gpu0\" is not a PCI address"),
            (vec![GPU, "0000:3B:00.0"], "GPU 0000:3b:00.0 is given twice"),
            (vec!["0000:99:00.0"], "no PCI device 0000:99:00.0"),
            (vec![GPU_AUDIO], "0000:3b:00.1 (audio) is not a GPU"),
        ] {
            let err = plan(&fx, &input).unwrap_err();
            assert!(err.to_string().contains(want), "{input:?}: {err}");
        }
        assert!(plan(&fx, &[GPU]).is_ok(), "the fixture is whole again");

        let fx = Fx::iommu_off();
        fx.file(OVMF_CODE, "");
        fx.file(OVMF_VARS, "");
        fx.set_driver(GPU, Some("vfio-pci"));
        let err = plan(&fx, &[GPU]).unwrap_err();
        assert!(
            matches!(
                err,
                PassthroughError::Host(vfio::VfioError::NoIommuGroup { .. })
            ),
            "{err:?}"
        );
    }

    #[test]
    fn the_window_fits_the_bars_as_the_firmware_packs_them() {
        let h100 = [128 << 30, 32 << 20];
        let port = port_window(&h100).unwrap();
        assert_eq!(port, ((128 << 30) + (32 << 20), 128 << 30));
        // One H100: 128 GiB + 32 MiB, + 1 GiB → 256 GiB.
        assert_eq!(mmio64_window(pack(&[port]).unwrap()).unwrap(), 256 << 30);
        // Two: the second port starts at the next 128 GiB boundary, 256 GiB.
        assert_eq!(pack(&[port, port]), Some((384 << 30) + (32 << 20)));
        assert_eq!(
            mmio64_window(pack(&[port, port]).unwrap()).unwrap(),
            512 << 30
        );
        // Eight (an HGX board): 1920 GiB + 32 MiB → 2 TiB.
        assert_eq!(
            mmio64_window(pack(&[port; 8]).unwrap()).unwrap(),
            2048 << 30
        );
        // A 32 GiB BAR1 exactly: the headroom takes it to 64 GiB.
        assert_eq!(
            mmio64_window(pack(&[port_window(&[32 << 30]).unwrap()]).unwrap()).unwrap(),
            64 << 30
        );
        // Small BARs: OVMF's default 32 GiB.
        assert_eq!(
            mmio64_window(pack(&[port_window(&[256 << 20]).unwrap()]).unwrap()).unwrap(),
            32 << 30
        );
        assert_eq!(mmio64_window(0), Some(32 << 30));
        // Mixed ports pack largest alignment first.
        let small = port_window(&[16 << 20]).unwrap();
        assert_eq!(pack(&[small, port]), Some((128 << 30) + (48 << 20)));
    }

    /// `--simulate-gpus 1xH100-80GB:vfio,1xA100-80GB`: the backend lays out a sysfs tree the
    /// plan reads like a host's (firmware from the fixture root, as `Node::passthrough` takes
    /// it from the real one).
    #[test]
    fn simulated_vfio_gpus_are_planned_over_the_backends_tree() {
        use crate::gpu::{GpuBackend, SimulatedBackend};
        let fx = host();
        let dev = fx.path("/data/dev");
        let b = SimulatedBackend::new("1xH100-80GB:vfio,1xA100-80GB", &dev, &fx.root()).unwrap();
        let gpus = b.devices().unwrap();
        assert!(gpus[0].is_vfio() && !gpus[1].is_vfio());
        assert_eq!(gpus[0].iommu_group, Some(100));
        assert_eq!(gpus[0].pci_address, "0000:1b:00.0");
        let sim = b.passthrough_root().expect("a vfio GPU gives a tree");
        let p = plan_with(&sim, &fx.root(), &[gpus[0].pci_address.clone()]).unwrap();
        assert_eq!(
            p.args,
            args(&[
                "-device",
                "pcie-root-port,id=gvrp0,bus=pcie.0,chassis=64",
                "-device",
                "vfio-pci,host=0000:1b:00.0,id=gvpt0f0,bus=gvrp0,addr=00.0",
                "-global",
                "q35-pcihost.pci-hole64-size=256G",
                "-fw_cfg",
                "name=opt/ovmf/X-PciMmio64Mb,string=262144",
            ])
        );
        assert_eq!(p.firmware.code, fx.path(OVMF_CODE));
        assert_eq!(
            p.notes[0],
            "IOMMU group 100 (/dev/vfio/100): 0000:1b:00.0 (GPU, vfio-pci)"
        );
        let err = plan_with(&sim, &fx.root(), &[gpus[1].pci_address.clone()]).unwrap_err();
        assert!(
            matches!(&err, PassthroughError::GpuNotVfio { driver, .. } if driver == "nvidia"),
            "{err:?}"
        );
        // A new backend (a daemon restart) lays the tree out again, the same.
        let again =
            SimulatedBackend::new("1xH100-80GB:vfio,1xA100-80GB", &dev, &fx.root()).unwrap();
        let p2 = plan_with(
            &again.passthrough_root().unwrap(),
            &fx.root(),
            &[gpus[0].pci_address.clone()],
        )
        .unwrap();
        assert_eq!(p2, p);
        // Without a vfio GPU there is no tree.
        let plain =
            SimulatedBackend::new("1xA100-80GB", &fx.path("/data2/dev"), &fx.root()).unwrap();
        assert!(plain.passthrough_root().is_none());
        assert!(plain.devices().unwrap().iter().all(|g| g.driver.is_none()));
    }

    /// QEMU (the host's: 10.0 from bookworm-backports) takes the arguments as they are: with the host's OVMF, a plan over
    /// a fixture GPU gets as far as opening the (absent) host device, every argument before it
    /// parsed; the detached plan (simulated GPUs) starts the machine. Needs qemu-system-x86_64
    /// and ovmf (scripts/install-deps); a missing one fails under CI=true, else is a skip.
    #[test]
    fn qemu_accepts_the_arguments() {
        let qemu = "qemu-system-x86_64";
        let has_qemu = std::process::Command::new(qemu)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_qemu {
            crate::testfx::prerequisite_missing(
                "qemu-system-x86_64 (apt-get install qemu-system-x86)",
            );
            return;
        }
        if !std::path::Path::new(OVMF_CODE).is_file() || !std::path::Path::new(OVMF_VARS).is_file()
        {
            crate::testfx::prerequisite_missing("OVMF firmware (apt-get install ovmf)");
            return;
        }
        let fx = host();
        let (gpu, gpu_audio) = ("0000:ee:00.0", "0000:ee:00.1");
        h100(&fx, gpu, 17, "vfio-pci");
        audio(&fx, gpu_audio, 17, "vfio-pci");
        let p = plan_with(&fx.root(), &HostRoot::real(), &[gpu.to_string()]).unwrap();
        let run = |args: &[String]| {
            let vars = fx.path("/vars.fd");
            std::fs::copy(&p.firmware.vars_template, &vars).unwrap();
            let mut c = std::process::Command::new("timeout");
            c.args([
                "60",
                qemu,
                "-machine",
                "q35",
                "-accel",
                "tcg",
                "-nodefaults",
            ])
            .args(["-display", "none", "-S", "-monitor", "stdio", "-drive"])
            .arg(format!(
                "if=pflash,format=raw,readonly=on,file={}",
                p.firmware.code.display()
            ))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", vars.display()))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
            let mut child = c.spawn().unwrap();
            use std::io::Write;
            let _ = child
                .stdin
                .take()
                .unwrap()
                .write_all(b"qom-get /machine/q35 pci-hole64-size\nquit\n");
            child.wait_with_output().unwrap()
        };
        let out = run(&p.args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("-device vfio-pci,host=0000:ee:00.0")
                && err.contains("no such host device"),
            "QEMU refused something else: {err}"
        );
        let out = run(&detached(p.clone()).args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(&(256u64 << 30).to_string()), "{stdout}");
    }

    #[test]
    fn detached_moves_devices_to_the_notes() {
        let fx = host();
        h100(&fx, GPU, 17, "vfio-pci");
        let p = detached(plan(&fx, &[GPU]).unwrap());
        assert_eq!(
            p.args,
            args(&[
                "-global",
                "q35-pcihost.pci-hole64-size=256G",
                "-fw_cfg",
                "name=opt/ovmf/X-PciMmio64Mb,string=262144",
            ])
        );
        assert_eq!(
            p.notes[0],
            "simulated GPUs: not attached; a host with these GPUs gets -device pcie-root-port,id=gvrp0,bus=pcie.0,chassis=64 -device vfio-pci,host=0000:3b:00.0,id=gvpt0f0,bus=gvrp0,addr=00.0"
        );
    }
}
