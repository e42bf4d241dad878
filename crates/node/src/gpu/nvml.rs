//! GPUs as the NVIDIA driver reports them, through NVML (`libnvidia-ml.so.1`, loaded at run time
//! by nvml-wrapper, so the binary runs on hosts without the driver).
//!
//! The inventory is queried on every call rather than cached: it is cheap, and it follows GPUs
//! that host preparation hands to vfio-pci or back. NUMA nodes, the IOMMU group and the bound
//! driver come from sysfs, which NVML does not report reliably on every platform.
//! GPUs bound to vfio-pci, which NVML no longer sees, are added from the sysfs scan
//! ([`with_vfio_gpus`]), so that they stay placeable for VMs after a daemon restart.

use super::{
    driver_files, host_control_devices, host_gpu_node, normalise_model_name, normalise_pci_address,
    pci_driver, pci_iommu_group, pci_numa_node, BackendKind, DeviceNode, GpuBackend, GpuDevice,
    GpuError,
};
use crate::HostRoot;
use nvml_wrapper::Nvml;
use std::path::PathBuf;

/// The NVML backend; holds the initialised library for its lifetime.
pub struct NvmlBackend {
    nvml: Nvml,
    root: HostRoot,
    count: u32,
}

impl std::fmt::Debug for NvmlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlBackend")
            .field("root", &self.root)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl NvmlBackend {
    /// Loads NVML. `Err` when the library or the driver is missing (the caller falls through to
    /// sysfs); `Ok(None)` when it loads but sees no GPU.
    pub fn probe(root: &HostRoot) -> Result<Option<Self>, GpuError> {
        let nvml = Nvml::init().map_err(|e| GpuError::Nvml(e.to_string()))?;
        let count = nvml
            .device_count()
            .map_err(|e| GpuError::Nvml(format!("device count: {e}")))?;
        if count == 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            nvml,
            root: root.clone(),
            count,
        }))
    }

    /// GPUs seen at probe time.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The initialised library, for telemetry and MIG code that needs more than the inventory.
    pub fn nvml(&self) -> &Nvml {
        &self.nvml
    }

    fn device(&self, i: u32) -> Result<GpuDevice, GpuError> {
        let e = |what: &str, err: nvml_wrapper::error::NvmlError| {
            GpuError::Nvml(format!("gpu {i}: {what}: {err}"))
        };
        let dev = self.nvml.device_by_index(i).map_err(|err| e("open", err))?;
        let uuid = dev.uuid().map_err(|err| e("uuid", err))?;
        let name = dev.name().map_err(|err| e("name", err))?;
        let memory = dev.memory_info().map_err(|err| e("memory", err))?.total;
        let bus_id = dev.pci_info().map_err(|err| e("pci info", err))?.bus_id;
        let pci_address = normalise_pci_address(&bus_id).unwrap_or_else(|| bus_id.to_lowercase());
        // The minor is what /dev/nvidia<N> is named after; NVML's enumeration order can differ.
        let index = dev.minor_number().unwrap_or(i);
        Ok(GpuDevice {
            uuid,
            index,
            model: normalise_model_name(&name, memory),
            vram: memory,
            numa_node: pci_numa_node(&self.root, &pci_address),
            node: host_gpu_node(&self.root, index),
            driver: pci_driver(&self.root, &pci_address).or_else(|| Some("nvidia".to_string())),
            iommu_group: pci_iommu_group(&self.root, &pci_address),
            mig_enabled: false,
            mig: None,
            pci_address,
        })
    }
}

impl GpuBackend for NvmlBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Nvml
    }

    fn devices(&self) -> Result<Vec<GpuDevice>, GpuError> {
        let count = self
            .nvml
            .device_count()
            .map_err(|e| GpuError::Nvml(format!("device count: {e}")))?;
        let out = (0..count)
            .map(|i| self.device(i))
            .collect::<Result<Vec<_>, _>>()?;
        // GPUs handed to vfio-pci are invisible to NVML: the sysfs scan finds them (for VMs).
        Ok(with_vfio_gpus(
            out,
            super::scan_sysfs(&self.root).unwrap_or_default(),
        ))
    }

    fn control_devices(&self) -> Vec<DeviceNode> {
        host_control_devices(&self.root)
    }

    fn driver_files(&self) -> Vec<(PathBuf, PathBuf)> {
        driver_files(&self.root)
    }

    fn mig_control(
        &self,
        _state_dir: &std::path::Path,
    ) -> Result<Option<Box<dyn crate::mig::MigControl>>, GpuError> {
        // A second NVML handle: init is reference-counted by the library. Without it the host
        // still runs whole GPUs: MIG is then simply not offered.
        match crate::mig::NvmlMig::init() {
            Ok(m) => Ok(Some(Box::new(m))),
            Err(e) => {
                tracing::warn!(error = %e, "MIG control unavailable: GPUs are used whole");
                Ok(None)
            }
        }
    }

    fn mig_caps(&self, gpu: &GpuDevice, gi: u32, ci: u32) -> Vec<DeviceNode> {
        super::host_mig_caps(&self.root, gpu.index, gi, ci)
    }

    fn process_utilisation(&self, uuid: &str, since_us: u64) -> Vec<(u32, u32)> {
        let Ok(dev) = self.nvml.device_by_uuid(uuid) else {
            return Vec::new();
        };
        let Ok(samples) = dev.process_utilization_stats(since_us) else {
            return Vec::new();
        };
        // Keep the newest sample of each process.
        let mut newest: std::collections::BTreeMap<u32, (u64, u32)> = Default::default();
        for s in samples {
            let e = newest.entry(s.pid).or_insert((0, 0));
            if s.timestamp >= e.0 {
                *e = (s.timestamp, s.sm_util);
            }
        }
        newest.into_iter().map(|(pid, (_, u))| (pid, u)).collect()
    }

    /// `nvmlDeviceGetComputeRunningProcesses` and `nvmlDeviceGetGraphicsRunningProcesses`
    /// (a process in both lists is counted once, with its larger figure). Not yet run on a GPU
    /// host: the simulated backend's process table is what the tests exercise.
    fn process_memory(&self, uuid: &str) -> Vec<(u32, u64)> {
        use nvml_wrapper::enums::device::UsedGpuMemory;
        let Ok(dev) = self.nvml.device_by_uuid(uuid) else {
            return Vec::new();
        };
        let mut by_pid: std::collections::BTreeMap<u32, u64> = Default::default();
        let compute = dev.running_compute_processes().unwrap_or_default();
        let graphics = dev.running_graphics_processes().unwrap_or_default();
        for p in compute.into_iter().chain(graphics) {
            if let UsedGpuMemory::Used(b) = p.used_gpu_memory {
                let e = by_pid.entry(p.pid).or_default();
                *e = (*e).max(b);
            }
        }
        by_pid.into_iter().collect()
    }

    fn measures_processes(&self) -> bool {
        true
    }

    /// Every field is queried on its own: a GPU that does not support one (ECC on consumer
    /// boards, PCIe counters in some virtualised setups) still reports the others.
    fn telemetry(
        &self,
        gpu: &GpuDevice,
        _load: &crate::telemetry::GpuLoad,
    ) -> Option<crate::telemetry::GpuReading> {
        use nvml_wrapper::enum_wrappers::device::{
            Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor,
        };
        use nvml_wrapper::error::NvmlError;
        let mut r = crate::telemetry::GpuReading {
            uuid: gpu.uuid.clone(),
            index: gpu.index,
            mem_total: gpu.vram,
            ..Default::default()
        };
        let dev = match self.nvml.device_by_uuid(gpu.uuid.as_str()) {
            Ok(d) => d,
            Err(NvmlError::GpuLost) => {
                r.lost = true;
                return Some(r);
            }
            Err(_) => return Some(r),
        };
        let mut lost = false;
        fn keep<T>(lost: &mut bool, res: Result<T, NvmlError>) -> Option<T> {
            match res {
                Ok(v) => Some(v),
                Err(NvmlError::GpuLost) => {
                    *lost = true;
                    None
                }
                Err(_) => None,
            }
        }
        macro_rules! ok {
            ($e:expr) => {
                keep(&mut lost, $e)
            };
        }
        if let Some(u) = ok!(dev.utilization_rates()) {
            r.util = Some(f64::from(u.gpu));
        }
        if let Some(m) = ok!(dev.memory_info()) {
            r.mem_used = Some(m.used);
            r.mem_total = m.total;
        }
        r.temp_c = ok!(dev.temperature(TemperatureSensor::Gpu)).map(f64::from);
        r.power_w = ok!(dev.power_usage()).map(|mw| f64::from(mw) / 1000.0);
        r.sm_clock_mhz = ok!(dev.clock_info(Clock::SM));
        r.mem_clock_mhz = ok!(dev.clock_info(Clock::Memory));
        r.throttle_reasons = ok!(dev.current_throttle_reasons()).map(|t| t.bits());
        r.pcie_tx_kbs = ok!(dev.pcie_throughput(PcieUtilCounter::Send)).map(u64::from);
        r.pcie_rx_kbs = ok!(dev.pcie_throughput(PcieUtilCounter::Receive)).map(u64::from);
        r.ecc_corrected = ok!(dev.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile));
        r.ecc_uncorrected =
            ok!(dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile));
        r.lost = lost;
        Some(r)
    }
}

/// NVML's GPUs plus the GPUs bound to vfio-pci that NVML cannot see (from a sysfs scan), at
/// indexes NVML's GPUs do not use, sorted by index. A vfio-pci GPU's UUID is then
/// `PCI-<address>` (the driver that knows the real one does not hold it).
pub(crate) fn with_vfio_gpus(mut gpus: Vec<GpuDevice>, scanned: Vec<GpuDevice>) -> Vec<GpuDevice> {
    let mut taken: std::collections::BTreeSet<u32> = gpus.iter().map(|g| g.index).collect();
    let mut next = 0u32;
    for g in scanned {
        if !g.is_vfio() || gpus.iter().any(|n| n.pci_address == g.pci_address) {
            continue;
        }
        let index = if taken.contains(&g.index) {
            while taken.contains(&next) {
                next += 1;
            }
            next
        } else {
            g.index
        };
        taken.insert(index);
        gpus.push(GpuDevice { index, ..g });
    }
    gpus.sort_by_key(|g| g.index);
    gpus
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(index: u32, pci: &str, driver: &str) -> GpuDevice {
        GpuDevice {
            uuid: format!("PCI-{pci}"),
            index,
            model: "H100-80GB".into(),
            vram: 80 << 30,
            pci_address: pci.into(),
            numa_node: None,
            node: crate::gpu::host_gpu_node(&HostRoot::at("/nonexistent"), index),
            driver: Some(driver.into()),
            iommu_group: Some(17),
            mig_enabled: false,
            mig: None,
        }
    }

    /// A GPU bound to vfio-pci stays in the inventory of a host whose other GPUs NVML lists,
    /// at an index of its own; NVML's own GPUs and GPUs on other drivers are not doubled.
    #[test]
    fn vfio_gpus_join_nvmls_inventory() {
        let nvml = vec![
            GpuDevice {
                uuid: "GPU-a".into(),
                ..dev(0, "0000:1b:00.0", "nvidia")
            },
            GpuDevice {
                uuid: "GPU-c".into(),
                ..dev(2, "0000:52:00.0", "nvidia")
            },
        ];
        let scanned = vec![
            dev(0, "0000:1b:00.0", "nvidia"),
            dev(0, "0000:43:00.0", "vfio-pci"),
            dev(2, "0000:52:00.0", "nvidia"),
            dev(3, "0000:61:00.0", "vfio-pci"),
            dev(4, "0000:9d:00.0", "nouveau"),
        ];
        let got: Vec<(u32, String, String)> = with_vfio_gpus(nvml, scanned)
            .into_iter()
            .map(|g| (g.index, g.uuid, g.pci_address))
            .collect();
        let want = [
            (0, "GPU-a", "0000:1b:00.0"),
            (1, "PCI-0000:43:00.0", "0000:43:00.0"),
            (2, "GPU-c", "0000:52:00.0"),
            (3, "PCI-0000:61:00.0", "0000:61:00.0"),
        ];
        let want: Vec<(u32, String, String)> = want
            .iter()
            .map(|(i, u, p)| (*i, u.to_string(), p.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    /// Runs only where asked (`GPUVISOR_GPU_TESTS=1`, on a GPU machine): the real driver.
    #[test]
    fn real_driver_inventory() {
        if !crate::testfx::gpu_tests_enabled() {
            return;
        }
        let root = HostRoot::real();
        let b = NvmlBackend::probe(&root).unwrap().unwrap();
        let gpus = b.devices().unwrap();
        assert!(!gpus.is_empty());
        for g in &gpus {
            eprintln!("{g:?}");
            assert!(g.uuid.starts_with("GPU-"), "{}", g.uuid);
            assert!(g.vram > 0);
            assert_eq!(
                normalise_pci_address(&g.pci_address).as_ref(),
                Some(&g.pci_address)
            );
            assert!(g.model.contains("GB"), "{}", g.model);
        }
        let ctl = b.control_devices();
        eprintln!("{ctl:?}");
        assert!(ctl.iter().any(|d| d.container_path.ends_with("nvidiactl")));
        let files = b.driver_files();
        eprintln!("{files:?}");
        assert!(files
            .iter()
            .any(|(_, c)| c.to_string_lossy().contains("libcuda.so")));
    }
}
