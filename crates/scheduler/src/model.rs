//! The scheduler's view of the world: nodes with CPU, memory and GPUs, and requests.
//!
//! Units are integers so that arithmetic is exact and results reproducible: milli-CPU, MiB and
//! milli-GPU (a whole GPU is [`MILLI`]). A GPU's `kind` decides which requests may use it; the
//! key decision is that fractions only ever land on `Shareable` GPUs and a whole request takes a
//! shareable GPU only when nothing is on it.

use serde::{Deserialize, Serialize};

/// Milli-GPU in one whole GPU.
pub const MILLI: u32 = 1000;

/// At most this many GPUs per node (NVLink peers are a bitmask).
pub const MAX_GPUS_PER_NODE: usize = 64;

/// How a GPU may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuKind {
    /// Whole GPUs only (no sharing configured).
    WholeOnly,
    /// May be split between fractional requests, or given whole when empty.
    Shareable,
    /// A MIG slice: an exclusive unit; its `model` names the profile (e.g. `A100-1g.10gb`).
    Mig,
    /// Bound to vfio-pci: only for requests that ask for passthrough (micro-VMs).
    Passthrough,
}

/// One GPU's capacity and current free amounts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub model: String,
    /// Total VRAM in MiB (0 = unknown: VRAM is then not checked).
    pub vram_mib: u64,
    pub free_milli: u32,
    pub free_vram_mib: u64,
    pub numa: Option<u32>,
    /// Bitmask of GPU indices on the same node joined to this one by NVLink.
    pub nvlink_peers: u64,
    pub kind: GpuKind,
}

impl Gpu {
    /// An empty GPU.
    pub fn new(model: impl Into<String>, vram_mib: u64, kind: GpuKind) -> Self {
        Self {
            model: model.into(),
            vram_mib,
            free_milli: MILLI,
            free_vram_mib: vram_mib,
            numa: None,
            nvlink_peers: 0,
            kind,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.free_milli == MILLI && self.free_vram_mib == self.vram_mib
    }
}

/// One host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub free_cpu_milli: u64,
    pub free_memory_mib: u64,
    pub gpus: Vec<Gpu>,
}

impl Node {
    /// An empty node.
    pub fn new(name: impl Into<String>, cpu_milli: u64, memory_mib: u64, gpus: Vec<Gpu>) -> Self {
        Self {
            name: name.into(),
            cpu_milli,
            memory_mib,
            free_cpu_milli: cpu_milli,
            free_memory_mib: memory_mib,
            gpus,
        }
    }

    pub fn free_gpu_milli(&self) -> u64 {
        self.gpus.iter().map(|g| u64::from(g.free_milli)).sum()
    }

    pub fn total_gpu_milli(&self) -> u64 {
        self.gpus.len() as u64 * u64::from(MILLI)
    }
}

/// The GPU part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GpuDemand {
    #[default]
    None,
    /// N whole GPUs.
    Whole(u32),
    /// A fraction of one shareable GPU: compute share and VRAM (0 = not checked).
    Fraction { milli: u32, vram_mib: u64 },
}

impl GpuDemand {
    /// GPU capacity this demand takes, in milli-GPU.
    pub fn milli(&self) -> u64 {
        match *self {
            GpuDemand::None => 0,
            GpuDemand::Whole(n) => u64::from(n) * u64::from(MILLI),
            GpuDemand::Fraction { milli, .. } => u64::from(milli),
        }
    }
}

/// What one instance asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Request {
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub gpu: GpuDemand,
    /// Allowed GPU models; empty = any.
    pub models: Vec<String>,
    /// Higher is more important. Preemption only evicts strictly lower priorities.
    pub priority: u32,
    /// May be evicted for a higher-priority request.
    pub interruptible: bool,
    /// Needs passthrough-bound GPUs (a micro-VM); only such requests use them.
    pub passthrough: bool,
}

/// Where a request goes: a node and, per GPU used, the share taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub node: usize,
    /// (GPU index on the node, milli-GPU, VRAM MiB).
    pub gpus: Vec<(usize, u32, u64)>,
}
