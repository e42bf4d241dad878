//! Host reads for telemetry: one reading per GPU and per instance, taken by the control layer's
//! 1 Hz sampler through [`HostSampler::sample`].
//!
//! Why here: the node layer is the only code that touches the host, so every counter the
//! sampler needs (NVML, cgroup files, `statvfs` of the instance's mounts, veth counters, the
//! kernel log for XID errors) is read in this module and handed up as plain numbers. The
//! control layer turns counters into rates, keeps history and raises alarms.
//!
//! Key decisions:
//! - GPU readings come from the backend ([`GpuBackend::telemetry`]): NVML on real GPUs; the
//!   simulated backend derives its values from what actually runs on each GPU ([`GpuLoad`]:
//!   allocated share of running instances, the limiter's VRAM accounting), so dashboards and
//!   alarms can be exercised without hardware. Simulated readings say so (`simulated`).
//! - XID errors are read from the kernel log (`/dev/kmsg`, `NVRM: Xid (PCI:…): N, …`), which
//!   every driver version writes, instead of NVML event sets whose handle would have to live as
//!   long as the library (a self-referential backend). Simulated GPUs get faults injected through
//!   a file beside their device node (`nvidia<i>.fault`: lines `xid=79`, `temp=95`, `lost`).
//! - Counters stay cumulative (CPU nanoseconds, network bytes); rates are the caller's business,
//!   because only the caller knows the previous sample.

use crate::gpu::GpuDevice;
use crate::{HostRoot, Node};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// What runs on one GPU, as the control layer knows it: drives simulated readings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuLoad {
    /// Thousandths of the GPU allocated to *running* instances.
    pub running_milli: u32,
    /// VRAM the limiter accounts to fractional instances on this GPU (bytes).
    pub limiter_used: u64,
    /// Utilisation the limiter sampler published for them, basis points (0 when unknown).
    pub limiter_util_bp: u32,
}

/// One GPU at one instant. Fields a backend cannot read stay `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuReading {
    pub uuid: String,
    pub index: u32,
    /// Percent of time a kernel ran.
    pub util: Option<f64>,
    pub mem_used: Option<u64>,
    pub mem_total: u64,
    pub temp_c: Option<f64>,
    pub power_w: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub mem_clock_mhz: Option<u32>,
    /// NVML's clocks-throttle-reason bit mask (0 = not throttled).
    pub throttle_reasons: Option<u64>,
    /// PCIe throughput, KB/s (NVML's unit, and DCGM's).
    pub pcie_tx_kbs: Option<u64>,
    pub pcie_rx_kbs: Option<u64>,
    /// Volatile ECC counts since the driver loaded.
    pub ecc_corrected: Option<u64>,
    pub ecc_uncorrected: Option<u64>,
    /// XID errors seen since the previous reading (simulated faults; real ones come from the
    /// kernel log through [`HostSampler`]).
    pub xids: Vec<u32>,
    /// The GPU stopped answering (NVML `GPU_IS_LOST`): it fell off the bus.
    pub lost: bool,
    pub simulated: bool,
}

/// An XID error from the kernel log, attributed to a GPU by its PCI address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidEvent {
    pub pci_address: String,
    pub xid: u32,
    /// The driver's text after the number.
    pub detail: String,
}

/// The instance whose counters to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRef {
    pub id: String,
    /// GPU UUIDs it holds (for per-process GPU queries).
    pub gpus: Vec<String>,
}

/// One instance at one instant; counters are cumulative.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstanceReading {
    pub id: String,
    /// CPU time of the instance's cgroup, nanoseconds since it was created.
    pub cpu_ns: Option<u64>,
    pub mem_bytes: Option<u64>,
    /// Container disk (`<data>/instances/<id>/disk`).
    pub disk_used: Option<u64>,
    pub disk_total: Option<u64>,
    /// All volumes under `<data>/instances/<id>/volumes`, summed.
    pub volume_used: u64,
    pub volume_total: u64,
    /// As seen from inside the instance (the host veth's tx is the instance's rx).
    pub net_rx_bytes: Option<u64>,
    pub net_tx_bytes: Option<u64>,
    /// Its processes' GPU memory (NVML per-process), bytes; `None` where the backend cannot tell.
    pub gpu_mem: Option<u64>,
    /// Its processes' SM utilisation summed over its GPUs, percent.
    pub gpu_util: Option<f64>,
}

/// What the runtime reads of an instance's storage and network (the cgroup part is shared):
/// a container's mounted disk and volumes and its veth; a VM's overlay, volume images and tap.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuntimeUsage {
    pub disk_used: Option<u64>,
    pub disk_total: Option<u64>,
    pub volume_used: u64,
    pub volume_total: u64,
    /// As seen from inside the instance.
    pub net_rx_bytes: Option<u64>,
    pub net_tx_bytes: Option<u64>,
}

/// One sample of the whole host.
#[derive(Debug, Clone, Default)]
pub struct HostSample {
    pub gpus: Vec<GpuReading>,
    pub instances: Vec<InstanceReading>,
    pub xids: Vec<XidEvent>,
}

/// Long-lived host reader: keeps the kernel-log cursor between samples.
pub struct HostSampler {
    kmsg: Option<std::fs::File>,
    /// Newest NVML process-sample timestamp seen (µs), for the next query.
    since_us: u64,
}

impl std::fmt::Debug for HostSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSampler")
            .field("kmsg", &self.kmsg.is_some())
            .finish()
    }
}

impl HostSampler {
    /// Opens the kernel log positioned at its end (only XIDs from now on are news; older ones
    /// were handled by a previous daemon or predate the last reset). Without `/dev/kmsg` (a
    /// container without it, a fixture tree) XIDs come only from the backend.
    pub fn new(root: &HostRoot) -> Self {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let path = root.path("/dev/kmsg");
        let kmsg = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .ok()
            .and_then(|mut f| {
                let is_dev = f.metadata().is_ok_and(|m| m.file_type().is_char_device());
                if is_dev {
                    use std::io::Seek;
                    f.seek(std::io::SeekFrom::End(0)).ok()?;
                }
                Some(f)
            });
        Self { kmsg, since_us: 0 }
    }

    /// Reads every GPU (with its load, by UUID) and every listed instance once.
    pub fn sample(
        &mut self,
        node: &Node,
        loads: &BTreeMap<String, GpuLoad>,
        instances: &[InstanceRef],
    ) -> HostSample {
        let idle = GpuLoad::default();
        let gpus = node
            .gpus()
            .iter()
            .filter(|g| g.is_physical())
            .filter_map(|g| node.gpu.telemetry(g, loads.get(&g.uuid).unwrap_or(&idle)))
            .collect();
        let per_proc = self.gpu_processes(node, instances);
        let instances = instances
            .iter()
            .map(|i| {
                let mut r = node.instance_reading(&i.id);
                if let Some((mem, util)) = per_proc.get(&i.id) {
                    r.gpu_mem = Some(*mem);
                    r.gpu_util = Some(*util);
                }
                r
            })
            .collect();
        HostSample {
            gpus,
            instances,
            xids: self.read_kmsg(),
        }
    }

    /// Per instance: (GPU memory, SM utilisation %) of its processes, from NVML's per-process
    /// queries; processes are mapped to instances by their cgroup.
    fn gpu_processes(
        &mut self,
        node: &Node,
        instances: &[InstanceRef],
    ) -> BTreeMap<String, (u64, f64)> {
        let mut out: BTreeMap<String, (u64, f64)> = BTreeMap::new();
        let uuids: BTreeSet<&String> = instances.iter().flat_map(|i| &i.gpus).collect();
        if uuids.is_empty() {
            return out;
        }
        let owner = |pid: u32| -> Option<String> {
            let cg =
                std::fs::read_to_string(node.cfg.root.path(format!("/proc/{pid}/cgroup"))).ok()?;
            instances
                .iter()
                .find(|i| cg.contains(&format!("/{}/{}", node.cfg.root.cgroup_parent(), i.id)))
                .map(|i| i.id.clone())
        };
        let since = self.since_us;
        for uuid in uuids {
            let mem = node.gpu.process_memory(uuid);
            let util = node.gpu.process_utilisation(uuid, since);
            if mem.is_empty() && util.is_empty() {
                continue;
            }
            for (pid, bytes) in mem {
                if let Some(id) = owner(pid) {
                    out.entry(id).or_default().0 += bytes;
                }
            }
            for (pid, sm) in util {
                if let Some(id) = owner(pid) {
                    out.entry(id).or_default().1 += f64::from(sm);
                }
            }
        }
        self.since_us = now_us().saturating_sub(1_000_000);
        out
    }

    fn read_kmsg(&mut self) -> Vec<XidEvent> {
        let Some(f) = self.kmsg.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        // /dev/kmsg returns one record per read; EAGAIN when caught up, EPIPE when records were
        // overwritten before we read them (skip on). A regular file (fixture) reads to its end.
        for _ in 0..10_000 {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    out.extend(text.lines().filter_map(parse_xid_line));
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        out
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Parses the driver's XID line: `NVRM: Xid (PCI:0000:3b:00): 79, pid=..., GPU has fallen off
/// the bus.` The PCI address has no function number; it is returned as `0000:3b:00`.
pub fn parse_xid_line(line: &str) -> Option<XidEvent> {
    let rest = &line[line.find("NVRM: Xid (")? + "NVRM: Xid (".len()..];
    let rest = rest.strip_prefix("PCI:").unwrap_or(rest);
    let (addr, rest) = rest.split_once(')')?;
    let rest = rest.trim_start_matches(':').trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let xid = digits.parse().ok()?;
    let detail = rest[digits.len()..]
        .trim_start_matches(',')
        .trim()
        .to_string();
    Some(XidEvent {
        pci_address: addr.trim().to_ascii_lowercase(),
        xid,
        detail,
    })
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// cgroup v1 (`cpuacct`, `memory` hierarchies, also the joined `cpu,cpuacct`) with v2 fallbacks
/// (`cpu.stat` `usage_usec`, `memory.current`).
fn read_cgroup(root: &HostRoot, id: &str) -> (Option<u64>, Option<u64>) {
    let rel = format!("{}/{id}", root.cgroup_parent());
    let base = root.path("/sys/fs/cgroup");
    let cpu = ["cpuacct", "cpu,cpuacct"]
        .iter()
        .find_map(|h| read_u64(&base.join(h).join(&rel).join("cpuacct.usage")))
        .or_else(|| {
            let stat = std::fs::read_to_string(base.join(&rel).join("cpu.stat")).ok()?;
            let usec: u64 = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse()
                .ok()?;
            Some(usec * 1000)
        });
    let mem = read_u64(&base.join("memory").join(&rel).join("memory.usage_in_bytes"))
        .or_else(|| read_u64(&base.join(&rel).join("memory.current")));
    (cpu, mem)
}

/// Anonymous memory charged to instance `id`'s cgroup (`anon` in v2's `memory.stat`, `rss`
/// in v1's): what a lower limit could only take back by killing.
pub fn cgroup_anon(root: &HostRoot, id: &str) -> Option<u64> {
    let rel = format!("{}/{id}", root.cgroup_parent());
    let base = root.path("/sys/fs/cgroup");
    let field = |path: PathBuf, key: &str| -> Option<u64> {
        let stat = std::fs::read_to_string(path).ok()?;
        stat.lines()
            .find_map(|l| l.strip_prefix(key))?
            .trim()
            .parse()
            .ok()
    };
    field(base.join(&rel).join("memory.stat"), "anon ")
        .or_else(|| field(base.join("memory").join(&rel).join("memory.stat"), "rss "))
}

/// (used, total) bytes of the file system mounted at `path`, if it is a mount point of ours.
fn fs_usage(path: &Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let frsize = st.fragment_size() as u64;
    let total = st.blocks() as u64 * frsize;
    let free = st.blocks_free() as u64 * frsize;
    Some((total.saturating_sub(free), total))
}

/// Whether `path` is a mount point (its device differs from its parent's).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(m), Some(parent)) = (std::fs::metadata(path), path.parent()) else {
        return false;
    };
    std::fs::metadata(parent).is_ok_and(|p| p.dev() != m.dev())
}

/// The cumulative counters of one instance: its cgroup's CPU and memory and `usage`, what its
/// runtime read of its storage and network.
pub fn instance_reading(root: &HostRoot, id: &str, usage: RuntimeUsage) -> InstanceReading {
    let (cpu_ns, mem_bytes) = read_cgroup(root, id);
    InstanceReading {
        id: id.to_string(),
        cpu_ns,
        mem_bytes,
        disk_used: usage.disk_used,
        disk_total: usage.disk_total,
        volume_used: usage.volume_used,
        volume_total: usage.volume_total,
        net_rx_bytes: usage.net_rx_bytes,
        net_tx_bytes: usage.net_tx_bytes,
        gpu_mem: None,
        gpu_util: None,
    }
}

/// Transmit and receive byte counters of host network device `dev`, as seen from the other end
/// (the guest's or container's rx is the host device's tx).
pub fn peer_net_counters(root: &HostRoot, dev: &str) -> (Option<u64>, Option<u64>) {
    let net = root.path(format!("/sys/class/net/{dev}/statistics"));
    (
        read_u64(&net.join("tx_bytes")),
        read_u64(&net.join("rx_bytes")),
    )
}

/// A container's storage and network: statvfs of its mounted disk and volumes
/// (`<data>/instances/<id>/disk`, `.../volumes/*`) and the counters of its host veth `veth`.
pub fn container_usage(root: &HostRoot, data_dir: &Path, id: &str, veth: &str) -> RuntimeUsage {
    let dir: PathBuf = data_dir.join("instances").join(id);
    let disk_dir = dir.join("disk");
    let (disk_used, disk_total) = if is_mount_point(&disk_dir) {
        fs_usage(&disk_dir).map_or((None, None), |(u, t)| (Some(u), Some(t)))
    } else {
        (None, None)
    };
    let (mut volume_used, mut volume_total) = (0, 0);
    if let Ok(rd) = std::fs::read_dir(dir.join("volumes")) {
        for e in rd.flatten() {
            if is_mount_point(&e.path()) {
                if let Some((u, t)) = fs_usage(&e.path()) {
                    volume_used += u;
                    volume_total += t;
                }
            }
        }
    }
    let (net_rx_bytes, net_tx_bytes) = peer_net_counters(root, veth);
    RuntimeUsage {
        disk_used,
        disk_total,
        volume_used,
        volume_total,
        net_rx_bytes,
        net_tx_bytes,
    }
}

/// Nominal figures of a model family for simulated readings: (TDP W, max SM MHz, memory MHz).
fn sim_model_figures(model: &str) -> (f64, u32, u32) {
    match model.split('-').next().unwrap_or(model) {
        "A100" => (400.0, 1410, 1593),
        "H100" => (700.0, 1980, 2619),
        "H200" => (700.0, 1980, 3201),
        "L4" => (72.0, 2040, 6251),
        _ => (300.0, 1500, 1500),
    }
}

/// A simulated reading: utilisation is what the limiter measured if anything, else the share
/// allocated to running instances; memory is the limiter's VRAM accounting; temperature, power
/// and clocks follow utilisation. Faults from `nvidia<i>.fault` beside the device node override.
pub fn simulated_reading(gpu: &GpuDevice, load: &GpuLoad) -> GpuReading {
    let (tdp, sm_max, mem_clock) = sim_model_figures(&gpu.model);
    let util = if load.limiter_util_bp > 0 {
        f64::from(load.limiter_util_bp) / 100.0
    } else {
        f64::from(load.running_milli) / 10.0
    }
    .min(100.0);
    let busy = util / 100.0;
    let mut r = GpuReading {
        uuid: gpu.uuid.clone(),
        index: gpu.index,
        util: Some(util),
        mem_used: Some(load.limiter_used.min(gpu.vram)),
        mem_total: gpu.vram,
        temp_c: Some((32.0 + 40.0 * busy).round()),
        power_w: Some(((0.12 + 0.78 * busy) * tdp * 10.0).round() / 10.0),
        sm_clock_mhz: Some(if util > 0.0 { sm_max } else { 345 }),
        mem_clock_mhz: Some(mem_clock),
        throttle_reasons: Some(if util > 0.0 { 0 } else { 1 }),
        pcie_tx_kbs: Some((busy * 2_000.0) as u64),
        pcie_rx_kbs: Some((busy * 6_000.0) as u64),
        ecc_corrected: Some(0),
        ecc_uncorrected: Some(0),
        xids: Vec::new(),
        lost: false,
        simulated: true,
    };
    apply_faults(&gpu.node.host_path, gpu.index, &mut r);
    r
}

/// Faults injected into a simulated GPU: `temp=N` and `lost` stay until the line is removed;
/// each `xid=N` is reported once (the file is rewritten without it).
fn apply_faults(node_path: &Path, index: u32, r: &mut GpuReading) {
    let path = node_path.with_file_name(format!("nvidia{index}.fault"));
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let mut keep = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(x) = line.strip_prefix("xid=") {
            if let Ok(x) = x.trim().parse() {
                r.xids.push(x);
            }
            continue;
        }
        if let Some(t) = line.strip_prefix("temp=") {
            if let Ok(t) = t.trim().parse() {
                r.temp_c = Some(t);
            }
        } else if line == "lost" {
            r.lost = true;
        }
        keep.push(line);
    }
    if !r.xids.is_empty() {
        let mut rest = keep.join("\n");
        if !rest.is_empty() {
            rest.push('\n');
        }
        if let Err(e) = std::fs::write(&path, rest) {
            tracing::debug!(path = %path.display(), "cannot rewrite fault file: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn parses_xid_lines() {
        let e = parse_xid_line(
            "6,1234,5678,-;NVRM: Xid (PCI:0000:3B:00): 79, pid=1234, name=python, GPU has fallen off the bus.",
        )
        .unwrap();
        assert_eq!(e.pci_address, "0000:3b:00");
        assert_eq!(e.xid, 79);
        assert!(e.detail.starts_with("pid=1234"));
        let e = parse_xid_line("NVRM: Xid (0000:01:00): 13, Graphics Exception").unwrap();
        assert_eq!((e.pci_address.as_str(), e.xid), ("0000:01:00", 13));
        assert!(parse_xid_line("NVRM: loading NVIDIA UNIX x86_64 Kernel Module").is_none());
    }

    #[test]
    fn reads_cgroup_v1_and_v2_and_veth_counters() {
        let t = tempfile::tempdir().unwrap();
        let root = HostRoot::at(t.path());
        let w = |p: &str, v: &str| {
            let p = root.path(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        };
        w("/sys/fs/cgroup/cpuacct/gpuvisor/a1/cpuacct.usage", "5000\n");
        w(
            "/sys/fs/cgroup/memory/gpuvisor/a1/memory.usage_in_bytes",
            "4096\n",
        );
        w(
            "/sys/fs/cgroup/gpuvisor/b2/cpu.stat",
            "usage_usec 7\nuser_usec 5\n",
        );
        w("/sys/fs/cgroup/gpuvisor/b2/memory.current", "123\n");
        // A non-default prefix's veth: the name comes from the network, not a fixed pattern.
        w("/sys/class/net/grshba1/statistics/tx_bytes", "10\n");
        w("/sys/class/net/grshba1/statistics/rx_bytes", "20\n");
        let a = instance_reading(
            &root,
            "a1",
            container_usage(&root, t.path(), "a1", "grshba1"),
        );
        assert_eq!(
            (a.cpu_ns, a.mem_bytes, a.net_rx_bytes, a.net_tx_bytes),
            (Some(5000), Some(4096), Some(10), Some(20))
        );
        assert_eq!(a.disk_used, None);
        let b = instance_reading(&root, "b2", RuntimeUsage::default());
        assert_eq!((b.cpu_ns, b.mem_bytes), (Some(7000), Some(123)));
    }

    #[test]
    fn simulated_values_follow_load_and_faults() {
        let t = tempfile::tempdir().unwrap();
        let gpu = GpuDevice {
            uuid: "GPU-x".into(),
            index: 3,
            model: "H100-80GB".into(),
            vram: 80 << 30,
            pci_address: "0000:1b:00.0".into(),
            numa_node: None,
            node: crate::gpu::DeviceNode {
                container_path: "/dev/nvidia3".into(),
                host_path: t.path().join("nvidia3"),
                major: 195,
                minor: 3,
            },
            driver: None,
            iommu_group: None,
            mig_enabled: false,
            mig: None,
        };
        let idle = simulated_reading(&gpu, &GpuLoad::default());
        assert_eq!(idle.util, Some(0.0));
        assert!(idle.simulated);
        let busy = simulated_reading(
            &gpu,
            &GpuLoad {
                running_milli: 500,
                limiter_used: 1 << 30,
                limiter_util_bp: 0,
            },
        );
        assert_eq!(busy.util, Some(50.0));
        assert_eq!(busy.mem_used, Some(1 << 30));
        assert!(busy.temp_c > idle.temp_c && busy.power_w > idle.power_w);
        std::fs::write(t.path().join("nvidia3.fault"), "xid=79\ntemp=91\n").unwrap();
        let f = simulated_reading(&gpu, &GpuLoad::default());
        assert_eq!((f.xids.clone(), f.temp_c), (vec![79], Some(91.0)));
        let f = simulated_reading(&gpu, &GpuLoad::default());
        assert!(f.xids.is_empty(), "an xid is reported once");
        assert_eq!(f.temp_c, Some(91.0));
    }

    /// On a GPU machine (`GPUVISOR_GPU_TESTS=1`): NVML readings agree with `nvidia-smi` taken
    /// right after. Tolerances: memory total within 1 MiB, memory used within 256 MiB (other
    /// processes may allocate in between), temperature ±3 °C, power ±20 W or 15 %, memory clock
    /// ±5 %, SM clock ±15 % (boost moves between the two reads), utilisation ±25 points.
    #[test]
    fn nvml_matches_nvidia_smi() {
        if !crate::testfx::gpu_tests_enabled() {
            return;
        }
        use crate::gpu::GpuBackend;
        let b = crate::gpu::NvmlBackend::probe(&HostRoot::real())
            .unwrap()
            .unwrap();
        let readings: Vec<GpuReading> = b
            .devices()
            .unwrap()
            .iter()
            .map(|g| b.telemetry(g, &GpuLoad::default()).unwrap())
            .collect();
        let out = std::process::Command::new("nvidia-smi")
            .args([
                "--query-gpu=uuid,memory.total,memory.used,temperature.gpu,power.draw,clocks.mem,clocks.sm,utilization.gpu",
                "--format=csv,noheader,nounits",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let close = |a: f64, b: f64, tol: f64, what: &str| {
            assert!(
                (a - b).abs() <= tol,
                "{what}: nvml {a} vs nvidia-smi {b} (±{tol})"
            );
        };
        for line in text.lines() {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let r = readings.iter().find(|r| r.uuid == f[0]).unwrap();
            eprintln!("{r:?}\n{line}");
            let num = |i: usize| f[i].parse::<f64>().unwrap();
            const MIB: f64 = 1048576.0;
            close(r.mem_total as f64 / MIB, num(1), 1.0, "memory.total MiB");
            close(
                r.mem_used.unwrap() as f64 / MIB,
                num(2),
                256.0,
                "memory.used MiB",
            );
            close(r.temp_c.unwrap(), num(3), 3.0, "temperature");
            let p = num(4);
            close(r.power_w.unwrap(), p, (p * 0.15).max(20.0), "power W");
            let mc = num(5);
            close(
                f64::from(r.mem_clock_mhz.unwrap()),
                mc,
                mc * 0.05,
                "mem clock",
            );
            let sc = num(6);
            close(
                f64::from(r.sm_clock_mhz.unwrap()),
                sc,
                sc * 0.15,
                "sm clock",
            );
            close(r.util.unwrap(), num(7), 25.0, "utilisation");
            assert!(!r.simulated && !r.lost);
        }
    }
}
