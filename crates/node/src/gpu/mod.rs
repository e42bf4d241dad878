//! GPU inventory behind one trait, with a probing constructor ([`probe`]): NVML when a driver is
//! present, a sysfs PCI scan (vendor 0x10de) for GPUs without a usable driver library or bound to
//! vfio-pci, and a simulated backend for machines without GPUs.
//!
//! Why: everything above the node layer (scheduler, engine, API) only needs "which GPUs exist, how
//! big are they, which device nodes and driver files does a container need". Hiding the three
//! very different sources behind [`GpuBackend`] lets the same engine run on an H100 host, on a
//! host whose GPUs are all handed to VMs through vfio-pci, and on a laptop in CI.
//!
//! Key decisions:
//! - The choice is made once, at start-up, in a fixed order: `--simulate-gpus` wins, then NVML if
//!   `libnvidia-ml.so.1` loads *and* reports at least one GPU, then sysfs (which may find none: a
//!   host without GPUs still runs CPU instances). NVML is never tried when the [`HostRoot`] is a
//!   fixture tree, since it would describe the real machine, not the fixture.
//! - Simulated GPUs are real character devices (major 195, like the driver's) created under the
//!   data dir, so the container runtime's device plumbing (device cgroup rules, bind mounts) runs
//!   unchanged against them. Their UUIDs are derived from the data dir, the index and the model, so
//!   they survive daemon restarts (the store refers to GPUs by UUID) and differ between data dirs.
//! - Models are short names users type (`A100-80GB`): one table ([`KNOWN_MODELS`]) serves the
//!   simulator, the sysfs device-id lookup and the NVML name normaliser.

mod nvml;
mod sim;
mod sysfs;

pub use nvml::NvmlBackend;
pub use sim::{parse_sim_spec, sim_uuid, SimMode, SimulatedBackend, SIM_IOMMU_GROUP_BASE};
pub use sysfs::{scan_sysfs, SysfsBackend};

use crate::HostRoot;
use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum GpuError {
    #[error("bad --simulate-gpus spec {spec:?}: {why}")]
    BadSimSpec { spec: String, why: String },
    #[error("simulated gpus need a directory for their device nodes (set the data dir)")]
    NoSimDevDir,
    #[error("nvml: {0}")]
    Nvml(String),
    #[error("cannot create device node {path}: {source}")]
    DeviceNode {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("io on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The character-device major of `/dev/nvidia*` (fixed by the NVIDIA driver).
pub const NVIDIA_MAJOR: u32 = 195;
/// The minor of `/dev/nvidiactl`.
pub const NVIDIACTL_MINOR: u32 = 255;
/// The usual dynamic major of `nvidia-uvm`, used when `/proc/devices` does not list it.
pub const DEFAULT_UVM_MAJOR: u32 = 510;

const GIB: u64 = 1 << 30;

/// A character device node to expose inside a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Path inside the container (`/dev/nvidia0`).
    pub container_path: PathBuf,
    /// Path on the host (for simulated GPUs, under the data dir).
    pub host_path: PathBuf,
    pub major: u32,
    pub minor: u32,
}

/// One physical (or simulated) GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuDevice {
    /// `GPU-xxxxxxxx-...` from NVML (or derived, for simulated GPUs); `PCI-<address>` from the
    /// sysfs backend, which cannot read the real UUID.
    pub uuid: String,
    /// Device minor / index (`/dev/nvidia<index>`).
    pub index: u32,
    /// Short model name as users type it (`A100-80GB`, `H100-80GB`).
    pub model: String,
    /// Bytes; 0 where unknown (sysfs scan of a model not in [`KNOWN_MODELS`]).
    pub vram: u64,
    /// PCI address, `0000:3b:00.0`.
    pub pci_address: String,
    pub numa_node: Option<u32>,
    /// The device node of this GPU.
    pub node: DeviceNode,
    /// Kernel driver bound to the PCI function (`nvidia`, `vfio-pci`); `None` when unbound or
    /// simulated.
    pub driver: Option<String>,
    /// IOMMU group of the PCI function, when the IOMMU is on; `None` for simulated GPUs.
    pub iommu_group: Option<u32>,
    /// The GPU is in MIG mode: it is scheduled through its MIG slices, never whole.
    pub mig_enabled: bool,
    /// Set on a MIG slice (a compute instance, `MIG-` UUID): what it is a slice of, and the
    /// capability nodes (`/dev/nvidia-caps/nvidia-cap<N>`) that open its GPU and compute
    /// instance. `node` is then the parent GPU's node, which a slice needs too.
    pub mig: Option<MigSliceDevice>,
}

/// The MIG part of a slice's [`GpuDevice`].
#[derive(Debug, Clone, PartialEq)]
pub struct MigSliceDevice {
    pub slice: gpuvisor_wire::mig::MigSlice,
    pub caps: Vec<DeviceNode>,
}

impl GpuDevice {
    /// The device nodes a container using this device needs: the GPU's node and, for a MIG
    /// slice, its capability nodes.
    pub fn device_nodes(&self) -> Vec<DeviceNode> {
        let mut out = vec![self.node.clone()];
        if let Some(m) = &self.mig {
            out.extend(m.caps.iter().cloned());
        }
        out
    }

    /// Whole GPUs and MIG slices can be placed on; a GPU in MIG mode only through its slices.
    pub fn schedulable(&self) -> bool {
        !self.mig_enabled
    }

    /// A physical GPU (not a MIG slice).
    pub fn is_physical(&self) -> bool {
        self.mig.is_none()
    }

    /// True when the GPU is bound to vfio-pci: it is for PCIe passthrough into a VM, and
    /// containers cannot use it (its `/dev/nvidia<index>` node does not exist).
    pub fn is_vfio(&self) -> bool {
        self.driver.as_deref() == Some("vfio-pci")
    }

    /// The VFIO group device (`/dev/vfio/<group>`) a VM needs for passthrough, when the GPU is
    /// bound to vfio-pci and in an IOMMU group.
    pub fn vfio_group_path(&self) -> Option<PathBuf> {
        match (self.is_vfio(), self.iommu_group) {
            (true, Some(g)) => Some(PathBuf::from(format!("/dev/vfio/{g}"))),
            _ => None,
        }
    }
}

/// Which backend produced the inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Nvml,
    Sysfs,
    Simulated,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Nvml => "nvml",
            BackendKind::Sysfs => "sysfs",
            BackendKind::Simulated => "simulated",
        }
    }
}

pub trait GpuBackend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// All GPUs, sorted by index.
    fn devices(&self) -> Result<Vec<GpuDevice>, GpuError>;
    /// Control devices every GPU container needs (`nvidiactl`, `nvidia-uvm`, ...).
    fn control_devices(&self) -> Vec<DeviceNode>;
    /// Driver user-space files (libcuda, libnvidia-ml, nvidia-smi) to bind read-only, host paths
    /// mapped to container paths. Empty where the host has no driver.
    fn driver_files(&self) -> Vec<(PathBuf, PathBuf)>;
    /// SM utilisation per process on one GPU (host pid, percent), from samples newer than
    /// `since_us` (CPU timestamp, µs). Empty where the backend cannot tell (sysfs).
    fn process_utilisation(&self, _uuid: &str, _since_us: u64) -> Vec<(u32, u32)> {
        Vec::new()
    }
    /// GPU memory per process on one GPU (host pid, bytes): compute and graphics processes as
    /// the driver counts them, whatever route they took to the GPU. Empty where the backend
    /// cannot tell (sysfs).
    fn process_memory(&self, _uuid: &str) -> Vec<(u32, u64)> {
        Vec::new()
    }
    /// Whether this backend measures per-process utilisation and memory (NVML; the simulated
    /// backend from its process tables). Where it does not, a GPU fraction's compute share is
    /// not enforced (the limiter's controller has nothing to follow) and nothing checks the
    /// VRAM quota from outside: fractions there are VRAM-only, enforced by the library alone.
    fn measures_processes(&self) -> bool {
        false
    }
    /// The MIG control of this backend's GPUs (NVML on a driver host, the in-memory double on a
    /// simulated one, keeping its layout in `state_dir`); `None` where there is none (sysfs).
    fn mig_control(
        &self,
        _state_dir: &Path,
    ) -> Result<Option<Box<dyn crate::mig::MigControl>>, GpuError> {
        Ok(None)
    }
    /// The capability device nodes that grant access to GI `gi` / CI `ci` of `gpu`, from the
    /// driver's `/proc/driver/nvidia-caps/mig-minors` table.
    fn mig_caps(&self, _gpu: &GpuDevice, _gi: u32, _ci: u32) -> Vec<DeviceNode> {
        Vec::new()
    }
    /// The sysfs tree VFIO passthrough of this backend's GPUs is planned over
    /// (`vm::passthrough`): `None` for the host's own (real GPUs); the simulated backend's
    /// tree of its GPUs (`--simulate-gpus 1xH100-80GB:vfio`).
    fn passthrough_root(&self) -> Option<HostRoot> {
        None
    }
    /// One telemetry reading of `gpu`; `load` is what runs on it (drives simulated values).
    /// `None` where the backend reads nothing (sysfs: no driver to ask).
    fn telemetry(
        &self,
        _gpu: &GpuDevice,
        _load: &crate::telemetry::GpuLoad,
    ) -> Option<crate::telemetry::GpuReading> {
        None
    }
}

/// How to find GPUs.
#[derive(Debug, Clone, Default)]
pub struct GpuConfig {
    /// `2xA100-80GB,1xH100-80GB`: simulate these instead of probing.
    pub simulate: Option<String>,
    /// Where simulated device nodes go (`<data>/dev`); on a real host, where the UUIDs of its
    /// GPUs are remembered (`gpu-uuids`, see [`remember_uuids`]). Empty: nothing remembered.
    pub sim_dev_dir: PathBuf,
}

/// The file, under [`GpuConfig::sim_dev_dir`], of a real host's remembered GPU UUIDs.
pub const UUIDS_FILE: &str = "gpu-uuids";

/// Keeps a GPU's UUID when it changes driver. The driver (NVML, `/proc/driver/nvidia`) knows a
/// GPU's `GPU-` UUID only while it holds the GPU; bound to vfio-pci the GPU would come back as
/// `PCI-<address>`, and the instances and cordons that name it would lose it (a VM's GPU
/// reported gone after a daemon restart). So every `GPU-` UUID seen is remembered by PCI
/// address in `file` (`<address> <uuid> <vendor>:<device>:<subsystem vendor>:<subsystem
/// device>` lines, replaced atomically through a temporary file of a unique name when it
/// changes), and a GPU seen without one gets its remembered UUID back, but only when
/// - the entry is well-formed (an address in the kernel's form, a `GPU-` UUID of the driver's
///   8-4-4-4-12 hex form) and its PCI IDs are those of the device now at that address (a card
///   moved or swapped is not taken for the one remembered), and
/// - no live GPU reports that UUID (a card moved to another slot keeps its UUID there; the old
///   slot's entry is dropped when the UUID is seen at its new address).
///
/// Entries for addresses with no device or other IDs are pruned. Failures to write are logged:
/// the inventory is still right for this run.
pub fn remember_uuids(root: &HostRoot, file: &Path, gpus: &mut [GpuDevice]) {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut known: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut changed = false;
    for l in text.lines() {
        let mut f = l.split_whitespace();
        let entry = match (f.next(), f.next(), f.next(), f.next()) {
            (Some(pci), Some(uuid), Some(ids), None)
                if normalise_pci_address(pci).as_deref() == Some(pci)
                    && is_gpu_uuid(uuid)
                    && pci_ids(root, pci).as_deref() == Some(ids) =>
            {
                Some((pci.to_string(), (uuid.to_string(), ids.to_string())))
            }
            _ => None,
        };
        match entry {
            Some((pci, v)) => {
                known.insert(pci, v);
            }
            None => changed = true, // malformed, stale or another card: pruned
        }
    }
    // What the driver says now wins: a live UUID is remembered at its address only.
    let live: Vec<(String, String)> = gpus
        .iter()
        .filter(|g| g.is_physical() && is_gpu_uuid(&g.uuid))
        .map(|g| (g.pci_address.clone(), g.uuid.clone()))
        .collect();
    for (pci, uuid) in &live {
        let before = known.len();
        known.retain(|p, (u, _)| p == pci || u != uuid);
        changed |= known.len() != before;
        if known.get(pci).map(|(u, _)| u) != Some(uuid) {
            if let Some(ids) = pci_ids(root, pci) {
                known.insert(pci.clone(), (uuid.clone(), ids));
                changed = true;
            }
        }
    }
    for g in gpus.iter_mut().filter(|g| g.is_physical()) {
        if is_gpu_uuid(&g.uuid) {
            continue;
        }
        if let Some((uuid, _)) = known.get(&g.pci_address) {
            if !live.iter().any(|(_, u)| u == uuid) {
                g.uuid = uuid.clone();
            }
        }
    }
    if !changed {
        return;
    }
    let text: String = known
        .iter()
        .map(|(p, (u, ids))| format!("{p} {u} {ids}\n"))
        .collect();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = file.with_extension(format!(
        "tmp.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let written = file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&tmp, text))
        .and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(file = %file.display(), error = %e, "cannot remember GPU UUIDs");
    }
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (hex), as the driver reports it.
pub fn is_gpu_uuid(uuid: &str) -> bool {
    let Some(rest) = uuid.strip_prefix("GPU-") else {
        return false;
    };
    let parts: Vec<&str> = rest.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `0x10de:0x2330:0x10de:0x16c1`: vendor, device, subsystem vendor and device of the function
/// at `pci` (a missing subsystem file reads as `-`); `None` when there is no such device.
fn pci_ids(root: &HostRoot, pci: &str) -> Option<String> {
    let dir = format!("/sys/bus/pci/devices/{pci}");
    let vendor = root.read_trimmed(format!("{dir}/vendor"))?;
    let device = root.read_trimmed(format!("{dir}/device"))?;
    let sub = |f: &str| {
        root.read_trimmed(format!("{dir}/{f}"))
            .unwrap_or_else(|| "-".into())
    };
    Some(
        format!(
            "{vendor}:{device}:{}:{}",
            sub("subsystem_vendor"),
            sub("subsystem_device")
        )
        .to_ascii_lowercase(),
    )
}

/// A real host's backend with its GPUs' UUIDs kept across driver changes ([`remember_uuids`]).
struct Remembered {
    inner: Box<dyn GpuBackend>,
    file: PathBuf,
    root: HostRoot,
}

impl GpuBackend for Remembered {
    fn kind(&self) -> BackendKind {
        self.inner.kind()
    }
    fn devices(&self) -> Result<Vec<GpuDevice>, GpuError> {
        let mut gpus = self.inner.devices()?;
        remember_uuids(&self.root, &self.file, &mut gpus);
        Ok(gpus)
    }
    fn control_devices(&self) -> Vec<DeviceNode> {
        self.inner.control_devices()
    }
    fn driver_files(&self) -> Vec<(PathBuf, PathBuf)> {
        self.inner.driver_files()
    }
    fn process_utilisation(&self, uuid: &str, since_us: u64) -> Vec<(u32, u32)> {
        self.inner.process_utilisation(uuid, since_us)
    }
    fn process_memory(&self, uuid: &str) -> Vec<(u32, u64)> {
        self.inner.process_memory(uuid)
    }
    fn measures_processes(&self) -> bool {
        self.inner.measures_processes()
    }
    fn mig_control(
        &self,
        state_dir: &Path,
    ) -> Result<Option<Box<dyn crate::mig::MigControl>>, GpuError> {
        self.inner.mig_control(state_dir)
    }
    fn mig_caps(&self, gpu: &GpuDevice, gi: u32, ci: u32) -> Vec<DeviceNode> {
        self.inner.mig_caps(gpu, gi, ci)
    }
    fn passthrough_root(&self) -> Option<HostRoot> {
        self.inner.passthrough_root()
    }
    fn telemetry(
        &self,
        gpu: &GpuDevice,
        load: &crate::telemetry::GpuLoad,
    ) -> Option<crate::telemetry::GpuReading> {
        self.inner.telemetry(gpu, load)
    }
}

/// [`probe_backend`] with the UUIDs of a real host's GPUs remembered under `cfg.sim_dev_dir`.
pub fn probe(cfg: &GpuConfig, root: &HostRoot) -> Result<Box<dyn GpuBackend>, GpuError> {
    let backend = probe_backend(cfg, root)?;
    if backend.kind() == BackendKind::Simulated || cfg.sim_dev_dir.as_os_str().is_empty() {
        return Ok(backend);
    }
    Ok(Box::new(Remembered {
        inner: backend,
        file: cfg.sim_dev_dir.join(UUIDS_FILE),
        root: root.clone(),
    }))
}

/// Picks the backend: simulated if asked, else NVML if the driver loads and sees a GPU, else a
/// sysfs scan (which may find no GPU at all; that is not an error).
pub fn probe_backend(cfg: &GpuConfig, root: &HostRoot) -> Result<Box<dyn GpuBackend>, GpuError> {
    if let Some(spec) = &cfg.simulate {
        let backend = SimulatedBackend::new(spec, &cfg.sim_dev_dir, root)?;
        tracing::info!(
            backend = "simulated",
            gpus = backend.len(),
            dev_dir = %cfg.sim_dev_dir.display(),
            "gpu backend chosen"
        );
        return Ok(Box::new(backend));
    }
    if root.is_real() {
        match NvmlBackend::probe(root) {
            Ok(Some(backend)) => {
                tracing::info!(
                    backend = "nvml",
                    gpus = backend.count(),
                    "gpu backend chosen"
                );
                return Ok(Box::new(backend));
            }
            Ok(None) => tracing::debug!("nvml loaded but reports no gpu; trying sysfs"),
            Err(e) => tracing::debug!(error = %e, "nvml unavailable; trying sysfs"),
        }
    }
    let backend = SysfsBackend::new(root.clone());
    let gpus = backend.devices()?.len();
    tracing::info!(backend = "sysfs", gpus, "gpu backend chosen");
    Ok(Box::new(backend))
}

/// The schedulable inventory: the backend's GPUs and, after each GPU in MIG mode, one device per
/// MIG compute instance (`MIG-` UUID, the memory of its GPU instance, the parent's node plus its
/// capability nodes, model `<parent model>-<profile>`, e.g. `A100-80GB-3g.40gb`).
pub fn inventory(
    backend: &dyn GpuBackend,
    mig: Option<&dyn crate::mig::MigControl>,
) -> Result<Vec<GpuDevice>, GpuError> {
    let mut out = Vec::new();
    for mut gpu in backend.devices()? {
        let Some(ctl) = mig else {
            out.push(gpu);
            continue;
        };
        // A MIG query that fails leaves the GPU whole (mode unknown) or slice-less (listing
        // failed): the daemon still starts, and the warning says why no slice shows.
        let warn = |what: &str, e: crate::mig::MigError| {
            tracing::warn!(gpu = gpu.index, error = %e, "MIG {what} failed");
        };
        gpu.mig_enabled = match ctl.enabled(&gpu.uuid) {
            Ok(on) => on,
            Err(e) => {
                warn("mode query", e);
                false
            }
        };
        if !gpu.mig_enabled {
            out.push(gpu);
            continue;
        }
        let listed = ctl
            .gpu_instances(&gpu.uuid)
            .and_then(|gis| Ok((gis, ctl.profiles(&gpu.uuid)?, ctl.mig_devices(&gpu.uuid)?)));
        let (gis, profiles, devices) = match listed {
            Ok(x) => x,
            Err(e) => {
                warn("listing", e);
                out.push(gpu);
                continue;
            }
        };
        let slices: Vec<GpuDevice> = devices
            .into_iter()
            .map(|d| {
                let gi = gis.iter().find(|g| g.id == d.gi);
                let profile = gi.map_or_else(|| format!("gi{}", d.gi), |g| g.profile.clone());
                let compute = gi
                    .and_then(|g| profiles.iter().find(|p| p.id == g.profile_id))
                    .map_or(0, |p| p.slices);
                GpuDevice {
                    uuid: d.uuid,
                    model: format!("{}-{profile}", gpu.model),
                    vram: d.memory,
                    mig_enabled: false,
                    mig: Some(MigSliceDevice {
                        caps: backend.mig_caps(&gpu, d.gi, d.ci),
                        slice: gpuvisor_wire::mig::MigSlice {
                            parent_uuid: gpu.uuid.clone(),
                            gi: d.gi,
                            ci: d.ci,
                            profile,
                            slices: compute,
                        },
                    }),
                    ..gpu.clone()
                }
            })
            .collect();
        out.push(gpu);
        out.extend(slices);
    }
    Ok(out)
}

/// The driver's capability minor of `gpu<gpu>/gi<gi>/access` (`ci: None`) or
/// `gpu<gpu>/gi<gi>/ci<ci>/access` in its fixed table: 15 GIs of 1 + 8 entries per GPU after
/// `config` (1) and `monitor` (2).
pub fn mig_cap_minor(gpu: u32, gi: u32, ci: Option<u32>) -> u32 {
    3 + gpu * 15 * 9 + gi * 9 + ci.map_or(0, |c| c + 1)
}

/// The capability nodes of one MIG slice on a driver host: minors from
/// `/proc/driver/nvidia-caps/mig-minors`, major of `nvidia-caps` from `/proc/devices`. Empty
/// where the driver has no such table (no MIG support).
pub fn host_mig_caps(root: &HostRoot, gpu_minor: u32, gi: u32, ci: u32) -> Vec<DeviceNode> {
    let Some(major) = proc_devices_major(root, "nvidia-caps") else {
        return Vec::new();
    };
    let table = root
        .read_trimmed("/proc/driver/nvidia-caps/mig-minors")
        .unwrap_or_default();
    let minor_of = |key: &str| {
        table.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse::<u32>().ok()).flatten()
        })
    };
    [
        format!("gpu{gpu_minor}/gi{gi}/access"),
        format!("gpu{gpu_minor}/gi{gi}/ci{ci}/access"),
    ]
    .iter()
    .filter_map(|k| minor_of(k))
    .map(|minor| {
        let p = PathBuf::from(format!("/dev/nvidia-caps/nvidia-cap{minor}"));
        DeviceNode {
            host_path: root.path(&p),
            container_path: p,
            major,
            minor,
        }
    })
    .collect()
}

/// A GPU model gpuvisor knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModel {
    /// Short name users type (`H100-80GB`).
    pub model: &'static str,
    /// The name NVML reports for the common variant.
    pub full_name: &'static str,
    /// Nominal VRAM in GiB, as named.
    pub vram_gib: u64,
    /// PCI device ids (vendor 0x10de) of this model's variants.
    pub pci_device_ids: &'static [u16],
}

impl KnownModel {
    pub fn vram_bytes(&self) -> u64 {
        self.vram_gib * GIB
    }

    /// The model without its memory size (`H100`).
    pub fn family(&self) -> &'static str {
        self.model.split_once('-').map_or(self.model, |(f, _)| f)
    }
}

/// The models the simulator accepts and the sysfs scan recognises.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        model: "A100-40GB",
        full_name: "NVIDIA A100-SXM4-40GB",
        vram_gib: 40,
        pci_device_ids: &[0x20b0, 0x20f1],
    },
    KnownModel {
        model: "A100-80GB",
        full_name: "NVIDIA A100-SXM4-80GB",
        vram_gib: 80,
        pci_device_ids: &[0x20b2, 0x20b5],
    },
    KnownModel {
        model: "H100-80GB",
        full_name: "NVIDIA H100 80GB HBM3",
        vram_gib: 80,
        pci_device_ids: &[0x2330, 0x2331],
    },
    KnownModel {
        model: "H200-141GB",
        full_name: "NVIDIA H200",
        vram_gib: 141,
        pci_device_ids: &[0x2335],
    },
    KnownModel {
        model: "L4-24GB",
        full_name: "NVIDIA L4",
        vram_gib: 24,
        pci_device_ids: &[0x27b8],
    },
    KnownModel {
        model: "L40S-48GB",
        full_name: "NVIDIA L40S",
        vram_gib: 48,
        pci_device_ids: &[0x26b9],
    },
    KnownModel {
        model: "A10-24GB",
        full_name: "NVIDIA A10",
        vram_gib: 24,
        pci_device_ids: &[0x2236],
    },
    KnownModel {
        model: "T4-16GB",
        full_name: "Tesla T4",
        vram_gib: 16,
        pci_device_ids: &[0x1eb8],
    },
    KnownModel {
        model: "RTX4090-24GB",
        full_name: "NVIDIA GeForce RTX 4090",
        vram_gib: 24,
        pci_device_ids: &[0x2684],
    },
    KnownModel {
        model: "V100-32GB",
        full_name: "Tesla V100-SXM2-32GB",
        vram_gib: 32,
        pci_device_ids: &[0x1db5],
    },
    KnownModel {
        model: "B200-192GB",
        full_name: "NVIDIA B200",
        vram_gib: 192,
        pci_device_ids: &[],
    },
];

/// Looks a short model name up (case-insensitive), returning the table entry.
pub fn known_model(model: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.model.eq_ignore_ascii_case(model.trim()))
}

/// The known model of an NVIDIA PCI device id.
pub fn model_for_pci_device_id(device_id: u16) -> Option<&'static KnownModel> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.pci_device_ids.contains(&device_id))
}

/// Turns the name NVML (or `/proc/driver/nvidia`) reports into the short model users type:
/// `NVIDIA H100 80GB HBM3` → `H100-80GB`, `NVIDIA H100 PCIe` with 80 GiB → `H100-80GB`,
/// `Tesla T4` → `T4-16GB`.
///
/// Vendor words and form factors (SXM4, PCIe, HBM3, NVL) are dropped. The size is the one in the
/// name when there is one; else the nominal size of the [`KNOWN_MODELS`] entry of the same family
/// closest to `memory_total` (bytes; drivers report a little less than the nominal size); else
/// `memory_total` rounded to a common marketing size. With `memory_total` 0 (unknown), an exact
/// [`KnownModel::full_name`] still maps to its model; anything else is just the family.
pub fn normalise_model_name(name: &str, memory_total: u64) -> String {
    let mut explicit_gb: Option<u64> = None;
    let mut parts: Vec<String> = Vec::new();
    for tok in name
        .split(|c: char| c.is_whitespace() || c == '-' || c == '_')
        .filter(|t| !t.is_empty())
    {
        let up = tok.to_ascii_uppercase();
        if is_noise_word(&up) {
            continue;
        }
        if let Some(gb) = up.strip_suffix("GB").and_then(|n| n.parse::<u64>().ok()) {
            explicit_gb.get_or_insert(gb);
            continue;
        }
        parts.push(up);
    }
    let mut family = parts.concat();
    if family.is_empty() {
        family = "GPU".to_string();
    }
    if explicit_gb.is_none() && memory_total == 0 {
        // No size to go by: only an exact known name is trusted (`H100 NVL` is not 80 GB).
        if let Some(m) = KNOWN_MODELS
            .iter()
            .find(|m| m.full_name.eq_ignore_ascii_case(name.trim()))
        {
            return m.model.to_string();
        }
        return family;
    }
    match explicit_gb.or_else(|| size_from_memory(&family, memory_total)) {
        Some(gb) => format!("{family}-{gb}GB"),
        None => family,
    }
}

fn is_noise_word(up: &str) -> bool {
    matches!(
        up,
        "NVIDIA"
            | "TESLA"
            | "GEFORCE"
            | "QUADRO"
            | "GENERATION"
            | "GPU"
            | "PCIE"
            | "NVL"
            | "NVLINK"
    ) || up.starts_with("SXM")
        || up.starts_with("HBM")
}

fn size_from_memory(family: &str, memory_total: u64) -> Option<u64> {
    let candidates: Vec<&KnownModel> = KNOWN_MODELS
        .iter()
        .filter(|m| m.family().eq_ignore_ascii_case(family))
        .collect();
    let measured = memory_total as f64 / GIB as f64;
    let off = |nominal: u64| (nominal as f64 - measured).abs() / nominal as f64;
    let closest = candidates
        .iter()
        .map(|m| m.vram_gib)
        .min_by(|a, b| off(*a).total_cmp(&off(*b)));
    if let Some(gb) = closest.filter(|gb| off(*gb) <= 0.15) {
        return Some(gb);
    }
    const SIZES: &[u64] = &[
        2, 3, 4, 6, 8, 10, 11, 12, 16, 20, 24, 32, 40, 48, 64, 80, 94, 96, 128, 141, 144, 180, 192,
        256, 288,
    ];
    let snapped = SIZES
        .iter()
        .copied()
        .min_by(|a, b| off(*a).total_cmp(&off(*b)))
        .filter(|gb| off(*gb) <= 0.08);
    let gb = snapped.unwrap_or(measured.round() as u64);
    (gb > 0).then_some(gb)
}

/// Normalises a PCI address to the kernel's sysfs form, `0000:3b:00.0`: NVML reports
/// `00000000:3B:00.0`. `None` when it is not a `domain:bus:device.function` address.
pub fn normalise_pci_address(addr: &str) -> Option<String> {
    let (domain, rest) = addr.trim().split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    let domain = u32::from_str_radix(domain, 16).ok()?;
    let bus = u8::from_str_radix(bus, 16).ok()?;
    let dev = u8::from_str_radix(dev, 16).ok().filter(|d| *d < 32)?;
    let func = u8::from_str_radix(func, 16).ok().filter(|f| *f < 8)?;
    Some(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

/// NUMA node of a PCI device from sysfs (`-1`, absent or unreadable → `None`).
pub(crate) fn pci_numa_node(root: &HostRoot, pci_address: &str) -> Option<u32> {
    root.read_trimmed(format!("/sys/bus/pci/devices/{pci_address}/numa_node"))?
        .parse::<i64>()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
}

/// Basename of a sysfs symlink of a PCI device (`driver` → `nvidia`, `iommu_group` → `42`).
pub(crate) fn pci_link_name(root: &HostRoot, pci_address: &str, link: &str) -> Option<String> {
    let target =
        std::fs::read_link(root.path(format!("/sys/bus/pci/devices/{pci_address}/{link}"))).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

pub(crate) fn pci_driver(root: &HostRoot, pci_address: &str) -> Option<String> {
    pci_link_name(root, pci_address, "driver")
}

pub(crate) fn pci_iommu_group(root: &HostRoot, pci_address: &str) -> Option<u32> {
    pci_link_name(root, pci_address, "iommu_group")?
        .parse()
        .ok()
}

/// Major and minor of a character device on the host, `None` if absent or not a char device.
pub fn char_device_at(root: &HostRoot, host_path: impl AsRef<Path>) -> Option<(u32, u32)> {
    let md = std::fs::metadata(root.path(host_path)).ok()?;
    if !md.file_type().is_char_device() {
        return None;
    }
    let rdev = md.rdev();
    let major = u32::try_from(nix::sys::stat::major(rdev)).ok()?;
    let minor = u32::try_from(nix::sys::stat::minor(rdev)).ok()?;
    Some((major, minor))
}

/// The major of a character driver from the host's `/proc/devices` (`nvidia-uvm` → 510).
pub fn proc_devices_major(root: &HostRoot, driver: &str) -> Option<u32> {
    let text = std::fs::read_to_string(root.path("/proc/devices")).ok()?;
    let mut in_char = false;
    for line in text.lines() {
        let line = line.trim();
        if line.ends_with("devices:") {
            in_char = line.starts_with("Character");
            continue;
        }
        if !in_char {
            continue;
        }
        if let Some((major, name)) = line.split_once(char::is_whitespace) {
            if name.trim() == driver {
                return major.parse().ok();
            }
        }
    }
    None
}

/// The driver's control devices present on the host (`nvidiactl`, `nvidia-uvm`,
/// `nvidia-uvm-tools`, `nvidia-modeset`), with their real major/minor. Missing ones are left out:
/// `nvidia-uvm` only appears once something loaded the module (`nvidia-modprobe -u -c=0`).
pub fn host_control_devices(root: &HostRoot) -> Vec<DeviceNode> {
    [
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
        "/dev/nvidia-modeset",
    ]
    .iter()
    .filter_map(|p| {
        let (major, minor) = char_device_at(root, p)?;
        Some(DeviceNode {
            container_path: PathBuf::from(p),
            host_path: root.path(p),
            major,
            minor,
        })
    })
    .collect()
}

/// The device node of GPU `index` as the host has it; the driver's fixed major and the index as
/// minor when the node does not exist (yet).
pub(crate) fn host_gpu_node(root: &HostRoot, index: u32) -> DeviceNode {
    let p = format!("/dev/nvidia{index}");
    let (major, minor) = char_device_at(root, &p).unwrap_or((NVIDIA_MAJOR, index));
    DeviceNode {
        container_path: PathBuf::from(&p),
        host_path: root.path(&p),
        major,
        minor,
    }
}

const DRIVER_LIB_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
];

const DRIVER_LIB_PREFIXES: &[&str] = &[
    "libcuda.so",
    "libnvidia-ml.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-nvvm.so",
    "libcudadebugger.so",
];

const DRIVER_BINARIES: &[&str] = &[
    "/usr/bin/nvidia-smi",
    "/usr/bin/nvidia-debugdump",
    "/usr/bin/nvidia-persistenced",
];

/// The driver's user-space files a CUDA container needs, as (host path, container path) pairs:
/// the libraries (real files and their soname links) in the usual lib dirs and the tools in
/// `/usr/bin`. Container paths are the host paths without the [`HostRoot`] prefix, so a
/// container sees the libraries where its loader looks for them. Sorted, without duplicates.
pub fn driver_files(root: &HostRoot) -> Vec<(PathBuf, PathBuf)> {
    let mut found: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    for dir in DRIVER_LIB_DIRS {
        let Ok(entries) = std::fs::read_dir(root.path(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let wanted = DRIVER_LIB_PREFIXES
                .iter()
                .any(|p| name == *p || name.strip_prefix(p).is_some_and(|v| v.starts_with('.')));
            if !wanted {
                continue;
            }
            let container = Path::new(dir).join(name);
            let host = root.path(&container);
            if resolves(root, &host) {
                found.insert(container, host);
            }
        }
    }
    for bin in DRIVER_BINARIES {
        let host = root.path(bin);
        if resolves(root, &host) {
            found.insert(PathBuf::from(bin), host);
        }
    }
    found
        .into_iter()
        .map(|(container, host)| (host, container))
        .collect()
}

/// True when `host` (already under the root) is a file, or a symlink whose target exists inside
/// the root. Absolute link targets are mapped through the root so fixture trees behave like the
/// host.
fn resolves(root: &HostRoot, host: &Path) -> bool {
    let Ok(md) = std::fs::symlink_metadata(host) else {
        return false;
    };
    if !md.file_type().is_symlink() {
        return md.is_file();
    }
    let Ok(target) = std::fs::read_link(host) else {
        return false;
    };
    let resolved = if target.is_absolute() {
        root.path(&target)
    } else {
        match host.parent() {
            Some(dir) => dir.join(&target),
            None => return false,
        }
    };
    resolved.is_file()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// The capability nodes of a MIG slice come from the driver's minors table, and the
    /// simulator's numbering follows the same table.
    #[test]
    fn mig_caps_from_the_driver_table() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::at(dir.path());
        assert!(
            host_mig_caps(&root, 0, 1, 0).is_empty(),
            "no driver, no caps"
        );
        fs::create_dir_all(dir.path().join("proc/driver/nvidia-caps")).unwrap();
        fs::write(
            dir.path().join("proc/devices"),
            "Character devices:\n195 nvidia\n236 nvidia-caps\n510 nvidia-uvm\n",
        )
        .unwrap();
        let mut table = String::from("config 1\nmonitor 2\n");
        let mut minor = 3;
        for gpu in 0..2 {
            for gi in 0..15 {
                table.push_str(&format!("gpu{gpu}/gi{gi}/access {minor}\n"));
                minor += 1;
                for ci in 0..8 {
                    table.push_str(&format!("gpu{gpu}/gi{gi}/ci{ci}/access {minor}\n"));
                    minor += 1;
                }
            }
        }
        fs::write(
            dir.path().join("proc/driver/nvidia-caps/mig-minors"),
            &table,
        )
        .unwrap();
        let caps = host_mig_caps(&root, 1, 2, 1);
        let got: Vec<(u32, u32, String)> = caps
            .iter()
            .map(|n| (n.major, n.minor, n.container_path.display().to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                (236, 156, "/dev/nvidia-caps/nvidia-cap156".to_string()),
                (236, 158, "/dev/nvidia-caps/nvidia-cap158".to_string()),
            ]
        );
        assert_eq!(
            caps[0].host_path,
            dir.path().join("dev/nvidia-caps/nvidia-cap156")
        );
        assert_eq!(mig_cap_minor(1, 2, None), 156);
        assert_eq!(mig_cap_minor(1, 2, Some(1)), 158);
        assert_eq!(mig_cap_minor(0, 0, Some(0)), 4);
    }

    /// A GPU keeps its `GPU-` UUID when bound to vfio-pci (the driver no longer tells it), across
    /// backends (daemon restarts); UUIDs are remembered per PCI address.
    #[test]
    fn uuids_survive_a_driver_change() {
        use crate::testfx::{Fx, GPU};
        let fx = Fx::clean();
        let data = tempfile::tempdir().unwrap();
        let cfg = GpuConfig {
            simulate: None,
            sim_dev_dir: data.path().join("dev"),
        };
        let uuid = "GPU-11111111-2222-3333-4444-555555555555";
        let b = probe(&cfg, &fx.root()).unwrap();
        assert_eq!(b.kind(), BackendKind::Sysfs);
        assert_eq!(b.devices().unwrap()[0].uuid, uuid);
        assert_eq!(
            fs::read_to_string(data.path().join("dev").join(UUIDS_FILE)).unwrap(),
            format!("{GPU} {uuid} 0x10de:0x2330:-:-\n")
        );
        // Bound to vfio-pci: the driver's information is gone with it.
        fx.set_driver(GPU, Some("vfio-pci"));
        fx.remove(&format!("/proc/driver/nvidia/gpus/{GPU}"));
        assert_eq!(
            scan_sysfs(&fx.root()).unwrap()[0].uuid,
            format!("PCI-{GPU}"),
            "what the scan alone says"
        );
        let b = probe(&cfg, &fx.root()).unwrap();
        let g = &b.devices().unwrap()[0];
        assert_eq!((g.uuid.as_str(), g.is_vfio()), (uuid, true));
        // Nothing remembered without a directory for it.
        let b = probe(&GpuConfig::default(), &fx.root()).unwrap();
        assert_eq!(b.devices().unwrap()[0].uuid, format!("PCI-{GPU}"));
    }

    /// Review finding 3 (the attack): card U moved from slot 3b to 5e and a new card of the
    /// same model in 3b bound to vfio-pci: the inventory showed GPU-U twice (a second VM placed
    /// on the GPU the first holds). The live UUID wins and drops the old slot's entry; a
    /// remembered UUID is never given to a card with other PCI IDs; malformed entries are
    /// pruned.
    #[test]
    fn a_remembered_uuid_is_never_given_twice_nor_to_another_card() {
        use crate::testfx::{Fx, Pci, GPU};
        let fx = Fx::clean();
        let data = tempfile::tempdir().unwrap();
        let cfg = GpuConfig {
            simulate: None,
            sim_dev_dir: data.path().join("dev"),
        };
        let file = data.path().join("dev").join(UUIDS_FILE);
        let uuid = "GPU-11111111-2222-3333-4444-555555555555";
        assert_eq!(
            probe(&cfg, &fx.root()).unwrap().devices().unwrap()[0].uuid,
            uuid
        );

        // U now at 5e (the driver tells its UUID there); a new card in 3b on vfio-pci.
        let moved = "0000:5e:00.0";
        fx.pci(&Pci {
            addr: moved,
            vendor: "0x10de",
            device: "0x2330",
            class: "0x030200",
            driver: Some("nvidia"),
            group: Some(18),
        });
        fx.remove(&format!("/proc/driver/nvidia/gpus/{GPU}"));
        fx.file(
            &format!("/proc/driver/nvidia/gpus/{moved}/information"),
            &format!(
                "Model: \t\t NVIDIA H100 80GB HBM3\nGPU UUID: \t {uuid}\nDevice Minor: \t 1\n"
            ),
        );
        fx.set_driver(GPU, Some("vfio-pci"));
        let gpus = probe(&cfg, &fx.root()).unwrap().devices().unwrap();
        let by_addr = |a: &str| {
            gpus.iter()
                .find(|g| g.pci_address == a)
                .unwrap()
                .uuid
                .clone()
        };
        assert_eq!(by_addr(moved), uuid);
        assert_eq!(
            by_addr(GPU),
            format!("PCI-{GPU}"),
            "never the UUID a live GPU has"
        );
        let text = fs::read_to_string(&file).unwrap();
        assert_eq!(
            text,
            format!("{moved} {uuid} 0x10de:0x2330:-:-\n"),
            "the old slot's entry is dropped"
        );

        // U gone altogether, its entry at 3b again but the card there is another model: not U.
        fs::write(&file, format!("{GPU} {uuid} 0x10de:0x2330:-:-\n")).unwrap();
        fx.remove(&format!("/proc/driver/nvidia/gpus/{moved}"));
        fx.set_driver(moved, None);
        fx.file(&format!("/sys/devices/pci0000:00/{GPU}/device"), "0x2324\n");
        let gpus = probe(&cfg, &fx.root()).unwrap().devices().unwrap();
        assert!(gpus.iter().all(|g| g.uuid != uuid), "{gpus:?}");

        // Malformed lines (no IDs, a bad UUID, an address that is not one) are never used.
        fx.file(&format!("/sys/devices/pci0000:00/{GPU}/device"), "0x2330\n");
        for line in [
            format!("{GPU} {uuid}\n"),
            format!("{GPU} GPU-zz 0x10de:0x2330:-:-\n"),
            format!("{GPU},x {uuid} 0x10de:0x2330:-:-\n"),
        ] {
            fs::write(&file, &line).unwrap();
            let gpus = probe(&cfg, &fx.root()).unwrap().devices().unwrap();
            assert!(gpus.iter().all(|g| g.uuid != uuid), "{line}: {gpus:?}");
        }
        // A temporary file of its own each time: none left behind.
        let left: Vec<_> = fs::read_dir(data.path().join("dev"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(UUIDS_FILE)]);
        assert!(is_gpu_uuid(uuid) && !is_gpu_uuid("GPU-1") && !is_gpu_uuid(&format!("PCI-{GPU}")));
    }

    #[test]
    fn normalises_nvml_names() {
        let mib = 1u64 << 20;
        let cases: &[(&str, u64, &str)] = &[
            ("NVIDIA H100 80GB HBM3", 81559 * mib, "H100-80GB"),
            ("NVIDIA H100 PCIe", 81559 * mib, "H100-80GB"),
            ("NVIDIA H100 NVL", 95830 * mib, "H100-94GB"),
            ("NVIDIA A100-SXM4-80GB", 81920 * mib, "A100-80GB"),
            ("NVIDIA A100-SXM4-40GB", 40960 * mib, "A100-40GB"),
            ("NVIDIA A100-PCIE-40GB", 40960 * mib, "A100-40GB"),
            ("NVIDIA A100 80GB PCIe", 81920 * mib, "A100-80GB"),
            ("NVIDIA H200", 143771 * mib, "H200-141GB"),
            ("NVIDIA L4", 23034 * mib, "L4-24GB"),
            ("NVIDIA L40S", 46068 * mib, "L40S-48GB"),
            ("NVIDIA A10", 23028 * mib, "A10-24GB"),
            ("Tesla T4", 15360 * mib, "T4-16GB"),
            ("NVIDIA GeForce RTX 4090", 24564 * mib, "RTX4090-24GB"),
            ("Tesla V100-SXM2-32GB", 32768 * mib, "V100-32GB"),
            ("Tesla V100-SXM2-16GB", 16384 * mib, "V100-16GB"),
            ("NVIDIA B200", 183359 * mib, "B200-192GB"),
            ("NVIDIA RTX A6000", 49140 * mib, "RTXA6000-48GB"),
            (
                "NVIDIA RTX 6000 Ada Generation",
                49140 * mib,
                "RTX6000ADA-48GB",
            ),
            ("NVIDIA GeForce RTX 3090", 24576 * mib, "RTX3090-24GB"),
            // No memory figure: the size in the name, an exact known name, else the family.
            ("NVIDIA H100 80GB HBM3", 0, "H100-80GB"),
            ("NVIDIA L40S", 0, "L40S-48GB"),
            ("NVIDIA H100 NVL", 0, "H100"),
            ("NVIDIA H100 PCIe", 0, "H100"),
            ("NVIDIA A100-SXM4", 0, "A100"),
            ("NVIDIA", 0, "GPU"),
        ];
        for (name, mem, want) in cases {
            assert_eq!(normalise_model_name(name, *mem), *want, "{name}");
        }
        // Every table entry's own full name maps back to it.
        for m in KNOWN_MODELS {
            assert_eq!(
                normalise_model_name(m.full_name, m.vram_bytes()),
                m.model,
                "{}",
                m.full_name
            );
        }
    }

    #[test]
    fn normalises_pci_addresses() {
        assert_eq!(
            normalise_pci_address("00000000:3B:00.0").as_deref(),
            Some("0000:3b:00.0")
        );
        assert_eq!(
            normalise_pci_address("0000:1b:00.1").as_deref(),
            Some("0000:1b:00.1")
        );
        assert_eq!(normalise_pci_address("3b:00.0"), None);
        assert_eq!(normalise_pci_address("0000:3b:40.0"), None);
        assert_eq!(normalise_pci_address("garbage"), None);
    }

    #[test]
    fn table_lookups() {
        assert_eq!(known_model("h100-80gb").map(|m| m.vram_gib), Some(80));
        assert_eq!(known_model("H200-141GB").map(|m| m.vram_gib), Some(141));
        assert_eq!(
            model_for_pci_device_id(0x2331).map(|m| m.model),
            Some("H100-80GB")
        );
        assert_eq!(model_for_pci_device_id(0x1234), None);
        assert_eq!(KNOWN_MODELS[0].family(), "A100");
    }

    #[test]
    fn reads_majors_from_proc_devices() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("proc")).unwrap();
        fs::write(
            dir.path().join("proc/devices"),
            "Character devices:\n  1 mem\n195 nvidia-frontend\n508 nvidia-uvm\n\n\
             Block devices:\n  7 loop\n509 nvidia-uvm\n",
        )
        .unwrap();
        let root = HostRoot::at(dir.path());
        assert_eq!(proc_devices_major(&root, "nvidia-uvm"), Some(508));
        assert_eq!(proc_devices_major(&root, "loop"), None);
        assert_eq!(proc_devices_major(&HostRoot::at("/nonexistent"), "x"), None);
    }

    #[test]
    fn finds_driver_files_in_a_fixture_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::at(dir.path());
        let lib = dir.path().join("usr/lib/x86_64-linux-gnu");
        fs::create_dir_all(&lib).unwrap();
        fs::create_dir_all(dir.path().join("usr/bin")).unwrap();
        for f in [
            "libcuda.so.550.54.15",
            "libnvidia-ml.so.550.54.15",
            "libnvidia-ptxjitcompiler.so.550.54.15",
            "libcudart.so.12",    // the toolkit's, not the driver's
            "libnvidia-mlx.so.1", // a different library with a shared prefix
            "libcudadebugger.so.550.54.15",
        ] {
            fs::write(lib.join(f), b"elf").unwrap();
        }
        symlink("libcuda.so.550.54.15", lib.join("libcuda.so.1")).unwrap();
        symlink("libcuda.so.1", lib.join("libcuda.so")).unwrap();
        symlink("libnvidia-ml.so.550.54.15", lib.join("libnvidia-ml.so.1")).unwrap();
        // Absolute link target, mapped through the root.
        symlink(
            "/usr/lib/x86_64-linux-gnu/libcudadebugger.so.550.54.15",
            lib.join("libcudadebugger.so.1"),
        )
        .unwrap();
        symlink("libnvidia-nvvm.so.4.0.0", lib.join("libnvidia-nvvm.so.4")).unwrap(); // dangling
        fs::write(dir.path().join("usr/bin/nvidia-smi"), b"elf").unwrap();

        let files = driver_files(&root);
        let containers: Vec<String> = files.iter().map(|(_, c)| c.display().to_string()).collect();
        let l = "/usr/lib/x86_64-linux-gnu";
        assert_eq!(
            containers,
            vec![
                "/usr/bin/nvidia-smi".to_string(),
                format!("{l}/libcuda.so"),
                format!("{l}/libcuda.so.1"),
                format!("{l}/libcuda.so.550.54.15"),
                format!("{l}/libcudadebugger.so.1"),
                format!("{l}/libcudadebugger.so.550.54.15"),
                format!("{l}/libnvidia-ml.so.1"),
                format!("{l}/libnvidia-ml.so.550.54.15"),
                format!("{l}/libnvidia-ptxjitcompiler.so.550.54.15"),
            ]
        );
        for (host, container) in &files {
            assert_eq!(*host, root.path(container));
        }
        assert!(driver_files(&HostRoot::at(dir.path().join("empty"))).is_empty());
    }

    #[test]
    fn control_devices_come_from_real_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::at(dir.path());
        let dev = dir.path().join("dev");
        fs::create_dir_all(&dev).unwrap();
        sim::ensure_char_device(&dev.join("nvidiactl"), NVIDIA_MAJOR, NVIDIACTL_MINOR).unwrap();
        sim::ensure_char_device(&dev.join("nvidia-uvm"), 508, 0).unwrap();
        fs::write(dev.join("nvidia-modeset"), b"not a device").unwrap();
        let nodes = host_control_devices(&root);
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].container_path, PathBuf::from("/dev/nvidiactl"));
        assert_eq!((nodes[0].major, nodes[0].minor), (195, 255));
        assert_eq!(nodes[0].host_path, dev.join("nvidiactl"));
        assert_eq!((nodes[1].major, nodes[1].minor), (508, 0));
        assert_eq!(host_gpu_node(&root, 3).minor, 3);
    }
}
