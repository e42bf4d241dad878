//! Instance snapshots: an instance's disks (its container or root disk and its volumes) and,
//! for a VM asked with `memory`, its running state, saved on the instance's host. A snapshot
//! restores its own instance (`POST /v1/instances/{id}/restore`: the volumes now, the disk and
//! a VM's running state at the next start) or seeds new ones (`CreateInstance::from_snapshot`:
//! disks only).

use crate::RuntimeKind;
use serde::{Deserialize, Serialize};

/// `pending` while its files are written, `ready` once they are complete: a volume's states.
pub type SnapshotState = crate::VolumeState;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Snapshot {
    pub id: String,
    /// Unique in its tenant.
    pub name: String,
    pub tenant: String,
    /// The instance it was taken of.
    pub instance_id: String,
    /// That instance's name, while its row is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_name: Option<String>,
    pub runtime: RuntimeKind,
    /// The instance's image (a clone runs the same one).
    pub image: String,
    #[serde(default)]
    pub state: SnapshotState,
    /// A VM's running state was saved too (restored into the same vCPUs and memory).
    #[serde(default)]
    pub memory: bool,
    /// How the point in time was made: `filesystem freeze`, `guest agent freeze`, `paused
    /// with memory` or `crash-consistent` ('' while pending).
    #[serde(default)]
    pub consistency: String,
    /// Bytes: the container (or VM root) disk's size; a clone's disk is this size.
    pub disk_size: u64,
    /// The volumes saved, by name.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// The instance's vCPUs when it was taken.
    pub vcpus: u32,
    /// Bytes: the instance's memory when it was taken.
    pub memory_bytes: u64,
    /// Bytes the snapshot takes on the host's disk (0 while pending).
    pub bytes: u64,
    /// Unix ms.
    pub created_at: i64,
}

/// `POST /v1/instances/{id}/snapshots`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct CreateSnapshot {
    pub name: String,
    /// VMs: save the running state too (restoring it resumes the VM where it was).
    #[serde(default)]
    pub memory: bool,
}

/// `POST /v1/instances/{id}/restore`: the instance is stopped (if it runs), its volumes are
/// rolled back to the snapshot's now, and it starts again from the snapshot's disk (and a VM
/// from its saved running state).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct RestoreInstance {
    /// A snapshot of this instance, by id or name.
    pub snapshot: String,
}
