//! Handing a GPU to vfio-pci for PCIe passthrough into a VM, and giving it back to the host driver.
//!
//! Why here: binding is a handful of sysfs writes, but their order matters and a wrong one leaves
//! a GPU with no driver at all, so the sequence lives in one place and is tested write by write.
//!
//! Key decisions:
//! - `driver_override` + `drivers_probe`, not `new_id`: the override names one device, so other
//!   GPUs of the same model stay on `nvidia`, and it survives the unbind/probe in between.
//! - The IOMMU group is the unit of isolation, sorted by one rule, [`group_verdict`], which
//!   bind-vfio, the passthrough plan and host check share: a group holding anything but the
//!   GPUs' own functions (HDMI audio, USB-C controller: NVIDIA functions in a GPU's slot) and
//!   harmless bridges is refused, naming the intruders, whatever driver they are on; the own
//!   functions are moved to vfio-pci with the GPU, since a group is only usable when all of it
//!   is. A bridge is harmless only on `pcieport` or no driver (the kernel's rule for a viable
//!   group); it stays on the host. Groups are read fail-closed ([`iommu_group`]).
//! - "Is the GPU in use?" is the engine's question (it knows the instances); this module only
//!   knows the host.
//! - Every write goes through [`SysWriter`], so tests record the exact sequence against a fixture
//!   tree whose "kernel" is a double (`testfx::Kernel`). The daemon's writer is the node's
//!   (`Node::sys_writer`, [`FsWriter`] unless a test replaced it).

use crate::HostRoot;
use std::path::{Path, PathBuf};
use thiserror::Error;

const DEVICES: &str = "/sys/bus/pci/devices";
const DRIVERS: &str = "/sys/bus/pci/drivers";
pub const VFIO_DRIVER: &str = "vfio-pci";
const NVIDIA_VENDOR: &str = "0x10de";

#[derive(Debug, Error)]
pub enum VfioError {
    #[error("{0:?} is not a PCI address (want 0000:3b:00.0)")]
    BadAddress(String),
    #[error("no PCI device {0} on this host")]
    NoDevice(String),
    #[error("{pci} is in no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line, VT-d/AMD-Vi in firmware) and reboot")]
    NoIommuGroup { pci: String },
    #[error("IOMMU group {group} of {pci} also holds {}: a VM can only get a whole group; move the GPU to another slot or enable ACS", .others.join(", "))]
    SharedGroup {
        pci: String,
        group: u32,
        others: Vec<String>,
    },
    #[error("cannot read IOMMU group {group} ({}): {source}", .path.display())]
    GroupUnreadable {
        group: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "IOMMU group {group} lists {name:?}, which is not a PCI address: the group is refused"
    )]
    BadGroupEntry { group: u32, name: String },
    #[error("vfio-pci is not available: load it with `modprobe vfio-pci`")]
    NoVfioDriver,
    #[error("writing {data:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        data: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{pci} is bound to {} after probing, not {want}", .got.as_deref().unwrap_or("no driver"))]
    NotBound {
        pci: String,
        want: String,
        got: Option<String>,
    },
}

/// How sysfs is written. The real one opens existing files only (sysfs attributes are never
/// created); tests substitute a recording double (`testfx::Kernel`), also through
/// `Node::with_sys_writer`.
pub trait SysWriter {
    /// Writes `data` to `path` (already mapped through the [`HostRoot`]).
    fn write(&self, path: &Path, data: &str) -> std::io::Result<()>;
}

/// Writes to the real files.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsWriter;

impl SysWriter for FsWriter {
    fn write(&self, path: &Path, data: &str) -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(data.as_bytes())
    }
}

/// One PCI function, as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    pub address: String,
    /// `0x10de`.
    pub vendor: String,
    /// `0x030200`.
    pub class: String,
    pub driver: Option<String>,
}

impl PciFunction {
    pub fn read(root: &HostRoot, address: &str) -> Option<Self> {
        let dir = format!("{DEVICES}/{address}");
        if !root.path(&dir).exists() {
            return None;
        }
        let read = |f: &str| {
            root.read_trimmed(format!("{dir}/{f}"))
                .unwrap_or_default()
                .to_ascii_lowercase()
        };
        Some(Self {
            address: address.to_string(),
            vendor: read("vendor"),
            class: read("class"),
            driver: crate::gpu::pci_driver(root, address),
        })
    }

    pub fn is_nvidia(&self) -> bool {
        self.vendor == NVIDIA_VENDOR
    }

    /// A display or 3D controller (class 0x03xxxx).
    pub fn is_gpu(&self) -> bool {
        self.class.starts_with("0x03")
    }

    /// A PCI-to-PCI bridge (root or switch port, class 0x0604) or a semi-transparent one
    /// (0x0609). A bridge bound to `pcieport` may share a group that is given to a VM (the
    /// driver manages its own DMA), so it stays on the host.
    pub fn is_bridge(&self) -> bool {
        self.class.starts_with("0x0604") || self.class.starts_with("0x0609")
    }

    /// What it is, for messages: `0000:3a:00.0 (SATA controller, ahci)`.
    pub fn describe(&self) -> String {
        let kind = class_name(&self.class);
        match &self.driver {
            Some(d) => format!("{} ({kind}, {d})", self.address),
            None => format!("{} ({kind})", self.address),
        }
    }
}

/// A readable name for the common PCI classes found in IOMMU groups.
pub fn class_name(class: &str) -> &'static str {
    let c = class.trim_start_matches("0x");
    let prefix = |p: &str| c.starts_with(p);
    if prefix("0300") || prefix("0302") || prefix("0380") {
        "GPU"
    } else if prefix("0403") {
        "audio"
    } else if prefix("0106") {
        "SATA controller"
    } else if prefix("0108") {
        "NVMe controller"
    } else if prefix("0200") || prefix("0207") {
        "network controller"
    } else if prefix("0604") {
        "PCI bridge"
    } else if prefix("0680") {
        "bridge (NVSwitch)"
    } else if prefix("0c03") {
        "USB controller"
    } else if prefix("0c80") || prefix("0c05") {
        "serial bus controller"
    } else {
        "device"
    }
}

/// `0000:3b:00.1` → `0000:3b:00` (the slot: domain, bus, device).
pub fn slot(address: &str) -> &str {
    address.rsplit_once('.').map_or(address, |(s, _)| s)
}

/// The IOMMU group of `pci` and every function in it (including `pci`), sorted by address.
/// Fails closed: a group directory that cannot be read, an entry whose name is not a PCI
/// address in the kernel's form (it would end up in a QEMU argument), or a listed device that
/// sysfs does not describe refuses the group rather than shrinking it.
pub fn iommu_group(root: &HostRoot, pci: &str) -> Result<(u32, Vec<PciFunction>), VfioError> {
    let group = crate::gpu::pci_iommu_group(root, pci).ok_or_else(|| VfioError::NoIommuGroup {
        pci: pci.to_string(),
    })?;
    let host_dir = format!("/sys/kernel/iommu_groups/{group}/devices");
    let unreadable = |source| VfioError::GroupUnreadable {
        group,
        path: PathBuf::from(&host_dir),
        source,
    };
    let mut members = Vec::new();
    for entry in std::fs::read_dir(root.path(&host_dir)).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if crate::gpu::normalise_pci_address(&name).as_deref() != Some(name.as_str()) {
            return Err(VfioError::BadGroupEntry { group, name });
        }
        members.push(PciFunction::read(root, &name).ok_or(VfioError::NoDevice(name))?);
    }
    if !members.iter().any(|m| m.address == pci) {
        members.push(PciFunction::read(root, pci).ok_or_else(|| VfioError::NoDevice(pci.into()))?);
    }
    members.sort_by(|a, b| a.address.cmp(&b.address));
    Ok((group, members))
}

/// What an IOMMU group means for giving some GPUs to one VM: the one rule `gpu bind-vfio`, the
/// passthrough plan and `host check` all apply ([`group_verdict`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupVerdict {
    pub group: u32,
    /// What goes with the GPUs (to vfio-pci, into the VM), sorted by address: the given GPUs in
    /// this group and their companions (NVIDIA functions in a given GPU's slot: HD audio,
    /// USB-C).
    pub pass: Vec<PciFunction>,
    /// Bridges on `pcieport` or on no driver: they stay on the host, as the kernel allows.
    pub host_bridges: Vec<PciFunction>,
    /// GPUs in the group that were not given: the group only goes with them.
    pub other_gpus: Vec<PciFunction>,
    /// Anything else (storage, NICs, bridges on another driver): the group cannot go to a VM.
    pub blockers: Vec<PciFunction>,
}

impl GroupVerdict {
    /// The refusal for moving or passing this group, when something in it is not the GPUs'.
    pub fn refusal(&self, pci: &str) -> Option<VfioError> {
        if self.other_gpus.is_empty() && self.blockers.is_empty() {
            return None;
        }
        Some(VfioError::SharedGroup {
            pci: pci.to_string(),
            group: self.group,
            others: self
                .other_gpus
                .iter()
                .chain(&self.blockers)
                .map(blocker_text)
                .collect(),
        })
    }
}

/// A blocker for messages; a bridge says why it blocks.
pub fn blocker_text(m: &PciFunction) -> String {
    if m.is_bridge() {
        format!(
            "{} (a bridge may share a VM's group only on pcieport or no driver)",
            m.describe()
        )
    } else {
        m.describe()
    }
}

/// A bridge the kernel lets stay on the host while the rest of its group is in a VM: one on
/// `pcieport` or unbound. On any other driver it makes the group not viable for VFIO.
pub fn is_harmless_bridge(m: &PciFunction) -> bool {
    m.is_bridge() && matches!(m.driver.as_deref(), None | Some("pcieport"))
}

/// Sorts the IOMMU group of GPU `pci` for giving `pci` and `gpus` (other GPUs going to the same
/// VM; may include `pci`) to one VM. Reads the group fail-closed ([`iommu_group`]).
pub fn group_verdict(
    root: &HostRoot,
    pci: &str,
    gpus: &[String],
) -> Result<GroupVerdict, VfioError> {
    let (group, members) = iommu_group(root, pci)?;
    let given = |a: &str| a == pci || gpus.iter().any(|g| g == a);
    let given_slots: Vec<&str> = members
        .iter()
        .filter(|m| given(&m.address))
        .map(|m| slot(&m.address))
        .collect();
    let mut v = GroupVerdict {
        group,
        pass: Vec::new(),
        host_bridges: Vec::new(),
        other_gpus: Vec::new(),
        blockers: Vec::new(),
    };
    for m in &members {
        let list = if given(&m.address) {
            &mut v.pass
        } else if m.is_gpu() {
            &mut v.other_gpus
        } else if m.is_nvidia() && given_slots.contains(&slot(&m.address)) {
            &mut v.pass
        } else if is_harmless_bridge(m) {
            &mut v.host_bridges
        } else {
            &mut v.blockers
        };
        list.push(m.clone());
    }
    Ok(v)
}

/// What a bind or release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub pci: String,
    pub iommu_group: Option<u32>,
    /// The functions moved (the GPU first, then its companions).
    pub functions: Vec<String>,
    /// The GPU's driver afterwards.
    pub driver: Option<String>,
    /// Nothing to do: already in the asked state.
    pub unchanged: bool,
}

fn check_address(pci: &str) -> Result<String, VfioError> {
    crate::gpu::normalise_pci_address(pci).ok_or_else(|| VfioError::BadAddress(pci.to_string()))
}

fn put(root: &HostRoot, w: &dyn SysWriter, host_path: &str, data: &str) -> Result<(), VfioError> {
    let path = root.path(host_path);
    w.write(&path, data).map_err(|source| VfioError::Write {
        path: PathBuf::from(host_path),
        data: data.to_string(),
        source,
    })
}

/// The GPU and its companions, GPU first; refuses a group shared with anything else (bridges
/// on `pcieport` or no driver stay on the host).
fn group_for_move(root: &HostRoot, pci: &str) -> Result<(u32, Vec<PciFunction>), VfioError> {
    let v = group_verdict(root, pci, &[])?;
    if let Some(e) = v.refusal(pci) {
        return Err(e);
    }
    let mut mine = v.pass;
    mine.sort_by_key(|m| (m.address != pci, m.address.clone()));
    Ok((v.group, mine))
}

/// Binds to vfio-pci. For each function, GPU first:
/// 1. `vfio-pci` → `/sys/bus/pci/devices/<pci>/driver_override`
/// 2. `<pci>` → `/sys/bus/pci/drivers/<current driver>/unbind` (when bound to something else)
/// 3. `<pci>` → `/sys/bus/pci/drivers_probe` (the kernel honours the override)
///
/// then checks that the GPU's driver link now names vfio-pci.
pub fn bind_vfio_with(root: &HostRoot, pci: &str, w: &dyn SysWriter) -> Result<Outcome, VfioError> {
    let pci = check_address(pci)?;
    let gpu = PciFunction::read(root, &pci).ok_or_else(|| VfioError::NoDevice(pci.clone()))?;
    let (group, funcs) = group_for_move(root, &pci)?;
    if funcs
        .iter()
        .all(|f| f.driver.as_deref() == Some(VFIO_DRIVER))
    {
        return Ok(Outcome {
            pci,
            iommu_group: Some(group),
            functions: vec![],
            driver: gpu.driver,
            unchanged: true,
        });
    }
    if !root.path(format!("{DRIVERS}/{VFIO_DRIVER}")).exists() {
        return Err(VfioError::NoVfioDriver);
    }
    let mut moved = Vec::new();
    for f in funcs
        .iter()
        .filter(|f| f.driver.as_deref() != Some(VFIO_DRIVER))
    {
        let a = &f.address;
        put(
            root,
            w,
            &format!("{DEVICES}/{a}/driver_override"),
            VFIO_DRIVER,
        )?;
        if let Some(d) = &f.driver {
            put(root, w, &format!("{DRIVERS}/{d}/unbind"), a)?;
        }
        put(root, w, "/sys/bus/pci/drivers_probe", a)?;
        moved.push(a.clone());
    }
    let driver = crate::gpu::pci_driver(root, &pci);
    if driver.as_deref() != Some(VFIO_DRIVER) {
        return Err(VfioError::NotBound {
            pci,
            want: VFIO_DRIVER.into(),
            got: driver,
        });
    }
    Ok(Outcome {
        pci,
        iommu_group: Some(group),
        functions: moved,
        driver,
        unchanged: false,
    })
}

/// Gives a vfio-pci GPU (and its companions on vfio-pci) back to the host. For each, GPU first:
/// 1. `\n` → `/sys/bus/pci/devices/<pci>/driver_override` (clears it)
/// 2. `<pci>` → `/sys/bus/pci/drivers/vfio-pci/unbind`
/// 3. `<pci>` → `/sys/bus/pci/drivers_probe` (the default driver, `nvidia`, claims it)
///
/// and `1` → `/sys/bus/pci/rescan` if a function vanished from the bus meanwhile.
/// Functions on another driver are left alone; group sharing is not checked (giving a device
/// back is always safe).
pub fn release_with(root: &HostRoot, pci: &str, w: &dyn SysWriter) -> Result<Outcome, VfioError> {
    let pci = check_address(pci)?;
    let gpu = PciFunction::read(root, &pci).ok_or_else(|| VfioError::NoDevice(pci.clone()))?;
    // A group that cannot be read whole still lets the GPU itself go back.
    let (group, mut funcs) = match group_verdict(root, &pci, &[]) {
        Ok(v) => (Some(v.group), v.pass),
        Err(_) => (crate::gpu::pci_iommu_group(root, &pci), vec![gpu.clone()]),
    };
    funcs.sort_by_key(|m| (m.address != pci, m.address.clone()));
    let on_vfio: Vec<&PciFunction> = funcs
        .iter()
        .filter(|f| f.driver.as_deref() == Some(VFIO_DRIVER))
        .collect();
    if on_vfio.is_empty() {
        return Ok(Outcome {
            pci,
            iommu_group: group,
            functions: vec![],
            driver: gpu.driver,
            unchanged: true,
        });
    }
    let mut moved = Vec::new();
    for f in on_vfio {
        let a = &f.address;
        put(root, w, &format!("{DEVICES}/{a}/driver_override"), "\n")?;
        put(root, w, &format!("{DRIVERS}/{VFIO_DRIVER}/unbind"), a)?;
        put(root, w, "/sys/bus/pci/drivers_probe", a)?;
        moved.push(a.clone());
    }
    if moved
        .iter()
        .any(|a| !root.path(format!("{DEVICES}/{a}")).exists())
    {
        put(root, w, "/sys/bus/pci/rescan", "1")?;
    }
    Ok(Outcome {
        pci: pci.clone(),
        iommu_group: group,
        functions: moved,
        driver: crate::gpu::pci_driver(root, &pci),
        unchanged: false,
    })
}

/// The kernel driver bound to a PCI function now (`nvidia`, `vfio-pci`), from sysfs.
pub fn current_driver(root: &HostRoot, pci: &str) -> Option<String> {
    crate::gpu::pci_driver(root, pci)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::testfx::{Fx, Kernel, GPU, GPU_AUDIO};

    fn w(path: &str, data: &str) -> (String, String) {
        (path.to_string(), data.to_string())
    }

    #[test]
    fn bind_writes_override_unbind_probe_for_gpu_then_audio() {
        let fx = Fx::clean();
        let root = fx.root();
        let k = Kernel::new(fx.root());
        let out = bind_vfio_with(&root, "0000:3B:00.0", &k).unwrap();
        assert_eq!(
            k.writes(),
            vec![
                w(
                    "/sys/bus/pci/devices/0000:3b:00.0/driver_override",
                    "vfio-pci"
                ),
                w("/sys/bus/pci/drivers/nvidia/unbind", "0000:3b:00.0"),
                w("/sys/bus/pci/drivers_probe", "0000:3b:00.0"),
                w(
                    "/sys/bus/pci/devices/0000:3b:00.1/driver_override",
                    "vfio-pci"
                ),
                w("/sys/bus/pci/drivers/snd_hda_intel/unbind", "0000:3b:00.1"),
                w("/sys/bus/pci/drivers_probe", "0000:3b:00.1"),
            ]
        );
        assert_eq!(out.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(out.iommu_group, Some(17));
        assert_eq!(out.functions, vec![GPU.to_string(), GPU_AUDIO.to_string()]);
        assert!(!out.unchanged);
        assert_eq!(
            current_driver(&root, GPU_AUDIO).as_deref(),
            Some("vfio-pci")
        );

        // Again: nothing to do, nothing written.
        let k2 = Kernel::new(fx.root());
        let again = bind_vfio_with(&root, GPU, &k2).unwrap();
        assert!(again.unchanged);
        assert!(k2.writes().is_empty());
    }

    #[test]
    fn bind_of_an_unbound_gpu_skips_unbind() {
        let fx = Fx::clean();
        fx.set_driver(GPU, None);
        fx.set_driver(GPU_AUDIO, Some("vfio-pci"));
        let k = Kernel::new(fx.root());
        bind_vfio_with(&fx.root(), GPU, &k).unwrap();
        assert_eq!(
            k.writes(),
            vec![
                w(
                    "/sys/bus/pci/devices/0000:3b:00.0/driver_override",
                    "vfio-pci"
                ),
                w("/sys/bus/pci/drivers_probe", "0000:3b:00.0"),
            ]
        );
    }

    #[test]
    fn bind_refuses_a_shared_group_and_names_the_intruder() {
        let fx = Fx::shared_group();
        let k = Kernel::new(fx.root());
        let err = bind_vfio_with(&fx.root(), GPU, &k).unwrap_err();
        match &err {
            VfioError::SharedGroup { group, others, .. } => {
                assert_eq!(*group, 17);
                assert_eq!(
                    others,
                    &vec!["0000:3a:00.0 (SATA controller, ahci)".to_string()]
                );
            }
            e => panic!("{e:?}"),
        }
        assert!(err.to_string().contains("0000:3a:00.0"), "{err}");
        assert!(k.writes().is_empty(), "nothing written");
    }

    #[test]
    fn bind_refuses_without_iommu_or_vfio_or_device() {
        let fx = Fx::iommu_off();
        let k = Kernel::new(fx.root());
        let err = bind_vfio_with(&fx.root(), GPU, &k).unwrap_err();
        assert!(matches!(err, VfioError::NoIommuGroup { .. }), "{err:?}");
        assert!(err.to_string().contains("intel_iommu=on"));

        let fx = Fx::clean();
        fx.remove("/sys/bus/pci/drivers/vfio-pci");
        let err = bind_vfio_with(&fx.root(), GPU, &k).unwrap_err();
        assert!(matches!(err, VfioError::NoVfioDriver), "{err:?}");

        let err = bind_vfio_with(&fx.root(), "0000:99:00.0", &k).unwrap_err();
        assert!(matches!(err, VfioError::NoDevice(_)), "{err:?}");
        let err = bind_vfio_with(&fx.root(), "gpu0", &k).unwrap_err();
        assert!(matches!(err, VfioError::BadAddress(_)), "{err:?}");
        assert!(k.writes().is_empty());
    }

    #[test]
    fn bind_reports_a_write_error_and_a_failed_probe() {
        let fx = Fx::clean();
        let k = Kernel::new(fx.root()).fail_on("/unbind");
        let err = bind_vfio_with(&fx.root(), GPU, &k).unwrap_err();
        assert!(
            err.to_string()
                .contains("/sys/bus/pci/drivers/nvidia/unbind"),
            "{err}"
        );

        // A kernel that ignores the override: the GPU ends up on nvidia again.
        let fx = Fx::clean();
        let stubborn = Kernel::new(fx.root()).ignoring_override();
        let err = bind_vfio_with(&fx.root(), GPU, &stubborn).unwrap_err();
        assert!(
            matches!(&err, VfioError::NotBound { got: Some(d), .. } if d == "nvidia"),
            "{err:?}"
        );
    }

    #[test]
    fn bind_leaves_a_bridge_in_the_group_on_the_host() {
        let fx = Fx::clean();
        fx.pci(&crate::testfx::Pci {
            addr: "0000:00:01.0",
            vendor: "0x8086",
            device: "0x1901",
            class: "0x060400",
            driver: Some("pcieport"),
            group: Some(17),
        });
        let k = Kernel::new(fx.root());
        let out = bind_vfio_with(&fx.root(), GPU, &k).unwrap();
        assert_eq!(out.functions, vec![GPU.to_string(), GPU_AUDIO.to_string()]);
        assert!(
            !k.writes()
                .iter()
                .any(|(p, d)| p.contains("0000:00:01.0") || d == "0000:00:01.0"),
            "{:?}",
            k.writes()
        );
        assert_eq!(
            current_driver(&fx.root(), "0000:00:01.0").as_deref(),
            Some("pcieport")
        );
    }

    #[test]
    fn release_clears_override_unbinds_and_probes() {
        let fx = Fx::clean();
        let root = fx.root();
        bind_vfio_with(&root, GPU, &Kernel::new(fx.root())).unwrap();
        let k = Kernel::new(fx.root());
        let out = release_with(&root, GPU, &k).unwrap();
        assert_eq!(
            k.writes(),
            vec![
                w("/sys/bus/pci/devices/0000:3b:00.0/driver_override", "\n"),
                w("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:3b:00.0"),
                w("/sys/bus/pci/drivers_probe", "0000:3b:00.0"),
                w("/sys/bus/pci/devices/0000:3b:00.1/driver_override", "\n"),
                w("/sys/bus/pci/drivers/vfio-pci/unbind", "0000:3b:00.1"),
                w("/sys/bus/pci/drivers_probe", "0000:3b:00.1"),
            ]
        );
        assert_eq!(out.driver.as_deref(), Some("nvidia"));
        assert_eq!(
            current_driver(&root, GPU_AUDIO).as_deref(),
            Some("snd_hda_intel")
        );

        // Already on the host driver: nothing written.
        let k2 = Kernel::new(fx.root());
        assert!(release_with(&root, GPU, &k2).unwrap().unchanged);
        assert!(k2.writes().is_empty());
    }

    #[test]
    fn release_rescans_when_the_device_vanished() {
        let fx = Fx::clean();
        let root = fx.root();
        bind_vfio_with(&root, GPU, &Kernel::new(fx.root())).unwrap();
        fx.set_driver(GPU_AUDIO, Some("snd_hda_intel"));
        let k = Kernel::new(fx.root()).vanish_on_unbind();
        let out = release_with(&root, GPU, &k).unwrap();
        let log = k.writes();
        assert_eq!(log.len(), 4, "{log:?}");
        assert_eq!(log[3], w("/sys/bus/pci/rescan", "1"));
        assert_eq!(out.functions, vec![GPU.to_string()]);
        assert!(fx.path("/sys/bus/pci/devices/0000:3b:00.0").exists());
    }

    #[test]
    fn groups_and_classes() {
        let fx = Fx::shared_group();
        let (g, members) = iommu_group(&fx.root(), GPU).unwrap();
        assert_eq!(g, 17);
        let addrs: Vec<&str> = members.iter().map(|m| m.address.as_str()).collect();
        assert_eq!(addrs, vec!["0000:3a:00.0", GPU, GPU_AUDIO]);
        assert_eq!(members.len(), 3);
        let v = group_verdict(&fx.root(), GPU, &[]).unwrap();
        assert_eq!(v.pass.len(), 2);
        assert_eq!(
            v.blockers[0].describe(),
            "0000:3a:00.0 (SATA controller, ahci)"
        );
        assert_eq!(class_name("0x060400"), "PCI bridge");
        assert_eq!(class_name("0x040300"), "audio");
        assert!(matches!(
            iommu_group(&Fx::iommu_off().root(), GPU),
            Err(VfioError::NoIommuGroup { .. })
        ));
    }

    fn bridge(fx: &Fx, driver: Option<&str>) {
        fx.pci(&crate::testfx::Pci {
            addr: "0000:00:01.0",
            vendor: "0x8086",
            device: "0x1901",
            class: "0x060400",
            driver,
            group: Some(17),
        });
    }

    /// Review finding 5: a bridge stays on the host only on pcieport or no driver; on any
    /// other driver the kernel finds the group not viable, so bind-vfio refuses it by name.
    #[test]
    fn a_bridge_on_another_driver_blocks_the_group() {
        let fx = Fx::clean();
        bridge(&fx, Some("some_other_drv"));
        let k = Kernel::new(fx.root());
        let err = bind_vfio_with(&fx.root(), GPU, &k).unwrap_err();
        assert!(
            matches!(&err, VfioError::SharedGroup { others, .. } if others[0].starts_with("0000:00:01.0 (PCI bridge, some_other_drv)")),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("only on pcieport or no driver"),
            "{err}"
        );
        assert!(k.writes().is_empty());
        // Unbound, it is harmless.
        fx.set_driver("0000:00:01.0", None);
        let v = group_verdict(&fx.root(), GPU, &[]).unwrap();
        assert_eq!(v.host_bridges.len(), 1);
        assert!(v.blockers.is_empty());
    }

    /// Review finding 1: the one rule. A non-NVIDIA device in the group blocks it whatever
    /// its driver (vfio-pci included): it is not the GPU's to hand over.
    #[test]
    fn a_vfio_bound_stranger_blocks_the_group() {
        let fx = Fx::clean();
        fx.set_driver(GPU, Some("vfio-pci"));
        fx.set_driver(GPU_AUDIO, Some("vfio-pci"));
        fx.pci(&crate::testfx::Pci {
            addr: "0000:3c:00.0",
            vendor: "0x144d",
            device: "0xa808",
            class: "0x010802",
            driver: Some("vfio-pci"),
            group: Some(17),
        });
        let v = group_verdict(&fx.root(), GPU, &[]).unwrap();
        let pass: Vec<&str> = v.pass.iter().map(|m| m.address.as_str()).collect();
        assert_eq!(pass, vec![GPU, GPU_AUDIO]);
        assert_eq!(
            v.blockers
                .iter()
                .map(PciFunction::describe)
                .collect::<Vec<_>>(),
            vec!["0000:3c:00.0 (NVMe controller, vfio-pci)".to_string()]
        );
        let err = v.refusal(GPU).unwrap();
        assert!(
            err.to_string()
                .contains("0000:3c:00.0 (NVMe controller, vfio-pci)"),
            "{err}"
        );
    }

    /// Review finding 6: group entries go into QEMU arguments, so a name that is not a PCI
    /// address refuses the group; an unreadable group directory refuses it too (it used to
    /// read as "the GPU alone").
    #[test]
    fn group_reads_fail_closed() {
        let fx = Fx::clean();
        let gdir = fx.path("/sys/kernel/iommu_groups/17/devices");
        std::os::unix::fs::symlink(
            "../../../../devices/pci0000:00/0000:3b:00.1",
            gdir.join("0000:3b:00.1,x-igd-opregion=on"),
        )
        .unwrap();
        let err = iommu_group(&fx.root(), GPU).unwrap_err();
        assert!(
            matches!(&err, VfioError::BadGroupEntry { group: 17, name } if name == "0000:3b:00.1,x-igd-opregion=on"),
            "{err:?}"
        );
        let k = Kernel::new(fx.root());
        assert!(bind_vfio_with(&fx.root(), GPU, &k).is_err());
        assert!(k.writes().is_empty());
        std::fs::remove_file(gdir.join("0000:3b:00.1,x-igd-opregion=on")).unwrap();
        std::fs::symlink_metadata(&gdir).unwrap();
        // Upper case is not the kernel's form either.
        std::os::unix::fs::symlink("x", gdir.join("0000:3B:00.1")).unwrap();
        assert!(matches!(
            iommu_group(&fx.root(), GPU),
            Err(VfioError::BadGroupEntry { .. })
        ));
        std::fs::remove_file(gdir.join("0000:3B:00.1")).unwrap();
        assert!(iommu_group(&fx.root(), GPU).is_ok());

        // The directory unreadable (here: not a directory).
        std::fs::remove_dir_all(&gdir).unwrap();
        std::fs::write(&gdir, "").unwrap();
        let err = iommu_group(&fx.root(), GPU).unwrap_err();
        assert!(
            matches!(err, VfioError::GroupUnreadable { group: 17, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn real_writer_never_creates_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("driver_override");
        assert!(FsWriter.write(&p, "vfio-pci").is_err());
        std::fs::write(&p, "(null)\n").unwrap();
        FsWriter.write(&p, "vfio-pci").unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().starts_with("vfio-pci"));
    }
}
