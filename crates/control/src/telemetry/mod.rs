//! Telemetry state of the daemon: the newest reading of every GPU and instance, their bounded
//! history ([`history`]), alarms (thermal ceiling, XID errors, a GPU lost from the bus) and the
//! set of cordoned GPUs that placement skips.
//!
//! Why in the control layer: the node layer reads counters ([`gpuvisor_node::telemetry`]); what
//! they mean over time — rates, aggregates, when a temperature is an alarm, when a GPU must take
//! no more work — is policy. The engine's sampler ([`crate::Engine::run_telemetry`]) feeds one
//! [`HostSample`] a second into [`Telemetry::ingest`] and records the returned [`Alarm`]s as
//! events.
//!
//! Key decisions: one `std` mutex around everything (ingest takes tens of microseconds; readers
//! copy out what they need); thermal alarms have a 5 °C hysteresis so a GPU hovering at the
//! ceiling does not flood the event log; cordons are kept here for placement and persisted by
//! the engine (`gpu_cordons`), so they survive a restart until an operator runs `gpu uncordon`
//! after resetting the GPU.

pub mod history;
pub mod prom;
pub mod xid;

use gpuvisor_node::telemetry::{GpuReading, HostSample, InstanceReading};
use gpuvisor_wire::{GpuStats, MetricSeries};
use history::{History, MinuteRecord};
use prom::{Format, Kind, Writer};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Policy knobs of the sampler and `/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// A GPU at or above this temperature raises a `thermal` alarm.
    pub thermal_ceiling_c: f64,
    /// A read-only bearer token for `/metrics` (admin keys are always accepted).
    pub metrics_token: Option<String>,
    /// Instances whose history is kept at most (the oldest-seen go first).
    pub max_instances: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            thermal_ceiling_c: 85.0,
            metrics_token: None,
            max_instances: 1024,
        }
    }
}

/// Below the ceiling by this much before a thermal alarm clears.
const THERMAL_HYSTERESIS_C: f64 = 5.0;
/// History of instances not seen for this long is dropped.
const INSTANCE_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// Metric names of GPU history, in the order of [`GpuState::values`].
pub const GPU_METRICS: &[&str] = &[
    "util_percent",
    "memory_used_bytes",
    "temperature_c",
    "power_w",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "pcie_tx_kbs",
    "pcie_rx_kbs",
];

/// Metric names of instance history.
pub const INSTANCE_METRICS: &[&str] = &[
    "cpu_percent",
    "memory_bytes",
    "disk_used_bytes",
    "volume_used_bytes",
    "net_rx_bytes_per_s",
    "net_tx_bytes_per_s",
    "gpu_memory_bytes",
    "gpu_util_percent",
];

/// What a GPU is, for labels.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuMeta {
    pub uuid: String,
    pub index: u32,
    /// Short model (`H100-80GB`).
    pub model: String,
    /// The driver's name (`NVIDIA H100 80GB HBM3`), DCGM's `modelName`.
    pub model_name: String,
    pub pci_address: String,
}

/// A MIG slice of this host as `/metrics` shows it (set by the engine each sample).
#[derive(Debug, Clone, PartialEq)]
pub struct SliceMeta {
    /// The slice's `MIG-` UUID.
    pub uuid: String,
    pub parent_index: u32,
    pub parent_uuid: String,
    pub gi: u32,
    pub ci: u32,
    /// `3g.40gb`.
    pub profile: String,
    /// Bytes of its GPU instance.
    pub vram: u64,
    /// The instance holding it, if any.
    pub instance: Option<String>,
}

/// An alarm for the event log.
#[derive(Debug, Clone, PartialEq)]
pub struct Alarm {
    pub gpu: String,
    pub index: u32,
    /// `thermal`, `thermal_cleared`, `xid`, `gpu_lost`.
    pub kind: &'static str,
    pub message: String,
    /// This alarm cordoned the GPU.
    pub cordoned: bool,
}

#[derive(Debug)]
struct GpuState {
    meta: GpuMeta,
    last: Option<GpuReading>,
    at: i64,
    xid_count: u64,
    last_xid: Option<u32>,
    hot: bool,
    pcie_tx_kb: f64,
    pcie_rx_kb: f64,
    history: History,
}

#[derive(Debug)]
struct InstState {
    tenant: String,
    last: InstanceReading,
    at: i64,
    cpu_pct: Option<f64>,
    rx_bps: Option<f64>,
    tx_bps: Option<f64>,
    history: History,
}

impl InstState {
    fn new(tenant: String, at: i64) -> Self {
        Self {
            tenant,
            last: InstanceReading::default(),
            at,
            cpu_pct: None,
            rx_bps: None,
            tx_bps: None,
            history: History::new(INSTANCE_METRICS.len()),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    hostname: String,
    gpus: BTreeMap<String, GpuState>,
    instances: BTreeMap<String, InstState>,
    cordoned: BTreeMap<String, String>,
    slices: Vec<SliceMeta>,
    /// Time of the newest sample; only instances seen then are exported.
    newest: i64,
    /// The host's KSM counters, where it has KSM.
    ksm: Option<gpuvisor_node::ksm::KsmStats>,
}

#[derive(Debug, Default)]
pub struct Telemetry {
    cfg: Mutex<TelemetryConfig>,
    state: Mutex<State>,
    /// The time of the newest sample ingested (ms since the epoch): what live streams wait on.
    sampled: tokio::sync::watch::Sender<i64>,
}

fn f(v: Option<f64>) -> f32 {
    v.map_or(f32::NAN, |v| v as f32)
}
fn fu(v: Option<u64>) -> f32 {
    v.map_or(f32::NAN, |v| v as f32)
}

fn rate(prev: Option<u64>, cur: Option<u64>, dt_ms: i64) -> Option<f64> {
    match (prev, cur) {
        (Some(p), Some(c)) if dt_ms > 0 && c >= p => Some((c - p) as f64 * 1000.0 / dt_ms as f64),
        _ => None,
    }
}

impl Telemetry {
    pub fn new(hostname: &str, gpus: Vec<GpuMeta>) -> Self {
        let state = State {
            hostname: hostname.to_string(),
            gpus: gpus
                .into_iter()
                .map(|meta| {
                    (
                        meta.uuid.clone(),
                        GpuState {
                            meta,
                            last: None,
                            at: 0,
                            xid_count: 0,
                            last_xid: None,
                            hot: false,
                            pcie_tx_kb: 0.0,
                            pcie_rx_kb: 0.0,
                            history: History::new(GPU_METRICS.len()),
                        },
                    )
                })
                .collect(),
            ..Default::default()
        };
        Self {
            cfg: Mutex::new(TelemetryConfig::default()),
            state: Mutex::new(state),
            sampled: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes each time a sample is ingested (to its time): live streams wait on it.
    pub fn samples(&self) -> tokio::sync::watch::Receiver<i64> {
        self.sampled.subscribe()
    }

    /// The time of the newest sample (0 before the first).
    pub fn newest(&self) -> i64 {
        *self.sampled.borrow()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn configure(&self, cfg: TelemetryConfig) {
        *self.cfg.lock().unwrap_or_else(|p| p.into_inner()) = cfg;
    }

    pub fn config(&self) -> TelemetryConfig {
        self.cfg.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_cordoned(&self, uuid: &str) -> bool {
        self.state().cordoned.contains_key(uuid)
    }

    /// Cordoned GPUs and why.
    pub fn cordoned(&self) -> BTreeMap<String, String> {
        self.state().cordoned.clone()
    }

    /// Cordons a GPU (idempotent; the first reason is kept). Returns whether it was new.
    pub fn cordon(&self, uuid: &str, reason: &str) -> bool {
        let mut st = self.state();
        if st.cordoned.contains_key(uuid) {
            return false;
        }
        st.cordoned.insert(uuid.to_string(), reason.to_string());
        true
    }

    /// Lifts a cordon; true when there was one. Alarms already raised stay in the event log.
    pub fn uncordon(&self, uuid: &str) -> bool {
        self.state().cordoned.remove(uuid).is_some()
    }

    /// Takes one host sample at `now` (ms); `tenants` maps instance id → tenant name. Returns
    /// the alarms it raised (already applied: cordons are in effect when this returns).
    pub fn ingest(
        &self,
        now: i64,
        sample: HostSample,
        tenants: &BTreeMap<String, String>,
    ) -> Vec<Alarm> {
        let cfg = self.config();
        let mut st = self.state();
        let st = &mut *st;
        st.newest = now;
        let mut alarms = Vec::new();
        let mut xids: Vec<(String, u32, String)> = Vec::new();
        for r in sample.gpus {
            let Some(g) = st.gpus.get_mut(&r.uuid) else {
                continue;
            };
            let dt = if g.at > 0 {
                (now - g.at) as f64 / 1000.0
            } else {
                0.0
            };
            g.pcie_tx_kb += r.pcie_tx_kbs.unwrap_or(0) as f64 * dt;
            g.pcie_rx_kb += r.pcie_rx_kbs.unwrap_or(0) as f64 * dt;
            g.history.push(
                now,
                &[
                    f(r.util),
                    fu(r.mem_used),
                    f(r.temp_c),
                    f(r.power_w),
                    r.sm_clock_mhz.map_or(f32::NAN, |v| v as f32),
                    r.mem_clock_mhz.map_or(f32::NAN, |v| v as f32),
                    fu(r.pcie_tx_kbs),
                    fu(r.pcie_rx_kbs),
                ],
            );
            if let Some(t) = r.temp_c {
                if t >= cfg.thermal_ceiling_c && !g.hot {
                    g.hot = true;
                    alarms.push(Alarm {
                        gpu: r.uuid.clone(),
                        index: r.index,
                        kind: "thermal",
                        message: format!(
                            "GPU {} at {t} °C, at or above the {} °C ceiling: check cooling and airflow; the driver will throttle clocks",
                            r.index, cfg.thermal_ceiling_c
                        ),
                        cordoned: false,
                    });
                } else if g.hot && t < cfg.thermal_ceiling_c - THERMAL_HYSTERESIS_C {
                    g.hot = false;
                    alarms.push(Alarm {
                        gpu: r.uuid.clone(),
                        index: r.index,
                        kind: "thermal_cleared",
                        message: format!("GPU {} back to {t} °C", r.index),
                        cordoned: false,
                    });
                }
            }
            for x in &r.xids {
                xids.push((r.uuid.clone(), *x, String::new()));
            }
            if r.lost && !st.cordoned.contains_key(&r.uuid) {
                let reason = "fell off the bus (the driver reports it lost)".to_string();
                st.cordoned.insert(r.uuid.clone(), reason.clone());
                alarms.push(Alarm {
                    gpu: r.uuid.clone(),
                    index: r.index,
                    kind: "gpu_lost",
                    message: format!(
                        "GPU {} {reason}; cordoned: reboot or power-cycle the host",
                        r.index
                    ),
                    cordoned: true,
                });
            }
            g.at = now;
            g.last = Some(r);
        }
        for e in sample.xids {
            if let Some(g) = st
                .gpus
                .values()
                .find(|g| g.meta.pci_address.starts_with(&e.pci_address))
            {
                xids.push((g.meta.uuid.clone(), e.xid, e.detail));
            }
        }
        for (uuid, code, detail) in xids {
            let Some(g) = st.gpus.get_mut(&uuid) else {
                continue;
            };
            g.xid_count += 1;
            g.last_xid = Some(code);
            let mut message = format!("GPU {}: {}", g.meta.index, xid::describe(code));
            if !detail.is_empty() {
                message.push_str(&format!(" (driver: {detail})"));
            }
            let fatal = xid::decode(code).is_some_and(|x| x.fatal);
            let cordoned = fatal && !st.cordoned.contains_key(&uuid);
            if cordoned {
                st.cordoned.insert(
                    uuid.clone(),
                    xid::describe(code)
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .to_string(),
                );
                message.push_str("; GPU cordoned: no new instances are placed on it");
            }
            alarms.push(Alarm {
                gpu: uuid,
                index: g.meta.index,
                kind: "xid",
                message,
                cordoned,
            });
        }
        for r in sample.instances {
            let e = st
                .instances
                .entry(r.id.clone())
                .or_insert_with(|| InstState::new(String::new(), 0));
            if let Some(t) = tenants.get(&r.id) {
                e.tenant.clone_from(t);
            }
            let dt = if e.at > 0 { now - e.at } else { 0 };
            e.cpu_pct = rate(e.last.cpu_ns, r.cpu_ns, dt).map(|ns_per_s| ns_per_s / 1e7);
            e.rx_bps = rate(e.last.net_rx_bytes, r.net_rx_bytes, dt);
            e.tx_bps = rate(e.last.net_tx_bytes, r.net_tx_bytes, dt);
            e.history.push(
                now,
                &[
                    f(e.cpu_pct),
                    fu(r.mem_bytes),
                    fu(r.disk_used),
                    if r.volume_total > 0 {
                        r.volume_used as f32
                    } else {
                        f32::NAN
                    },
                    f(e.rx_bps),
                    f(e.tx_bps),
                    fu(r.gpu_mem),
                    f(r.gpu_util),
                ],
            );
            e.at = now;
            e.last = r;
        }
        st.instances
            .retain(|_, i| now - i.at < INSTANCE_RETENTION_MS);
        while st.instances.len() > cfg.max_instances.max(1) {
            let oldest = st
                .instances
                .iter()
                .min_by_key(|(_, i)| i.at)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => st.instances.remove(&k),
                None => break,
            };
        }
        self.sampled.send_replace(now);
        alarms
    }

    /// The host's MIG slices and who holds them, for `/metrics`.
    /// The host's KSM counters for `/metrics` (`None`: no KSM on this host).
    pub fn set_ksm(&self, ksm: Option<gpuvisor_node::ksm::KsmStats>) {
        self.state().ksm = ksm;
    }

    pub fn set_slices(&self, slices: Vec<SliceMeta>) {
        self.state().slices = slices;
    }

    /// Closed minutes of every GPU and instance not yet saved, keyed by entity (`gpu:<uuid>`,
    /// `instance:<id>`): the engine writes them to the store.
    pub fn drain_unsaved(&self) -> Vec<(String, MinuteRecord)> {
        let mut st = self.state();
        let mut out = Vec::new();
        for (uuid, g) in &mut st.gpus {
            out.extend(
                g.history
                    .take_unsaved()
                    .into_iter()
                    .map(|r| (gpu_entity(uuid), r)),
            );
        }
        for (id, i) in &mut st.instances {
            out.extend(
                i.history
                    .take_unsaved()
                    .into_iter()
                    .map(|r| (instance_entity(id), r)),
            );
        }
        out
    }

    /// Puts saved minutes back into a GPU's history (after a restart); unknown GPUs are skipped.
    pub fn restore_gpu(&self, uuid: &str, records: Vec<MinuteRecord>) {
        if let Some(g) = self.state().gpus.get_mut(uuid) {
            g.history.restore(records);
        }
    }

    /// Puts saved minutes back into an instance's history (after a restart), at `now` (ms), so
    /// it is kept like an instance sampled then.
    pub fn restore_instance(&self, id: &str, tenant: &str, now: i64, records: Vec<MinuteRecord>) {
        let mut st = self.state();
        let e = st
            .instances
            .entry(id.to_string())
            .or_insert_with(|| InstState::new(tenant.to_string(), now));
        e.history.restore(records);
    }

    /// History of a GPU: `None` if unknown.
    pub fn gpu_history(
        &self,
        uuid: &str,
        since: i64,
        step: i64,
    ) -> Option<(i64, Vec<MetricSeries>)> {
        self.gpu_span(uuid, since, step, Span::History)
    }

    /// A GPU's history, queried as `span` says.
    pub fn gpu_span(
        &self,
        uuid: &str,
        since: i64,
        step: i64,
        span: Span,
    ) -> Option<(i64, Vec<MetricSeries>)> {
        let st = self.state();
        let g = st.gpus.get(uuid)?;
        Some(series(&g.history, GPU_METRICS, since, step, span))
    }

    /// History of an instance: empty series before its first sample.
    pub fn instance_history(&self, id: &str, since: i64, step: i64) -> (i64, Vec<MetricSeries>) {
        self.instance_span(id, since, step, Span::History)
    }

    /// An instance's history, queried as `span` says.
    pub fn instance_span(
        &self,
        id: &str,
        since: i64,
        step: i64,
        span: Span,
    ) -> (i64, Vec<MetricSeries>) {
        let st = self.state();
        match st.instances.get(id) {
            Some(i) => series(&i.history, INSTANCE_METRICS, since, step, span),
            None => (
                step.max(1000),
                INSTANCE_METRICS
                    .iter()
                    .map(|m| MetricSeries {
                        metric: (*m).to_string(),
                        points: vec![],
                    })
                    .collect(),
            ),
        }
    }

    /// The newest sample of every GPU (instance counts are the caller's).
    pub fn gpu_stats(&self) -> Vec<GpuStats> {
        let st = self.state();
        let mut out: Vec<GpuStats> = st
            .gpus
            .values()
            .map(|g| {
                let r = g.last.clone().unwrap_or_default();
                GpuStats {
                    uuid: g.meta.uuid.clone(),
                    index: g.meta.index,
                    model: g.meta.model.clone(),
                    at: g.at,
                    util_percent: r.util,
                    memory_used: r.mem_used,
                    memory_total: r.mem_total,
                    temperature_c: r.temp_c,
                    power_w: r.power_w,
                    sm_clock_mhz: r.sm_clock_mhz,
                    mem_clock_mhz: r.mem_clock_mhz,
                    throttle_reasons: r.throttle_reasons,
                    pcie_tx_kbs: r.pcie_tx_kbs,
                    pcie_rx_kbs: r.pcie_rx_kbs,
                    ecc_corrected: r.ecc_corrected,
                    ecc_uncorrected: r.ecc_uncorrected,
                    xid_errors: g.xid_count,
                    last_xid: g.last_xid,
                    instances: 0,
                    cordoned: st.cordoned.get(&g.meta.uuid).cloned(),
                    alarms: if g.hot {
                        vec!["thermal".into()]
                    } else {
                        vec![]
                    },
                    simulated: r.simulated,
                }
            })
            .collect();
        out.sort_by_key(|g| g.index);
        out
    }

    /// The newest sample in Prometheus form (see [`prom`]).
    pub fn render(&self, format: Format) -> String {
        let st = self.state();
        let mut w = Writer::new(format);
        let gpus: Vec<&GpuState> = {
            let mut v: Vec<&GpuState> = st.gpus.values().filter(|g| g.last.is_some()).collect();
            v.sort_by_key(|g| g.meta.index);
            v
        };
        let labels = |g: &GpuState| -> Vec<(&'static str, String)> {
            let mut l = vec![
                ("gpu", g.meta.index.to_string()),
                ("UUID", g.meta.uuid.clone()),
                ("pci_bus_id", g.meta.pci_address.clone()),
                ("device", format!("nvidia{}", g.meta.index)),
                ("modelName", g.meta.model_name.clone()),
                ("Hostname", st.hostname.clone()),
            ];
            if g.last.as_ref().is_some_and(|r| r.simulated) {
                l.push(("simulated", "true".into()));
            }
            l
        };
        let gpu_labels: Vec<Vec<(&'static str, String)>> = gpus.iter().map(|g| labels(g)).collect();
        type Get = fn(&GpuState, &GpuReading) -> Option<f64>;
        let families: &[(&str, &str, Kind, Get)] = &[
            (
                "DCGM_FI_DEV_SM_CLOCK",
                "SM clock frequency (in MHz).",
                Kind::Gauge,
                |_, r| r.sm_clock_mhz.map(f64::from),
            ),
            (
                "DCGM_FI_DEV_MEM_CLOCK",
                "Memory clock frequency (in MHz).",
                Kind::Gauge,
                |_, r| r.mem_clock_mhz.map(f64::from),
            ),
            (
                "DCGM_FI_DEV_GPU_TEMP",
                "GPU temperature (in C).",
                Kind::Gauge,
                |_, r| r.temp_c,
            ),
            (
                "DCGM_FI_DEV_POWER_USAGE",
                "Power draw (in W).",
                Kind::Gauge,
                |_, r| r.power_w,
            ),
            (
                "DCGM_FI_DEV_PCIE_TX_THROUGHPUT",
                "Total number of bytes transmitted through PCIe TX (in KB) via NVML.",
                Kind::Counter,
                |g, r| r.pcie_tx_kbs.map(|_| g.pcie_tx_kb.round()),
            ),
            (
                "DCGM_FI_DEV_PCIE_RX_THROUGHPUT",
                "Total number of bytes received through PCIe RX (in KB) via NVML.",
                Kind::Counter,
                |g, r| r.pcie_rx_kbs.map(|_| g.pcie_rx_kb.round()),
            ),
            (
                "DCGM_FI_DEV_GPU_UTIL",
                "GPU utilization (in %).",
                Kind::Gauge,
                |_, r| r.util,
            ),
            (
                "DCGM_FI_DEV_XID_ERRORS",
                "Value of the last XID error encountered.",
                Kind::Gauge,
                |g, _| Some(f64::from(g.last_xid.unwrap_or(0))),
            ),
            (
                "DCGM_FI_DEV_FB_FREE",
                "Framebuffer memory free (in MiB).",
                Kind::Gauge,
                |_, r| {
                    r.mem_used
                        .map(|u| (r.mem_total.saturating_sub(u) >> 20) as f64)
                },
            ),
            (
                "DCGM_FI_DEV_FB_USED",
                "Framebuffer memory used (in MiB).",
                Kind::Gauge,
                |_, r| r.mem_used.map(|u| (u >> 20) as f64),
            ),
            (
                "DCGM_FI_DEV_FB_TOTAL",
                "Framebuffer memory total (in MiB).",
                Kind::Gauge,
                |_, r| Some((r.mem_total >> 20) as f64),
            ),
            (
                "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
                "Current clock throttle reasons (bit mask).",
                Kind::Gauge,
                |_, r| r.throttle_reasons.map(|v| v as f64),
            ),
            (
                "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
                "Total number of single-bit volatile ECC errors.",
                Kind::Counter,
                |_, r| r.ecc_corrected.map(|v| v as f64),
            ),
            (
                "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
                "Total number of double-bit volatile ECC errors.",
                Kind::Counter,
                |_, r| r.ecc_uncorrected.map(|v| v as f64),
            ),
            (
                "gpuvisor_gpu_xid_errors_total",
                "XID errors seen since the daemon started.",
                Kind::Counter,
                |g, _| Some(g.xid_count as f64),
            ),
            (
                "gpuvisor_gpu_thermal_alarm",
                "1 while the GPU is at or above the thermal ceiling.",
                Kind::Gauge,
                |g, _| Some(if g.hot { 1.0 } else { 0.0 }),
            ),
        ];
        for (name, help, kind, get) in families {
            let vals: Vec<(usize, f64)> = gpus
                .iter()
                .enumerate()
                .filter_map(|(i, g)| g.last.as_ref().and_then(|r| get(g, r)).map(|v| (i, v)))
                .collect();
            if vals.is_empty() {
                continue;
            }
            w.family(name, help, *kind);
            for (i, v) in vals {
                let l: Vec<(&str, &str)> = gpu_labels[i]
                    .iter()
                    .map(|(k, v)| (*k, v.as_str()))
                    .collect();
                w.sample(name, &l, v);
            }
        }
        if !gpus.is_empty() {
            w.family(
                "gpuvisor_gpu_cordoned",
                "1 when no new instance is placed on the GPU (fatal XID, lost).",
                Kind::Gauge,
            );
            for (i, g) in gpus.iter().enumerate() {
                let l: Vec<(&str, &str)> = gpu_labels[i]
                    .iter()
                    .map(|(k, v)| (*k, v.as_str()))
                    .collect();
                w.sample(
                    "gpuvisor_gpu_cordoned",
                    &l,
                    if st.cordoned.contains_key(&g.meta.uuid) {
                        1.0
                    } else {
                        0.0
                    },
                );
            }
        }
        if !st.slices.is_empty() {
            // dcgm-exporter's MIG labels (GPU_I_ID, GPU_I_PROFILE) on the parent's gpu/UUID.
            let sl: Vec<Vec<(&str, String)>> = st
                .slices
                .iter()
                .map(|m| {
                    vec![
                        ("gpu", m.parent_index.to_string()),
                        ("UUID", m.parent_uuid.clone()),
                        ("GPU_I_ID", m.gi.to_string()),
                        ("GPU_I_PROFILE", m.profile.clone()),
                        ("mig_uuid", m.uuid.clone()),
                        ("Hostname", st.hostname.clone()),
                    ]
                })
                .collect();
            type SGet = fn(&SliceMeta) -> f64;
            let sfam: &[(&str, &str, SGet)] = &[
                (
                    "gpuvisor_mig_slice_fb_total",
                    "Framebuffer memory of the MIG slice's GPU instance (in MiB).",
                    |m| (m.vram >> 20) as f64,
                ),
                (
                    "gpuvisor_mig_slice_allocated",
                    "1 while an instance holds the MIG slice.",
                    |m| if m.instance.is_some() { 1.0 } else { 0.0 },
                ),
            ];
            for (name, help, get) in sfam {
                w.family(name, help, Kind::Gauge);
                for (m, l) in st.slices.iter().zip(&sl) {
                    let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    w.sample(name, &l, get(m));
                }
            }
        }
        let insts: Vec<(&String, &InstState)> = st
            .instances
            .iter()
            .filter(|(_, i)| i.at == st.newest)
            .collect();
        type IGet = fn(&InstState) -> Option<f64>;
        let ifam: &[(&str, &str, Kind, IGet)] = &[
            (
                "gpuvisor_instance_cpu_seconds_total",
                "CPU time used by the instance's cgroup.",
                Kind::Counter,
                |i| i.last.cpu_ns.map(|n| n as f64 / 1e9),
            ),
            (
                "gpuvisor_instance_cpu_percent",
                "CPU use over the last second (100 = one core).",
                Kind::Gauge,
                |i| i.cpu_pct,
            ),
            (
                "gpuvisor_instance_memory_bytes",
                "Memory charged to the instance's cgroup.",
                Kind::Gauge,
                |i| i.last.mem_bytes.map(|v| v as f64),
            ),
            (
                "gpuvisor_instance_disk_used_bytes",
                "Used bytes of the container disk.",
                Kind::Gauge,
                |i| i.last.disk_used.map(|v| v as f64),
            ),
            (
                "gpuvisor_instance_disk_size_bytes",
                "Size of the container disk.",
                Kind::Gauge,
                |i| i.last.disk_total.map(|v| v as f64),
            ),
            (
                "gpuvisor_instance_volume_used_bytes",
                "Used bytes of the attached volumes.",
                Kind::Gauge,
                |i| (i.last.volume_total > 0).then_some(i.last.volume_used as f64),
            ),
            (
                "gpuvisor_instance_volume_size_bytes",
                "Size of the attached volumes.",
                Kind::Gauge,
                |i| (i.last.volume_total > 0).then_some(i.last.volume_total as f64),
            ),
            (
                "gpuvisor_instance_network_receive_bytes_total",
                "Bytes received by the instance.",
                Kind::Counter,
                |i| i.last.net_rx_bytes.map(|v| v as f64),
            ),
            (
                "gpuvisor_instance_network_transmit_bytes_total",
                "Bytes sent by the instance.",
                Kind::Counter,
                |i| i.last.net_tx_bytes.map(|v| v as f64),
            ),
            (
                "gpuvisor_instance_gpu_memory_bytes",
                "GPU memory of the instance's processes.",
                Kind::Gauge,
                |i| i.last.gpu_mem.map(|v| v as f64),
            ),
            (
                "gpuvisor_instance_gpu_util_percent",
                "SM utilisation of the instance's processes.",
                Kind::Gauge,
                |i| i.last.gpu_util,
            ),
        ];
        for (name, help, kind, get) in ifam {
            let vals: Vec<(&String, &InstState, f64)> = insts
                .iter()
                .filter_map(|(id, i)| get(i).map(|v| (*id, *i, v)))
                .collect();
            if vals.is_empty() {
                continue;
            }
            w.family(name, help, *kind);
            for (id, i, v) in vals {
                w.sample(
                    name,
                    &[
                        ("instance", id),
                        ("tenant", &i.tenant),
                        ("Hostname", &st.hostname),
                    ],
                    v,
                );
            }
        }
        if let Some(k) = st.ksm {
            let host = [("Hostname", st.hostname.as_str())];
            for (name, help, v) in [
                (
                    "gpuvisor_ksm_running",
                    "Whether KSM runs (the daemon runs it while VMs run).",
                    u64::from(k.running),
                ),
                (
                    "gpuvisor_ksm_pages_shared",
                    "Pages KSM keeps one copy of.",
                    k.pages_shared,
                ),
                (
                    "gpuvisor_ksm_pages_sharing",
                    "Pages that share a page KSM keeps (what merging saved, in pages).",
                    k.pages_sharing,
                ),
                (
                    "gpuvisor_ksm_zero_pages",
                    "Zero-filled pages KSM mapped to the kernel's zero page.",
                    k.zero_pages,
                ),
                (
                    "gpuvisor_ksm_saved_bytes",
                    "Memory KSM saved: pages sharing and zero pages merged, times the page size.",
                    k.saved_bytes(),
                ),
            ] {
                w.family(name, help, Kind::Gauge);
                w.sample(name, &host, v as f64);
            }
        }
        w.finish()
    }
}

/// The store key of a GPU's saved history.
pub fn gpu_entity(uuid: &str) -> String {
    format!("gpu:{uuid}")
}

/// The store key of an instance's saved history.
pub fn instance_entity(id: &str) -> String {
    format!("instance:{id}")
}

/// Which query of a history: the API's ([`History::query`]) or a live stream's
/// ([`History::query_recent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    History,
    Recent,
}

fn series(
    h: &History,
    names: &[&str],
    since: i64,
    step: i64,
    span: Span,
) -> (i64, Vec<MetricSeries>) {
    let (step, pts) = match span {
        Span::History => h.query(since, step),
        Span::Recent => h.query_recent(since, step),
    };
    (
        step,
        names
            .iter()
            .zip(pts)
            .map(|(m, points)| MetricSeries {
                metric: (*m).to_string(),
                points,
            })
            .collect(),
    )
}

/// Parses `since`: a duration back from `now` (`90s`, `10m`, `2h`, `7d`) or epoch ms.
pub fn parse_since(s: &str, now: i64) -> Option<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    parse_duration_ms(s).map(|d| now - d)
}

/// `500ms`, `30s`, `10m`, `2h`, `7d` → milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<i64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().ok()?;
    let mul = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(mul)
}

#[cfg(test)]
mod tests;
