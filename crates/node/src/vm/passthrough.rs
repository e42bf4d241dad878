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
//! - The IOMMU group is the unit: a VM gets every function of its GPUs' groups, each bound to
//!   vfio-pci (`gpu bind-vfio` moves a GPU's own functions, its HD audio, with it), or the plan is
//!   refused naming the device and its driver. PCI bridges (class 0x0604/0x0609) in a group stay
//!   on the host, as the kernel allows. A group holding a GPU the VM was not given is refused:
//!   two VMs can never share a group.
//! - Functions of one host slot stay together in one guest slot (function 0 `multifunction=on`),
//!   each slot behind its own `pcie-root-port` (chassis 64 and up, ids `gvrp<N>`, devices
//!   `gvpt<N>f<F>`; the ports take the first free slots of `pcie.0`): the guest driver sees a
//!   PCIe device, as on the host. The machine is q35 (CORE's builder uses it whenever a plan
//!   exists).
//! - The 64-bit MMIO window: OVMF's default aperture (32 GiB) cannot map an H100's 128 GiB BAR1,
//!   and a guest without the BAR mapped sees no GPU. The 64-bit memory BARs of every function
//!   (sysfs `resource`) are packed as the firmware packs them (per root port: the port's BARs,
//!   largest first, the port window aligned to its largest BAR; ports largest alignment first),
//!   1 GiB of headroom is added for the VM's own devices, and the result is rounded up to a
//!   power of two (at least 32 GiB). It is given to both QEMU (`-global
//!   q35-pcihost.pci-hole64-size`) and OVMF (`-fw_cfg opt/ovmf/X-PciMmio64Mb`).
//! - Firmware is Debian's `ovmf` package (`OVMF_CODE_4M.fd` read-only, a per-VM copy of
//!   `OVMF_VARS_4M.fd`); a missing file is an error naming the package.
//! - [`Node::passthrough`] maps an instance's GPU UUIDs to PCI addresses. On simulated GPUs it
//!   plans over the simulated backend's sysfs tree (`GpuBackend::passthrough_root`) and, since
//!   no device exists, moves the `-device` arguments into the notes: the full command line is
//!   produced and checked, nothing is attached.

use crate::hostcheck::parse_bars;
use crate::vfio::{self, PciFunction, VFIO_DRIVER};
use crate::{HostRoot, Node};
use gpuvisor_wire::format_size;
use std::collections::BTreeSet;
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
    #[error("{0:?} is not a PCI address (want 0000:3b:00.0)")]
    BadAddress(String),
    #[error("GPU {0} is given twice")]
    Duplicate(String),
    #[error("no PCI device {0} on this host")]
    NoDevice(String),
    #[error("{pci} ({what}) is not a GPU")]
    NotAGpu { pci: String, what: &'static str },
    #[error("no GPU {0} on this host (see `gpuvisor gpu list`)")]
    UnknownGpu(String),
    #[error("{uuid} is a MIG slice of GPU {parent}: a VM takes whole GPUs only")]
    MigSlice { uuid: String, parent: String },
    #[error("GPU {pci} is on {driver}, not vfio-pci: a VM takes a GPU by passthrough only; bind it with `gpuvisor gpu bind-vfio {pci}` (admin)")]
    GpuNotVfio { pci: String, driver: String },
    #[error("{pci} is in no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line, VT-d/AMD-Vi in firmware) and reboot")]
    NoIommuGroup { pci: String },
    #[error("IOMMU group {group} of GPU {gpu} also holds {member}, on {driver}, not vfio-pci: a VM gets the whole group; {remedy}")]
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
    #[error("OVMF firmware {} is missing: install Debian's ovmf package (`apt-get install ovmf`; scripts/install-deps does)", .path.display())]
    NoFirmware { path: PathBuf },
}

/// What a VM needs for its GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passthrough {
    /// QEMU arguments: the vfio-pci devices (whole IOMMU groups), the 64-bit MMIO window.
    pub args: Vec<String>,
    /// OVMF code (read-only) and a per-VM copy of the vars, to pass as pflash drives.
    pub firmware: Firmware,
    /// What was checked, for `instance get`/logs on simulated GPUs.
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
            .ok_or_else(|| PassthroughError::BadAddress(g.clone()))?;
        if wanted.contains(&pci) {
            return Err(PassthroughError::Duplicate(pci));
        }
        wanted.push(pci);
    }
    let mut notes = Vec::new();
    let mut groups_done: BTreeSet<u32> = BTreeSet::new();
    // Host slots in the order the guest gets them: (slot, functions sorted by address).
    let mut slots: Vec<(String, Vec<PciFunction>)> = Vec::new();
    for pci in &wanted {
        let gpu =
            PciFunction::read(sys, pci).ok_or_else(|| PassthroughError::NoDevice(pci.clone()))?;
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
        let (group, members) = vfio::iommu_group(sys, pci)
            .ok_or_else(|| PassthroughError::NoIommuGroup { pci: pci.clone() })?;
        if !groups_done.insert(group) {
            continue; // another of the VM's GPUs brought this group in
        }
        let dev = format!("/dev/vfio/{group}");
        if !sys.path(&dev).exists() {
            return Err(PassthroughError::NoGroupDevice {
                gpu: pci.clone(),
                path: PathBuf::from(dev),
            });
        }
        let mut passed = Vec::new();
        for m in members {
            if m.is_bridge() {
                notes.push(format!(
                    "IOMMU group {group}: {} stays on the host (a bridge may share a VM's group)",
                    m.describe()
                ));
                continue;
            }
            if m.address != *pci && m.is_gpu() && !wanted.contains(&m.address) {
                return Err(PassthroughError::ForeignGpu {
                    gpu: pci.clone(),
                    group,
                    other: m.address,
                });
            }
            if m.driver.as_deref() != Some(VFIO_DRIVER) {
                let companion = m.is_nvidia() && slot_of(&m.address) == slot_of(pci);
                let remedy = if companion {
                    format!("`gpuvisor gpu bind-vfio {pci}` moves the GPU's own functions with it")
                } else {
                    "move the GPU to a slot with its own IOMMU group, or enable ACS".to_string()
                };
                return Err(PassthroughError::GroupNotVfio {
                    gpu: pci.clone(),
                    group,
                    member: m.describe(),
                    driver: driver_name(&m.driver),
                    remedy,
                });
            }
            passed.push(m);
        }
        notes.push(format!(
            "IOMMU group {group} ({dev}): {}",
            passed
                .iter()
                .map(PciFunction::describe)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        for f in passed {
            let s = slot_of(&f.address).to_string();
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
    let mut bar_total = 0u64;
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
        bar_total += sizes.iter().sum::<u64>();
        ports.push(port_window(&sizes));
    }
    let packed = pack(&ports);
    let window = mmio64_window(packed);

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
        "64-bit MMIO window {} for {} of 64-bit BARs ({} packed, plus {} headroom): the guest CPU needs at least {} physical address bits",
        format_size(window),
        format_size(bar_total),
        format_size(packed),
        format_size(MMIO64_HEADROOM),
        window.trailing_zeros() + 1
    ));
    notes.push(
        "VFIO pins all guest memory: QEMU's RLIMIT_MEMLOCK must cover the guest's RAM".to_string(),
    );
    notes.push(format!(
        "QEMU opens /dev/vfio/vfio and {} (an unprivileged QEMU needs them chowned to it)",
        groups_done
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
    Ok(Passthrough {
        args,
        firmware,
        notes,
    })
}

fn driver_name(d: &Option<String>) -> String {
    d.clone().unwrap_or_else(|| "no driver".to_string())
}

/// `0000:3b:00.1` → `0000:3b:00`.
fn slot_of(address: &str) -> &str {
    address.rsplit_once('.').map_or(address, |(s, _)| s)
}

/// A root port's prefetchable window: (size, alignment). Its BARs (powers of two) packed largest
/// first fill it without gaps; bridge windows have a 1 MiB granularity.
fn port_window(bars: &[u64]) -> (u64, u64) {
    let size: u64 = bars.iter().sum();
    let largest = bars.iter().copied().max().unwrap_or(0);
    (size.div_ceil(MIB) * MIB, largest.max(MIB))
}

/// The end of the ports' windows packed from 0, largest alignment first, each aligned.
fn pack(ports: &[(u64, u64)]) -> u64 {
    let mut sorted: Vec<(u64, u64)> = ports.iter().copied().filter(|(s, _)| *s > 0).collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    sorted.into_iter().fold(0u64, |end, (size, align)| {
        end.div_ceil(align) * align + size
    })
}

/// The window for `packed` bytes of BAR windows: plus headroom, a power of two, at least 32 GiB.
pub fn mmio64_window(packed: u64) -> u64 {
    (packed + MMIO64_HEADROOM)
        .checked_next_power_of_two()
        .unwrap_or(1 << 63)
        .max(MIN_MMIO64)
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
            let d = inventory
                .iter()
                .find(|d| d.uuid == *u)
                .ok_or_else(|| PassthroughError::UnknownGpu(u.clone()))?;
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
    Passthrough {
        args,
        firmware: p.firmware,
        notes,
    }
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
            "IOMMU group 17 of GPU 0000:3b:00.0 also holds 0000:3b:00.1 (audio, snd_hda_intel), on snd_hda_intel, not vfio-pci: a VM gets the whole group; `gpuvisor gpu bind-vfio 0000:3b:00.0` moves the GPU's own functions with it"
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
            PassthroughError::GroupNotVfio {
                member,
                driver,
                group,
                ..
            } => {
                assert_eq!(member, "0000:3a:00.0 (SATA controller, ahci)");
                assert_eq!(driver, "ahci");
                assert_eq!(*group, 17);
            }
            e => panic!("{e:?}"),
        }
        assert!(err.to_string().contains("enable ACS"), "{err}");

        // An unbound member is not vfio-pci's either.
        fx.set_driver(SATA, None);
        let err = plan(&fx, &[GPU]).unwrap_err();
        assert!(err.to_string().contains("on no driver"), "{err}");
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
            "IOMMU group 17: 0000:00:01.0 (PCI bridge, pcieport) stays on the host (a bridge may share a VM's group)"
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
            "GPU 0000:3b:00.0 is on nvidia, not vfio-pci: a VM takes a GPU by passthrough only; bind it with `gpuvisor gpu bind-vfio 0000:3b:00.0` (admin)"
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
            matches!(err, PassthroughError::NoIommuGroup { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn the_window_fits_the_bars_as_the_firmware_packs_them() {
        let h100 = [128 << 30, 32 << 20];
        let port = port_window(&h100);
        assert_eq!(port, ((128 << 30) + (32 << 20), 128 << 30));
        // One H100: 128 GiB + 32 MiB, + 1 GiB → 256 GiB.
        assert_eq!(mmio64_window(pack(&[port])), 256 << 30);
        // Two: the second port starts at the next 128 GiB boundary, 256 GiB.
        assert_eq!(pack(&[port, port]), (384 << 30) + (32 << 20));
        assert_eq!(mmio64_window(pack(&[port, port])), 512 << 30);
        // Eight (an HGX board): 1920 GiB + 32 MiB → 2 TiB.
        assert_eq!(mmio64_window(pack(&[port; 8])), 2048 << 30);
        // A 32 GiB BAR1 exactly: the headroom takes it to 64 GiB.
        assert_eq!(mmio64_window(pack(&[port_window(&[32 << 30])])), 64 << 30);
        // Small BARs: OVMF's default 32 GiB.
        assert_eq!(mmio64_window(pack(&[port_window(&[256 << 20])])), 32 << 30);
        assert_eq!(mmio64_window(0), 32 << 30);
        // Mixed ports pack largest alignment first.
        let small = port_window(&[16 << 20]);
        assert_eq!(pack(&[small, port]), (128 << 30) + (48 << 20));
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

    /// QEMU (Debian's 7.2) takes the arguments as they are: with the host's OVMF, a plan over
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
