//! GPUs found by scanning `/sys/bus/pci/devices` for NVIDIA (vendor 0x10de) display and 3D
//! controllers (class 0x03xxxx), for hosts where NVML is not usable: GPUs bound to vfio-pci for
//! passthrough, or a driver without its user-space library.
//!
//! sysfs cannot know everything NVML does, and this backend says so rather than guess:
//! - UUID: not in sysfs. When the driver is loaded, `/proc/driver/nvidia/gpus/<addr>/information`
//!   has it; otherwise the GPU gets the stable placeholder `PCI-<address>`.
//! - VRAM: the nominal size of a model in [`KNOWN_MODELS`](super::KNOWN_MODELS), else 0.
//! - Model: from the PCI device id when known, else from the driver's `Model:` line, else
//!   `NVIDIA-<device id>`.
//! - Index: the driver's `Device Minor` when it has the GPU; the others take the lowest free
//!   numbers in PCI address order.
//!
//! GPUs bound to vfio-pci are for PCIe passthrough into VMs: their `/dev/nvidia<index>` node does
//! not exist, and what a VM needs is the group node `/dev/vfio/<iommu_group>`
//! ([`GpuDevice::vfio_group_path`]).

use super::{
    driver_files, host_control_devices, host_gpu_node, model_for_pci_device_id,
    normalise_model_name, normalise_pci_address, pci_driver, pci_iommu_group, pci_numa_node,
    BackendKind, DeviceNode, GpuBackend, GpuDevice, GpuError,
};
use crate::HostRoot;
use std::collections::BTreeSet;
use std::path::PathBuf;

const NVIDIA_VENDOR: &str = "0x10de";
const PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// The sysfs backend; rescans on every call so it follows vfio-pci binds and unbinds.
#[derive(Debug, Clone)]
pub struct SysfsBackend {
    root: HostRoot,
}

impl SysfsBackend {
    pub fn new(root: HostRoot) -> Self {
        Self { root }
    }
}

impl GpuBackend for SysfsBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Sysfs
    }

    fn devices(&self) -> Result<Vec<GpuDevice>, GpuError> {
        scan_sysfs(&self.root)
    }

    fn control_devices(&self) -> Vec<DeviceNode> {
        host_control_devices(&self.root)
    }

    fn driver_files(&self) -> Vec<(PathBuf, PathBuf)> {
        driver_files(&self.root)
    }
}

/// What the NVIDIA driver says about one GPU in `/proc/driver/nvidia/gpus/<addr>/information`.
#[derive(Debug, Default)]
struct DriverInfo {
    model: Option<String>,
    uuid: Option<String>,
    minor: Option<u32>,
}

fn driver_info(root: &HostRoot, addr: &str) -> DriverInfo {
    let mut info = DriverInfo::default();
    let Ok(text) =
        std::fs::read_to_string(root.path(format!("/proc/driver/nvidia/gpus/{addr}/information")))
    else {
        return info;
    };
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "Model" if !value.is_empty() => info.model = Some(value.to_string()),
            // Older drivers print `GPU-????????-...` until the GPU has been initialised.
            "GPU UUID" if value.starts_with("GPU-") && !value.contains('?') => {
                info.uuid = Some(value.to_string());
            }
            "Device Minor" => info.minor = value.parse().ok(),
            _ => {}
        }
    }
    info
}

/// Scans the PCI bus under `root` for NVIDIA GPUs, sorted by index. A missing
/// `/sys/bus/pci/devices` (a container without sysfs) is no GPU, not an error.
pub fn scan_sysfs(root: &HostRoot) -> Result<Vec<GpuDevice>, GpuError> {
    let dir = root.path(PCI_DEVICES);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(GpuError::Io { path: dir, source }),
    };
    let mut found: Vec<(String, u16)> = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(addr) = name.to_str().and_then(normalise_pci_address) else {
            continue;
        };
        let read = |f: &str| root.read_trimmed(format!("{PCI_DEVICES}/{addr}/{f}"));
        if !read("vendor").is_some_and(|v| v.eq_ignore_ascii_case(NVIDIA_VENDOR)) {
            continue;
        }
        if !read("class").is_some_and(|c| c.to_ascii_lowercase().starts_with("0x03")) {
            continue;
        }
        let Some(device_id) =
            read("device").and_then(|d| u16::from_str_radix(d.trim_start_matches("0x"), 16).ok())
        else {
            continue;
        };
        found.push((addr, device_id));
    }
    found.sort();

    let infos: Vec<DriverInfo> = found.iter().map(|(a, _)| driver_info(root, a)).collect();
    let mut taken: BTreeSet<u32> = infos.iter().filter_map(|i| i.minor).collect();
    let mut next_free = 0u32;
    let mut out = Vec::with_capacity(found.len());
    for ((addr, device_id), info) in found.into_iter().zip(infos) {
        let index = match info.minor {
            Some(m) => m,
            None => {
                while taken.contains(&next_free) {
                    next_free += 1;
                }
                taken.insert(next_free);
                next_free
            }
        };
        let known = model_for_pci_device_id(device_id);
        let model = match (known, &info.model) {
            (Some(k), _) => k.model.to_string(),
            (None, Some(name)) => normalise_model_name(name, 0),
            (None, None) => format!("NVIDIA-{device_id:04x}"),
        };
        out.push(GpuDevice {
            uuid: info.uuid.unwrap_or_else(|| format!("PCI-{addr}")),
            index,
            vram: known.map_or(0, |k| k.vram_bytes()),
            model,
            numa_node: pci_numa_node(root, &addr),
            node: host_gpu_node(root, index),
            driver: pci_driver(root, &addr),
            iommu_group: pci_iommu_group(root, &addr),
            mig_enabled: false,
            mig: None,
            pci_address: addr,
        });
    }
    out.sort_by_key(|g| g.index);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    struct Fn<'a> {
        addr: &'a str,
        vendor: &'a str,
        device: &'a str,
        class: &'a str,
        numa: &'a str,
        driver: Option<&'a str>,
        group: Option<u32>,
    }

    /// Lays a device out as the kernel does: the real directory under `/sys/devices`, a symlink
    /// to it in `/sys/bus/pci/devices`, `driver` and `iommu_group` as relative symlinks.
    fn add(root: &Path, f: &Fn<'_>) {
        let real = root.join("sys/devices/pci0000:00").join(f.addr);
        fs::create_dir_all(&real).unwrap();
        fs::write(real.join("vendor"), format!("{}\n", f.vendor)).unwrap();
        fs::write(real.join("device"), format!("{}\n", f.device)).unwrap();
        fs::write(real.join("class"), format!("{}\n", f.class)).unwrap();
        fs::write(real.join("numa_node"), format!("{}\n", f.numa)).unwrap();
        if let Some(d) = f.driver {
            fs::create_dir_all(root.join("sys/bus/pci/drivers").join(d)).unwrap();
            symlink(format!("../../../bus/pci/drivers/{d}"), real.join("driver")).unwrap();
        }
        if let Some(g) = f.group {
            fs::create_dir_all(root.join(format!("sys/kernel/iommu_groups/{g}"))).unwrap();
            symlink(
                format!("../../../kernel/iommu_groups/{g}"),
                real.join("iommu_group"),
            )
            .unwrap();
        }
        let bus = root.join("sys/bus/pci/devices");
        fs::create_dir_all(&bus).unwrap();
        symlink(
            format!("../../../devices/pci0000:00/{}", f.addr),
            bus.join(f.addr),
        )
        .unwrap();
    }

    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        // Listed out of PCI order on purpose.
        add(
            r,
            &Fn {
                addr: "0000:b1:00.0",
                vendor: "0x10de",
                device: "0x2330",
                class: "0x030200",
                numa: "1",
                driver: Some("vfio-pci"),
                group: Some(42),
            },
        );
        add(
            r,
            &Fn {
                addr: "0000:3b:00.0",
                vendor: "0x10de",
                device: "0x20b5",
                class: "0x030200",
                numa: "-1",
                driver: Some("nvidia"),
                group: Some(17),
            },
        );
        // A network card (not NVIDIA) and the GPU's own HDMI audio function: both ignored.
        add(
            r,
            &Fn {
                addr: "0000:5e:00.0",
                vendor: "0x15b3",
                device: "0x101b",
                class: "0x020700",
                numa: "0",
                driver: Some("mlx5_core"),
                group: Some(20),
            },
        );
        add(
            r,
            &Fn {
                addr: "0000:3b:00.1",
                vendor: "0x10de",
                device: "0x22ba",
                class: "0x040300",
                numa: "-1",
                driver: None,
                group: Some(17),
            },
        );
        dir
    }

    #[test]
    fn scans_nvidia_gpus_from_a_fixture_tree() {
        let dir = fixture();
        let root = HostRoot::at(dir.path());
        let gpus = SysfsBackend::new(root.clone()).devices().unwrap();
        assert_eq!(gpus.len(), 2, "{gpus:#?}");

        let a = &gpus[0];
        assert_eq!(a.index, 0);
        assert_eq!(a.pci_address, "0000:3b:00.0");
        assert_eq!(a.uuid, "PCI-0000:3b:00.0");
        assert_eq!(a.model, "A100-80GB");
        assert_eq!(a.vram, 80 << 30);
        assert_eq!(a.numa_node, None);
        assert_eq!(a.driver.as_deref(), Some("nvidia"));
        assert_eq!(a.iommu_group, Some(17));
        assert!(!a.is_vfio());
        assert_eq!(a.vfio_group_path(), None);
        assert_eq!(a.node.container_path, PathBuf::from("/dev/nvidia0"));
        assert_eq!((a.node.major, a.node.minor), (195, 0));

        let h = &gpus[1];
        assert_eq!(h.index, 1);
        assert_eq!(h.pci_address, "0000:b1:00.0");
        assert_eq!(h.model, "H100-80GB");
        assert_eq!(h.numa_node, Some(1));
        assert_eq!(h.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(h.iommu_group, Some(42));
        assert!(h.is_vfio());
        assert_eq!(h.vfio_group_path(), Some(PathBuf::from("/dev/vfio/42")));
    }

    #[test]
    fn uses_the_driver_view_when_loaded() {
        let dir = fixture();
        let r = dir.path();
        // An unknown device id, known to the driver as minor 0; the A100 is minor 1.
        add(
            r,
            &Fn {
                addr: "0000:d8:00.0",
                vendor: "0x10de",
                device: "0x2321",
                class: "0x030200",
                numa: "1",
                driver: Some("nvidia"),
                group: None,
            },
        );
        let info = |addr: &str, text: &str| {
            let d = r.join(format!("proc/driver/nvidia/gpus/{addr}"));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("information"), text).unwrap();
        };
        info(
            "0000:d8:00.0",
            "Model: \t\t NVIDIA H100 NVL\nGPU UUID: \t GPU-11111111-2222-3333-4444-555555555555\n\
             Bus Location: \t 0000:d8:00.0\nDevice Minor: \t 0\n",
        );
        info(
            "0000:3b:00.0",
            "Model: \t\t NVIDIA A100 80GB PCIe\nGPU UUID: \t GPU-????????-????-????-????-????????????\n\
             Device Minor: \t 1\n",
        );
        let gpus = scan_sysfs(&HostRoot::at(r)).unwrap();
        let got: Vec<(u32, &str, &str, &str)> = gpus
            .iter()
            .map(|g| {
                (
                    g.index,
                    g.pci_address.as_str(),
                    g.model.as_str(),
                    g.uuid.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    0,
                    "0000:d8:00.0",
                    "H100",
                    "GPU-11111111-2222-3333-4444-555555555555"
                ),
                (1, "0000:3b:00.0", "A100-80GB", "PCI-0000:3b:00.0"),
                // The vfio GPU takes the lowest free index.
                (2, "0000:b1:00.0", "H100-80GB", "PCI-0000:b1:00.0"),
            ]
        );
        assert_eq!(gpus[0].vram, 0, "unknown model: sysfs cannot tell the size");
    }

    #[test]
    fn unknown_ids_and_missing_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        add(
            dir.path(),
            &Fn {
                addr: "0000:01:00.0",
                vendor: "0x10de",
                device: "0x1234",
                class: "0x030000",
                numa: "0",
                driver: None,
                group: None,
            },
        );
        let gpus = scan_sysfs(&HostRoot::at(dir.path())).unwrap();
        assert_eq!(gpus[0].model, "NVIDIA-1234");
        assert_eq!(gpus[0].driver, None);
        assert_eq!(gpus[0].iommu_group, None);
        assert_eq!(gpus[0].numa_node, Some(0));

        let empty = scan_sysfs(&HostRoot::at(dir.path().join("nothing"))).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn probe_falls_back_to_sysfs_on_fixture_roots() {
        let dir = fixture();
        let cfg = crate::gpu::GpuConfig::default();
        let b = crate::gpu::probe(&cfg, &HostRoot::at(dir.path())).unwrap();
        assert_eq!(b.kind(), BackendKind::Sysfs);
        assert_eq!(b.devices().unwrap().len(), 2);
        assert!(b.control_devices().is_empty());
        assert!(b.driver_files().is_empty());

        let data = tempfile::tempdir().unwrap();
        let cfg = crate::gpu::GpuConfig {
            simulate: Some("1xT4-16GB".into()),
            sim_dev_dir: data.path().join("dev"),
        };
        let b = crate::gpu::probe(&cfg, &HostRoot::at(dir.path())).unwrap();
        assert_eq!(b.kind(), BackendKind::Simulated);
        assert_eq!(b.devices().unwrap()[0].model, "T4-16GB");
    }
}
