//! Simulated GPUs for hosts without any (development machines, CI): `2xA100-80GB,1xH100-80GB`.
//!
//! The device nodes are real character devices created with mknod under the data dir, with the
//! driver's numbers (`nvidia<i>` 195/i, `nvidiactl` 195/255, `nvidia-uvm` with the host's uvm
//! major), so that the container runtime's device handling is exercised for real. Opening them
//! on a host without the driver fails with ENXIO, which is what a CUDA program without a GPU sees.
//! On a host that *does* have the driver, the nodes alias the real GPUs: simulate only where that
//! is what you want.
//!
//! NUMA nodes are synthetic (first half of the GPUs on node 0, the rest on node 1) and may not
//! exist on the host; consumers must treat a NUMA node without CPUs as "no preference".

use super::{
    known_model, proc_devices_major, BackendKind, DeviceNode, GpuBackend, GpuDevice, GpuError,
    KnownModel, DEFAULT_UVM_MAJOR, KNOWN_MODELS, NVIDIACTL_MINOR, NVIDIA_MAJOR,
};
use crate::HostRoot;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use sha2::{Digest, Sha256};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Device minors 0..=254 are GPUs; 255 is `nvidiactl`.
const MAX_SIM_GPUS: u32 = 255;

/// Plausible PCI buses of an 8-GPU server; the domain grows past eight GPUs.
const SIM_PCI_BUSES: [u8; 8] = [0x1b, 0x43, 0x52, 0x61, 0x9d, 0xc3, 0xd1, 0xdf];

/// GPU families with MIG (A100, A30, H100, H200, B200).
const MIG_FAMILIES: &[&str] = &["A100", "A30", "H100", "H200", "B200"];

/// How a simulated GPU is set up: on the (simulated) host driver, in MIG mode, or bound to
/// vfio-pci for passthrough into VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimMode {
    Plain,
    /// `:mig`: in MIG mode, scheduled through its slices.
    Mig,
    /// `:vfio`: bound to vfio-pci, for VMs only (the backend lays out a sysfs tree for it, see
    /// [`SimulatedBackend::passthrough_root`]).
    Vfio,
}

/// Parses `2xA100-80GB,1xH100-80GB:mig,1xH100-80GB:vfio` into (count, model, mode) triples,
/// strictly: every item is `<count>x<model>[:mig|:vfio]` with a count of at least 1, a model
/// from [`KNOWN_MODELS`] (case-insensitive) and `:mig` only on a MIG-capable family; at most 255
/// GPUs in all.
pub fn parse_sim_spec(spec: &str) -> Result<Vec<(u32, &'static KnownModel, SimMode)>, GpuError> {
    let bad = |why: String| GpuError::BadSimSpec {
        spec: spec.to_string(),
        why,
    };
    if spec.trim().is_empty() {
        return Err(bad(
            "empty; expected <count>x<model>[,...], e.g. 2xA100-80GB".into(),
        ));
    }
    let mut out = Vec::new();
    let mut total: u32 = 0;
    for item in spec.split(',').map(str::trim) {
        let (item_model, mode) = match item.rsplit_once(':') {
            Some((m, opt)) if opt.trim().eq_ignore_ascii_case("mig") => (m, SimMode::Mig),
            Some((m, opt)) if opt.trim().eq_ignore_ascii_case("vfio") => (m, SimMode::Vfio),
            Some((_, opt)) => {
                return Err(bad(format!(
                    "unknown option {:?} in {item:?}; the options are :mig and :vfio",
                    opt.trim()
                )))
            }
            None => (item, SimMode::Plain),
        };
        let mig = mode == SimMode::Mig;
        let Some((count, model)) = item_model.split_once(['x', 'X']) else {
            return Err(bad(format!(
                "item {item:?} is not <count>x<model>, e.g. 2xA100-80GB"
            )));
        };
        let count: u32 = count.trim().parse().map_err(|_| {
            bad(format!(
                "count {:?} in {item:?} is not a number",
                count.trim()
            ))
        })?;
        if count == 0 {
            return Err(bad(format!("count in {item:?} must be at least 1")));
        }
        let Some(known) = known_model(model) else {
            let names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.model).collect();
            return Err(bad(format!(
                "unknown model {:?}; known models: {}",
                model.trim(),
                names.join(", ")
            )));
        };
        if mig && !MIG_FAMILIES.contains(&known.family()) {
            return Err(bad(format!(
                "{} has no MIG; MIG-capable: {}",
                known.model,
                MIG_FAMILIES.join(", ")
            )));
        }
        total = total.saturating_add(count);
        if total > MAX_SIM_GPUS {
            return Err(bad(format!("at most {MAX_SIM_GPUS} gpus in all")));
        }
        out.push((count, known, mode));
    }
    Ok(out)
}

/// A stable UUID for simulated GPU `index` of `model` whose nodes live in `dev_dir`: the same
/// across restarts, different between data dirs. NVIDIA's `GPU-` + 8-4-4-4-12 hex form.
pub fn sim_uuid(dev_dir: &Path, index: u32, model: &str) -> String {
    let mut h = Sha256::new();
    h.update(dev_dir.as_os_str().as_bytes());
    h.update([0u8]);
    h.update(index.to_string().as_bytes());
    h.update([0u8]);
    h.update(model.as_bytes());
    let hex: String = h
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The simulated inventory, fixed at start-up.
#[derive(Debug, Clone)]
pub struct SimulatedBackend {
    devices: Vec<GpuDevice>,
    control: Vec<DeviceNode>,
    /// Per device: simulated in MIG mode.
    mig: Vec<bool>,
    dev_dir: PathBuf,
    caps_major: u32,
    /// The sysfs tree of the GPUs, when any is simulated as bound to vfio-pci.
    passthrough: Option<HostRoot>,
}

/// IOMMU groups of simulated GPUs: this plus the GPU's index.
pub const SIM_IOMMU_GROUP_BASE: u32 = 100;

/// Lays out the simulated GPUs as the kernel would in sysfs under `root` (`<data>/dev/host`),
/// made afresh at each start: each GPU in its own IOMMU group (`/dev/vfio/<group>` for those
/// on vfio-pci), on `vfio-pci` or `nvidia`, with a 16 MiB BAR0, a 64-bit prefetchable BAR1 of
/// its memory rounded up to a power of two (128 GiB on an H100) and a 32 MiB BAR3, so that
/// `vm::passthrough` plans their VMs with the same code as real GPUs.
fn write_sysfs(root: &HostRoot, devices: &[GpuDevice], bar1: &[u64]) -> Result<(), GpuError> {
    use std::os::unix::fs::symlink;
    let top = root.path("/");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| GpuError::Io { path, source }
    };
    match std::fs::remove_dir_all(&top) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&top)(e)),
    }
    let mkdir = |p: &Path| std::fs::create_dir_all(p).map_err(io(p));
    let write = |p: &Path, text: &str| std::fs::write(p, text).map_err(io(p));
    let link = |target: &str, p: &Path| symlink(target, p).map_err(io(p));
    for d in [
        "/sys/bus/pci/devices",
        "/sys/bus/pci/drivers/nvidia",
        "/dev/vfio",
    ] {
        mkdir(&root.path(d))?;
    }
    mkdir(&root.path(format!("/sys/bus/pci/drivers/{}", crate::vfio::VFIO_DRIVER)))?;
    write(&root.path("/dev/vfio/vfio"), "")?;
    for (g, bar1) in devices.iter().zip(bar1) {
        let addr = &g.pci_address;
        let real = root.path(format!("/sys/devices/pci0000:00/{addr}"));
        mkdir(&real)?;
        let id = known_model(&g.model)
            .and_then(|m| m.pci_device_ids.first().copied())
            .unwrap_or(0);
        let bar = |start: u64, size: u64, flags: u64| {
            format!(
                "0x{start:016x} 0x{:016x} 0x{flags:016x}
",
                start + size - 1
            )
        };
        let bar1_start = 0x100_0000_0000 * (u64::from(g.index) + 1);
        let resource = [
            bar(
                0x9000_0000 + u64::from(g.index) * 0x200_0000,
                16 << 20,
                0x0004_0200,
            ),
            bar(bar1_start, *bar1, 0x0014_220c),
            "0x0000000000000000 0x0000000000000000 0x0000000000000000
"
            .to_string(),
            bar(bar1_start + bar1, 32 << 20, 0x0014_220c),
        ]
        .concat();
        let numa = g.numa_node.map_or("-1".to_string(), |n| n.to_string());
        for (name, value) in [
            ("vendor", "0x10de".to_string()),
            ("device", format!("0x{id:04x}")),
            ("class", "0x030200".to_string()),
            ("numa_node", numa),
            ("resource", resource),
        ] {
            write(&real.join(name), &format!("{}\n", value.trim_end()))?;
        }
        let driver = if g.is_vfio() {
            crate::vfio::VFIO_DRIVER
        } else {
            "nvidia"
        };
        link(
            &format!("../../../bus/pci/drivers/{driver}"),
            &real.join("driver"),
        )?;
        let group = g.iommu_group.unwrap_or(SIM_IOMMU_GROUP_BASE + g.index);
        let gdir = root.path(format!("/sys/kernel/iommu_groups/{group}/devices"));
        mkdir(&gdir)?;
        link(
            &format!("../../../kernel/iommu_groups/{group}"),
            &real.join("iommu_group"),
        )?;
        link(
            &format!("../../../../devices/pci0000:00/{addr}"),
            &gdir.join(addr),
        )?;
        link(
            &format!("../../../devices/pci0000:00/{addr}"),
            &root.path(format!("/sys/bus/pci/devices/{addr}")),
        )?;
        if g.is_vfio() {
            write(&root.path(format!("/dev/vfio/{group}")), "")?;
        }
    }
    Ok(())
}

/// The dynamic major of `nvidia-caps` when `/proc/devices` does not list it.
const DEFAULT_CAPS_MAJOR: u32 = 236;

impl SimulatedBackend {
    /// Parses `spec` and creates the device nodes under `dev_dir` (created if missing). The uvm
    /// major comes from the host's `/proc/devices` through `root`, else 510.
    pub fn new(spec: &str, dev_dir: &Path, root: &HostRoot) -> Result<Self, GpuError> {
        let models = parse_sim_spec(spec)?;
        if dev_dir.as_os_str().is_empty() {
            return Err(GpuError::NoSimDevDir);
        }
        std::fs::create_dir_all(dev_dir).map_err(|source| GpuError::Io {
            path: dev_dir.to_path_buf(),
            source,
        })?;
        // The canonical path keys the UUIDs, so `./data` and `/abs/data` name the same GPUs.
        let dev_dir = dev_dir.canonicalize().map_err(|source| GpuError::Io {
            path: dev_dir.to_path_buf(),
            source,
        })?;

        let total: u32 = models.iter().map(|(n, _, _)| n).sum();
        let vfio = models.iter().any(|(_, _, m)| *m == SimMode::Vfio);
        let first_half = total.div_ceil(2);
        let mut devices = Vec::new();
        let mut mig = Vec::new();
        let mut bar1 = Vec::new();
        let mut index: u32 = 0;
        for (count, model, mode) in models {
            for _ in 0..count {
                mig.push(mode == SimMode::Mig);
                let host_path = dev_dir.join(format!("nvidia{index}"));
                ensure_char_device(&host_path, NVIDIA_MAJOR, index)?;
                let bus = SIM_PCI_BUSES[(index as usize) % SIM_PCI_BUSES.len()];
                let domain = index / SIM_PCI_BUSES.len() as u32;
                devices.push(GpuDevice {
                    uuid: sim_uuid(&dev_dir, index, model.model),
                    index,
                    model: model.model.to_string(),
                    vram: model.vram_bytes(),
                    pci_address: format!("{domain:04x}:{bus:02x}:00.0"),
                    numa_node: Some(if index < first_half { 0 } else { 1 }),
                    node: DeviceNode {
                        container_path: PathBuf::from(format!("/dev/nvidia{index}")),
                        host_path,
                        major: NVIDIA_MAJOR,
                        minor: index,
                    },
                    // Plain simulated GPUs have no driver (as documented on `GpuDevice`).
                    driver: (mode == SimMode::Vfio).then(|| crate::vfio::VFIO_DRIVER.to_string()),
                    iommu_group: (mode == SimMode::Vfio).then_some(SIM_IOMMU_GROUP_BASE + index),
                    mig_enabled: false,
                    mig: None,
                });
                bar1.push(model.vram_bytes().next_power_of_two());
                index += 1;
            }
        }

        let uvm_major = proc_devices_major(root, "nvidia-uvm").unwrap_or(DEFAULT_UVM_MAJOR);
        let mut control = Vec::new();
        for (name, major, minor) in [
            ("nvidiactl", NVIDIA_MAJOR, NVIDIACTL_MINOR),
            ("nvidia-uvm", uvm_major, 0),
            ("nvidia-uvm-tools", uvm_major, 1),
        ] {
            let host_path = dev_dir.join(name);
            ensure_char_device(&host_path, major, minor)?;
            control.push(DeviceNode {
                container_path: PathBuf::from(format!("/dev/{name}")),
                host_path,
                major,
                minor,
            });
        }
        let passthrough = if vfio {
            let root = HostRoot::at(dev_dir.join("host"));
            write_sysfs(&root, &devices, &bar1)?;
            Some(root)
        } else {
            None
        };
        Ok(Self {
            devices,
            control,
            mig,
            passthrough,
            caps_major: proc_devices_major(root, "nvidia-caps").unwrap_or(DEFAULT_CAPS_MAJOR),
            dev_dir,
        })
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

impl GpuBackend for SimulatedBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Simulated
    }

    fn devices(&self) -> Result<Vec<GpuDevice>, GpuError> {
        Ok(self.devices.clone())
    }

    fn control_devices(&self) -> Vec<DeviceNode> {
        self.control.clone()
    }

    fn driver_files(&self) -> Vec<(PathBuf, PathBuf)> {
        Vec::new()
    }

    fn passthrough_root(&self) -> Option<HostRoot> {
        self.passthrough.clone()
    }

    fn mig_control(
        &self,
        state_dir: &Path,
    ) -> Result<Option<Box<dyn crate::mig::MigControl>>, GpuError> {
        if !self.mig.contains(&true) {
            return Ok(None);
        }
        let gpus: Vec<(&str, u64, bool)> = self
            .devices
            .iter()
            .zip(&self.mig)
            .map(|(g, m)| (g.uuid.as_str(), g.vram, *m))
            .collect();
        let file = state_dir.join("mig-state.json");
        crate::mig::SimulatedMig::persistent(&gpus, file)
            .map(|m| Some(Box::new(m) as Box<dyn crate::mig::MigControl>))
            .map_err(|e| GpuError::Nvml(e.to_string()))
    }

    /// Real character devices under the data dir, numbered as the driver numbers them.
    fn mig_caps(&self, gpu: &GpuDevice, gi: u32, ci: u32) -> Vec<DeviceNode> {
        let dir = self.dev_dir.join("nvidia-caps");
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create simulated MIG caps");
            return Vec::new();
        }
        [None, Some(ci)]
            .into_iter()
            .filter_map(|c| {
                let minor = super::mig_cap_minor(gpu.index, gi, c);
                let host_path = dir.join(format!("nvidia-cap{minor}"));
                match ensure_char_device(&host_path, self.caps_major, minor) {
                    Ok(()) => Some(DeviceNode {
                        container_path: PathBuf::from(format!(
                            "/dev/nvidia-caps/nvidia-cap{minor}"
                        )),
                        host_path,
                        major: self.caps_major,
                        minor,
                    }),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot create simulated MIG cap node");
                        None
                    }
                }
            })
            .collect()
    }

    fn telemetry(
        &self,
        gpu: &GpuDevice,
        load: &crate::telemetry::GpuLoad,
    ) -> Option<crate::telemetry::GpuReading> {
        Some(crate::telemetry::simulated_reading(gpu, load))
    }

    fn process_utilisation(&self, uuid: &str, _since_us: u64) -> Vec<(u32, u32)> {
        self.processes(uuid)
            .into_iter()
            .filter_map(|p| Some((p.pid, p.sm?)))
            .collect()
    }

    fn process_memory(&self, uuid: &str) -> Vec<(u32, u64)> {
        self.processes(uuid)
            .into_iter()
            .filter_map(|p| Some((p.pid, p.mem?)))
            .collect()
    }

    fn measures_processes(&self) -> bool {
        true
    }
}

/// One process line of a simulated GPU's process table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SimProcess {
    pub pid: u32,
    /// SM utilisation, percent.
    pub sm: Option<u32>,
    /// GPU memory, bytes.
    pub mem: Option<u64>,
}

/// Parses `nvidia<i>.procs`: one process per line, `<host pid> [sm=<percent>] [mem=<bytes>]`,
/// `#` comments. Bad lines are skipped.
pub(crate) fn parse_procs(text: &str) -> Vec<SimProcess> {
    text.lines()
        .filter_map(|l| {
            let l = l.split('#').next()?.trim();
            let mut f = l.split_whitespace();
            let pid = f.next()?.parse().ok()?;
            let mut p = SimProcess {
                pid,
                sm: None,
                mem: None,
            };
            for kv in f {
                match kv.split_once('=') {
                    Some(("sm", v)) => p.sm = v.parse().ok(),
                    Some(("mem", v)) => p.mem = v.parse().ok(),
                    _ => {}
                }
            }
            Some(p)
        })
        .collect()
}

impl SimulatedBackend {
    /// The simulated driver's per-process table of GPU `uuid`: a file beside its device node,
    /// `<dev dir>/nvidia<i>.procs`, that tests (or an operator trying things out) write, as
    /// `nvidia<i>.fault` injects faults. It stands in for NVML's
    /// `nvmlDeviceGetComputeRunningProcesses` and `nvmlDeviceGetProcessUtilization`.
    fn processes(&self, uuid: &str) -> Vec<SimProcess> {
        let Some(g) = self.devices.iter().find(|g| g.uuid == uuid) else {
            return Vec::new();
        };
        std::fs::read_to_string(self.dev_dir.join(format!("nvidia{}.procs", g.index)))
            .map(|t| parse_procs(&t))
            .unwrap_or_default()
    }
}

/// Makes `path` a root-owned character device `major:minor` with mode 0660. An existing correct
/// node is kept (mode and owner fixed if needed); anything else but a directory is replaced
/// atomically (mknod beside it, then rename), so a reader never sees the path missing.
pub(crate) fn ensure_char_device(path: &Path, major: u32, minor: u32) -> Result<(), GpuError> {
    let err = |source: std::io::Error| GpuError::DeviceNode {
        path: path.to_path_buf(),
        source,
    };
    let want = makedev(u64::from(major), u64::from(minor));
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_char_device() && md.rdev() == want => {
            if md.mode() & 0o7777 != 0o660 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                    .map_err(err)?;
            }
            if md.uid() != 0 || md.gid() != 0 {
                std::os::unix::fs::chown(path, Some(0), Some(0)).map_err(err)?;
            }
            return Ok(());
        }
        Ok(md) if md.is_dir() => {
            return Err(err(std::io::Error::other("a directory is in the way")));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let name = path
        .file_name()
        .ok_or_else(|| err(std::io::Error::other("no file name")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    mknod(&tmp, SFlag::S_IFCHR, Mode::from_bits_truncate(0o660), want)
        .map_err(|e| err(e.into()))?;
    // mknod honours the umask; chown/chmod make the result independent of it.
    let finish = std::os::unix::fs::chown(&tmp, Some(0), Some(0))
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660)))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = finish {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn nodes_of(dir: &Path) -> (u32, u32, u32) {
        let md = fs::symlink_metadata(dir).unwrap();
        assert!(md.file_type().is_char_device(), "{}", dir.display());
        let rdev = md.rdev();
        (
            nix::sys::stat::major(rdev) as u32,
            nix::sys::stat::minor(rdev) as u32,
            md.mode() & 0o7777,
        )
    }

    #[test]
    fn parses_process_tables() {
        assert_eq!(
            parse_procs("# pid sm mem\n42 sm=80 mem=1024\n\nbad\n7 mem=5\n"),
            vec![
                SimProcess {
                    pid: 42,
                    sm: Some(80),
                    mem: Some(1024)
                },
                SimProcess {
                    pid: 7,
                    sm: None,
                    mem: Some(5)
                },
            ]
        );
    }

    #[test]
    fn parses_good_specs() {
        let got = parse_sim_spec("2xA100-80GB, 1xh100-80gb:MIG, 1xL4-24GB:vfio").unwrap();
        let got: Vec<(u32, &str, SimMode)> =
            got.iter().map(|(n, m, g)| (*n, m.model, *g)).collect();
        assert_eq!(
            got,
            vec![
                (2, "A100-80GB", SimMode::Plain),
                (1, "H100-80GB", SimMode::Mig),
                (1, "L4-24GB", SimMode::Vfio)
            ]
        );
        assert_eq!(parse_sim_spec("1xH200-141GB").unwrap()[0].1.vram_gib, 141);
    }

    #[test]
    fn rejects_bad_specs() {
        let why = |spec: &str| match parse_sim_spec(spec) {
            Err(GpuError::BadSimSpec { why, .. }) => why,
            other => panic!("{spec:?}: {other:?}"),
        };
        let w = why("2xA100-80GB,1xZ9000-1GB");
        assert!(w.contains("Z9000-1GB") && w.contains("H100-80GB"), "{w}");
        assert!(why("0xA100-80GB").contains("at least 1"));
        assert!(why("").contains("empty"));
        assert!(why("garbage").contains("not <count>x<model>"));
        assert!(why("twoxA100-80GB").contains("not a number"));
        assert!(why("-1xA100-80GB").contains("not a number"));
        assert!(why("2xA100-80GB,").contains("not <count>x<model>"));
        assert!(why("200xA100-80GB,100xL4-24GB").contains("at most 255"));
        assert!(why("1xL4-24GB:mig").contains("L4-24GB has no MIG"));
        assert!(why("1xA100-80GB:nvlink").contains("the options are :mig and :vfio"));
        let e = parse_sim_spec("1xFOO").unwrap_err().to_string();
        assert!(e.starts_with("bad --simulate-gpus spec \"1xFOO\""), "{e}");
    }

    /// A simulated GPU in MIG mode: its slices join the inventory with their own UUIDs, the
    /// GI's memory, the parent's node and two real capability nodes numbered as the driver
    /// numbers them; the layout is kept in the state file across a new backend.
    #[test]
    fn mig_slices_join_the_inventory() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::at(dir.path());
        let dev = dir.path().join("dev");
        let b = SimulatedBackend::new("1xA100-80GB:mig,1xA100-80GB", &dev, &root).unwrap();
        let ctl = b.mig_control(&dev).unwrap().unwrap();
        let inv = crate::gpu::inventory(&b, Some(&*ctl)).unwrap();
        assert_eq!(inv.len(), 2);
        assert!(inv[0].mig_enabled && !inv[0].schedulable());
        assert!(!inv[1].mig_enabled && inv[1].schedulable());

        let gi = crate::mig::create(&*ctl, &inv[0].uuid, "2g.20gb").unwrap();
        let inv = crate::gpu::inventory(&b, Some(&*ctl)).unwrap();
        assert_eq!(inv.len(), 3);
        let s = &inv[1];
        let m = s.mig.as_ref().unwrap();
        assert!(s.uuid.starts_with("MIG-") && s.schedulable() && !s.is_physical());
        assert_eq!(s.model, "A100-80GB-2g.20gb");
        assert_eq!(s.vram, 20 << 30);
        assert_eq!((m.slice.gi, m.slice.ci, m.slice.slices), (gi.id, 0, 2));
        assert_eq!(m.slice.parent_uuid, inv[0].uuid);
        let nodes = s.device_nodes();
        assert_eq!(nodes[0], inv[0].node);
        let minors: Vec<u32> = nodes[1..].iter().map(|n| n.minor).collect();
        assert_eq!(
            minors,
            vec![
                crate::gpu::mig_cap_minor(0, gi.id, None),
                crate::gpu::mig_cap_minor(0, gi.id, Some(0))
            ]
        );
        for n in &nodes[1..] {
            assert_eq!(nodes_of(&n.host_path).0, n.major);
            assert_eq!(nodes_of(&n.host_path).1, n.minor);
            assert_eq!(
                n.container_path,
                PathBuf::from(format!("/dev/nvidia-caps/nvidia-cap{}", n.minor))
            );
        }

        // A new backend over the same data dir (a daemon restart) finds the same slice.
        let b2 = SimulatedBackend::new("1xA100-80GB:mig,1xA100-80GB", &dev, &root).unwrap();
        let ctl2 = b2.mig_control(&dev).unwrap().unwrap();
        let again = crate::gpu::inventory(&b2, Some(&*ctl2)).unwrap();
        assert_eq!(again[1].uuid, s.uuid);
        // Without `:mig` there is no MIG control at all.
        let plain = SimulatedBackend::new("1xA100-80GB", &dir.path().join("d2"), &root).unwrap();
        assert!(plain.mig_control(&dev).unwrap().is_none());
    }

    #[test]
    fn uuids_are_stable_and_distinct() {
        let a = sim_uuid(Path::new("/var/lib/gpuvisor/dev"), 0, "A100-80GB");
        assert_eq!(
            a,
            sim_uuid(Path::new("/var/lib/gpuvisor/dev"), 0, "A100-80GB")
        );
        assert_ne!(
            a,
            sim_uuid(Path::new("/var/lib/gpuvisor/dev"), 1, "A100-80GB")
        );
        assert_ne!(
            a,
            sim_uuid(Path::new("/var/lib/gpuvisor/dev"), 0, "H100-80GB")
        );
        assert_ne!(a, sim_uuid(Path::new("/other/dev"), 0, "A100-80GB"));
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts[0], "GPU");
        assert_eq!(
            parts[1..].iter().map(|p| p.len()).collect::<Vec<_>>(),
            vec![8, 4, 4, 4, 12]
        );
        assert!(parts[1..].iter().all(|p| p
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())));
    }

    #[test]
    fn builds_inventory_and_real_device_nodes() {
        let data = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        fs::create_dir_all(host.path().join("proc")).unwrap();
        fs::write(
            host.path().join("proc/devices"),
            "Character devices:\n195 nvidia-frontend\n507 nvidia-uvm\n",
        )
        .unwrap();
        let root = HostRoot::at(host.path());
        let dev = data.path().join("dev");
        let b = SimulatedBackend::new("2xA100-80GB,1xH100-80GB", &dev, &root).unwrap();
        assert_eq!(b.kind(), BackendKind::Simulated);
        let gpus = b.devices().unwrap();
        assert_eq!(gpus.len(), 3);
        let dev = dev.canonicalize().unwrap();
        for (i, g) in gpus.iter().enumerate() {
            let i = i as u32;
            assert_eq!(g.index, i);
            assert_eq!(
                g.node.container_path,
                PathBuf::from(format!("/dev/nvidia{i}"))
            );
            assert_eq!(g.node.host_path, dev.join(format!("nvidia{i}")));
            assert_eq!((g.node.major, g.node.minor), (195, i));
            assert_eq!(nodes_of(&g.node.host_path), (195, i, 0o660));
            let md = fs::metadata(&g.node.host_path).unwrap();
            assert_eq!((md.uid(), md.gid()), (0, 0));
        }
        assert_eq!(gpus[0].model, "A100-80GB");
        assert_eq!(gpus[2].model, "H100-80GB");
        assert_eq!(gpus[0].vram, 80 << 30);
        let numa: Vec<Option<u32>> = gpus.iter().map(|g| g.numa_node).collect();
        assert_eq!(numa, vec![Some(0), Some(0), Some(1)]);
        assert_eq!(gpus[0].pci_address, "0000:1b:00.0");
        let mut addrs: Vec<&str> = gpus.iter().map(|g| g.pci_address.as_str()).collect();
        addrs.dedup();
        assert_eq!(addrs.len(), 3);
        let mut uuids: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
        uuids.sort_unstable();
        uuids.dedup();
        assert_eq!(uuids.len(), 3);

        let ctl = b.control_devices();
        let names: Vec<_> = ctl.iter().map(|d| d.container_path.clone()).collect();
        assert_eq!(
            names,
            ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"].map(PathBuf::from)
        );
        assert_eq!(nodes_of(&ctl[0].host_path), (195, 255, 0o660));
        assert_eq!(nodes_of(&ctl[1].host_path), (507, 0, 0o660));
        assert_eq!(nodes_of(&ctl[2].host_path), (507, 1, 0o660));
        assert!(b.driver_files().is_empty());

        // A restart sees the same GPUs; another data dir different ones.
        let again = SimulatedBackend::new("2xA100-80GB,1xH100-80GB", &dev, &root).unwrap();
        assert_eq!(again.devices().unwrap(), gpus);
        let other = tempfile::tempdir().unwrap();
        let elsewhere = SimulatedBackend::new("2xA100-80GB,1xH100-80GB", other.path(), &root)
            .unwrap()
            .devices()
            .unwrap();
        assert_ne!(elsewhere[0].uuid, gpus[0].uuid);
    }

    #[test]
    fn uvm_major_defaults_without_proc_devices() {
        let data = tempfile::tempdir().unwrap();
        let root = HostRoot::at(data.path().join("nohost"));
        let b = SimulatedBackend::new("1xL4-24GB", data.path(), &root).unwrap();
        assert_eq!(b.control_devices()[1].major, DEFAULT_UVM_MAJOR);
        assert_eq!(b.devices().unwrap()[0].numa_node, Some(0));
        assert!(matches!(
            SimulatedBackend::new("1xL4-24GB", Path::new(""), &root),
            Err(GpuError::NoSimDevDir)
        ));
    }

    #[test]
    fn recreating_nodes_is_idempotent_and_repairs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nvidia0");
        ensure_char_device(&p, 195, 0).unwrap();
        let ino = fs::metadata(&p).unwrap().ino();
        ensure_char_device(&p, 195, 0).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().ino(),
            ino,
            "a correct node is kept"
        );

        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        ensure_char_device(&p, 195, 0).unwrap();
        assert_eq!(nodes_of(&p), (195, 0, 0o660));
        assert_eq!(fs::metadata(&p).unwrap().ino(), ino, "mode fixed in place");

        ensure_char_device(&p, 195, 7).unwrap();
        assert_eq!(nodes_of(&p), (195, 7, 0o660), "wrong numbers replaced");

        let f = dir.path().join("nvidiactl");
        fs::write(&f, b"plain file").unwrap();
        ensure_char_device(&f, 195, 255).unwrap();
        assert_eq!(nodes_of(&f), (195, 255, 0o660), "plain file replaced");

        let d = dir.path().join("nvidia-uvm");
        fs::create_dir(&d).unwrap();
        assert!(matches!(
            ensure_char_device(&d, 510, 0),
            Err(GpuError::DeviceNode { .. })
        ));
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
