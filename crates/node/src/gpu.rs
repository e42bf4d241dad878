//! GPU inventory behind one trait, with a probing constructor: NVML when a driver is present,
//! a sysfs PCI scan (vendor 0x10de) for GPUs without a driver or bound to vfio-pci, and a
//! simulated backend for machines without GPUs.
//! CONTRACT (to be implemented): see the helper's notes.

use crate::HostRoot;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum GpuError {
    #[error("bad --simulate-gpus spec {spec:?}: {why}")]
    BadSimSpec { spec: String, why: String },
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
    pub uuid: String,
    /// Device minor / index (`/dev/nvidia<index>`).
    pub index: u32,
    /// Short model name as users type it (`A100-80GB`, `H100-80GB`).
    pub model: String,
    pub vram: u64,
    /// PCI address, `0000:3b:00.0`.
    pub pci_address: String,
    pub numa_node: Option<u32>,
    /// The device node of this GPU.
    pub node: DeviceNode,
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
}

/// How to find GPUs.
#[derive(Debug, Clone, Default)]
pub struct GpuConfig {
    /// `2xA100-80GB,1xH100-80GB`: simulate these instead of probing.
    pub simulate: Option<String>,
    /// Where simulated device nodes go (`<data>/dev`).
    pub sim_dev_dir: PathBuf,
}

/// Picks the backend: simulated if asked, else NVML if the driver loads, else a sysfs scan.
pub fn probe(_cfg: &GpuConfig, _root: &HostRoot) -> Result<Box<dyn GpuBackend>, GpuError> {
    Err(GpuError::Nvml("not implemented yet".into()))
}
