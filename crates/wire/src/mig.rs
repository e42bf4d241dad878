//! MIG (Multi-Instance GPU) types: a GPU's GPU-instance profiles and placements, its GPU and
//! compute instances, and the slice a schedulable MIG device stands for. The node layer fills
//! them from NVML (or its simulated double); `gpu mig list` shows them.

use serde::{Deserialize, Serialize};

/// A GI placement: `size` memory slices from slice `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Placement {
    pub start: u32,
    pub size: u32,
}

impl Placement {
    pub fn overlaps(&self, o: &Placement) -> bool {
        self.start < o.start + o.size && o.start < self.start + self.size
    }
}

/// A GPU-instance profile of one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GiProfile {
    /// NVML's profile index (`NVML_GPU_INSTANCE_PROFILE_1_SLICE` = 0, ...).
    pub profile: u32,
    /// NVML's profile id, as in `nvidia-smi mig -lgip`.
    pub id: u32,
    /// `1g.10gb`.
    pub name: String,
    pub slices: u32,
    pub memory_mib: u64,
    pub multiprocessors: u32,
    /// How many GIs of this profile fit on an empty GPU.
    pub max_instances: u32,
    /// How many more fit now.
    pub free: u32,
    pub placements: Vec<Placement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ComputeInstance {
    pub id: u32,
    pub profile_id: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GpuInstance {
    pub id: u32,
    pub profile_id: u32,
    /// Profile name (`1g.10gb`), where known.
    pub profile: String,
    pub placement: Placement,
    pub compute_instances: Vec<ComputeInstance>,
}

/// One GPU's MIG state, as `gpu mig list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MigState {
    pub gpu: String,
    pub enabled: bool,
    pub profiles: Vec<GiProfile>,
    pub instances: Vec<GpuInstance>,
}

/// What a schedulable MIG device is a slice of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MigSlice {
    /// UUID of the physical GPU.
    pub parent_uuid: String,
    /// GPU-instance and compute-instance ids on the parent.
    pub gi: u32,
    pub ci: u32,
    /// `3g.40gb`.
    pub profile: String,
    /// Compute slices (of 7 on A100/H100).
    pub slices: u32,
}

/// `POST /v1/gpus/{gpu}/mig`: make a GPU instance of `profile` (name `1g.10gb` or NVML id) with
/// one compute instance spanning it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CreateMigInstance {
    pub profile: String,
}
