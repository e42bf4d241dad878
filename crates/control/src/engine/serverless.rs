//! Serverless endpoints: a tenant's queue of jobs, served by worker instances of a template
//! that the autoscaler starts when the queue asks for them and removes when idle, down to zero.
//!
//! Three faces, one module:
//! - management (`endpoint create/list/get/update/rm`), tenant keys;
//! - the queue (`run`, `runsync`, `status`, `stream`, `cancel`, `retry`, `purge-queue`,
//!   `health`), tenant keys, RunPod's shapes;
//! - the worker API that RunPod's worker SDK speaks (`job-take`, `job-stop`, `job-done`,
//!   `job-stream`, `ping`), each worker authenticated by its own credential (made when the
//!   worker is, only its hash stored), never the tenant's key.
//!
//! Key decisions:
//! - Jobs live in the store and are accepted (committed) before the client hears back, so a
//!   daemon killed at any moment loses none. Delivery is at least once: a worker's claim is a
//!   lease its pings renew; a lease that runs out, or a worker instance that stops running,
//!   puts the job back in the queue (at most [`MAX_ATTEMPTS`] claims, then `FAILED`). A job ends
//!   once: the first result wins (`Store::finish_job`), so the client sees each job complete
//!   exactly once.
//! - Waiting is by signal, not by polling the store: each endpoint has a watch channel bumped
//!   whenever one of its jobs changes; `job-take` and `runsync` wait on it.
//! - The autoscaler (`run_serverless`, every [`TICK`] and at each new job) decides from one
//!   snapshot per pass: leases, timeouts and retention first, then per endpoint how many
//!   workers the scaler wants, clamped to `workers_min..=workers_max`; the tenant's quotas are
//!   the instance create's own refusal. Workers are ordinary instances (`ep-<pod id>`), made
//!   through `create_instance` as the tenant, so placement, quotas, metering and isolation are
//!   the same as for any instance.

use super::authz::Op;
use super::{hash_key, now_ms, random_hex, validate, Engine, Principal};
use crate::error::{invalid, EngineError, Result};
use crate::store::{EndpointRow, InstanceRow, JobRow, JobTally, WorkerRow};
use gpuvisor_wire::{
    self as wire, EndpointHealth, EndpointSpec, InstanceState, JobState, JobStatus, Role,
    ScalerKind,
};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

/// Claims of one job before it is `FAILED` (workers lost under it).
pub const MAX_ATTEMPTS: i64 = 3;
/// How often workers ping (RUNPOD_PING_INTERVAL), and how long a claim lives without one.
pub const PING_INTERVAL_MS: i64 = 2_000;
pub const LEASE_MS: i64 = 15_000;
/// Retention of finished jobs: `run` and `runsync` (RunPod's).
pub const RUN_RETENTION_MS: i64 = 30 * 60_000;
pub const SYNC_RETENTION_MS: i64 = 60_000;
/// A job's default and longest time to live, queue included.
pub const DEFAULT_TTL_MS: u64 = 24 * 3_600_000;
pub const MAX_TTL_MS: u64 = 7 * 24 * 3_600_000;
/// `runsync`'s default and longest wait.
pub const DEFAULT_SYNC_WAIT_MS: u64 = 90_000;
pub const MAX_SYNC_WAIT_MS: u64 = 300_000;
/// The largest job input (RunPod's `run` limit; `runsync` is bounded by the API's body limit).
pub const MAX_INPUT_BYTES: usize = 10 << 20;
/// The largest result a worker may post.
pub const MAX_OUTPUT_BYTES: usize = 20 << 20;
/// The largest stream chunk or progress update, and the most chunks one job keeps.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
pub const MAX_CHUNKS: i64 = 10_000;
/// Chunks one `stream` answer hands out at most (the rest on the next call).
pub const STREAM_PAGE: i64 = 1_000;
/// Jobs one endpoint holds in its queue at most (RunPod answers 429 past its own).
pub const MAX_QUEUED: u64 = 10_000;
/// A parked (frozen) worker is removed after this long unused: it holds memory and GPUs.
const PARKED_TTL_MS: i64 = 30 * 60_000;
pub const MAX_ENDPOINTS_PER_TENANT: usize = 64;
pub const MAX_WORKERS: u32 = 64;
/// The autoscaler's period.
pub const TICK: Duration = Duration::from_millis(500);
/// How far back an endpoint's rates and latency look.
pub const STATS_WINDOW_MS: i64 = 5 * 60_000;
/// How long a job's end is kept for them.
pub const JOB_ENDS_KEPT_MS: i64 = 15 * 60_000;
/// A worker row whose instance was never made is given this long (a create in flight).
const ORPHAN_ROW_MS: i64 = 60_000;

/// Where workers reach the worker API (this port on their tenant bridge's gateway), and the
/// addresses webhooks may reach although not public.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerlessSettings {
    pub worker_port: u16,
    pub webhook_allow: Vec<std::net::IpAddr>,
    /// Public networks no webhook reaches (the instances' `[network] deny`).
    pub webhook_deny: Vec<gpuvisor_node::net::NetRule>,
    /// The octets all jobs of one tenant's endpoints keep in the store at most (inputs,
    /// results, stream chunks, until their retention ends): 10 000 queued jobs of 10 MiB would
    /// otherwise fill the host's disk for every tenant.
    pub job_bytes_per_tenant: u64,
}

/// Webhook calls in flight at most; the rest wait in the store for the next pass.
const MAX_WEBHOOKS: usize = 64;
/// Webhook calls of one tenant in flight at most: a tenant whose hooks hang (each call may
/// take 3 × 10 s and 20 s between) holds no more, and the others' are called meanwhile.
const MAX_WEBHOOKS_PER_TENANT: usize = 8;
/// Calls of one webhook (RunPod's: the first and two more, 10 s apart).
const WEBHOOK_TRIES: u32 = 3;
const WEBHOOK_RETRY: Duration = Duration::from_secs(10);
/// A job past its retention whose webhook was never called (its tenant's calls all busy) is
/// kept this much longer, then forgotten with its webhook.
const WEBHOOK_GRACE_MS: i64 = 10 * 60_000;

/// A webhook call in flight: its global slot and its place in its tenant's count, both given
/// back when the call ends (or its task is dropped).
struct BusyWebhook {
    map: std::sync::Arc<Mutex<HashMap<String, usize>>>,
    tenant: String,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for BusyWebhook {
    fn drop(&mut self) {
        let mut m = lock(&self.map);
        if let Some(n) = m.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.tenant);
            }
        }
    }
}

/// What a worker is to the autoscaler and to `health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkerPhase {
    Parked,
    /// Made or started, not yet asking for jobs.
    Initializing,
    Idle,
    Running,
    /// Its instance failed or is gone.
    Unhealthy,
}

/// In-memory state: what a restart may lose without harm (a worker not yet seen since the
/// restart counts as initializing until its next request, which is at most a ping away).
pub struct Serverless {
    settings: std::sync::RwLock<Option<ServerlessSettings>>,
    signals: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Pod id → when it last asked for anything since its instance (re)started.
    seen: Mutex<HashMap<String, i64>>,
    /// Pod id → when it last had a job (or was made, or started again).
    last_busy: Mutex<HashMap<String, i64>>,
    /// Pods that let a job's lease run out while they kept pinging without naming it: they
    /// took it and neither ran nor reported it (a wedged worker); the autoscaler replaces
    /// them. (A worker that stopped pinging altogether — unreachable, a busy store — only
    /// loses the job to the queue.)
    wedged: Mutex<HashSet<String>>,
    /// Pod id → when it last pinged.
    pinged: Mutex<HashMap<String, i64>>,
    /// Pod id → jobs it must stop (cancelled, timed out), for its `job-stop` poll.
    stops: Mutex<HashMap<String, Vec<String>>>,
    stop_signal: tokio::sync::Notify,
    /// Woken by a new job, so a cold start does not wait for the tick.
    wake: tokio::sync::Notify,
    webhooks: std::sync::RwLock<Option<std::sync::Arc<gpuvisor_node::webhook::Webhooks>>>,
    webhook_slots: std::sync::Arc<tokio::sync::Semaphore>,
    /// Webhook calls in flight per tenant.
    webhooks_busy: std::sync::Arc<Mutex<HashMap<String, usize>>>,
    /// Turns which endpoint's webhooks go first in a pass.
    webhook_turn: std::sync::atomic::AtomicUsize,
    /// Endpoint id → (no new worker before, the next wait): a worker create that failed
    /// (quota, no room, a template gone) is tried again after 2 s, doubling to a minute.
    backoff: Mutex<HashMap<String, (i64, i64)>>,
    /// When the job ends past their keeping were last forgotten (ms).
    ends_pruned: std::sync::atomic::AtomicI64,
}

impl Default for Serverless {
    fn default() -> Self {
        Self {
            settings: Default::default(),
            signals: Default::default(),
            seen: Default::default(),
            last_busy: Default::default(),
            stops: Default::default(),
            wedged: Default::default(),
            pinged: Default::default(),
            stop_signal: Default::default(),
            wake: Default::default(),
            webhooks: Default::default(),
            webhook_slots: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_WEBHOOKS)),
            webhooks_busy: Default::default(),
            webhook_turn: Default::default(),
            backoff: Default::default(),
            ends_pruned: Default::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn job_id() -> Result<String> {
    let h = random_hex(16)?;
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

fn parse_json(table: &str, s: &str) -> Option<Value> {
    if s.is_empty() {
        return None;
    }
    match serde_json::from_str(s) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!("serverless: a stored {table} is not JSON: {e}");
            None
        }
    }
}

/// A job as the queue API shows it.
pub fn job_status(j: &JobRow) -> JobStatus {
    let state = j.state();
    let ms = |a: i64, b: i64| (a > 0 && b >= a).then(|| u64::try_from(b - a).unwrap_or(0));
    let delay_end = if j.started_at > 0 {
        j.started_at
    } else if state.is_final() {
        j.finished_at
    } else {
        0
    };
    JobStatus {
        id: j.id.clone(),
        status: state,
        delay_time: ms(j.created_at, delay_end),
        execution_time: if j.started_at > 0 {
            ms(j.started_at, j.finished_at)
        } else {
            None
        },
        output: parse_json("output", &j.output),
        error: parse_json("error", &j.error),
        worker_id: (!j.worker_id.is_empty() && state != JobState::InQueue)
            .then(|| j.worker_id.clone()),
        retries: u32::try_from((j.attempts - 1).max(0)).unwrap_or(0),
    }
}

/// The environment variable holding a worker's own credential.
pub const CREDENTIAL_ENV: &str = "RUNPOD_AI_API_KEY";

/// An instance's environment as shown: a worker's credential is not (readers of the
/// instance, viewers included, must not act as the worker).
pub fn redact_env(env: Vec<String>) -> Vec<String> {
    env.into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if k == CREDENTIAL_ENV && v.starts_with("gvw_") => {
                format!("{k}=(hidden)")
            }
            _ => kv,
        })
        .collect()
}

fn check_spec(spec: &EndpointSpec) -> Result<()> {
    if spec.template.is_empty() {
        return Err(invalid("an endpoint needs a template (--template NAME)"));
    }
    if spec.workers_max == 0 || spec.workers_max > MAX_WORKERS {
        return Err(invalid(format!(
            "workers_max must be 1 to {MAX_WORKERS}, not {}",
            spec.workers_max
        )));
    }
    if spec.workers_min > spec.workers_max {
        return Err(invalid(format!(
            "workers_min ({}) is above workers_max ({})",
            spec.workers_min, spec.workers_max
        )));
    }
    if spec.idle_timeout_secs == 0 || spec.idle_timeout_secs > 7 * 24 * 3600 {
        return Err(invalid("idle_timeout must be 1 s to 7 days"));
    }
    if spec.scaler.value == 0 || spec.scaler.value > 3600 {
        return Err(invalid(format!(
            "the scaler's value must be 1 to 3600, not {}",
            spec.scaler.value
        )));
    }
    if spec.execution_timeout_ms < 5_000 || spec.execution_timeout_ms > MAX_TTL_MS {
        return Err(invalid("execution_timeout must be 5 s to 7 days"));
    }
    if spec.gpus.is_some() && spec.gpu_fraction.is_some() {
        return Err(invalid("give gpus or gpu_fraction, not both"));
    }
    Ok(())
}

/// Per endpoint, what one pass sees.
#[derive(Default)]
struct Snapshot {
    endpoints: Vec<EndpointRow>,
    workers: Vec<WorkerRow>,
    tallies: Vec<JobTally>,
    instances: HashMap<String, InstanceRow>,
    busy: HashSet<String>,
}

impl Snapshot {
    fn tally(&self, ep: &str, state: JobState) -> Option<&JobTally> {
        self.tallies
            .iter()
            .find(|t| t.endpoint_id == ep && t.state == state.as_str())
    }
}

impl Engine {
    pub fn set_serverless(&self, s: ServerlessSettings) -> Result<()> {
        let hooks =
            gpuvisor_node::webhook::Webhooks::new(s.webhook_allow.clone(), s.webhook_deny.clone())
                .map_err(|e| EngineError::Internal(e.to_string()))?;
        *self
            .serverless
            .webhooks
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(std::sync::Arc::new(hooks));
        *self
            .serverless
            .settings
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(s);
        Ok(())
    }

    fn serverless_settings(&self) -> Result<ServerlessSettings> {
        self.serverless
            .settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                EngineError::Unavailable(
                    "serverless endpoints are off on this daemon: give it a worker API port ([proxy] worker_port)".into(),
                )
            })
    }

    fn signal(&self, endpoint_id: &str) {
        let mut m = lock(&self.serverless.signals);
        let tx = m
            .entry(endpoint_id.to_string())
            .or_insert_with(|| watch::Sender::new(0));
        tx.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn subscribe(&self, endpoint_id: &str) -> watch::Receiver<u64> {
        let mut m = lock(&self.serverless.signals);
        m.entry(endpoint_id.to_string())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe()
    }

    // --- management --------------------------------------------------------------------

    async fn wire_endpoint(&self, e: EndpointRow) -> Result<wire::Endpoint> {
        let snap = self.snapshot().await?;
        self.wire_endpoint_in(e, &snap).await
    }

    async fn wire_endpoint_in(&self, e: EndpointRow, snap: &Snapshot) -> Result<wire::Endpoint> {
        let tenant = self
            .store
            .tenant(&e.tenant_id)
            .await?
            .map(|t| t.name)
            .unwrap_or_default();
        let health = self.health_of(snap, &e.id);
        let stats = self.endpoint_stats(&e.id).await;
        Ok(wire::Endpoint {
            path: format!("/v2/{}", e.id),
            id: e.id,
            name: e.name,
            tenant,
            created_at: e.created_at,
            spec: e.spec,
            health,
            stats,
        })
    }

    /// What `endpoint_id`'s jobs that ended in the last [`STATS_WINDOW_MS`] took: counts of
    /// all of them, percentiles of the newest [`crate::store::JOB_ENDS_SAMPLE`]. Empty (and
    /// logged) when the store cannot say: the endpoint is still shown.
    async fn endpoint_stats(&self, endpoint_id: &str) -> wire::serverless::EndpointStats {
        let (counts, sample) = match self
            .store
            .job_ends(endpoint_id, now_ms() - STATS_WINDOW_MS)
            .await
        {
            Ok(e) => e,
            Err(err) => {
                tracing::warn!(endpoint = endpoint_id, "endpoint stats: {err}");
                return wire::serverless::EndpointStats {
                    window_s: (STATS_WINDOW_MS / 1000) as u64,
                    ..Default::default()
                };
            }
        };
        let n = |s: JobState| {
            counts
                .iter()
                .find(|(k, _)| k == s.as_str())
                .map_or(0, |(_, n)| *n)
        };
        let all: u64 = counts.iter().map(|(_, n)| n).sum();
        wire::serverless::EndpointStats {
            window_s: (STATS_WINDOW_MS / 1000) as u64,
            completed: n(JobState::Completed),
            failed: n(JobState::Failed),
            timed_out: n(JobState::TimedOut),
            cancelled: n(JobState::Cancelled),
            per_minute: all as f64 * 60_000.0 / STATS_WINDOW_MS as f64,
            delay_ms: wire::serverless::Percentiles::of(
                sample.iter().filter_map(|e| e.delay_ms).collect(),
            ),
            execution_ms: wire::serverless::Percentiles::of(
                sample.iter().filter_map(|e| e.exec_ms).collect(),
            ),
        }
    }

    /// Refuses `more` octets of job data for tenant `tenant_id` when its jobs
    /// would keep more than `job_bytes_per_tenant` in the store; new jobs (`input`) only up to
    /// three quarters of it, so that a full queue leaves room for the results of the jobs
    /// running. Checked before the write: requests at the same moment may each pass it by
    /// their own size (a job's input, result or chunk: at most 20 MiB each).
    async fn check_job_storage(&self, tenant_id: &str, more: usize, input: bool) -> Result<()> {
        let all = self.serverless_settings()?.job_bytes_per_tenant;
        let cap = if input { all / 4 * 3 } else { all };
        let held = self.store.tenant_job_bytes(tenant_id).await?;
        if held.saturating_add(more as u64) > cap {
            return Err(EngineError::ResourceExhausted(format!(
                "the jobs of this tenant's endpoints keep {} KiB in the store and {} KiB more \
                 would pass {} KiB{}: wait for ended jobs to expire, or purge a queue",
                held >> 10,
                more >> 10,
                cap >> 10,
                if input {
                    " (new jobs may fill three quarters of the tenant's job storage)"
                } else {
                    ""
                }
            )));
        }
        Ok(())
    }

    /// The endpoint `id_or_name` of `who`'s tenant (any tenant's by id for an admin).
    async fn find_endpoint(&self, who: &Principal, id_or_name: &str) -> Result<EndpointRow> {
        let not_found = || {
            EngineError::NotFound(format!(
                "endpoint {id_or_name:?} not found (see `gpuvisor endpoint list`)"
            ))
        };
        if let Some(e) = self.store.endpoint(id_or_name).await? {
            if who.is_admin() || e.tenant_id == who.tenant_id {
                return Ok(e);
            }
            // Another tenant's id: perhaps the name of one of the caller's.
        }
        self.store
            .endpoint_by_name(&who.tenant_id, id_or_name)
            .await?
            .ok_or_else(not_found)
    }

    pub async fn create_endpoint(
        &self,
        who: &Principal,
        req: &wire::CreateEndpoint,
    ) -> Result<wire::Endpoint> {
        who.allow(Op::CreateEndpoint)?;
        self.serverless_settings()?;
        validate::name("endpoint", &req.name)?;
        check_spec(&req.spec)?;
        if who.tenant_id.is_empty() {
            return Err(invalid(
                "endpoints belong to a tenant: create it with a tenant's key",
            ));
        }
        // The template must resolve for the tenant now (its workers are made from it).
        self.check_template(who, &req.spec).await?;
        if self.store.endpoints(Some(&who.tenant_id)).await?.len() >= MAX_ENDPOINTS_PER_TENANT {
            return Err(EngineError::QuotaExceeded(format!(
                "a tenant may have at most {MAX_ENDPOINTS_PER_TENANT} endpoints"
            )));
        }
        let row = EndpointRow {
            id: random_hex(6)?,
            tenant_id: who.tenant_id.clone(),
            name: req.name.clone(),
            spec: req.spec.clone(),
            created_at: now_ms(),
        };
        self.store
            .insert_endpoint(&row)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::Conflict(_) => {
                    EngineError::AlreadyExists(format!("endpoint {:?} already exists", req.name))
                }
                e => e.into(),
            })?;
        self.serverless.wake.notify_one();
        self.wire_endpoint(row).await
    }

    pub async fn list_endpoints(&self, who: &Principal) -> Result<Vec<wire::Endpoint>> {
        who.allow(Op::ListEndpoints)?;
        let rows = self
            .store
            .endpoints((!who.is_admin()).then_some(who.tenant_id.as_str()))
            .await?;
        let snap = self.snapshot().await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(self.wire_endpoint_in(r, &snap).await?);
        }
        Ok(out)
    }

    pub async fn get_endpoint(&self, who: &Principal, id: &str) -> Result<wire::Endpoint> {
        who.allow(Op::GetEndpoint)?;
        let e = self.find_endpoint(who, id).await?;
        self.wire_endpoint(e).await
    }

    pub async fn update_endpoint(
        &self,
        who: &Principal,
        id: &str,
        u: &wire::UpdateEndpoint,
    ) -> Result<wire::Endpoint> {
        who.allow(Op::UpdateEndpoint)?;
        let mut e = self.find_endpoint(who, id).await?;
        let s = &mut e.spec;
        if let Some(t) = &u.template {
            s.template = t.clone();
        }
        if let Some(v) = u.workers_min {
            s.workers_min = v;
        }
        if let Some(v) = u.workers_max {
            s.workers_max = v;
        }
        if let Some(v) = u.idle_timeout_secs {
            s.idle_timeout_secs = v;
        }
        if let Some(v) = u.scaler {
            s.scaler = v;
        }
        if let Some(v) = u.flashboot {
            s.flashboot = v;
        }
        if let Some(v) = u.execution_timeout_ms {
            s.execution_timeout_ms = v;
        }
        check_spec(s)?;
        if u.template.is_some() || u.flashboot == Some(true) {
            let owner = self.principal_for(&e).await?;
            self.check_template(&owner, &e.spec).await?;
        }
        self.store.set_endpoint_spec(&e.id, &e.spec).await?;
        self.serverless.wake.notify_one();
        self.wire_endpoint(e).await
    }

    /// Removes the endpoint, its queue and its workers (terminated).
    pub async fn remove_endpoint(&self, who: &Principal, id: &str) -> Result<wire::Endpoint> {
        who.allow(Op::RemoveEndpoint)?;
        let e = self.find_endpoint(who, id).await?;
        let shown = self.wire_endpoint(e.clone()).await?;
        self.store.delete_endpoint(&e.id).await?;
        // Its workers go now; a crash before that leaves rows the next pass removes.
        for w in self.store.workers().await? {
            if w.endpoint_id == e.id {
                self.remove_worker(&e, &w).await;
            }
        }
        self.signal(&e.id);
        lock(&self.serverless.signals).remove(&e.id);
        lock(&self.serverless.backoff).remove(&e.id);
        Ok(shown)
    }

    /// The endpoint's template resolves for `who`; flashboot only with container workers.
    async fn check_template(&self, who: &Principal, spec: &EndpointSpec) -> Result<()> {
        let r = self
            .resolve_request(
                who,
                &wire::CreateInstance {
                    template: Some(spec.template.clone()),
                    ..Default::default()
                },
            )
            .await?;
        if r.runtime() == wire::RuntimeKind::Vm {
            return Err(invalid(
                "serverless workers are containers (a VM gets no environment for RunPod's SDK): this template makes VMs",
            ));
        }
        Ok(())
    }

    /// Who the endpoint's workers are made as: its tenant, with a member's rights, named in
    /// the audit log as the endpoint.
    async fn principal_for(&self, e: &EndpointRow) -> Result<Principal> {
        let t = self
            .store
            .tenant(&e.tenant_id)
            .await?
            .ok_or_else(|| EngineError::NotFound("the endpoint's tenant is gone".into()))?;
        Ok(Principal {
            tenant_id: t.id,
            tenant: t.name,
            role: Role::Member,
            key_id: format!("endpoint/{}", e.id),
        })
    }

    // --- the queue ---------------------------------------------------------------------

    /// `run` (and the first half of `runsync`): the job is in the store when this returns.
    pub async fn submit_job(
        &self,
        who: &Principal,
        endpoint: &str,
        req: &wire::RunRequest,
        sync: bool,
    ) -> Result<JobStatus> {
        who.allow(Op::RunJob)?;
        let e = self.find_endpoint(who, endpoint).await?;
        if req.input.is_null() {
            return Err(invalid("a job needs an \"input\""));
        }
        let input = serde_json::to_string(&req.input)
            .map_err(|e| EngineError::Internal(format!("input: {e}")))?;
        if input.len() > MAX_INPUT_BYTES {
            return Err(EngineError::PayloadTooLarge(format!(
                "a job's input may be at most {} MiB",
                MAX_INPUT_BYTES >> 20
            )));
        }
        let kept = input.len() + webhook_len(req) + crate::store::JOB_ROW_OCTETS as usize;
        self.check_job_storage(&e.tenant_id, kept, true).await?;
        if self.store.queued_jobs(&e.id).await? >= MAX_QUEUED {
            return Err(EngineError::ResourceExhausted(format!(
                "endpoint {} has {MAX_QUEUED} jobs waiting: try again later",
                e.name
            )));
        }
        let policy = req.policy.clone().unwrap_or_default();
        let exec = policy
            .execution_timeout
            .unwrap_or(e.spec.execution_timeout_ms);
        if !(5_000..=MAX_TTL_MS).contains(&exec) {
            return Err(invalid("policy.executionTimeout must be 5000 ms to 7 days"));
        }
        let ttl = policy.ttl.unwrap_or(DEFAULT_TTL_MS);
        if !(10_000..=MAX_TTL_MS).contains(&ttl) {
            return Err(invalid("policy.ttl must be 10000 ms to 7 days"));
        }
        let webhook = match &req.webhook {
            Some(w) => {
                check_webhook(w)?;
                w.clone()
            }
            None => String::new(),
        };
        let id = if sync {
            format!("sync-{}", job_id()?)
        } else {
            format!("{}-u1", job_id()?)
        };
        let j = JobRow {
            id,
            endpoint_id: e.id.clone(),
            state: JobState::InQueue.as_str().into(),
            input,
            webhook,
            sync,
            exec_timeout_ms: i64::try_from(exec).unwrap_or(i64::MAX),
            ttl_ms: i64::try_from(ttl).unwrap_or(i64::MAX),
            created_at: now_ms(),
            ..Default::default()
        };
        self.store.insert_job(&j).await?;
        self.signal(&e.id);
        self.serverless.wake.notify_one();
        Ok(job_status(&j))
    }

    /// `runsync`: submits, then waits up to `wait_ms` for the end.
    pub async fn run_sync(
        &self,
        who: &Principal,
        endpoint: &str,
        req: &wire::RunRequest,
        wait_ms: Option<u64>,
    ) -> Result<JobStatus> {
        let wait = wait_ms.unwrap_or(DEFAULT_SYNC_WAIT_MS);
        if !(1_000..=MAX_SYNC_WAIT_MS).contains(&wait) {
            return Err(invalid("wait must be 1000 to 300000 ms"));
        }
        let j = self.submit_job(who, endpoint, req, true).await?;
        let e = self.find_endpoint(who, endpoint).await?;
        self.wait_job(&e.id, &j.id, Duration::from_millis(wait))
            .await
    }

    async fn wait_job(&self, endpoint_id: &str, id: &str, wait: Duration) -> Result<JobStatus> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = self.subscribe(endpoint_id);
        loop {
            let j = self
                .store
                .job(id)
                .await?
                .ok_or_else(|| EngineError::NotFound(format!("job {id:?} not found")))?;
            if j.state().is_final() || tokio::time::Instant::now() >= deadline {
                return Ok(job_status(&j));
            }
            let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
        }
    }

    async fn find_job(
        &self,
        who: &Principal,
        endpoint: &str,
        id: &str,
    ) -> Result<(EndpointRow, JobRow)> {
        let e = self.find_endpoint(who, endpoint).await?;
        match self.store.job(id).await? {
            Some(j) if j.endpoint_id == e.id => Ok((e, j)),
            _ => Err(EngineError::NotFound(format!(
                "job {id:?} not found on endpoint {endpoint:?} (finished jobs are kept 30 minutes, runsync's 1 minute)"
            ))),
        }
    }

    pub async fn job_status(&self, who: &Principal, endpoint: &str, id: &str) -> Result<JobStatus> {
        who.allow(Op::JobStatus)?;
        Ok(job_status(&self.find_job(who, endpoint, id).await?.1))
    }

    /// `stream`: the partial outputs not handed out before (each once).
    pub async fn job_stream(
        &self,
        who: &Principal,
        endpoint: &str,
        id: &str,
    ) -> Result<wire::StreamStatus> {
        who.allow(Op::JobStatus)?;
        let (_, j) = self.find_job(who, endpoint, id).await?;
        // The state is read before the chunks: a job seen final has posted them all.
        let chunks = self.store.take_stream(id, STREAM_PAGE).await?;
        let stream = chunks
            .iter()
            .filter_map(|c| parse_json("stream chunk", c))
            .map(|output| wire::StreamChunk { output })
            .collect();
        let s = job_status(&j);
        Ok(wire::StreamStatus {
            id: s.id,
            status: s.status,
            stream,
            error: s.error,
        })
    }

    pub async fn cancel_job(&self, who: &Principal, endpoint: &str, id: &str) -> Result<JobStatus> {
        who.allow(Op::CancelJob)?;
        let (e, _) = self.find_job(who, endpoint, id).await?;
        let now = now_ms();
        if self
            .store
            .finish_job(id, JobState::Cancelled, "", "", now, now + RUN_RETENTION_MS)
            .await?
        {
            // Its holder as of the end (a claim just before it included).
            if let Some(j) = self.store.job(id).await? {
                if !j.worker_id.is_empty() {
                    self.stop_on_worker(&j.worker_id, id);
                }
            }
        }
        self.signal(&e.id);
        Ok(job_status(&self.find_job(who, endpoint, id).await?.1))
    }

    pub async fn retry_job(&self, who: &Principal, endpoint: &str, id: &str) -> Result<JobStatus> {
        who.allow(Op::RetryJob)?;
        let (e, j) = self.find_job(who, endpoint, id).await?;
        if !self.store.retry_job(id, now_ms()).await? {
            return Err(EngineError::InvalidState(format!(
                "job {id} is {}: only a FAILED or TIMED_OUT job is retried",
                j.state().as_str()
            )));
        }
        self.signal(&e.id);
        self.serverless.wake.notify_one();
        Ok(job_status(&self.find_job(who, endpoint, id).await?.1))
    }

    pub async fn purge_queue(&self, who: &Principal, endpoint: &str) -> Result<wire::Purged> {
        who.allow(Op::PurgeQueue)?;
        let e = self.find_endpoint(who, endpoint).await?;
        let removed = self.store.purge_queue(&e.id).await?;
        self.signal(&e.id);
        Ok(wire::Purged {
            removed,
            status: "completed".into(),
        })
    }

    pub async fn endpoint_health(&self, who: &Principal, endpoint: &str) -> Result<EndpointHealth> {
        who.allow(Op::EndpointHealth)?;
        let e = self.find_endpoint(who, endpoint).await?;
        let snap = self.snapshot().await?;
        Ok(self.health_of(&snap, &e.id))
    }

    // --- the worker API ----------------------------------------------------------------

    /// The worker whose credential this is, if it belongs to `endpoint` and `pod` and the
    /// call comes from that worker's own instance address (`peer`): a credential read
    /// elsewhere works nowhere else.
    pub async fn worker_auth(
        &self,
        token: Option<&str>,
        endpoint: &str,
        pod: &str,
        peer: Option<std::net::IpAddr>,
    ) -> Result<WorkerRow> {
        Ok(self.worker_auth_tenant(token, endpoint, pod, peer).await?.0)
    }

    /// [`Engine::worker_auth`], with the worker's tenant.
    pub async fn worker_auth_tenant(
        &self,
        token: Option<&str>,
        endpoint: &str,
        pod: &str,
        peer: Option<std::net::IpAddr>,
    ) -> Result<(WorkerRow, String)> {
        let bad = || EngineError::Unauthorized("not a worker of this endpoint".into());
        let token = token.ok_or_else(bad)?;
        let token = token.strip_prefix("Bearer ").unwrap_or(token);
        let w = self
            .store
            .worker_by_token(&hash_key(token))
            .await?
            .ok_or_else(bad)?;
        if w.endpoint_id != endpoint || w.pod_id != pod || w.instance_id.is_empty() {
            return Err(bad());
        }
        let i = self.store.instance(&w.instance_id).await?.ok_or_else(bad)?;
        let t = self.store.tenant(&i.tenant_id).await?.ok_or_else(bad)?;
        let own = self.node.net.cfg.plan.address(t.net_slot, i.ip_host).ok();
        let from = match peer {
            Some(std::net::IpAddr::V4(v4)) => Some(v4),
            Some(std::net::IpAddr::V6(v6)) => v6.to_ipv4_mapped(),
            None => None,
        };
        if own.is_none() || own != from {
            tracing::info!(
                pod,
                ?own,
                ?from,
                "serverless: a worker credential from another address: refused"
            );
            return Err(bad());
        }
        lock(&self.serverless.seen).insert(w.pod_id.clone(), now_ms());
        Ok((w, t.id))
    }

    /// `job-take`: the next job for this worker, waiting up to `wait` for one; at most
    /// `batch` jobs.
    pub async fn worker_take(
        &self,
        w: &WorkerRow,
        batch: usize,
        wait: Duration,
    ) -> Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = self.subscribe(&w.endpoint_id);
        loop {
            let mut out = Vec::new();
            // A parked worker (or one of a removed endpoint) gets nothing.
            let current = self.store.worker_by_pod(&w.pod_id).await?;
            if current.is_some_and(|c| !c.parked) {
                for _ in 0..batch.max(1) {
                    let now = now_ms();
                    match self
                        .store
                        .claim_job(&w.endpoint_id, &w.pod_id, now, now + LEASE_MS)
                        .await?
                    {
                        Some(j) => {
                            let input = parse_json("input", &j.input).unwrap_or(Value::Null);
                            out.push(serde_json::json!({ "id": j.id, "input": input }));
                        }
                        None => break,
                    }
                }
            }
            if !out.is_empty() {
                lock(&self.serverless.last_busy).insert(w.pod_id.clone(), now_ms());
                self.signal(&w.endpoint_id);
                return Ok(out);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
            let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
        }
    }

    fn stop_on_worker(&self, pod: &str, job: &str) {
        lock(&self.serverless.stops)
            .entry(pod.to_string())
            .or_default()
            .push(job.to_string());
        self.serverless.stop_signal.notify_waiters();
    }

    /// `job-stop`: the jobs this worker must stop, waiting up to `wait` for some.
    pub async fn worker_stops(&self, w: &WorkerRow, wait: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.serverless.stop_signal.notified();
            if let Some(ids) = lock(&self.serverless.stops).remove(&w.pod_id) {
                return ids;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Vec::new();
            }
        }
    }

    /// `job-done`: a job's result (or a progress update, which ends nothing).
    pub async fn worker_done(
        &self,
        w: &WorkerRow,
        tenant: &str,
        job: &str,
        body: &[u8],
    ) -> Result<()> {
        if body.len() > MAX_OUTPUT_BYTES {
            return Err(EngineError::PayloadTooLarge(format!(
                "a result may be at most {} MiB",
                MAX_OUTPUT_BYTES >> 20
            )));
        }
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| invalid(format!("a result must be JSON: {e}")))?;
        let Some(j) = self.store.job(job).await? else {
            return Ok(());
        };
        if j.endpoint_id != w.endpoint_id {
            return Err(EngineError::NotFound(format!("job {job:?} not found")));
        }
        let output = v
            .get("output")
            .map(|o| serde_json::to_string(o).unwrap_or_default())
            .unwrap_or_default();
        if v.get("status").and_then(Value::as_str) == Some("IN_PROGRESS") {
            if body.len() > MAX_CHUNK_BYTES {
                return Err(EngineError::PayloadTooLarge(format!(
                    "a progress update may be at most {} MiB",
                    MAX_CHUNK_BYTES >> 20
                )));
            }
            // The store's sum only for the job's holder (anyone else's update changes nothing).
            if j.worker_id == w.pod_id {
                self.check_job_storage(tenant, output.len(), false).await?;
            }
            self.store.set_job_progress(job, &w.pod_id, &output).await?;
            self.signal(&w.endpoint_id);
            return Ok(());
        }
        let mut error = match v.get("error") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => String::new(),
            Some(Value::String(s)) if s.is_empty() => String::new(),
            Some(e) => serde_json::to_string(e).unwrap_or_default(),
        };
        let mut output = output;
        let room = if j.worker_id == w.pod_id {
            self.check_job_storage(tenant, output.len() + error.len(), false)
                .await
        } else {
            // Not its holder: the end below refuses it.
            Ok(())
        };
        match room {
            Ok(()) => {}
            // The job ends (its worker is not left retrying), without its result.
            Err(full @ EngineError::ResourceExhausted(_)) => {
                error = serde_json::to_string(&full.to_string()).unwrap_or_default();
                output.clear();
            }
            Err(e) => return Err(e),
        }
        let state = if error.is_empty() {
            JobState::Completed
        } else {
            JobState::Failed
        };
        let now = now_ms();
        let keep = if j.sync {
            SYNC_RETENTION_MS
        } else {
            RUN_RETENTION_MS
        };
        if !self
            .store
            .finish_job_by(job, &w.pod_id, state, &output, &error, now, now + keep)
            .await?
            && !j.state().is_final()
        {
            tracing::info!(
                job,
                pod = w.pod_id,
                holder = j.worker_id,
                state = j.state,
                "serverless: a result from a worker not holding the job: refused"
            );
            return Err(EngineError::NotFound(format!(
                "job {job:?} is not this worker's"
            )));
        }
        lock(&self.serverless.last_busy).insert(w.pod_id.clone(), now);
        self.signal(&w.endpoint_id);
        self.serverless.wake.notify_one();
        Ok(())
    }

    /// `job-stream`: one partial output of a running job.
    pub async fn worker_stream(
        &self,
        w: &WorkerRow,
        tenant: &str,
        job: &str,
        body: &[u8],
    ) -> Result<()> {
        if body.len() > MAX_CHUNK_BYTES {
            return Err(EngineError::PayloadTooLarge(format!(
                "a stream chunk may be at most {} MiB",
                MAX_CHUNK_BYTES >> 20
            )));
        }
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| invalid(format!("a stream chunk must be JSON: {e}")))?;
        let output =
            serde_json::to_string(v.get("output").unwrap_or(&Value::Null)).unwrap_or_default();
        self.check_job_storage(tenant, output.len(), false).await?;
        let appended = self
            .store
            .append_stream(job, &w.pod_id, &output, MAX_CHUNKS)
            .await?
            .ok_or_else(|| {
                EngineError::PayloadTooLarge(format!(
                    "a job may stream at most {MAX_CHUNKS} chunks and {} MiB",
                    crate::store::MAX_STREAM_BYTES >> 20
                ))
            })?;
        if appended {
            self.store
                .renew_leases(&w.pod_id, &[job.to_string()], now_ms() + LEASE_MS)
                .await?;
            self.signal(&w.endpoint_id);
        }
        Ok(())
    }

    /// `ping`: the worker is alive and holds `jobs`. Jobs it runs that were ended without it
    /// (cancelled, timed out: told again if the first word was lost, e.g. to a daemon
    /// restart) or given to another worker are to be stopped. A job its own result ended is
    /// not: the SDK's ping may still name it, and stopping its task while it finishes leaves
    /// the SDK's count of running jobs wrong (its worker then takes jobs it never runs).
    pub async fn worker_ping(&self, w: &WorkerRow, jobs: &[String]) -> Result<()> {
        lock(&self.serverless.pinged).insert(w.pod_id.clone(), now_ms());
        if !jobs.is_empty() {
            self.store
                .renew_leases(&w.pod_id, jobs, now_ms() + LEASE_MS)
                .await?;
            let stale = self.store.jobs_to_stop(&w.pod_id, jobs).await?;
            if !stale.is_empty() {
                let mut stops = lock(&self.serverless.stops);
                let list = stops.entry(w.pod_id.clone()).or_default();
                for id in stale {
                    if !list.contains(&id) && list.len() < 1024 {
                        list.push(id);
                    }
                }
                drop(stops);
                self.serverless.stop_signal.notify_waiters();
            }
        }
        Ok(())
    }

    // --- the autoscaler ----------------------------------------------------------------

    async fn snapshot(&self) -> Result<Snapshot> {
        let endpoints = self.store.endpoints(None).await?;
        let workers = self.store.workers().await?;
        let tallies = self.store.job_tallies().await?;
        let busy = self
            .store
            .running_jobs()
            .await?
            .into_iter()
            .map(|j| j.worker_id)
            .collect();
        // The workers' instances from the store's cached live list (a terminated one is
        // absent: gone, as for the checks below).
        let ids: HashSet<&str> = workers.iter().map(|w| w.instance_id.as_str()).collect();
        let instances: HashMap<String, InstanceRow> = self
            .store
            .live_instances(None)
            .await?
            .into_iter()
            .filter(|i| ids.contains(i.id.as_str()))
            .map(|i| (i.id.clone(), i))
            .collect();
        Ok(Snapshot {
            endpoints,
            workers,
            tallies,
            instances,
            busy,
        })
    }

    fn phase(&self, snap: &Snapshot, w: &WorkerRow) -> WorkerPhase {
        if w.parked {
            return WorkerPhase::Parked;
        }
        let Some(i) = snap.instances.get(&w.instance_id) else {
            return if w.instance_id.is_empty() {
                WorkerPhase::Initializing
            } else {
                WorkerPhase::Unhealthy
            };
        };
        match (i.state, i.desired) {
            (InstanceState::Running, InstanceState::Running) => {}
            // Being made, or restarting after its process exited (restart policy `always`).
            (
                InstanceState::Pending | InstanceState::Provisioning | InstanceState::Stopped,
                InstanceState::Running,
            ) => return WorkerPhase::Initializing,
            _ => return WorkerPhase::Unhealthy,
        }
        if snap.busy.contains(&w.pod_id) {
            return WorkerPhase::Running;
        }
        // Seen since the instance last started: ready.
        let seen = lock(&self.serverless.seen).get(&w.pod_id).copied();
        match seen {
            Some(t) if t >= i.updated_at => WorkerPhase::Idle,
            _ => WorkerPhase::Initializing,
        }
    }

    fn health_of(&self, snap: &Snapshot, ep: &str) -> EndpointHealth {
        let n = |s| snap.tally(ep, s).map_or(0, |t| t.count);
        let retried = snap
            .tallies
            .iter()
            .filter(|t| t.endpoint_id == ep)
            .map(|t| t.retried)
            .sum();
        let mut h = EndpointHealth {
            jobs: wire::serverless::JobCounts {
                completed: n(JobState::Completed),
                failed: n(JobState::Failed) + n(JobState::TimedOut),
                in_progress: n(JobState::InProgress),
                in_queue: n(JobState::InQueue),
                retried,
            },
            workers: Default::default(),
        };
        for w in snap.workers.iter().filter(|w| w.endpoint_id == ep) {
            let c = &mut h.workers;
            match self.phase(snap, w) {
                WorkerPhase::Parked => c.parked += 1,
                WorkerPhase::Initializing => c.initializing += 1,
                WorkerPhase::Idle => {
                    c.idle += 1;
                    c.ready += 1;
                }
                WorkerPhase::Running => {
                    c.running += 1;
                    c.ready += 1;
                }
                WorkerPhase::Unhealthy => c.unhealthy += 1,
            }
        }
        h
    }

    /// The autoscaler and the queue's clock (leases, timeouts, retention).
    pub async fn run_serverless(self: std::sync::Arc<Self>) {
        // Workers kept running while no daemon answered them: they get a lease's time to
        // ping this one before their jobs are judged lost.
        match self.store.extend_all_leases(now_ms() + LEASE_MS).await {
            Ok(n) if n > 0 => {
                tracing::info!(jobs = n, "serverless: running jobs given a lease to report")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("serverless: {e}"),
        }
        loop {
            if self.serverless_settings().is_ok() {
                if let Err(e) = self.serverless_pass().await {
                    tracing::warn!("serverless: {e}");
                }
            }
            let _ = tokio::time::timeout(TICK, self.serverless.wake.notified()).await;
        }
    }

    pub(crate) async fn serverless_pass(&self) -> Result<()> {
        let now = now_ms();
        // A job or row that cannot be handled must not stop the rest.
        if let Err(e) = self.expire_jobs(now).await {
            tracing::warn!("serverless: leases and timeouts: {e}");
        }
        let snap = self.snapshot().await?;
        // Workers of removed endpoints, and rows whose instance went away.
        for w in &snap.workers {
            let ep = snap.endpoints.iter().find(|e| e.id == w.endpoint_id);
            match ep {
                None => {
                    if let Err(e) = self.drop_worker_row(w).await {
                        tracing::warn!(pod = w.pod_id, "serverless: cannot remove a worker: {e}");
                    }
                }
                Some(e) => self.check_worker(e, w, &snap, now).await,
            }
        }
        if let Err(e) = self.send_webhooks().await {
            tracing::warn!("serverless: webhooks: {e}");
        }
        for e in &snap.endpoints {
            let waiting = lock(&self.serverless.backoff)
                .get(&e.id)
                .is_some_and(|(until, _)| now < *until);
            match self.scale(e, &snap, now, !waiting).await {
                Ok(()) => {}
                Err(err) => {
                    let mut b = lock(&self.serverless.backoff);
                    let wait = b.get(&e.id).map_or(2_000, |(_, w)| (*w * 2).min(60_000));
                    b.insert(e.id.clone(), (now + wait, wait));
                    tracing::warn!(
                        endpoint = e.id,
                        retry_in_ms = wait,
                        "serverless: cannot start a worker: {err}"
                    );
                }
            }
        }
        Ok(())
    }

    /// Ended jobs' webhooks: each called with the job's status (RunPod's shape) until it
    /// answers 2xx, at most [`WEBHOOK_TRIES`] times. Taken from the store before the call (at
    /// most once: a daemon killed during a call does not call again).
    async fn send_webhooks(&self) -> Result<()> {
        let free = self.serverless.webhook_slots.available_permits();
        if free == 0 {
            return Ok(());
        }
        let Some(hooks) = self
            .serverless
            .webhooks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Ok(());
        };
        // Round robin over the endpoints with calls due, one call each per round, the tenants
        // with the fewest calls in flight first, each tenant up to its share: a tenant whose
        // hooks hang holds its share only, and none of its endpoints starves another.
        let pending = self.store.pending_webhooks().await?;
        if pending.is_empty() {
            return Ok(());
        }
        let tenants: HashMap<String, String> = self
            .store
            .endpoints(None)
            .await?
            .into_iter()
            .map(|e| (e.id, e.tenant_id))
            .collect();
        let mut due: Vec<(usize, String, String)> = {
            let busy = lock(&self.serverless.webhooks_busy);
            pending
                .into_iter()
                .filter_map(|(ep, _)| {
                    let t = tenants.get(&ep)?.clone();
                    Some((busy.get(&t).copied().unwrap_or(0), t, ep))
                })
                .collect()
        };
        // Who goes first among equals turns with each pass, so no endpoint of a tenant is
        // always served last; and one pass makes at most the calls there were free slots for
        // when it began (the rest wait for the next pass: the queue's clock is not held up).
        let turn = self
            .serverless
            .webhook_turn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !due.is_empty() {
            let k = turn % due.len();
            due.rotate_left(k);
        }
        due.sort_by_key(|(busy, _, _)| *busy);
        let mut budget = self.serverless.webhook_slots.available_permits();
        while !due.is_empty() && budget > 0 {
            let mut left = Vec::with_capacity(due.len());
            for (n, tenant, ep) in due {
                let full = lock(&self.serverless.webhooks_busy)
                    .get(&tenant)
                    .is_some_and(|b| *b >= MAX_WEBHOOKS_PER_TENANT);
                if full {
                    continue;
                }
                // The slot first, then the call taken from the store (taken: made once).
                let Ok(permit) = self.serverless.webhook_slots.clone().try_acquire_owned() else {
                    return Ok(());
                };
                if budget == 0 {
                    break;
                }
                let Some(j) = self.store.take_webhooks(&ep, 1).await?.pop() else {
                    continue;
                };
                budget -= 1;
                *lock(&self.serverless.webhooks_busy)
                    .entry(tenant.clone())
                    .or_default() += 1;
                let busy = BusyWebhook {
                    map: self.serverless.webhooks_busy.clone(),
                    tenant: tenant.clone(),
                    _permit: permit,
                };
                self.call_webhook(&hooks, j, busy);
                left.push((n, tenant, ep));
            }
            due = left;
        }
        Ok(())
    }

    /// One job's webhook, in a task of its own: RunPod's tries, `busy` held until done.
    fn call_webhook(
        &self,
        hooks: &std::sync::Arc<gpuvisor_node::webhook::Webhooks>,
        j: JobRow,
        busy: BusyWebhook,
    ) {
        let body = serde_json::to_vec(&job_status(&j)).unwrap_or_default();
        let hooks = hooks.clone();
        tokio::spawn(async move {
            let _busy = busy;
            for attempt in 1..=WEBHOOK_TRIES {
                match hooks.post(&j.webhook, body.clone()).await {
                    Ok(code) if (200..300).contains(&code) => return,
                    Ok(code) => {
                        tracing::info!(job = j.id, code, attempt, "serverless: webhook answered")
                    }
                    Err(e) => tracing::info!(job = j.id, attempt, "serverless: {e}"),
                }
                if attempt < WEBHOOK_TRIES {
                    tokio::time::sleep(WEBHOOK_RETRY).await;
                }
            }
            tracing::warn!(
                job = j.id,
                "serverless: webhook given up after {WEBHOOK_TRIES} calls"
            );
        });
    }

    /// Leases, execution timeouts, time to live and retention.
    async fn expire_jobs(&self, now: i64) -> Result<()> {
        let workers: HashMap<String, WorkerRow> = self
            .store
            .workers()
            .await?
            .into_iter()
            .map(|w| (w.pod_id.clone(), w))
            .collect();
        let running = self.store.running_jobs().await?;
        // Which instances run, from the cached live list, once per pass.
        let up: HashSet<String> = if running.is_empty() {
            HashSet::new()
        } else {
            self.store
                .live_instances(None)
                .await?
                .into_iter()
                .filter(|i| i.state == InstanceState::Running)
                .map(|i| i.id)
                .collect()
        };
        for j in running {
            if now > j.started_at.saturating_add(j.exec_timeout_ms) {
                let err = serde_json::to_string("execution timeout exceeded").unwrap_or_default();
                if self
                    .store
                    .finish_job(
                        &j.id,
                        JobState::TimedOut,
                        "",
                        &err,
                        now,
                        now + RUN_RETENTION_MS,
                    )
                    .await?
                {
                    self.stop_on_worker(&j.worker_id, &j.id);
                    self.signal(&j.endpoint_id);
                }
                continue;
            }
            let alive = match workers.get(&j.worker_id) {
                Some(w) if !w.parked => up.contains(&w.instance_id),
                _ => false,
            };
            if alive && j.lease_until >= now {
                continue;
            }
            let why = if alive {
                // It pinged well after the lease was last renewed, without naming the job.
                let renewed = j.lease_until - LEASE_MS;
                let pinged = lock(&self.serverless.pinged).get(&j.worker_id).copied();
                if pinged.is_some_and(|p| p > renewed + 2 * PING_INTERVAL_MS) {
                    lock(&self.serverless.wedged).insert(j.worker_id.clone());
                }
                "lease expired"
            } else {
                "worker lost"
            };
            if j.attempts >= MAX_ATTEMPTS {
                let err =
                    serde_json::to_string(&format!("{why} on each of {MAX_ATTEMPTS} attempts"))
                        .unwrap_or_default();
                self.store
                    .finish_job(
                        &j.id,
                        JobState::Failed,
                        "",
                        &err,
                        now,
                        now + RUN_RETENTION_MS,
                    )
                    .await?;
            } else {
                tracing::info!(
                    job = j.id,
                    worker = j.worker_id,
                    "serverless: {why}: job queued again"
                );
                self.store.requeue_job(&j.id, &j.worker_id).await?;
            }
            self.signal(&j.endpoint_id);
        }
        for id in self.store.expired_queued_jobs(now).await? {
            let err =
                serde_json::to_string("time to live ran out in the queue").unwrap_or_default();
            self.store
                .finish_job(
                    &id,
                    JobState::TimedOut,
                    "",
                    &err,
                    now,
                    now + RUN_RETENTION_MS,
                )
                .await?;
        }
        let (_, dropped) = self
            .store
            .delete_expired_jobs(now, now - WEBHOOK_GRACE_MS)
            .await?;
        // Once a minute is enough (they are kept 15).
        let last = self
            .serverless
            .ends_pruned
            .load(std::sync::atomic::Ordering::Relaxed);
        if now - last >= 60_000 {
            self.serverless
                .ends_pruned
                .store(now, std::sync::atomic::Ordering::Relaxed);
            self.store.prune_job_ends(now - JOB_ENDS_KEPT_MS).await?;
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "serverless: jobs forgotten with their webhooks never called (their tenants' \
                 calls were all busy past the retention and its grace)"
            );
        }
        Ok(())
    }

    /// A worker row whose instance is missing or terminated: the row goes (or, for a row
    /// left by a crash between the row and the instance, the instance is found by name).
    async fn check_worker(&self, e: &EndpointRow, w: &WorkerRow, snap: &Snapshot, now: i64) {
        if w.instance_id.is_empty() {
            if now - w.created_at < ORPHAN_ROW_MS {
                return;
            }
            match self
                .store
                .instance_by_name(&e.tenant_id, &format!("ep-{}", w.pod_id))
                .await
            {
                Ok(Some(i)) if i.state != InstanceState::Terminated => {
                    let _ = self.store.set_worker_instance(&w.pod_id, &i.id).await;
                }
                Ok(_) => {
                    let _ = self.store.delete_worker(&w.pod_id).await;
                }
                Err(err) => tracing::warn!("serverless: {err}"),
            }
            return;
        }
        let gone = match snap.instances.get(&w.instance_id) {
            None => true,
            Some(i) => {
                i.desired == InstanceState::Terminated || i.state == InstanceState::Terminated
            }
        };
        if gone {
            let _ = self.store.delete_worker(&w.pod_id).await;
            self.forget_worker(&w.pod_id);
        }
    }

    async fn drop_worker_row(&self, w: &WorkerRow) -> Result<()> {
        if !w.instance_id.is_empty() {
            if let Some(i) = self.store.instance(&w.instance_id).await? {
                if i.desired != InstanceState::Terminated {
                    self.set_desired_state(&i.id, InstanceState::Terminated)
                        .await?;
                    self.wake.notify_one();
                }
            }
        }
        self.store.delete_worker(&w.pod_id).await?;
        self.forget_worker(&w.pod_id);
        Ok(())
    }

    fn forget_worker(&self, pod: &str) {
        lock(&self.serverless.pinged).remove(pod);
        lock(&self.serverless.wedged).remove(pod);
        lock(&self.serverless.seen).remove(pod);
        lock(&self.serverless.last_busy).remove(pod);
        lock(&self.serverless.stops).remove(pod);
    }

    async fn remove_worker(&self, e: &EndpointRow, w: &WorkerRow) {
        if let Err(err) = self.drop_worker_row(w).await {
            tracing::warn!(
                endpoint = e.id,
                pod = w.pod_id,
                "serverless: cannot remove a worker: {err}"
            );
        }
    }

    /// How many workers the endpoint should run now.
    fn wanted(&self, e: &EndpointRow, snap: &Snapshot, active: &[&WorkerRow], now: i64) -> u32 {
        let queued = snap.tally(&e.id, JobState::InQueue);
        let q = queued.map_or(0, |t| t.count);
        let running = snap
            .tally(&e.id, JobState::InProgress)
            .map_or(0, |t| t.count);
        let n_active = u64::try_from(active.len()).unwrap_or(u64::MAX);
        let want: u64 = match e.spec.scaler.kind {
            ScalerKind::RequestCount => (q + running).div_ceil(u64::from(e.spec.scaler.value)),
            ScalerKind::QueueDelay => {
                let starting = active
                    .iter()
                    .filter(|w| self.phase(snap, w) == WorkerPhase::Initializing)
                    .count();
                let waited = queued.map_or(0, |t| now - t.oldest);
                if q == 0 {
                    running
                } else if n_active == 0 {
                    1
                } else if starting == 0 && waited >= i64::from(e.spec.scaler.value) * 1000 {
                    n_active + 1
                } else {
                    n_active
                }
            }
        };
        let want = u32::try_from(want).unwrap_or(u32::MAX);
        want.clamp(e.spec.workers_min, e.spec.workers_max)
    }

    /// Starts or removes workers towards what the scaler wants; new ones only when `grow`
    /// (not backing off).
    async fn scale(&self, e: &EndpointRow, snap: &Snapshot, now: i64, grow: bool) -> Result<()> {
        let mine: Vec<&WorkerRow> = snap
            .workers
            .iter()
            .filter(|w| w.endpoint_id == e.id)
            .collect();
        // A worker whose instance failed, or was stopped or preempted, is removed, and the
        // endpoint waits before making another (a broken template must not spin).
        let mut failed = 0;
        let wedged: HashSet<String> = {
            let mut all = lock(&self.serverless.wedged);
            mine.iter().filter_map(|w| all.take(&w.pod_id)).collect()
        };
        for w in mine.iter().filter(|w| {
            !w.parked
                && (self.phase(snap, w) == WorkerPhase::Unhealthy || wedged.contains(&w.pod_id))
                // One being terminated (by its tenant, by a scale-down) is going already.
                && snap
                    .instances
                    .get(&w.instance_id)
                    .is_some_and(|i| i.desired != InstanceState::Terminated)
        }) {
            if let Some(i) = snap.instances.get(&w.instance_id) {
                self.event(
                    &i.id,
                    "worker_removed",
                    if wedged.contains(&w.pod_id) {
                        "serverless: the worker let a job's lease run out while it ran: replaced"
                            .to_string()
                    } else {
                        format!(
                            "serverless: the worker is {} (wanted {}): removed",
                            i.state, i.desired
                        )
                    },
                )
                .await;
            }
            self.remove_worker(e, w).await;
            failed += 1;
        }
        // Parked workers go when flashboot is turned off or after they sat unused too long.
        let mut gone = HashSet::new();
        for w in mine.iter().filter(|w| w.parked) {
            let since = *lock(&self.serverless.last_busy)
                .entry(w.pod_id.clone())
                .or_insert(now);
            if !e.spec.flashboot || now - since >= PARKED_TTL_MS {
                self.remove_worker(e, w).await;
                gone.insert(w.pod_id.clone());
            }
        }
        if failed > 0 {
            return Err(EngineError::Unavailable(format!(
                "{failed} worker(s) of endpoint {} stopped running (see their instances' events)",
                e.name
            )));
        }
        // Every worker counts towards workers_max until it is gone.
        let active: Vec<&WorkerRow> = mine.iter().copied().filter(|w| !w.parked).collect();
        let want = self.wanted(e, snap, &active, now) as usize;
        if want > active.len() && grow {
            let mut need = want - active.len();
            // Flashboot: parked workers first.
            for w in mine
                .iter()
                .filter(|w| w.parked && !gone.contains(&w.pod_id))
            {
                if need == 0 {
                    break;
                }
                self.unpark(w).await?;
                need -= 1;
            }
            for _ in 0..need {
                self.create_worker(e).await?;
            }
            lock(&self.serverless.backoff).remove(&e.id);
        } else if want < active.len() {
            let mut excess = active.len() - want;
            let idle_ms = i64::try_from(e.spec.idle_timeout_secs)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000);
            // The longest idle first.
            let mut idle: Vec<(&WorkerRow, i64)> = active
                .iter()
                .filter(|w| self.phase(snap, w) == WorkerPhase::Idle)
                .map(|w| {
                    let since = *lock(&self.serverless.last_busy)
                        .entry(w.pod_id.clone())
                        .or_insert(now);
                    (*w, since)
                })
                .collect();
            idle.sort_by_key(|(_, since)| *since);
            for (w, since) in idle {
                if excess == 0 || now - since < idle_ms {
                    break;
                }
                if e.spec.flashboot {
                    self.park(w).await?;
                } else {
                    self.remove_worker(e, w).await;
                }
                excess -= 1;
            }
        }
        Ok(())
    }

    /// Flashboot: an idle worker is frozen, not removed (its memory, GPU and warm process
    /// kept, no CPU used); it is handed no job while parked.
    async fn park(&self, w: &WorkerRow) -> Result<()> {
        self.store.set_worker_parked(&w.pod_id, true).await?;
        if let Err(e) = self.freeze(&w.instance_id, true).await {
            self.store.set_worker_parked(&w.pod_id, false).await?;
            return Err(e);
        }
        lock(&self.serverless.last_busy).insert(w.pod_id.clone(), now_ms());
        self.event(
            &w.instance_id,
            "parked",
            "flashboot: frozen while the endpoint is idle",
        )
        .await;
        Ok(())
    }

    async fn unpark(&self, w: &WorkerRow) -> Result<()> {
        self.freeze(&w.instance_id, false).await?;
        self.store.set_worker_parked(&w.pod_id, false).await?;
        lock(&self.serverless.last_busy).insert(w.pod_id.clone(), now_ms());
        self.signal(&w.endpoint_id);
        self.event(
            &w.instance_id,
            "unparked",
            "flashboot: thawed for the queue",
        )
        .await;
        Ok(())
    }

    async fn freeze(&self, instance: &str, frozen: bool) -> Result<()> {
        let node = self.node.clone();
        let id = instance.to_string();
        tokio::task::spawn_blocking(move || node.freeze(&id, frozen))
            .await
            .map_err(|e| EngineError::Internal(format!("freeze task: {e}")))??;
        Ok(())
    }

    /// A new worker: its row and credential first, then its instance (`ep-<pod id>`).
    async fn create_worker(&self, e: &EndpointRow) -> Result<()> {
        let settings = self.serverless_settings()?;
        let who = self.principal_for(e).await?;
        let tenant = self
            .store
            .tenant(&e.tenant_id)
            .await?
            .ok_or_else(|| EngineError::NotFound("the endpoint's tenant is gone".into()))?;
        let gateway = self
            .node
            .net
            .cfg
            .plan
            .address(tenant.net_slot, 1)
            .map_err(|err| EngineError::Internal(err.to_string()))?;
        let pod = random_hex(8)?;
        let token = format!("gvw_{}", random_hex(24)?);
        let now = now_ms();
        self.store
            .insert_worker(&pod, &e.id, &hash_key(&token), now)
            .await?;
        let base = format!("http://{gateway}:{}/v2/{}", settings.worker_port, e.id);
        let env = vec![
            format!("RUNPOD_WEBHOOK_GET_JOB={base}/job-take/$ID?"),
            format!("RUNPOD_WEBHOOK_POST_OUTPUT={base}/job-done/$RUNPOD_POD_ID/$ID?"),
            format!("RUNPOD_WEBHOOK_POST_STREAM={base}/job-stream/$RUNPOD_POD_ID/$ID?"),
            format!("RUNPOD_WEBHOOK_PING={base}/ping/$RUNPOD_POD_ID"),
            format!("{CREDENTIAL_ENV}={token}"),
            format!("RUNPOD_POD_ID={pod}"),
            format!("RUNPOD_POD_HOSTNAME=ep-{pod}"),
            format!("RUNPOD_ENDPOINT_ID={}", e.id),
            format!("RUNPOD_PING_INTERVAL={PING_INTERVAL_MS}"),
            // The SDK's start-up checks want 4 GiB free and a route to 8.8.8.8: the
            // template's sizes and the operator's network decide those here.
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=true".into(),
            "RUNPOD_LOG_LEVEL=INFO".into(),
        ];
        let req = wire::CreateInstance {
            template: Some(e.spec.template.clone()),
            name: Some(format!("ep-{pod}")),
            gpus: e.spec.gpus,
            gpu_fraction: e.spec.gpu_fraction,
            env,
            restart: wire::RestartPolicy::Always,
            ..Default::default()
        };
        match self.create_instance(&who, &req).await {
            Ok(i) => {
                if !self.store.set_worker_instance(&pod, &i.id).await? {
                    // The endpoint went while the instance was made.
                    self.set_desired_state(&i.id, InstanceState::Terminated)
                        .await?;
                    self.wake.notify_one();
                    return Ok(());
                }
                lock(&self.serverless.last_busy).insert(pod.clone(), now);
                tracing::info!(
                    endpoint = e.id,
                    pod,
                    instance = i.id,
                    "serverless: worker started"
                );
                Ok(())
            }
            Err(err) => {
                self.store.delete_worker(&pod).await?;
                Err(err)
            }
        }
    }
}

/// The octets a job's webhook URL takes in the store.
fn webhook_len(req: &wire::RunRequest) -> usize {
    req.webhook.as_ref().map_or(0, String::len)
}

/// A webhook must be an absolute http(s) URL; where it may point is checked when it is called.
fn check_webhook(w: &str) -> Result<()> {
    let ok = (w.starts_with("https://") || w.starts_with("http://"))
        && w.len() <= 2048
        && !w.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "webhook {w:?}: expected an http:// or https:// URL of at most 2048 characters"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_shows_its_times_and_retries() {
        let j = JobRow {
            id: "x".into(),
            state: "COMPLETED".into(),
            created_at: 1_000,
            started_at: 1_250,
            finished_at: 2_000,
            attempts: 2,
            output: "{\"a\":1}".into(),
            worker_id: "p".into(),
            ..Default::default()
        };
        let s = job_status(&j);
        assert_eq!(s.delay_time, Some(250));
        assert_eq!(s.execution_time, Some(750));
        assert_eq!(s.retries, 1);
        assert_eq!(s.output, Some(serde_json::json!({"a": 1})));
        let queued = JobRow {
            state: "IN_QUEUE".into(),
            created_at: 1_000,
            ..Default::default()
        };
        let q = job_status(&queued);
        assert_eq!(
            (q.delay_time, q.execution_time, q.output),
            (None, None, None)
        );
    }

    #[test]
    fn endpoint_specs_are_checked() {
        let ok = EndpointSpec {
            template: "t".into(),
            ..Default::default()
        };
        assert!(check_spec(&ok).is_ok());
        let bad = [
            EndpointSpec {
                template: String::new(),
                ..ok.clone()
            },
            EndpointSpec {
                workers_min: 4,
                workers_max: 3,
                ..ok.clone()
            },
            EndpointSpec {
                workers_max: 0,
                ..ok.clone()
            },
            EndpointSpec {
                execution_timeout_ms: 10,
                ..ok.clone()
            },
            EndpointSpec {
                gpus: Some(1),
                gpu_fraction: Some(0.5),
                ..ok.clone()
            },
        ];
        for b in bad {
            assert!(check_spec(&b).is_err(), "{b:?}");
        }
        assert!(check_webhook("https://example.com/hook").is_ok());
        assert!(check_webhook("file:///etc/passwd").is_err());
        assert!(check_webhook("http://a b").is_err());
    }
}
