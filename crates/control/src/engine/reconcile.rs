//! The reconciler: the only part of the engine that changes the host. It compares each
//! instance's desired state with what the store and the runtime say, and takes one step
//! towards it under the instance's lock. At start-up and every few seconds it also sweeps host
//! objects that no live instance owns (what a crash mid-create or mid-terminate leaves behind).

use super::Engine;
use crate::error::{EngineError, Result};
use crate::store::InstanceRow;
use gpuvisor_node::instance::Priority;
use gpuvisor_node::limiter::GpuShare;
use gpuvisor_node::InstancePlan;
use gpuvisor_wire::InstanceState as S;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the reconciler will do with an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Provision,
    /// The container ended on its own.
    Exited,
    Stop,
    Terminate,
    /// Evict for a preemptor: stop like `Stop`, end `interrupted`.
    Interrupt,
}

/// `running`: the instances whose container runs, or `None` on a pass that does not look
/// (a running instance is then taken to be still running).
fn step(i: &InstanceRow, running: Option<&BTreeSet<String>>) -> Option<Step> {
    match (i.desired, i.state) {
        (S::Terminated, S::Terminated) => None,
        (S::Terminated, _) => Some(Step::Terminate),
        (S::Interrupted, S::Interrupted) => None,
        (S::Interrupted, _) => Some(Step::Interrupt),
        (S::Stopped, S::Pending | S::Provisioning | S::Running | S::Stopping) => Some(Step::Stop),
        (S::Running, S::Pending | S::Provisioning | S::Stopped) => Some(Step::Provision),
        (S::Running, S::Running) if running.is_none_or(|r| r.contains(&i.id)) => None,
        (S::Running, S::Running) => Some(Step::Exited),
        (S::Running, S::Stopping) => Some(Step::Stop),
        _ => None,
    }
}

/// Where a step takes an instance on a simulated node, which owns nothing on this host (it
/// never "exits": it runs until stopped).
fn simulated_step(step: Step) -> Option<(S, &'static str)> {
    match step {
        Step::Provision => Some((S::Running, "running (simulated node)")),
        Step::Stop => Some((S::Stopped, "stopped (simulated node)")),
        Step::Interrupt => Some((S::Interrupted, "interrupted; resources released")),
        Step::Terminate => Some((S::Terminated, "terminated")),
        Step::Exited => None,
    }
}

/// States whose instances may own host objects right now.
fn owns_host_objects(s: S) -> bool {
    matches!(
        s,
        S::Pending | S::Provisioning | S::Running | S::Stopping | S::Terminating
    )
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EngineError::Internal(format!("host task: {e}")))
}

impl Engine {
    /// Runs until the process ends: one pass now, then on every wake-up or resync period.
    pub async fn run_reconciler(self: Arc<Self>) {
        let sweep_every = Duration::from_secs(30);
        let mut last_sweep: Option<Instant> = None;
        let mut last_exit_check: Option<Instant> = None;
        loop {
            if last_sweep.is_none_or(|t| t.elapsed() >= sweep_every) {
                if let Err(e) = self.sweep_orphans().await {
                    tracing::warn!("orphan sweep: {e}");
                }
                if let Err(e) = self.follow_mig_changes().await {
                    tracing::warn!("MIG inventory refresh: {e}");
                }
                last_sweep = Some(Instant::now());
            }
            // Whether containers still run is looked at once per resync period, not on every
            // wake-up: that look reads every instance's pid, so a create on a full host would
            // otherwise pay for all the others.
            let check_exits = last_exit_check.is_none_or(|t| t.elapsed() >= self.cfg.resync);
            if check_exits {
                last_exit_check = Some(Instant::now());
            }
            if let Err(e) = self.pass(check_exits).await {
                tracing::warn!("reconcile: {e}");
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.cfg.resync) => {}
            }
        }
    }

    /// Feeds the GPU limiters of fractional instances (4 Hz) where the GPU backend measures
    /// per-process utilisation and memory (NVML; the simulated backend's process tables): each
    /// instance's utilisation and the high-priority load on its GPUs go into its region (the
    /// compute-share controller runs there), and an instance whose processes hold more GPU
    /// memory than its quota, as the driver counts it, gets the configured action (kill those
    /// processes, by default) and an event. Elsewhere (sysfs) it returns at once: fractions are
    /// VRAM-only there, enforced by the library alone (see [`Engine::fraction_guarantee`]).
    pub async fn run_limiter_sampler(self: Arc<Self>) {
        if !self.node.gpu.measures_processes() {
            return;
        }
        let mut since = 0u64;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let Ok(live) = self.store.live_instances(None).await else {
                continue;
            };
            let fractional: Vec<(String, Vec<String>)> = live
                .iter()
                .filter(|i| i.state == S::Running && i.gpus.iter().any(|g| g.milli < 1000))
                .filter(|i| !self.is_simulated(i))
                .map(|i| {
                    (
                        i.id.clone(),
                        i.gpus.iter().map(|g| g.uuid.clone()).collect(),
                    )
                })
                .collect();
            if fractional.is_empty() {
                continue;
            }
            let node = self.node.clone();
            let Ok(sample) = blocking(move || node.sample_limiters(&fractional, since)).await
            else {
                continue;
            };
            since = sample.newest_us;
            for over in sample.over_quota {
                self.over_quota(over).await;
            }
        }
    }

    /// The outside check's action on an instance over its VRAM quota.
    async fn over_quota(&self, o: gpuvisor_node::limiter::OverQuota) {
        use gpuvisor_node::limiter::OverQuotaAction;
        let what = format!(
            "GPU {}: its processes hold {} bytes, quota {} (the limiter was bypassed)",
            o.uuid, o.used, o.quota
        );
        match self.node.cfg.limiter_over_quota {
            OverQuotaAction::Event => {
                self.event(&o.id, "gpu_over_quota", what).await;
            }
            OverQuotaAction::Kill => {
                let (node, id, pids) = (self.node.clone(), o.id.clone(), o.pids.clone());
                let killed = blocking(move || node.kill_instance_processes(&id, &pids))
                    .await
                    .unwrap_or_default();
                if killed.is_empty() {
                    return;
                }
                tracing::warn!(instance = %o.id, pids = ?killed, "over GPU memory quota: killed");
                self.event(
                    &o.id,
                    "gpu_over_quota",
                    format!("{what}; killed processes {killed:?}"),
                )
                .await;
            }
        }
    }

    /// What a GPU fraction of an instance with `gpus` guarantees on this host, for the create
    /// answer and `instance get`; `None` for whole GPUs (and instances without GPUs).
    pub(crate) fn fraction_guarantee(
        &self,
        gpus: &[gpuvisor_wire::GpuBinding],
    ) -> Option<gpuvisor_wire::FractionGuarantee> {
        if !gpus.iter().any(|g| g.milli < 1000) {
            return None;
        }
        let measured = self.node.gpu.measures_processes();
        Some(gpuvisor_wire::FractionGuarantee {
            vram_quota_enforced: true,
            compute_share_enforced: measured,
            bypass_detection: measured,
            summary: if measured {
                "VRAM quota and compute share enforced for programs that use the CUDA driver API \
                 through the dynamic loader (libgpuvisor_limiter.so); a process that bypasses it \
                 and goes over the VRAM quota is detected from the driver's per-process counts \
                 and killed; no fault or memory isolation from other instances on the GPU (that \
                 needs a MIG slice or a whole GPU)"
                    .into()
            } else {
                "VRAM quota only, for programs that use the CUDA driver API through the dynamic \
                 loader (libgpuvisor_limiter.so): this host's GPU backend cannot measure \
                 per-process utilisation, so the compute share is NOT enforced and bypasses are \
                 not detected; no fault or memory isolation (that needs a MIG slice or a whole GPU)"
                    .into()
            },
        })
    }

    /// Looks at every live instance once and starts work where needed (each instance in its own
    /// task, so a slow stop does not hold up a create).
    pub async fn reconcile_pass(self: &Arc<Self>) -> Result<()> {
        self.pass(true).await
    }

    /// [`Engine::reconcile_pass`]; `check_exits`: also look which containers still run.
    async fn pass(self: &Arc<Self>, check_exits: bool) -> Result<()> {
        let live = self.store.live_instances(None).await?;
        if live.is_empty() {
            return Ok(());
        }
        let running = if check_exits {
            let node = self.node.clone();
            Some(blocking(move || node.running()).await?)
        } else {
            None
        };
        // GPUs still held by instances being evicted: their preemptors wait for them.
        let evicting: BTreeSet<String> = live
            .iter()
            .filter(|i| i.desired == S::Interrupted && i.state != S::Interrupted)
            .flat_map(|i| i.gpus.iter().map(|g| g.uuid.clone()))
            .collect();
        for i in live {
            let on_host = !self.is_simulated(&i);
            let Some(step) = step(&i, running.as_ref()) else {
                continue;
            };
            if step == Step::Provision && i.gpus.iter().any(|g| evicting.contains(&g.uuid)) {
                continue;
            }
            if !on_host {
                // A simulated node: nothing to provision or stop; only the state moves.
                if let Some((to, msg)) = simulated_step(step) {
                    let reason =
                        (to == S::Interrupted).then_some("preempted by a higher-priority instance");
                    self.set(&i.id, to, reason, "state", msg.into()).await?;
                }
                continue;
            }
            let lock = self.lock_for(&i.id);
            let Ok(guard) = lock.try_lock_owned() else {
                continue; // already being worked on
            };
            let me = self.clone();
            tokio::spawn(async move {
                let id = i.id.clone();
                if let Err(e) = me.act(i, step).await {
                    tracing::warn!(instance = %id, "{e}");
                }
                drop(guard);
                // Something may have changed while we worked: look again.
                me.wake.notify_one();
            });
        }
        Ok(())
    }

    async fn plan(&self, i: &InstanceRow) -> Result<InstancePlan> {
        let tenant = self.store.tenant(&i.tenant_id).await?.ok_or_else(|| {
            EngineError::Internal(format!("tenant {} of {} is gone", i.tenant_id, i.id))
        })?;
        let image = self.store.image(&i.image).await?.ok_or_else(|| {
            EngineError::Internal(format!("image {} of instance {} is gone", i.image, i.id))
        })?;
        Ok(InstancePlan {
            id: i.id.clone(),
            tenant_id: i.tenant_id.clone(),
            hostname: i.name.clone(),
            image_digest: image.digest,
            layers: image.layers,
            disk_size: i.spec.container_disk,
            volumes: i
                .spec
                .volumes
                .iter()
                .map(|v| (v.name.clone(), PathBuf::from(&v.path)))
                .collect(),
            net_slot: tenant.net_slot,
            ip_host: i.ip_host,
            args: i.spec.command.clone(),
            env: i.spec.env.clone(),
            cpus: i.cpus.clone(),
            memory: i.spec.memory,
            gpus: i.gpus.iter().map(|g| g.uuid.clone()).collect(),
            // A share of a GPU is enforced by the limiter; whole GPUs need none.
            gpu_shares: if i.gpus.iter().any(|g| g.milli < 1000) {
                i.gpus
                    .iter()
                    .map(|g| GpuShare {
                        vram: g.vram,
                        milli: g.milli,
                    })
                    .collect()
            } else {
                Vec::new()
            },
            priority: if i.spec.priority == gpuvisor_wire::PriorityClass::High {
                Priority::High
            } else {
                Priority::Low
            },
        })
    }

    async fn set(
        &self,
        id: &str,
        st: S,
        reason: Option<&str>,
        kind: &str,
        msg: String,
    ) -> Result<()> {
        // Event first: whoever sees the new state (a `--wait`) also finds its event.
        self.event(id, kind, msg).await;
        self.set_state(id, st, reason).await
    }

    async fn teardown(&self, id: &str, stop_first: bool) -> Result<()> {
        let (node, rid, grace) = (self.node.clone(), id.to_string(), self.cfg.stop_grace);
        blocking(move || {
            if stop_first {
                node.stop(&rid, grace)?;
            }
            node.teardown(&rid)
        })
        .await??;
        Ok(())
    }

    async fn act(&self, i: InstanceRow, step: Step) -> Result<()> {
        // Re-read under the lock: the decision was taken on a snapshot.
        let Some(i) = self.store.instance(&i.id).await? else {
            return Ok(());
        };
        let id = i.id.clone();
        match step {
            Step::Provision => {
                if !matches!(
                    (i.desired, i.state),
                    (S::Running, S::Pending | S::Provisioning | S::Stopped)
                ) {
                    return Ok(());
                }
                if i.state != S::Provisioning {
                    self.set(&id, S::Provisioning, None, "state", "provisioning".into())
                        .await?;
                }
                let plan = self.plan(&i).await;
                let node = self.node.clone();
                let result = match plan {
                    Ok(plan) => blocking(move || node.provision(&plan))
                        .await?
                        .map_err(EngineError::from),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => {
                        self.set(&id, S::Running, None, "state", "running".into())
                            .await?;
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        tracing::warn!(instance = %id, "provisioning failed: {reason}");
                        // Roll back everything the attempt created; the instance keeps its
                        // reservation so `start` can retry.
                        if let Err(t) = self.teardown(&id, false).await {
                            tracing::warn!(instance = %id, "rollback: {t}");
                        }
                        self.set(&id, S::Failed, Some(&reason), "failed", reason.clone())
                            .await?;
                    }
                }
            }
            Step::Exited => {
                if (i.desired, i.state) != (S::Running, S::Running) {
                    return Ok(());
                }
                self.teardown(&id, false).await?;
                self.set_desired_state(&id, S::Stopped).await?;
                self.set(
                    &id,
                    S::Stopped,
                    Some("the main process exited"),
                    "exited",
                    "the main process exited; container disk wiped".into(),
                )
                .await?;
            }
            Step::Stop => {
                if i.state != S::Stopping {
                    self.set(&id, S::Stopping, None, "state", "stopping".into())
                        .await?;
                }
                // A `start` that arrives meanwhile finds `stopped` and provisions on the next pass.
                self.teardown(&id, true).await?;
                self.set(
                    &id,
                    S::Stopped,
                    None,
                    "state",
                    "stopped; container disk wiped".into(),
                )
                .await?;
            }
            Step::Interrupt => {
                if !matches!(i.state, S::Stopping) {
                    self.set(
                        &id,
                        S::Stopping,
                        None,
                        "state",
                        "stopping for a preemptor".into(),
                    )
                    .await?;
                }
                self.teardown(&id, owns_host_objects(i.state)).await?;
                self.set(
                    &id,
                    S::Interrupted,
                    Some("preempted by a higher-priority instance"),
                    "state",
                    "interrupted; resources released".into(),
                )
                .await?;
            }
            Step::Terminate => {
                if i.state != S::Terminating {
                    self.set(&id, S::Terminating, None, "state", "terminating".into())
                        .await?;
                }
                self.teardown(&id, owns_host_objects(i.state)).await?;
                let node = self.node.clone();
                let rid = id.clone();
                blocking(move || node.forget(&rid)).await?;
                self.set(&id, S::Terminated, None, "state", "terminated".into())
                    .await?;
                self.drop_lock(&id);
            }
        }
        Ok(())
    }

    /// Removes host objects that belong to no instance that should have them: terminated,
    /// stopped and failed instances, and unknown ids with a trace in our data dir. An unknown id
    /// seen only in host-wide namespaces is left alone: it may be another daemon's (every host
    /// object of ours is created after its instance row, so ours always have a row).
    pub async fn sweep_orphans(&self) -> Result<Vec<String>> {
        // Instance isolation lives in our iptables chains: put them back if they were flushed.
        let node = self.node.clone();
        if let Err(e) = blocking(move || node.net.repair_host()).await? {
            tracing::warn!("cannot rebuild the instance network chains: {e}");
        }
        let node = self.node.clone();
        let (local, global): (BTreeSet<String>, BTreeSet<String>) =
            blocking(move || node.ids_with_objects()).await??;
        let mut cleaned = Vec::new();
        for (id, ours) in local
            .into_iter()
            .map(|i| (i, true))
            .chain(global.into_iter().map(|i| (i, false)))
        {
            let lock = self.lock_for(&id);
            let Ok(_guard) = lock.try_lock() else {
                continue; // being worked on right now: not an orphan
            };
            let row = self.store.instance(&id).await?;
            if row.as_ref().is_some_and(|r| owns_host_objects(r.state)) || (row.is_none() && !ours)
            {
                continue;
            }
            tracing::info!(instance = %id, "removing orphaned host objects");
            self.teardown(&id, false).await?;
            cleaned.push(id);
        }
        Ok(cleaned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::InstanceSpec;

    fn row(desired: S, state: S) -> InstanceRow {
        InstanceRow {
            id: "aaaaaaaaaaaa".into(),
            name: "n".into(),
            tenant_id: "t".into(),
            node_id: "n".into(),
            image: "img".into(),
            state,
            desired,
            reason: None,
            spec: InstanceSpec::default(),
            cpus: vec![],
            gpus: vec![],
            ip_host: 2,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn steps_follow_desired_state() {
        let none = BTreeSet::new();
        let running = BTreeSet::from(["aaaaaaaaaaaa".to_string()]);
        assert_eq!(
            step(&row(S::Running, S::Pending), Some(&none)),
            Some(Step::Provision)
        );
        assert_eq!(
            step(&row(S::Running, S::Provisioning), Some(&none)),
            Some(Step::Provision)
        );
        assert_eq!(step(&row(S::Running, S::Running), Some(&running)), None);
        // A pass that does not look takes a running instance to be running.
        assert_eq!(step(&row(S::Running, S::Running), None), None);
        assert_eq!(
            step(&row(S::Running, S::Running), Some(&none)),
            Some(Step::Exited)
        );
        assert_eq!(
            step(&row(S::Stopped, S::Running), Some(&running)),
            Some(Step::Stop)
        );
        assert_eq!(step(&row(S::Stopped, S::Stopped), Some(&none)), None);
        assert_eq!(step(&row(S::Running, S::Failed), Some(&none)), None);
        assert_eq!(
            step(&row(S::Terminated, S::Stopped), Some(&none)),
            Some(Step::Terminate)
        );
        assert_eq!(step(&row(S::Terminated, S::Terminated), Some(&none)), None);
    }
}
