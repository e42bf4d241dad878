//! Live migration of a running VM (`POST /v1/instances/{id}/migrate`).

use serde::{Deserialize, Serialize};

/// `POST /v1/instances/{id}/migrate`: moves a running VM's running state to a new QEMU process
/// without stopping it (a switchover of milliseconds). Answers once the move has ended, either
/// way: a failed or refused migration leaves the VM running where it was.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct MigrateInstance {
    /// The node to move to; absent, or this daemon's own node id: a new QEMU process on this
    /// host (after a QEMU upgrade, or to re-create the process without a reboot).
    #[serde(default)]
    pub to: Option<String>,
    /// Switch to post-copy when pre-copy does not converge: the guest runs on the destination
    /// at once and fetches the pages still missing on demand (bounded downtime whatever the
    /// dirty rate; a failure after the switch loses the guest).
    #[serde(default)]
    pub postcopy: bool,
    /// The longest pause of the guest the switchover may take, ms (default 300).
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
}

/// What a completed migration measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct MigrationReport {
    pub instance: String,
    /// The node it runs on now.
    pub node: String,
    /// The guest's pause at the switchover, ms, as QEMU measured it (`query-migrate`).
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
    /// QEMU's process before and after.
    pub old_pid: i32,
    pub new_pid: i32,
}

impl MigrationReport {
    /// `downtime 40 ms, total 2400 ms, 512 MiB sent in 3 passes[, vCPUs throttled by N %][,
    /// post-copy]`: what the CLI prints and the instance's event says.
    pub fn summary(&self) -> String {
        format!(
            "downtime {} ms, total {} ms, {} sent in {} passes{}{}",
            self.downtime_ms,
            self.total_ms,
            crate::format_size(self.transferred_bytes),
            self.dirty_sync_count,
            if self.cpu_throttle_percent > 0 {
                format!(", vCPUs throttled by {} %", self.cpu_throttle_percent)
            } else {
                String::new()
            },
            if self.postcopy { ", post-copy" } else { "" }
        )
    }
}
