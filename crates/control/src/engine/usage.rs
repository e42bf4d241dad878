//! Metering and pricing: what each instance and volume uses, per second, persisted; what it
//! costs; what GPUs of each model cost to rent now.
//!
//! The meter is a reconciler: each step (every second, and at once when an instance changes)
//! derives the billable lines every instance and volume should have open now from its state
//! and size, compares them with the open intervals in the store, closes the ones that no
//! longer hold, opens the new ones and moves the open ones' end forward, in one transaction.
//! Nothing else writes usage, so no state change anywhere can be missed or counted twice. A
//! starting daemon first closes what was open at the last heartbeat: the time it was down is
//! a gap no longer than the restart, never a double count.

use super::authz::Op;
use super::pricing::Pricing;
use super::{now_ms, Engine, Principal};
use crate::error::{EngineError, Result};
use crate::store::{InstanceRow, UsageRow, VolumeRow};
use crate::telemetry::parse_since;
use gpuvisor_wire::{self as wire, InstanceState};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

const GIB: f64 = (1u64 << 30) as f64;
const MS_PER_HOUR: f64 = 3_600_000.0;

/// How often the meter notes its heartbeat (the most a crash can leave unmetered beyond the
/// restart).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How often it looks at every instance and volume when nothing told it of a change (what
/// changes without telling it — a tenant's teardown removing volumes — is metered within this).
const FULL_EVERY: Duration = Duration::from_secs(10);

/// How long the meter waits after a change for the ones that follow it.
const CHANGE_DEBOUNCE: Duration = Duration::from_millis(100);

/// The longest range one report covers.
const MAX_RANGE_MS: i64 = 400 * 86_400_000;

/// Whether an instance pays for its GPUs, vCPUs and memory: while it holds them in
/// placement, running or stopped (a stopped instance keeps them reserved for its start;
/// terminate it to release them), until a preemptor takes them.
fn computes(i: &InstanceRow) -> bool {
    super::reserves(i)
}

/// Whether an instance still holds its container disk (not once evicted).
fn holds_disk(i: &InstanceRow) -> bool {
    i.desired != InstanceState::Interrupted
        && !matches!(
            i.state,
            InstanceState::Pending
                | InstanceState::Terminating
                | InstanceState::Terminated
                | InstanceState::Interrupted
        )
}

/// What an interruptible instance pays per GPU-hour of `model`: its recorded bid, else the
/// floor now.
fn gpu_rate(p: &Pricing, i: &InstanceRow, model: &str) -> (f64, bool) {
    if i.spec.interruptible {
        let rate = i
            .spec
            .bid_per_gpu_hour
            .unwrap_or_else(|| p.gpu(model).interruptible);
        (rate, true)
    } else {
        (p.gpu(model).on_demand, false)
    }
}

fn line(i: &InstanceRow, line: String, resource: &str, quantity: f64, price: f64) -> UsageRow {
    UsageRow {
        subject_id: i.id.clone(),
        line,
        start_ms: 0,
        end_ms: 0,
        open: true,
        tenant_id: i.tenant_id.clone(),
        subject: "instance".into(),
        name: i.name.clone(),
        resource: resource.into(),
        model: String::new(),
        milli: 0,
        interruptible: false,
        quantity,
        unit_price: price,
    }
}

/// The lines an instance is billed for in its current state.
pub(crate) fn instance_lines(p: &Pricing, i: &InstanceRow) -> Vec<UsageRow> {
    let mut out = Vec::new();
    if computes(i) {
        let mut groups: BTreeMap<(&str, u32), u32> = BTreeMap::new();
        for g in &i.gpus {
            *groups.entry((g.model.as_str(), g.milli)).or_default() += 1;
        }
        for ((model, milli), n) in groups {
            let (rate, spot) = gpu_rate(p, i, model);
            let key = format!("gpu:{model}:{milli}{}", if spot { ":i" } else { "" });
            let qty = f64::from(n) * f64::from(milli) / 1000.0;
            let mut l = line(i, key, "gpu", qty, rate);
            l.model = model.to_string();
            l.milli = milli;
            l.interruptible = spot;
            out.push(l);
        }
        let vcpus = f64::from(i.spec.vcpus);
        out.push(line(i, "vcpu".into(), "vcpu", vcpus, p.vcpu_hour));
        let mem = i.spec.memory as f64 / GIB;
        out.push(line(i, "memory".into(), "memory", mem, p.memory_gib_hour));
    }
    if holds_disk(i) && i.spec.container_disk > 0 {
        let disk = i.spec.container_disk as f64 / GIB;
        out.push(line(i, "disk".into(), "disk", disk, p.disk_gib_hour));
    }
    out
}

fn volume_line(p: &Pricing, v: &VolumeRow) -> UsageRow {
    UsageRow {
        subject_id: format!("{}/{}", v.tenant_id, v.name),
        line: "volume".into(),
        start_ms: 0,
        end_ms: 0,
        open: true,
        tenant_id: v.tenant_id.clone(),
        subject: "volume".into(),
        name: v.name.clone(),
        resource: "volume".into(),
        model: String::new(),
        milli: 0,
        interruptible: false,
        quantity: v.size as f64 / GIB,
        unit_price: p.volume_gib_hour,
    }
}

/// The same line at the same size and price: an open interval that still holds.
fn same(a: &UsageRow, b: &UsageRow) -> bool {
    a.tenant_id == b.tenant_id
        && a.name == b.name
        && a.quantity.to_bits() == b.quantity.to_bits()
        && a.unit_price.to_bits() == b.unit_price.to_bits()
}

/// What a meter step does: the open intervals to close, the lines to open.
fn plan(open: Vec<UsageRow>, want: Vec<UsageRow>) -> (Vec<(String, String, i64)>, Vec<UsageRow>) {
    let mut want: HashMap<(String, String), UsageRow> = want
        .into_iter()
        .map(|u| ((u.subject_id.clone(), u.line.clone()), u))
        .collect();
    let mut close = Vec::new();
    for o in open {
        let key = (o.subject_id.clone(), o.line.clone());
        match want.get(&key) {
            Some(w) if same(w, &o) => {
                want.remove(&key);
            }
            _ => close.push((o.subject_id, o.line, o.start_ms)),
        }
    }
    let mut new: Vec<UsageRow> = want.into_values().collect();
    new.sort_by(|a, b| (&a.subject_id, &a.line).cmp(&(&b.subject_id, &b.line)));
    (close, new)
}

/// What `u` cost within `[from, to)`, `now` ending an open interval: (ms, unit-ms).
fn clipped_ms(u: &UsageRow, from: i64, to: i64, now: i64) -> i64 {
    let end = if u.open { u.end_ms.max(now) } else { u.end_ms };
    (end.min(to) - u.start_ms.max(from)).max(0)
}

fn cost(u: &UsageRow, ms: i64) -> f64 {
    u.quantity * u.unit_price * ms as f64 / MS_PER_HOUR
}

/// Parses a report bound: a duration back, epoch ms, RFC 3339, or a date (midnight UTC).
fn parse_time(what: &str, s: &str, now: i64) -> Result<i64> {
    use time::format_description::well_known::Rfc3339;
    let s = s.trim();
    if let Some(t) = parse_since(s, now) {
        return Ok(t);
    }
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let date = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(d) = time::Date::parse(s, &date) {
        return Ok(d.midnight().assume_utc().unix_timestamp() * 1000);
    }
    Err(EngineError::InvalidArgument(format!(
        "{what} {s:?}: expected a duration back (90s, 2h, 30d), epoch milliseconds, an RFC 3339 \
         time (2026-12-01T00:00:00Z) or a date (2026-12-01)"
    )))
}

impl Engine {
    /// Sets the price list (at start, before serving).
    pub fn set_pricing(&self, p: Pricing) {
        *self.pricing.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
    }

    pub fn pricing(&self) -> Arc<Pricing> {
        self.pricing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs the meter until the daemon ends.
    pub async fn run_meter(self: Arc<Self>) {
        match self.store.usage_close_all().await {
            Ok(n) if n > 0 => tracing::info!(intervals = n, "usage: closed at the last heartbeat"),
            Ok(_) => {}
            Err(e) => tracing::warn!("usage: cannot close open intervals: {e}"),
        }
        let mut changed = self.changed.subscribe();
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Every change, and every FULL_EVERY, a full step; else only the heartbeat (one row):
        // at rest the meter costs the daemon one small write a second, whatever it runs.
        let mut full = true;
        let mut last_full = tokio::time::Instant::now();
        loop {
            let step = if full || last_full.elapsed() >= FULL_EVERY {
                last_full = tokio::time::Instant::now();
                self.meter_step().await
            } else {
                self.store
                    .usage_heartbeat(now_ms())
                    .await
                    .map_err(Into::into)
            };
            if let Err(e) = step {
                tracing::warn!("usage: meter step failed: {e}");
            }
            tokio::select! {
                _ = tick.tick() => full = false,
                r = changed.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // A burst of changes (a create, a tenant's teardown) is one step.
                    tokio::time::sleep(CHANGE_DEBOUNCE).await;
                    full = true;
                }
            }
        }
    }

    /// One meter step (see the module's doc). Public for the daemon's shutdown, which takes a
    /// last one so that the downtime starts at the stop.
    pub async fn meter_step(&self) -> Result<()> {
        // Two steps at once (the loop and the shutdown's) could each open the same line.
        let _one = self.meter_lock.lock().await;
        let p = self.pricing();
        let live = self.store.live_instances(None).await?;
        let volumes = self.store.volumes(None).await?;
        let want: Vec<UsageRow> = live
            .iter()
            .flat_map(|i| instance_lines(&p, i))
            .chain(
                volumes
                    .iter()
                    .filter(|v| v.state != wire::VolumeState::Pending)
                    .map(|v| volume_line(&p, v)),
            )
            .collect();
        let open = self.store.usage_open().await?;
        let (close, new) = plan(open, want);
        self.store.usage_step(&close, &new, now_ms()).await?;
        Ok(())
    }

    /// What the caller may see of the metered usage in a range.
    pub async fn usage(&self, who: &Principal, q: &wire::UsageQuery) -> Result<wire::UsageReport> {
        who.allow(Op::Usage)?;
        let names = self.tenant_names().await?;
        let tenant_id = super::tenants::scoped_tenant(who, q.tenant.as_deref(), &names)?;
        let now = now_ms();
        let to = match &q.to {
            Some(s) => parse_time("to", s, now)?,
            None => now,
        };
        let from = match &q.from {
            Some(s) => parse_time("from", s, now)?,
            None => to - 30 * 86_400_000,
        };
        if from >= to || to - from > MAX_RANGE_MS {
            return Err(EngineError::InvalidArgument(format!(
                "the range must start before it ends and span at most 400 days ({from}..{to})"
            )));
        }
        let mut rows = self
            .store
            .usage_rows(from, to, tenant_id.as_deref())
            .await?;
        if let Some(s) = &q.subject {
            rows.retain(|u| u.subject_id == *s || u.name == *s);
        }
        Ok(report(
            rows,
            &names,
            from,
            to,
            now,
            &self.pricing().currency,
        ))
    }

    /// What an instance costs now per hour and has cost since creation.
    pub(crate) async fn instance_cost(&self, i: &InstanceRow) -> Result<wire::InstanceCost> {
        let p = self.pricing();
        let per_hour = instance_lines(&p, i)
            .iter()
            .map(|u| u.quantity * u.unit_price)
            .sum();
        let now = now_ms();
        let total = self
            .store
            .usage_of(&i.id)
            .await?
            .iter()
            .map(|u| cost(u, clipped_ms(u, 0, i64::MAX, now)))
            .sum();
        Ok(wire::InstanceCost {
            currency: p.currency.clone(),
            per_hour,
            total,
        })
    }

    /// Every GPU model that takes instances: how many, how many free, what they cost now.
    pub async fn gpu_types(&self, who: &Principal) -> Result<Vec<wire::GpuType>> {
        who.allow(Op::ListGpuTypes)?;
        let p = self.pricing();
        let gpus = self.list_gpus(who).await?;
        let live = self.store.live_instances(None).await?;
        // The lowest rate an interruptible instance pays for each GPU it holds.
        let mut lowest_bid: HashMap<&str, f64> = HashMap::new();
        for i in live.iter().filter(|i| i.spec.interruptible && computes(i)) {
            for g in &i.gpus {
                let rate = gpu_rate(&p, i, &g.model).0;
                let e = lowest_bid.entry(g.uuid.as_str()).or_insert(rate);
                *e = e.min(rate);
            }
        }
        let mut types: BTreeMap<String, wire::GpuType> = BTreeMap::new();
        for g in gpus
            .iter()
            .filter(|g| g.cordoned.is_none() && !g.mig_enabled)
        {
            let price = p.gpu(&g.model);
            let t = types.entry(g.model.clone()).or_insert(wire::GpuType {
                model: g.model.clone(),
                vram: g.vram,
                total: 0,
                free: 0,
                on_demand_price: price.on_demand,
                interruptible_floor: price.interruptible,
                interruptible_price: f64::INFINITY,
                currency: p.currency.clone(),
            });
            t.total += 1;
            let free = g.allocated_milli == 0;
            t.free += u32::from(free);
            // A free GPU rents at the floor; a held one to a bid above its holder's.
            let here = if free {
                Some(price.interruptible)
            } else {
                lowest_bid.get(g.uuid.as_str()).map(|b| b + 0.001)
            };
            if let Some(h) = here {
                t.interruptible_price = t.interruptible_price.min(h.max(price.interruptible));
            }
        }
        Ok(types
            .into_values()
            .map(|mut t| {
                // Every GPU held on demand: no bid gets one now; the floor is shown.
                if !t.interruptible_price.is_finite() {
                    t.interruptible_price = t.interruptible_floor;
                }
                t
            })
            .collect())
    }
}

/// Sums the rows into one line per subject, resource line and price.
fn report(
    rows: Vec<UsageRow>,
    names: &BTreeMap<String, String>,
    from: i64,
    to: i64,
    now: i64,
    currency: &str,
) -> wire::UsageReport {
    let mut lines: BTreeMap<(String, String, u64), wire::UsageLine> = BTreeMap::new();
    for u in rows {
        let ms = clipped_ms(&u, from, to, now);
        if ms == 0 {
            continue;
        }
        let key = (u.subject_id.clone(), u.line.clone(), u.unit_price.to_bits());
        let l = lines.entry(key).or_insert_with(|| wire::UsageLine {
            tenant: names
                .get(&u.tenant_id)
                .cloned()
                .unwrap_or_else(|| u.tenant_id.clone()),
            subject: u.subject.clone(),
            id: if u.subject == "volume" {
                u.name.clone()
            } else {
                u.subject_id.clone()
            },
            name: u.name.clone(),
            resource: u.resource.clone(),
            model: (!u.model.is_empty()).then(|| u.model.clone()),
            milli: (u.resource == "gpu").then_some(u.milli),
            interruptible: u.interruptible,
            seconds: 0.0,
            unit_seconds: 0.0,
            unit_price: u.unit_price,
            cost: 0.0,
        });
        l.seconds += ms as f64 / 1000.0;
        l.unit_seconds += u.quantity * ms as f64 / 1000.0;
        l.cost += cost(&u, ms);
    }
    let lines: Vec<wire::UsageLine> = lines.into_values().collect();
    wire::UsageReport {
        from,
        to,
        currency: currency.to_string(),
        total_cost: lines.iter().map(|l| l.cost).sum(),
        lines,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::InstanceSpec;
    use gpuvisor_wire::GpuBinding;

    fn inst(state: InstanceState, gpus: &[(&str, u32)], spot: Option<f64>) -> InstanceRow {
        InstanceRow {
            id: "i1".into(),
            name: "one".into(),
            tenant_id: "t1".into(),
            node_id: "n".into(),
            image: "busybox".into(),
            state,
            desired: InstanceState::Running,
            reason: None,
            spec: InstanceSpec {
                vcpus: 2,
                memory: 4 << 30,
                container_disk: 10 << 30,
                interruptible: spot.is_some(),
                bid_per_gpu_hour: spot.filter(|b| *b > 0.0),
                ..Default::default()
            },
            cpus: vec![0, 1],
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(n, (model, milli))| GpuBinding {
                    uuid: format!("GPU-{n}"),
                    index: n as u32,
                    model: model.to_string(),
                    milli: *milli,
                    vram: 0,
                })
                .collect(),
            ip_host: 2,
            created_at: 0,
            updated_at: 0,
            restart: Default::default(),
            runtime: Default::default(),
        }
    }

    #[test]
    fn a_running_instance_pays_for_gpus_cpus_memory_and_disk() {
        let p = Pricing::default();
        let i = inst(
            InstanceState::Running,
            &[("A100-80GB", 1000), ("A100-80GB", 1000)],
            None,
        );
        let l = instance_lines(&p, &i);
        let names: Vec<&str> = l.iter().map(|u| u.line.as_str()).collect();
        assert_eq!(names, ["gpu:A100-80GB:1000", "vcpu", "memory", "disk"]);
        assert_eq!(l[0].quantity, 2.0);
        assert_eq!(l[0].unit_price, p.gpu("A100-80GB").on_demand);
        assert_eq!(l[2].quantity, 4.0);
        assert_eq!(l[3].quantity, 10.0);
        // Stopped: still reserved, so still paid for. Interrupted, or being evicted: nothing.
        let stopped = instance_lines(&p, &inst(InstanceState::Stopped, &[], None));
        assert_eq!(stopped.len(), 3, "vcpu, memory, disk: {stopped:?}");
        assert!(instance_lines(&p, &inst(InstanceState::Interrupted, &[], None)).is_empty());
        let mut evicted = inst(InstanceState::Running, &[("A100-80GB", 1000)], Some(2.0));
        evicted.desired = InstanceState::Interrupted;
        assert!(
            instance_lines(&p, &evicted).is_empty(),
            "its GPU is the preemptor's"
        );
    }

    #[test]
    fn a_fraction_and_a_spot_pay_their_share_and_their_bid() {
        let p = Pricing::default();
        let frac = instance_lines(
            &p,
            &inst(InstanceState::Running, &[("H100-80GB", 250)], None),
        );
        assert_eq!(frac[0].line, "gpu:H100-80GB:250");
        assert_eq!(frac[0].quantity, 0.25);
        let spot = instance_lines(
            &p,
            &inst(InstanceState::Running, &[("H100-80GB", 1000)], Some(2.0)),
        );
        assert_eq!(spot[0].line, "gpu:H100-80GB:1000:i");
        assert_eq!(spot[0].unit_price, 2.0);
        assert!(spot[0].interruptible);
        // Without a recorded bid: the floor.
        let floor = instance_lines(
            &p,
            &inst(InstanceState::Running, &[("H100-80GB", 1000)], Some(0.0)),
        );
        assert_eq!(floor[0].unit_price, p.gpu("H100-80GB").interruptible);
    }

    #[test]
    fn a_step_keeps_what_holds_and_reopens_what_changed() {
        let p = Pricing::default();
        let mut open = instance_lines(&p, &inst(InstanceState::Running, &[], None));
        for (n, u) in open.iter_mut().enumerate() {
            u.start_ms = 100 + n as i64;
        }
        // Same state: nothing to do.
        let (close, new) = plan(
            open.clone(),
            instance_lines(&p, &inst(InstanceState::Running, &[], None)),
        );
        assert!(close.is_empty() && new.is_empty(), "{close:?} {new:?}");
        // Resized: vcpu closes and reopens at the new size; memory and disk hold.
        let mut bigger = inst(InstanceState::Running, &[], None);
        bigger.spec.vcpus = 4;
        let (close, new) = plan(open.clone(), instance_lines(&p, &bigger));
        assert_eq!(close, vec![("i1".to_string(), "vcpu".to_string(), 100)]);
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].quantity, 4.0);
        // Stopped: still reserved, nothing changes. Terminated: everything closes.
        let (close, _) = plan(
            open.clone(),
            instance_lines(&p, &inst(InstanceState::Stopped, &[], None)),
        );
        assert!(close.is_empty(), "{close:?}");
        let (close, new) = plan(
            open,
            instance_lines(&p, &inst(InstanceState::Terminated, &[], None)),
        );
        assert_eq!(close.len(), 3);
        assert!(new.is_empty());
    }

    #[test]
    fn a_report_clips_intervals_to_its_range_and_costs_them() {
        let p = Pricing::default();
        let mut rows = instance_lines(&p, &inst(InstanceState::Running, &[], None));
        rows.truncate(1); // vcpu: 2 × 0.01/h
        rows[0].start_ms = 0;
        rows[0].end_ms = 7_200_000;
        rows[0].open = false;
        let names = BTreeMap::from([("t1".to_string(), "acme".to_string())]);
        let r = report(rows.clone(), &names, 3_600_000, 10_800_000, 0, "USD");
        assert_eq!(r.lines.len(), 1);
        let l = &r.lines[0];
        assert_eq!(l.tenant, "acme");
        assert_eq!(l.seconds, 3600.0);
        assert_eq!(l.unit_seconds, 7200.0);
        assert!((l.cost - 0.02).abs() < 1e-12, "{}", l.cost);
        assert!((r.total_cost - 0.02).abs() < 1e-12);
        // An open interval runs to now.
        rows[0].open = true;
        let r = report(rows, &names, 0, i64::MAX, 10_800_000, "USD");
        assert_eq!(r.lines[0].seconds, 10_800.0);
    }

    #[test]
    fn report_bounds_take_durations_dates_and_rfc3339() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time("from", "2h", now).ok(), Some(now - 7_200_000));
        assert_eq!(
            parse_time("from", "1700000000000", now).ok(),
            Some(1_700_000_000_000)
        );
        assert_eq!(
            parse_time("from", "2026-12-01T00:00:00Z", now).ok(),
            Some(1_796_083_200_000)
        );
        assert_eq!(
            parse_time("from", "2026-12-01", now).ok(),
            Some(1_796_083_200_000)
        );
        assert!(parse_time("from", "yesterday", now).is_err());
    }
}
