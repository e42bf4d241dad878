//! Telemetry commands: the 1 Hz sampler loop, `/metrics`, metric history and the live GPU view.
//!
//! The sampler gathers what the control layer knows (which instances run where, their tenants,
//! the limiter's VRAM accounting as the load of simulated GPUs), asks the node layer for one
//! host sample in a blocking task, and hands it to [`Telemetry::ingest`]; alarms become events
//! on the GPU (keyed by its UUID) and on every live instance placed on it.

use super::authz::Op;
use super::{now_ms, Engine, Principal};
use crate::error::{invalid, EngineError, Result};
use crate::telemetry::{
    parse_duration_ms, parse_since, prom, GpuMeta, SliceMeta, Telemetry, TelemetryConfig,
};
use gpuvisor_node::telemetry::{GpuLoad, HostSampler, InstanceRef};
use gpuvisor_node::Node;
use gpuvisor_wire as wire;
use gpuvisor_wire::InstanceState;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How far back the minute aggregates reach, in memory and in the store: seven days.
const HISTORY_WINDOW_MS: i64 = crate::telemetry::history::MINUTES_KEPT as i64 * 60_000;

/// The telemetry state for this node's GPUs.
pub(super) fn telemetry_for(node: &Node, hostname: &str) -> Telemetry {
    let gpus = node
        .gpus()
        .iter()
        .filter(|g| g.is_physical())
        .map(|g| GpuMeta {
            uuid: g.uuid.clone(),
            index: g.index,
            model: g.model.clone(),
            model_name: gpuvisor_node::gpu::known_model(&g.model)
                .map_or_else(|| g.model.clone(), |m| m.full_name.to_string()),
            pci_address: g.pci_address.clone(),
        })
        .collect();
    Telemetry::new(hostname, gpus)
}

/// Compares in time independent of where the first difference is.
/// Compares the SHA-256 digests, in constant time: neither the bytes nor the token's length
/// show in how long it takes.
fn same_secret(a: &str, b: &str) -> bool {
    use sha2::Digest;
    let (x, y) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// `since` of a query (a duration back from `now` or epoch ms); `back` ms before `now` when
/// absent.
fn since_ms(since: Option<&str>, now: i64, back: i64) -> Result<i64> {
    match since {
        Some(s) => parse_since(s, now).ok_or_else(|| {
            invalid(format!(
                "since {s:?}: expected a duration back (90s, 10m, 2h, 7d) or epoch milliseconds"
            ))
        }),
        None => Ok(now - back),
    }
    // Nothing is older than the epoch (and the arithmetic on times stays in range).
    .map(|t| t.max(0))
}

/// How far back a live stream's update may reach (older points: the history API).
pub const STREAM_MAX_BACK_MS: i64 = 10 * 60_000;
const MINUTE_MS: i64 = 60_000;

/// An open live metrics stream ([`Engine::watch_metrics`]): the instance (by id, resolved
/// once), the GPUs whose histories go with it, the step, and its place in the streams' gate.
pub struct MetricsWatch {
    pub id: String,
    /// The GPUs whose histories go with the instance's (each once).
    gpus: Vec<String>,
    /// Whether the caller may read GPU histories.
    gpu_histories: bool,
    /// Where its first update starts (ms since the epoch).
    pub since: i64,
    /// Ms per point.
    pub step: i64,
    /// Held: its drop gives the place back.
    _permit: super::limits::GatePermit,
}

/// The GPUs an instance is bound to, each once.
fn gpu_uuids(row: &crate::store::InstanceRow) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for g in &row.gpus {
        if !out.contains(&g.uuid) {
            out.push(g.uuid.clone());
        }
    }
    out
}

/// The most GPU events one answer carries.
pub const GPU_EVENTS_MAX: u32 = 500;

/// How long a host check's answer is given again instead of a new run.
pub const HOST_CHECKS_FRESH: std::time::Duration = std::time::Duration::from_secs(10);

impl Engine {
    /// The VMs of `rows` running on this host (simulated nodes run nothing).
    fn vms_running<'a>(
        &self,
        rows: impl IntoIterator<Item = &'a crate::store::InstanceRow>,
    ) -> usize {
        rows.into_iter()
            .filter(|i| {
                i.state == InstanceState::Running
                    && i.runtime == gpuvisor_wire::RuntimeKind::Vm
                    && !self.is_simulated(i)
            })
            .count()
    }

    /// At the daemon's stop: KSM as the VMs left running need it (off where none runs: the
    /// sampler that would have turned it off stops with the daemon, and a VM terminated just
    /// before the stop would leave it on).
    pub async fn settle_ksm(&self) -> Result<()> {
        let vms = self.vms_running(self.store.live_instances(None).await?.iter());
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || node.ksm.tune(vms))
            .await
            .map_err(|e| EngineError::Internal(format!("KSM: {e}")))?
            .map_err(|e| EngineError::Internal(format!("KSM for {vms} VMs: {e}")))?;
        Ok(())
    }

    /// Samples the host every second until the daemon stops. `cfg` sets the thermal ceiling and
    /// the `/metrics` token.
    pub async fn run_telemetry(self: Arc<Self>, cfg: TelemetryConfig) {
        self.telemetry.configure(cfg);
        let root = self.node.cfg.root.clone();
        let mut sampler = match tokio::task::spawn_blocking(move || HostSampler::new(&root)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("telemetry sampler not started: {e}");
                return;
            }
        };
        self.restore_history().await;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            // Saved minutes older than the history window go once an hour (bounded on disk).
            if n.is_multiple_of(3600) {
                let before = now_ms() - HISTORY_WINDOW_MS;
                match self.store.prune_metric_minutes(before).await {
                    Ok(k) if k > 0 => tracing::debug!(rows = k, "metric history pruned"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("metric history prune: {e}"),
                }
            }
            n += 1;
            match self.sample_once(sampler).await {
                Ok(s) => sampler = s,
                Err(e) => {
                    tracing::warn!("telemetry sampler stopped: {e}");
                    return;
                }
            }
        }
    }

    /// Puts the saved minute aggregates of the last 7 days back into the GPUs' and instances'
    /// histories (after a restart).
    async fn restore_history(&self) {
        let saved = match self
            .store
            .metric_minutes(now_ms() - HISTORY_WINDOW_MS)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("metric history not restored: {e}");
                return;
            }
        };
        let now = now_ms();
        let mut restored = 0usize;
        for (entity, records) in saved {
            restored += records.len();
            if let Some(uuid) = entity.strip_prefix("gpu:") {
                self.telemetry.restore_gpu(uuid, records);
            } else if let Some(id) = entity.strip_prefix("instance:") {
                self.telemetry.restore_instance(id, "", now, records);
            }
        }
        tracing::info!(minutes = restored, "metric history restored");
    }

    /// Writes the minutes the histories closed since the last call.
    async fn save_history(&self) {
        let rows = self.telemetry.drain_unsaved();
        if let Err(e) = self.store.save_metric_minutes(&rows).await {
            tracing::warn!(minutes = rows.len(), "metric history not saved: {e}");
        }
    }

    /// One sample: returns the sampler for the next one.
    pub async fn sample_once(&self, mut sampler: HostSampler) -> Result<HostSampler> {
        let live = match self.store.live_instances(None).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!("telemetry: {e}");
                return Ok(sampler);
            }
        };
        let tenants: BTreeMap<String, String> = self
            .store
            .tenants()
            .await
            .map(|ts| ts.into_iter().map(|t| (t.id, t.name)).collect())
            .unwrap_or_default();
        let running: Vec<&crate::store::InstanceRow> = live
            .iter()
            .filter(|i| i.state == InstanceState::Running)
            .collect();
        let refs: Vec<InstanceRef> = running
            .iter()
            .map(|i| InstanceRef {
                id: i.id.clone(),
                gpus: i.gpus.iter().map(|g| g.uuid.clone()).collect(),
            })
            .collect();
        let fractional: Vec<(String, Vec<String>)> = running
            .iter()
            .filter(|i| i.gpus.iter().any(|g| g.milli < 1000))
            .map(|i| {
                (
                    i.id.clone(),
                    i.gpus.iter().map(|g| g.uuid.clone()).collect(),
                )
            })
            .collect();
        // A MIG slice's load is its parent's: slices/7 of the GPU when in use.
        let inventory = self.node.gpus();
        let slice_of: BTreeMap<String, (String, u32)> = inventory
            .iter()
            .filter_map(|g| {
                let m = g.mig.as_ref()?;
                Some((
                    g.uuid.clone(),
                    (m.slice.parent_uuid.clone(), m.slice.slices),
                ))
            })
            .collect();
        self.telemetry.set_slices(
            inventory
                .iter()
                .filter_map(|g| {
                    let m = g.mig.as_ref()?;
                    Some(SliceMeta {
                        uuid: g.uuid.clone(),
                        parent_index: g.index,
                        parent_uuid: m.slice.parent_uuid.clone(),
                        gi: m.slice.gi,
                        ci: m.slice.ci,
                        profile: m.slice.profile.clone(),
                        vram: g.vram,
                        instance: live
                            .iter()
                            .find(|i| i.gpus.iter().any(|b| b.uuid == g.uuid))
                            .map(|i| i.id.clone()),
                    })
                })
                .collect(),
        );
        let mut loads: BTreeMap<String, GpuLoad> = BTreeMap::new();
        for i in &running {
            for g in &i.gpus {
                let (uuid, milli) = match slice_of.get(&g.uuid) {
                    Some((parent, slices)) => (parent.clone(), slices * 1000 / 7),
                    None => (g.uuid.clone(), g.milli),
                };
                let l = loads.entry(uuid).or_default();
                l.running_milli = (l.running_milli + milli).min(1000);
            }
        }
        let inst_tenant: BTreeMap<String, String> = live
            .iter()
            .map(|i| {
                (
                    i.id.clone(),
                    tenants.get(&i.tenant_id).cloned().unwrap_or_default(),
                )
            })
            .collect();
        // KSM runs while VMs run on this host, faster the more of them (`gpuvisor_node::ksm`).
        let vms = self.vms_running(running.iter().copied());
        let node = self.node.clone();
        let (sampler, sample, ksm) = tokio::task::spawn_blocking(move || {
            if let Err(e) = node.ksm.tune(vms) {
                tracing::warn!("KSM for {vms} VMs: {e}");
            }
            for (id, gpus) in &fractional {
                for (uuid, u) in gpus.iter().zip(node.limiters.usage(id).unwrap_or_default()) {
                    let l = loads.entry(uuid.clone()).or_default();
                    l.limiter_used += u.used_bytes;
                    l.limiter_util_bp += u.util_bp;
                }
            }
            let sample = sampler.sample(&node, &loads, &refs);
            (sampler, sample, node.ksm.stats())
        })
        .await
        .map_err(|e| EngineError::Internal(format!("telemetry sample: {e}")))?;
        self.telemetry.set_ksm(ksm);
        let now = now_ms();
        let alarms = self.telemetry.ingest(now, sample, &inst_tenant);
        self.save_history().await;
        for a in alarms {
            if a.cordoned {
                // Persisted so the cordon survives a restart until `gpu uncordon`.
                if let Err(e) = self.store.cordon(&a.gpu, &a.message, now).await {
                    tracing::error!(gpu = %a.gpu, error = %e, "cannot persist cordon");
                }
            }
            if a.kind == "thermal_cleared" {
                tracing::info!(gpu = a.index, "{}", a.message);
            } else {
                tracing::warn!(gpu = a.index, kind = a.kind, "{}", a.message);
            }
            self.event(&a.gpu, a.kind, a.message.clone()).await;
            for i in live
                .iter()
                .filter(|i| i.gpus.iter().any(|g| g.uuid == a.gpu))
            {
                self.event(&i.id, a.kind, a.message.clone()).await;
            }
        }
        Ok(sampler)
    }

    /// Who may scrape `/metrics`: the configured read-only token, or an admin or metrics key.
    /// Other keys are refused: the page shows every tenant's instances.
    pub async fn authorize_metrics(&self, secret: Option<&str>) -> Result<()> {
        if let (Some(s), Some(token)) = (secret, self.telemetry.config().metrics_token) {
            if same_secret(s, &token) {
                return Ok(());
            }
        }
        // The page shows every tenant's instances: admin and metrics keys only.
        self.authenticate(secret).await?.allow(Op::ScrapeMetrics)
    }

    /// The newest sample in Prometheus text (or OpenMetrics) form.
    pub fn metrics_text(&self, format: prom::Format) -> String {
        self.telemetry.render(format)
    }

    fn window(q: &wire::MetricsQuery) -> Result<(i64, i64)> {
        let now = now_ms();
        let since = since_ms(q.since.as_deref(), now, 5 * 60_000)?;
        let step = match &q.step {
            Some(s) => parse_duration_ms(s).filter(|d| *d >= 1000).ok_or_else(|| {
                invalid(format!("step {s:?}: expected a duration of at least 1s"))
            })?,
            None => 1000,
        };
        Ok((since, step))
    }

    /// History of an instance the caller may see.
    pub async fn instance_metrics(
        &self,
        who: &Principal,
        id: &str,
        q: &wire::MetricsQuery,
    ) -> Result<wire::MetricsHistory> {
        who.allow(Op::InstanceMetrics)?;
        let row = self.find(who, id).await?;
        let (since, step) = Self::window(q)?;
        let (step, series) = self.telemetry.instance_history(&row.id, since, step);
        Ok(wire::MetricsHistory {
            kind: "instance".into(),
            id: row.id,
            step_s: (step / 1000) as u64,
            series,
        })
    }

    /// Opens a live metrics stream of instance `id` (tenancy as for its history): checks the
    /// query a stream's updates use (`since` at most [`STREAM_MAX_BACK_MS`] back, later is
    /// clamped to it; `step` at most a minute) and takes a place in the streams' gate (per
    /// tenant and in total), held until the watch is dropped.
    pub async fn watch_metrics(
        &self,
        who: &Principal,
        id: &str,
        q: &wire::MetricsQuery,
    ) -> Result<MetricsWatch> {
        who.allow(Op::InstanceMetrics)?;
        let row = self.find(who, id).await?;
        let (since, step) = Self::window(q)?;
        if step > MINUTE_MS {
            return Err(invalid(format!(
                "step {:?}: a live stream's points are at most a minute apart (older history: \
                 GET /v1/instances/{{id}}/metrics)",
                q.step.as_deref().unwrap_or_default()
            )));
        }
        // The GPUs' own histories (not a MIG slice's: it has none), if the caller may read them.
        let gpu_histories = who.allow(Op::GpuMetrics).is_ok();
        Ok(MetricsWatch {
            _permit: self.stream_permit(who)?,
            gpus: if gpu_histories {
                gpu_uuids(&row)
            } else {
                Vec::new()
            },
            gpu_histories,
            id: row.id,
            since,
            step,
        })
    }

    /// One message of a live metrics stream: the points from `since` (clamped to
    /// [`STREAM_MAX_BACK_MS`] back) of the instance's history, then of its GPUs'.
    pub fn metrics_update(&self, w: &MetricsWatch, since: i64) -> wire::MetricsUpdate {
        let since = since.max(now_ms() - STREAM_MAX_BACK_MS);
        let history = |kind: &str, id: &str, (step, series): (i64, Vec<wire::MetricSeries>)| {
            wire::MetricsHistory {
                kind: kind.into(),
                id: id.to_string(),
                step_s: (step / 1000) as u64,
                series,
            }
        };
        let recent = crate::telemetry::Span::Recent;
        let mut histories = vec![history(
            "instance",
            &w.id,
            self.telemetry.instance_span(&w.id, since, w.step, recent),
        )];
        for g in &w.gpus {
            if let Some(h) = self.telemetry.gpu_span(g, since, w.step, recent) {
                histories.push(history("gpu", g, h));
            }
        }
        wire::MetricsUpdate {
            at: self.telemetry.newest(),
            histories,
        }
    }

    /// Whether the watched instance is still there (not terminated), from the cached list of
    /// live instances; the GPUs it is bound to now (a resize or a move changes them) become
    /// those of the next updates.
    pub async fn watched_alive(&self, w: &mut MetricsWatch) -> Result<bool> {
        let Some(row) = self.store.live_instance(&w.id).await? else {
            return Ok(false);
        };
        if w.gpu_histories {
            w.gpus = gpu_uuids(&row);
        }
        Ok(true)
    }

    /// Changes with each new sample (to its time): what a live stream waits on.
    pub fn metric_samples(&self) -> tokio::sync::watch::Receiver<i64> {
        self.telemetry.samples()
    }

    /// History of a GPU, by UUID or index.
    pub async fn gpu_metrics(
        &self,
        who: &Principal,
        id: &str,
        q: &wire::MetricsQuery,
    ) -> Result<wire::MetricsHistory> {
        who.allow(Op::GpuMetrics)?;
        let gpu = self
            .node
            .gpus()
            .into_iter()
            .find(|g| g.is_physical() && (g.uuid == id || g.index.to_string() == id))
            .ok_or_else(|| EngineError::NotFound(format!("GPU {id:?} not found")))?;
        let (since, step) = Self::window(q)?;
        let (step, series) = self
            .telemetry
            .gpu_history(&gpu.uuid, since, step)
            .ok_or_else(|| EngineError::NotFound(format!("GPU {id:?} not found")))?;
        Ok(wire::MetricsHistory {
            kind: "gpu".into(),
            id: gpu.uuid.clone(),
            step_s: (step / 1000) as u64,
            series,
        })
    }

    /// The host preflight as the daemon sees the host (admins: it describes the host). One
    /// run at a time, its answer kept [`HOST_CHECKS_FRESH`]: a request in between gets that
    /// answer (the checks scan sysfs and start NVML, which may take seconds).
    pub async fn host_checks(&self, who: &Principal) -> Result<Vec<wire::HostCheck>> {
        who.allow(Op::HostChecks)?;
        static LAST: tokio::sync::Mutex<Option<(std::time::Instant, Vec<wire::HostCheck>)>> =
            tokio::sync::Mutex::const_new(None);
        let mut last = LAST.lock().await;
        if let Some((at, checks)) = last.as_ref() {
            if at.elapsed() < HOST_CHECKS_FRESH {
                return Ok(checks.clone());
            }
        }
        let node = self.node.clone();
        let checks = tokio::task::spawn_blocking(move || node.host_checks())
            .await
            .map_err(|e| EngineError::Internal(format!("host check: {e}")))?;
        let checks: Vec<wire::HostCheck> = checks
            .into_iter()
            .map(|c| wire::HostCheck {
                id: c.id,
                title: c.title,
                status: c.status.as_str().to_string(),
                detail: c.detail,
                remedy: Some(c.remedy).filter(|r| !r.is_empty()),
            })
            .collect();
        *last = Some((std::time::Instant::now(), checks.clone()));
        Ok(checks)
    }

    /// The newest sample of every GPU, with the number of live instances on each.
    pub async fn gpu_stats(&self, who: &Principal) -> Result<Vec<wire::GpuStats>> {
        who.allow(Op::GpuStats)?;
        let live = self.store.live_instances(None).await?;
        let mut stats = self.telemetry.gpu_stats();
        for s in &mut stats {
            s.instances = live
                .iter()
                .filter(|i| i.gpus.iter().any(|g| g.uuid == s.uuid))
                .count() as u32;
        }
        Ok(stats)
    }

    /// The events of this host's GPUs (XID errors, thermal alarms, losses, cordons), newest
    /// first: of one GPU (UUID, index or PCI address) or of all, since `q.since` (7 days back
    /// by default), at most `q.limit` ([`GPU_EVENTS_MAX`] by default and at most).
    pub async fn gpu_events(
        &self,
        who: &Principal,
        q: &wire::GpuEventsQuery,
    ) -> Result<Vec<wire::GpuEvent>> {
        who.allow(Op::GpuEvents)?;
        let now = now_ms();
        let since = since_ms(q.since.as_deref(), now, HISTORY_WINDOW_MS)?;
        let limit = match q.limit {
            Some(0) => return Err(invalid("limit must be at least 1")),
            Some(n) => n.min(GPU_EVENTS_MAX),
            None => GPU_EVENTS_MAX,
        };
        let gpus = match q.gpu.as_deref() {
            Some(g) => vec![self.gpu_by_ref(g)?],
            None => self.node.gpus(),
        };
        let mut out = Vec::new();
        for g in gpus {
            for e in self.store.recent_events(&g.uuid, since, limit).await? {
                out.push(wire::GpuEvent {
                    at: e.at,
                    gpu: g.uuid.clone(),
                    index: g.index,
                    kind: e.kind,
                    message: e.message,
                });
            }
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.at));
        out.truncate(limit as usize);
        Ok(out)
    }

    /// GPUs no new instance is placed on, and why.
    pub fn cordoned_gpus(&self) -> BTreeMap<String, String> {
        self.telemetry.cordoned()
    }
}
