//! Live migration of a running VM (`POST /v1/instances/{id}/migrate`).

use serde::{Deserialize, Serialize};

/// `POST /v1/instances/{id}/migrate`: moves a running VM's running state to a new QEMU process
/// without stopping it (a switchover of milliseconds; under TCG with QEMU before 9.0, for a VM
/// whose RAM QEMU cannot copy live there (see `MigrationReport::paused_copy`), the guest pauses
/// for the whole copy, or until the switch to post-copy, which then comes at once). Answers
/// once the move has ended, either
/// way: a failed or refused migration leaves the VM running where it was.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct MigrateInstance {
    /// The node to move to; absent, or this daemon's own node id: a new QEMU process on this
    /// host (after a QEMU upgrade, or to re-create the process without a reboot).
    #[serde(default)]
    pub to: Option<String>,
    /// Switch to post-copy after the first pass (at once where the copy pauses the guest): the
    /// guest runs on the destination and fetches the pages still missing on demand (bounded
    /// downtime whatever the dirty rate; a failure after the switch loses the guest).
    #[serde(default)]
    pub postcopy: bool,
    /// The longest pause of the guest the switchover may take, ms (default 300); not held
    /// where the copy pauses the guest (`MigrationReport::paused_copy`).
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
}

/// What a completed migration measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct MigrationReport {
    pub instance: String,
    /// The node it runs on now.
    pub node: String,
    /// The guest's pause at the switchover, ms, as QEMU measured it (`query-migrate`); where
    /// the copy paused the guest (`paused_copy`), the whole pause, from the start of the copy
    /// until the destination may run.
    pub downtime_ms: u64,
    /// From the start of the migration to the destination running, ms.
    pub total_ms: u64,
    /// RAM bytes sent (every pass).
    pub transferred_bytes: u64,
    /// Passes over the guest's dirty pages (1 = nothing was dirtied while copying).
    pub dirty_sync_count: u64,
    /// How far auto-converge slowed the guest's vCPUs down at the end, percent (0: never).
    pub cpu_throttle_percent: u64,
    /// Whether it ended in post-copy mode.
    pub postcopy: bool,
    /// The copy paused the guest from its start (under TCG with QEMU before 9.0, for a VM
    /// whose RAM is a whole number of 256 KiB, as VMs started before the daemon padded it:
    /// QEMU loses guest writes during a live copy of such RAM): `downtime_ms` is that whole
    /// pause.
    #[serde(default)]
    pub paused_copy: bool,
    /// QEMU's process before and after.
    pub old_pid: i32,
    pub new_pid: i32,
}

impl MigrationReport {
    /// `downtime 40 ms, total 2400 ms, 512 MiB sent in 3 passes[, vCPUs throttled by N %][,
    /// post-copy][, the guest paused for the copy]`: what the CLI prints and the instance's
    /// event says.
    pub fn summary(&self) -> String {
        format!(
            "downtime {} ms, total {} ms, {} sent in {} passes{}{}{}",
            self.downtime_ms,
            self.total_ms,
            crate::format_size(self.transferred_bytes),
            self.dirty_sync_count,
            if self.cpu_throttle_percent > 0 {
                format!(", vCPUs throttled by {} %", self.cpu_throttle_percent)
            } else {
                String::new()
            },
            if self.postcopy { ", post-copy" } else { "" },
            if self.paused_copy {
                ", the guest paused for the copy"
            } else {
                ""
            }
        )
    }
}

/// `POST /v1/migrations` (daemon to daemon, with an admin key of the destination): a source
/// daemon offers a running VM. The destination makes the instance (same id, name, tenant by
/// name, image, sizes and address), starts its QEMU waiting for the state, and answers; the
/// bytes then go over two channels ([`MigrationChannel`]) and the source says when the guest
/// may run (`POST /v1/migrations/{id}/run`) or that it stays where it was
/// (`DELETE /v1/migrations/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct MigrationOffer {
    /// The migration's id (the source's choice).
    pub migration: String,
    /// The source daemon's node id.
    pub from_node: String,
    /// The instance's id, kept across hosts.
    pub instance: String,
    /// Its tenant's name (the destination's tenant of that name receives it).
    pub tenant: String,
    /// The guest's address in its tenant's network (it keeps it: the destination's network
    /// of that tenant must hold it, free).
    pub address: String,
    /// The instance as it was asked for (name, image, sizes, ports, ...).
    pub create: crate::CreateInstance,
    /// Its image's digest: the destination's image of that name must be the same.
    pub image_digest: String,
    /// The source QEMU's recorded start (the node's `VmSpec`): the destination's QEMU takes
    /// its shape.
    pub vm: serde_json::Value,
    /// The source will switch to post-copy: the destination's QEMU must be able to.
    #[serde(default)]
    pub postcopy: bool,
}

/// The destination's answer to a [`MigrationOffer`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct MigrationAccepted {
    pub migration: String,
    pub instance: String,
    /// The destination's node id.
    pub node: String,
}

/// The two byte channels of a migration between hosts, each a connection upgraded at
/// `GET /v1/migrations/{id}/channels/{channel}` (`Upgrade: gpuvisor-migration`): the root
/// disk's blocks (NBD, to the destination QEMU's export) and the migration stream.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MigrationChannel {
    Disk,
    State,
}

impl MigrationChannel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disk => "disk",
            Self::State => "state",
        }
    }
}

/// The `Upgrade` protocol of a migration channel.
pub const MIGRATION_UPGRADE: &str = "gpuvisor-migration";

/// Where an offered migration stands on its destination (`GET /v1/migrations/{id}`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MigrationPhase {
    /// Its QEMU waits for the state (or is receiving it).
    Waiting,
    /// The guest ran here (it may have ended since): the source must not run it again.
    Running,
    /// It was here and never ran (dropped, or failed and removed).
    Gone,
    /// No record of it here (never offered, or its record is gone: pruned, or its tenant
    /// removed): a source whose copy had completed cannot tell whether it ran.
    Unknown,
}

/// `GET /v1/migrations/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct MigrationStatus {
    pub migration: String,
    pub phase: MigrationPhase,
}

/// `DELETE /v1/migrations/{id}`: the source keeps the guest (or, `lost`, the guest is lost:
/// its post-copy was cut, so even a destination that runs it removes it).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct DropMigration {
    #[serde(default)]
    pub lost: bool,
}
