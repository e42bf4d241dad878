//! Serverless endpoints: a tenant's job queue served by worker instances of a template that
//! scale with the queue, down to zero. The management types (`/v1/endpoints`) are ours; the
//! queue API's (`/v2/<endpoint-id>/...`) keep RunPod's JSON shapes and names, so RunPod's
//! client SDK and curl scripts work against gpuvisor unchanged.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::str::FromStr;

/// When the autoscaler adds a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ScalerKind {
    /// A job has waited this many seconds (or no worker runs at all).
    QueueDelay,
    /// One worker per this many jobs queued or running.
    RequestCount,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Scaler {
    pub kind: ScalerKind,
    pub value: u32,
}

impl Default for Scaler {
    fn default() -> Self {
        Self {
            kind: ScalerKind::QueueDelay,
            value: 4,
        }
    }
}

impl fmt::Display for Scaler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = match self.kind {
            ScalerKind::QueueDelay => "queue-delay",
            ScalerKind::RequestCount => "request-count",
        };
        write!(f, "{k}:{}", self.value)
    }
}

impl FromStr for Scaler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (k, v) = s.split_once(':').ok_or_else(|| {
            format!("scaler {s:?}: expected queue-delay:SECONDS or request-count:N")
        })?;
        let kind = match k {
            "queue-delay" => ScalerKind::QueueDelay,
            "request-count" => ScalerKind::RequestCount,
            _ => {
                return Err(format!(
                    "scaler {k:?}: expected queue-delay or request-count"
                ))
            }
        };
        let value: u32 = v
            .parse()
            .map_err(|_| format!("scaler value {v:?}: expected a whole number"))?;
        Ok(Self { kind, value })
    }
}

/// What an endpoint is: its template, its worker bounds and its scaling rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// The template workers are made from (the tenant's own, else a public one).
    pub template: String,
    #[serde(default)]
    pub workers_min: u32,
    #[serde(default = "default_workers_max")]
    pub workers_max: u32,
    /// A worker idle this long is removed (down to `workers_min`).
    #[serde(default = "default_idle_secs")]
    pub idle_timeout_secs: u64,
    #[serde(default)]
    pub scaler: Scaler,
    /// Whole GPUs per worker (unset: the template's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// A fraction of one GPU per worker (unset: the template's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_fraction: Option<f64>,
    /// Scaled-down workers are stopped, not removed, and started again first on the next
    /// scale-up (their image, disk and placement kept).
    #[serde(default)]
    pub flashboot: bool,
    /// A job running longer is `TIMED_OUT` (default 600 000; a job's own
    /// `policy.executionTimeout` wins).
    #[serde(default = "default_exec_ms")]
    pub execution_timeout_ms: u64,
}

fn default_workers_max() -> u32 {
    3
}
fn default_idle_secs() -> u64 {
    5
}
fn default_exec_ms() -> u64 {
    600_000
}

impl Default for EndpointSpec {
    fn default() -> Self {
        Self {
            template: String::new(),
            workers_min: 0,
            workers_max: default_workers_max(),
            idle_timeout_secs: default_idle_secs(),
            scaler: Scaler::default(),
            gpus: None,
            gpu_fraction: None,
            flashboot: false,
            execution_timeout_ms: default_exec_ms(),
        }
    }
}

/// `POST /v1/endpoints`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct CreateEndpoint {
    pub name: String,
    #[serde(flatten)]
    pub spec: EndpointSpec,
}

/// `PATCH /v1/endpoints/{id}`: the fields to change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateEndpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_min: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_max: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaler: Option<Scaler>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flashboot: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_timeout_ms: Option<u64>,
}

/// An endpoint as shown: its spec, where its queue is, and what it has now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Endpoint {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub created_at: i64,
    #[serde(flatten)]
    pub spec: EndpointSpec,
    /// The queue API's path: `/v2/<id>` on the API's address.
    pub path: String,
    pub health: EndpointHealth,
    /// Jobs that ended in the last [`EndpointStats::window_s`] seconds: rates and latency
    /// (absent from a daemon older than these: zeros).
    #[serde(default)]
    pub stats: EndpointStats,
}

/// What an endpoint's jobs that ended lately took: counts by outcome and the rate (of all
/// of them), and the percentiles of the time queued (`delay`, created to claimed) and run
/// (`execution`, claimed to ended) over the newest 2,000 of them (`n` says how many).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct EndpointStats {
    /// How far back it looks (300 s).
    pub window_s: u64,
    pub completed: u64,
    /// Failed by the worker or after three lost workers.
    pub failed: u64,
    pub timed_out: u64,
    pub cancelled: u64,
    /// Jobs ended per minute over the window.
    pub per_minute: f64,
    /// Absent when no job of the window was claimed by a worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<Percentiles>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_ms: Option<Percentiles>,
}

/// Nearest-rank percentiles of a set of durations, in ms.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct Percentiles {
    /// How many values.
    pub n: u64,
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
    pub max: u64,
}

impl Percentiles {
    /// Of `values` (sorted here); `None` when empty.
    pub fn of(mut values: Vec<u64>) -> Option<Self> {
        values.sort_unstable();
        let n = values.len();
        // Nearest rank: the smallest value with at least p% of the values at or below it.
        let at = |p: usize| values[(n * p).div_ceil(100).clamp(1, n) - 1];
        (n > 0).then(|| Self {
            n: n as u64,
            p50: at(50),
            p95: at(95),
            p99: at(99),
            max: values[n - 1],
        })
    }
}

/// `policy` of a job request (RunPod's).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobPolicy {
    /// Milliseconds a worker may run it (at least 5 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_timeout: Option<u64>,
    /// Milliseconds it may live in all, queue included (10 000 to one week).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_priority: Option<bool>,
}

/// `POST /v2/<endpoint>/run` and `runsync`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct RunRequest {
    /// What the worker's handler gets as `job["input"]`.
    pub input: Value,
    /// Called with the job's final status (POST, JSON) when it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<JobPolicy>,
}

/// A job's state, RunPod's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    InQueue,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::InQueue => "IN_QUEUE",
            JobState::InProgress => "IN_PROGRESS",
            JobState::Completed => "COMPLETED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::TimedOut => "TIMED_OUT",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            JobState::InQueue,
            JobState::InProgress,
            JobState::Completed,
            JobState::Failed,
            JobState::Cancelled,
            JobState::TimedOut,
        ]
        .into_iter()
        .find(|j| j.as_str() == s)
    }
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::InQueue | JobState::InProgress)
    }
}

/// A job as `run`, `runsync`, `status`, `cancel` and `retry` answer (and a webhook gets).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    pub id: String,
    pub status: JobState,
    /// Milliseconds from submission to a worker's pickup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_time: Option<u64>,
    /// Milliseconds from pickup to the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    /// Times it went back to the queue after a worker was lost.
    #[serde(default)]
    pub retries: u32,
}

/// One partial output of a streaming job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct StreamChunk {
    pub output: Value,
}

/// `GET /v2/<endpoint>/stream/<job>`: the chunks not handed out before.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct StreamStatus {
    pub id: String,
    pub status: JobState,
    pub stream: Vec<StreamChunk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

/// `POST /v2/<endpoint>/purge-queue`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Purged {
    pub removed: u64,
    pub status: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobCounts {
    pub completed: u64,
    pub failed: u64,
    pub in_progress: u64,
    pub in_queue: u64,
    pub retried: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct WorkerCounts {
    /// Running, no job.
    pub idle: u64,
    /// Running a job.
    pub running: u64,
    /// Started, not yet asking for jobs.
    pub initializing: u64,
    /// Up and asking for jobs.
    pub ready: u64,
    /// Flashboot workers stopped, ready to start again.
    pub parked: u64,
    pub throttled: u64,
    pub unhealthy: u64,
}

/// `GET /v2/<endpoint>/health`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct EndpointHealth {
    pub jobs: JobCounts,
    pub workers: WorkerCounts,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(Percentiles::of(vec![]), None);
        let one = Percentiles::of(vec![7]).unwrap();
        assert_eq!((one.p50, one.p99, one.max, one.n), (7, 7, 7, 1));
        // 1..=100 shuffled: the k-th percentile is k.
        let v: Vec<u64> = (1..=100).rev().collect();
        let p = Percentiles::of(v).unwrap();
        assert_eq!((p.p50, p.p95, p.p99, p.max, p.n), (50, 95, 99, 100, 100));
        let p = Percentiles::of(vec![10, 20, 30, 40]).unwrap();
        assert_eq!((p.p50, p.p95, p.max), (20, 40, 40));
    }

    #[test]
    fn scaler_round_trips_and_refuses_nonsense() {
        for s in ["queue-delay:4", "request-count:10"] {
            assert_eq!(s.parse::<Scaler>().unwrap().to_string(), s);
        }
        for bad in [
            "queue-delay",
            "delay:4",
            "request-count:x",
            "queue-delay:-1",
        ] {
            assert!(bad.parse::<Scaler>().is_err(), "{bad}");
        }
    }

    #[test]
    fn job_status_speaks_runpods_names() {
        let j = JobStatus {
            id: "a".into(),
            status: JobState::InQueue,
            delay_time: Some(5),
            execution_time: None,
            output: None,
            error: None,
            worker_id: None,
            retries: 0,
        };
        let v = serde_json::to_value(&j).unwrap();
        assert_eq!(v["status"], "IN_QUEUE");
        assert_eq!(v["delayTime"], 5);
        for s in [
            "IN_QUEUE",
            "IN_PROGRESS",
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMED_OUT",
        ] {
            assert_eq!(JobState::parse(s).unwrap().as_str(), s);
        }
    }
}
