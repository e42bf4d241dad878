//! Telemetry on the wire: metric history (`GET /v1/instances/{id}/metrics`,
//! `GET /v1/gpus/{id}/metrics`) and the live per-GPU view behind `gpuvisor gpu top`
//! (`GET /v1/gpus/stats`). Metric names are stable; values are in the unit the name ends with.

use serde::{Deserialize, Serialize};

/// One point of a series: the bucket's start (ms since the epoch), its mean and its maximum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MetricPoint {
    pub t: i64,
    pub avg: f64,
    pub max: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MetricSeries {
    /// `gpu_util_percent`, `memory_bytes`, ...
    pub metric: String,
    pub points: Vec<MetricPoint>,
}

/// History of one instance or GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MetricsHistory {
    /// `instance` or `gpu`.
    pub kind: String,
    /// Instance id or GPU UUID.
    pub id: String,
    /// Seconds per point actually used (1 s data is kept for an hour, 1 min aggregates for 7
    /// days; older or coarser requests are answered from the aggregates).
    pub step_s: u64,
    pub series: Vec<MetricSeries>,
}

/// Query of a history: `since` is a duration back from now (`10m`, `2h`, `7d`) or epoch
/// milliseconds; `step` a duration (`1s`, `1m`). Both optional (last 5 minutes, finest step).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MetricsQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// The newest sample of one GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GpuStats {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    /// Ms since the epoch of the sample; 0 before the first one.
    pub at: i64,
    pub util_percent: Option<f64>,
    pub memory_used: Option<u64>,
    pub memory_total: u64,
    pub temperature_c: Option<f64>,
    pub power_w: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub mem_clock_mhz: Option<u32>,
    pub throttle_reasons: Option<u64>,
    pub pcie_tx_kbs: Option<u64>,
    pub pcie_rx_kbs: Option<u64>,
    pub ecc_corrected: Option<u64>,
    pub ecc_uncorrected: Option<u64>,
    /// XID errors seen since the daemon started.
    pub xid_errors: u64,
    pub last_xid: Option<u32>,
    /// Instances placed on it (live ones).
    pub instances: u32,
    /// Why no new instance is placed on it, if it is cordoned.
    pub cordoned: Option<String>,
    /// Alarms now active (`thermal`, ...).
    pub alarms: Vec<String>,
    pub simulated: bool,
}

/// One event of a GPU (`GET /v1/gpus/events`, `gpu events`): an XID error, a thermal alarm
/// raised or cleared, the GPU lost, a cordon set or lifted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GpuEvent {
    /// Ms since the epoch.
    pub at: i64,
    pub gpu: String,
    pub index: u32,
    /// `xid`, `thermal`, `thermal_cleared`, `gpu_lost`, `cordoned` or `uncordoned`.
    pub kind: String,
    pub message: String,
}

/// Query of `GET /v1/gpus/events`: `since` as for a history (default 7 days back), `gpu` one
/// GPU (UUID or index), `limit` the most events (newest first; default and at most 500).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GpuEventsQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// One message of an instance's metrics stream (`GET /v1/instances/{id}/metrics/ws`): the
/// points of each history from the newest one sent before (that bucket again: it may have
/// grown), the instance's first, then the GPUs it is bound to that the caller may read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MetricsUpdate {
    /// Ms since the epoch of the sample that made this update.
    pub at: i64,
    pub histories: Vec<MetricsHistory>,
}
