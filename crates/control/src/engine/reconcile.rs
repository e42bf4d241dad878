//! The reconciler: the only part of the engine that changes the host. It compares each
//! instance's desired state with what the store and the runtime say, and takes one step
//! towards it under the instance's lock. At start-up and every few seconds it also sweeps host
//! objects that no live instance owns (what a crash mid-create or mid-terminate leaves behind)
//! and finishes or rolls back volumes a crash left `pending`.
//!
//! Restarts: an instance whose main process is gone while its desired state is running (it
//! exited, or the host rebooted and took every host object with it) is torn down and, if its
//! restart policy says so, goes back to `pending` with a `not_before` time; the next pass
//! provisions it again from scratch: fresh container disk, same volumes and GPUs. The delay
//! doubles from 1 s to 5 min while the instance keeps exiting within 10 s of starting, whether
//! or not its exit status is known; only a run that started before this daemon process (found
//! gone at start, e.g. after a reboot) is restarted at once.
//! Exit codes come from `waitpid`: the daemon is the child subreaper of the containers it
//! starts (`gpuvisor_node::reap`); a process that ended under an earlier daemon has an unknown
//! status, which counts as a failure.

use super::{Engine, SeenExit};
use crate::error::{EngineError, Result};
use crate::store::InstanceRow;
use gpuvisor_node::instance::Priority;
use gpuvisor_node::limiter::GpuShare;
use gpuvisor_node::reap::{self, Reaped};
use gpuvisor_node::snapshot::SnapshotSource;
use gpuvisor_node::InstancePlan;
use gpuvisor_wire::InstanceState as S;
use gpuvisor_wire::VolumeState;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why an evicted instance is `interrupted` (its `preempted` event says by what).
pub const PREEMPTED: &str =
    "preempted by a higher priority class, an on-demand instance or a higher bid";

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

/// First delay of an automatic restart, and its cap.
const BACKOFF_FIRST_MS: i64 = 1_000;
const BACKOFF_MAX_MS: i64 = 300_000;
/// A run at least this long resets the backoff to its first delay.
const BACKOFF_RESET_AFTER_MS: i64 = 10_000;

/// The delay before the next automatic restart: the first delay after a run of 10 s or more (or
/// for the first restart), else twice the last one, capped.
fn next_backoff(last_ms: i64, ran_ms: i64) -> i64 {
    if last_ms <= 0 || ran_ms >= BACKOFF_RESET_AFTER_MS {
        BACKOFF_FIRST_MS
    } else {
        last_ms.saturating_mul(2).min(BACKOFF_MAX_MS)
    }
}

/// The delay before restarting an instance that exited: the backoff of [`next_backoff`],
/// from how long its run lasted, whether or not its exit status is known (a failed `prctl`, a
/// daemon restart while it ran, a cgroup v1 zombie...); none only for a run that started before
/// this daemon did (`daemon_started`, unix ms): found gone at start, as after a host reboot.
fn restart_delay(r: &crate::store::RestartRow, now: i64, daemon_started: i64) -> i64 {
    if r.started_at < daemon_started {
        0
    } else {
        next_backoff(r.backoff_ms, now - r.started_at)
    }
}

/// `running`: the instances whose container runs, or `None` on a pass that does not look (a
/// running instance is then taken to be still running).
fn step(i: &InstanceRow, running: Option<&BTreeSet<String>>, now: i64) -> Option<Step> {
    match (i.desired, i.state) {
        // Waiting out a restart's backoff.
        (S::Running, S::Pending) if i.restart.not_before > now => None,
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

use super::blocking;

impl Engine {
    /// Runs until the process ends: one pass now, then on every wake-up or resync period.
    pub async fn run_reconciler(self: Arc<Self>) {
        // Containers started from here become our children when `runc` exits: their exit
        // codes are what restart policies decide on.
        if let Err(e) = reap::become_subreaper() {
            tracing::warn!("exit codes of instances will be unknown: {e}");
        }
        let sweep_every = self.cfg.sweep_every;
        let mut last_sweep: Option<Instant> = None;
        let mut zombies = std::collections::HashSet::new();
        let mut last_exit_check: Option<Instant> = None;
        loop {
            if last_sweep.is_none_or(|t| t.elapsed() >= sweep_every) {
                if let Err(e) = self.finish_pending_volumes().await {
                    tracing::warn!("pending volumes: {e}");
                }
                if let Err(e) = self.sweep_orphans().await {
                    tracing::warn!("orphan sweep: {e}");
                }
                let node = self.node.clone();
                let seen = std::mem::take(&mut zombies);
                zombies = blocking(move || {
                    let mut seen = seen;
                    reap::reap_stale_zombies(&node, &mut seen);
                    seen
                })
                .await
                .unwrap_or_default();
                if let Err(e) = self.follow_mig_changes().await {
                    tracing::warn!("MIG inventory refresh: {e}");
                }
                last_sweep = Some(Instant::now());
            }
            let mut pause = self.cfg.resync;
            let check_exits = last_exit_check.is_none_or(|t| t.elapsed() >= self.cfg.resync);
            if check_exits {
                last_exit_check = Some(Instant::now());
            }
            match self.reconcile_pass_due(check_exits).await {
                Ok(Some(due)) => {
                    let ms = u64::try_from(due - super::now_ms()).unwrap_or(0);
                    pause = pause.min(Duration::from_millis(ms));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("reconcile: {e}"),
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
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
        self.reconcile_pass_due(true).await.map(|_| ())
    }

    /// [`Engine::reconcile_pass`], answering the earliest time (unix ms) an instance waiting
    /// out a restart backoff is due.
    /// `check_exits`: also look which containers still run (a read of every instance's pid,
    /// done once per resync period, not on every wake-up: a create on a full host would
    /// otherwise pay for all the others).
    async fn reconcile_pass_due(self: &Arc<Self>, check_exits: bool) -> Result<Option<i64>> {
        // `tenant rm --cascade`: a tenant whose last instance is gone goes too.
        self.finish_tenant_deletions().await?;
        let live = self.store.live_instances(None).await?;
        if live.is_empty() {
            return Ok(None);
        }
        let now = super::now_ms();
        let due = live
            .iter()
            .filter(|i| (i.desired, i.state) == (S::Running, S::Pending))
            .map(|i| i.restart.not_before)
            .filter(|t| *t > now)
            .min();
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
            // A live migration to another node is unresolved: the guest may run there, so
            // this copy is neither restarted nor removed here (`remote::run_departures`).
            if i.spec.outgoing.is_some() && i.state != S::Terminated {
                continue;
            }
            let Some(step) = step(&i, running.as_ref(), now) else {
                continue;
            };
            if step == Step::Provision && i.gpus.iter().any(|g| evicting.contains(&g.uuid)) {
                continue;
            }
            if !on_host {
                // A simulated node: nothing to provision or stop; only the state moves.
                if let Some((to, msg)) = simulated_step(step) {
                    let reason = (to == S::Interrupted).then_some(PREEMPTED);
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
                let again = match me.act(i, step).await {
                    Ok(again) => again,
                    Err(e) => {
                        tracing::warn!(instance = %id, "{e}");
                        true
                    }
                };
                drop(guard);
                // Something may have changed while we worked: look again (not when it waits
                // for a volume: that would spin until the volume is ready).
                if again {
                    me.wake.notify_one();
                }
            });
        }
        Ok(due)
    }

    /// A hidden test hook: with `GPUVISOR_TEST_HOLD_EXIT_MS=N` in the daemon's environment, the
    /// reconciler records a `test_hold` event and waits N ms at the named point, so a test can
    /// make a request land there deterministically. Without it (always, outside tests) it does
    /// nothing.
    async fn test_hold(&self, point: &str, id: &str) {
        let Some(ms) = std::env::var("GPUVISOR_TEST_HOLD_EXIT_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return;
        };
        self.event(id, "test_hold", format!("holding {point} for {ms} ms"))
            .await;
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// A hidden test hook: with `GPUVISOR_TEST_FAIL_EXIT_TEARDOWN=1` in the daemon's
    /// environment, the first teardown after each instance's exit fails (as a busy mount
    /// would), so a test can check what the retry keeps. Without it it does nothing.
    fn test_fail_exit_teardown(&self, id: &str) -> Result<()> {
        static FAILED: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());
        if std::env::var("GPUVISOR_TEST_FAIL_EXIT_TEARDOWN").as_deref() != Ok("1") {
            return Ok(());
        }
        if FAILED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string())
        {
            return Err(EngineError::Internal(
                "test hook: the teardown after the exit failed".into(),
            ));
        }
        Ok(())
    }

    pub(crate) async fn plan(&self, i: &InstanceRow) -> Result<InstancePlan> {
        let tenant = self.store.tenant(&i.tenant_id).await?.ok_or_else(|| {
            EngineError::Internal(format!("tenant {} of {} is gone", i.tenant_id, i.id))
        })?;
        let image = self
            .store
            .image_visible(&i.tenant_id, &i.image)
            .await?
            .ok_or_else(|| {
                EngineError::Internal(format!("image {} of instance {} is gone", i.image, i.id))
            })?;
        Ok(InstancePlan {
            id: i.id.clone(),
            runtime: i.runtime,
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
            disk_io: i.spec.disk_io,
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
            ssh_keys: i.spec.ssh_keys.clone(),
            startup_script: i.spec.startup_script.clone(),
            packages: i.spec.packages.clone(),
            from_snapshot: self.snapshot_source(&i.spec)?,
            incoming: None,
        })
    }

    /// Where the instance's new disks come from: a restore still to apply (with the VM's
    /// running state when the snapshot has it), else the snapshot it was cloned from (disks
    /// only), else nowhere (the image).
    fn snapshot_source(&self, spec: &crate::store::InstanceSpec) -> Result<Option<SnapshotSource>> {
        let pending = spec.restore.as_ref().filter(|r| !r.applied);
        Ok(match (pending, &spec.from_snapshot) {
            (Some(r), _) => Some(SnapshotSource {
                dir: self.node.snapshot_dir(&r.snapshot)?,
                memory: r.memory,
            }),
            (None, Some(sid)) => Some(SnapshotSource {
                dir: self.node.snapshot_dir(sid)?,
                memory: false,
            }),
            (None, None) => None,
        })
    }

    /// A restore is applied once the instance runs from it: the next provision (a restart, a
    /// start after a stop) starts from the image (or the snapshot it was cloned from) again.
    /// Called under the instance's lock.
    async fn restore_applied(&self, id: &str) -> Result<()> {
        let Some(mut row) = self.store.instance(id).await? else {
            return Ok(());
        };
        if let Some(r) = row.spec.restore.as_mut().filter(|r| !r.applied) {
            r.applied = true;
            let sid = r.snapshot.clone();
            self.store.set_spec(id, &row.spec, self.tick()).await?;
            tracing::info!(instance = %id, snapshot = %sid, "restore applied");
        }
        Ok(())
    }

    /// Drops the instance's restore before a provision: an applied one (the instance starts
    /// from its image again), or, with `failed`, one whose provision failed (a snapshot that
    /// no longer loads must not hold the instance failing at every start; the event says so
    /// and `instance restore` may be asked again). Answers the row as it is now.
    async fn drop_restore(&self, i: &InstanceRow, failed: Option<&str>) -> Result<InstanceRow> {
        let mut row = i.clone();
        let Some(r) = row.spec.restore.take() else {
            return Ok(row);
        };
        if !r.applied && failed.is_none() {
            row.spec.restore = Some(r);
            return Ok(row);
        }
        self.store.set_spec(&i.id, &row.spec, self.tick()).await?;
        if let Some(why) = failed {
            self.event(
                &i.id,
                "restore_failed",
                format!(
                    "the restore from snapshot {} failed ({why}): the next start is from the instance's image",
                    r.snapshot
                ),
            )
            .await;
        }
        Ok(row)
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

    /// [`Engine::set`] with the restart bookkeeping in the same store write.
    async fn set_with_restart(
        &self,
        id: &str,
        st: S,
        reason: Option<&str>,
        kind: &str,
        msg: String,
        r: &crate::store::RestartRow,
    ) -> Result<()> {
        self.event(id, kind, msg).await;
        self.set_state_and_restart(id, st, reason, r).await
    }

    pub(crate) async fn teardown(&self, id: &str, stop_first: bool) -> Result<()> {
        let (node, rid, grace) = (self.node.clone(), id.to_string(), self.cfg.stop_grace);
        blocking(move || {
            // Named before the bundle goes: a killed init of ours is reaped, not left a zombie.
            let init = reap::init(&node, &rid);
            let stopped = if stop_first {
                node.stop(&rid, grace)
            } else {
                Ok(())
            };
            let done = stopped.and_then(|()| node.teardown(&rid));
            if let Some(init) = init {
                reap::reap(&node, &init, Duration::from_secs(1));
            }
            done
        })
        .await??;
        // The instance's processes are gone for good: an exit kept for a retried teardown
        // is not a later run's.
        self.seen_exits().remove(id);
        Ok(())
    }

    /// Why an instance cannot be provisioned now: a volume still pending (`Ok(Err(why))`: wait;
    /// the pending-volume sweep wakes the reconciler once it is ready), or missing, or a GPU no
    /// longer on this host (`Err((event kind, reason))`).
    async fn provision_blocker(
        &self,
        i: &InstanceRow,
    ) -> Result<std::result::Result<std::result::Result<(), String>, (String, String)>> {
        for v in &i.spec.volumes {
            match self.store.volume(&i.tenant_id, &v.name).await? {
                // Refused at create; a row from before the volume was marked is stopped here,
                // before the host kernel mounts what a guest wrote (review H2).
                Some(row)
                    if row.vm_touched && i.runtime == gpuvisor_wire::RuntimeKind::Container =>
                {
                    return Ok(Err(("failed".into(), super::vm_touched_refusal(&v.name))))
                }
                Some(row) if row.state == VolumeState::Ready => {}
                Some(_) => {
                    let why = self
                        .volume_errors()
                        .get(&(i.tenant_id.clone(), v.name.clone()))
                        .cloned()
                        .unwrap_or_else(|| "it is still being made".into());
                    return Ok(Ok(Err(format!("waiting for volume {:?}: {why}", v.name))));
                }
                None => {
                    return Ok(Err((
                        "failed".into(),
                        format!("volume {:?} does not exist; create it first", v.name),
                    )))
                }
            }
        }
        // A host that changed across a reboot: what the instance had must still be there.
        for v in &i.spec.volumes {
            let image = self.node.disks.volume_image(&i.tenant_id, &v.name);
            if !image.exists() {
                return Ok(Err((
                    "volume_gone".into(),
                    format!(
                        "volume_gone: the image of volume {:?} ({}) is missing from this host; \
                         its data is lost: remove the volume, create it again and start the \
                         instance",
                        v.name,
                        image.display()
                    ),
                )));
            }
        }
        // Online and not reserved (`--reserved-cpus`): instances are pinned to no other.
        if let Some(usable) = self.node.instance_cpus() {
            let gone: Vec<u32> = i
                .cpus
                .iter()
                .copied()
                .filter(|c| !usable.contains(c))
                .collect();
            if !gone.is_empty() {
                return Ok(Err((
                    "cpus_gone".into(),
                    format!(
                        "cpus_gone: CPUs {gone:?} of the instance are no longer online on this \
                         host, or are reserved for the host; terminate the instance and create it \
                         again"
                    ),
                )));
            }
        }
        let inventory = self.node.gpus();
        for g in &i.gpus {
            if !inventory
                .iter()
                .any(|d| d.uuid == g.uuid && d.schedulable())
            {
                return Ok(Err((
                    "gpu_gone".into(),
                    format!(
                        "gpu_gone: GPU {} ({}) is no longer on this host; terminate the instance \
                         and create it again",
                        g.uuid, g.model
                    ),
                )));
            }
        }
        Ok(Ok(Ok(())))
    }

    /// Takes `step` on an instance; false when it is blocked on something the reconciler need
    /// not look at again at once (a volume still being made).
    async fn act(&self, i: InstanceRow, step: Step) -> Result<bool> {
        // Re-read under the lock: the decision was taken on a snapshot.
        let Some(i) = self.store.instance(&i.id).await? else {
            return Ok(true);
        };
        // The row may have moved on since the snapshot (an exit handled by the task that held
        // the lock just before: a snapshot taken between its two writes asked for a Stop that
        // would overwrite its stopped state and reason). Liveness is not re-read here, so an
        // `Exited` step checks its own precondition below.
        if step != Step::Exited && self::step(&i, None, super::now_ms()) != Some(step) {
            return Ok(true);
        }
        let id = i.id.clone();
        match step {
            Step::Provision => {
                if !matches!(
                    (i.desired, i.state),
                    (S::Running, S::Pending | S::Provisioning | S::Stopped)
                ) || (i.state == S::Pending && i.restart.not_before > super::now_ms())
                {
                    return Ok(true);
                }
                match self.provision_blocker(&i).await? {
                    Ok(Ok(())) => {}
                    Ok(Err(waiting)) => {
                        // Said once (not on every pass), and no immediate second look: the
                        // sweep that finishes the volume wakes the reconciler, and the resync
                        // period retries meanwhile.
                        if i.reason.as_deref() != Some(waiting.as_str()) {
                            self.set(&id, i.state, Some(&waiting), "waiting", waiting.clone())
                                .await?;
                        }
                        return Ok(false);
                    }
                    Err((kind, reason)) => {
                        if i.state != S::Provisioning {
                            self.set(&id, S::Provisioning, None, "state", "provisioning".into())
                                .await?;
                        }
                        self.teardown(&id, false).await?;
                        return self
                            .set(&id, S::Failed, Some(&reason), &kind, reason.clone())
                            .await
                            .map(|()| true);
                    }
                }
                if i.state != S::Provisioning {
                    self.set(&id, S::Provisioning, None, "state", "provisioning".into())
                        .await?;
                }
                let i = &self.drop_restore(&i, None).await?;
                let plan = self.plan(i).await;
                let node = self.node.clone();
                let mut result = match &plan {
                    Ok(plan) => {
                        let plan = plan.clone();
                        blocking(move || node.provision(&plan))
                            .await?
                            .map_err(EngineError::from)
                    }
                    Err(e) => Err(EngineError::Internal(e.to_string())),
                };
                // Found `provisioning`: an earlier attempt was cut short by a crash, and what it
                // had started may have gone on without us (an orphaned `runc run` creating the
                // container). One retry from a clean slate, after that has settled.
                // Also for the first start after a reboot or a daemon restart (the run it
                // replaces started before this daemon): a host still settling.
                let recovering = i.state == S::Provisioning
                    || (i.restart.started_at > 0 && i.restart.started_at < self.started_ms);
                if let (Err(e), Ok(plan), true) = (&result, &plan, recovering) {
                    tracing::warn!(instance = %id, "provisioning after a crash or a reboot failed ({e}); retrying once from scratch");
                    self.teardown(&id, false).await?;
                    let (node, plan) = (self.node.clone(), plan.clone());
                    result = blocking(move || node.provision(&plan))
                        .await?
                        .map_err(EngineError::from);
                }
                match result {
                    Ok(()) => {
                        let restart = crate::store::RestartRow {
                            started_at: super::now_ms(),
                            ..i.restart.clone()
                        };
                        self.store.set_restart(&id, &restart).await?;
                        let msg = if restart.count > 0 {
                            format!("running (restart {})", restart.count)
                        } else {
                            "running".into()
                        };
                        self.set(&id, S::Running, None, "state", msg).await?;
                        // Cleared once `running` is written: a crash in between leaves the
                        // restore to be applied again by a later provision, never lost.
                        if i.spec.restore.is_some() {
                            self.restore_applied(&id).await?;
                        }
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
                        if i.spec.restore.as_ref().is_some_and(|r| !r.applied) {
                            self.drop_restore(i, Some(&reason)).await?;
                        }
                    }
                }
            }
            Step::Exited => {
                if (i.desired, i.state) != (S::Running, S::Running) {
                    return Ok(true);
                }
                let (node, rid) = (self.node.clone(), id.clone());
                let reaped = blocking(move || {
                    let Some(init) = reap::init(&node, &rid) else {
                        return Ok(None);
                    };
                    match reap::reap(&node, &init, Duration::from_millis(200)) {
                        Reaped::Exited(c) => Ok(Some((c, node.last_words(&rid)))),
                        Reaped::NotOurs => Ok(None),
                        // The decision was taken on a snapshot: the instance's main process
                        // runs now (a live migration switched to a new QEMU meanwhile).
                        Reaped::Running => Err(()),
                    }
                })
                .await?;
                let Ok(reaped) = reaped else {
                    return Ok(true);
                };
                // Kept before the teardown: a teardown that fails is retried by the next pass,
                // which can no longer reap the (already reaped) init, nor read the words from
                // what the teardown removed.
                let (code, said) = match reaped {
                    Some((c, said)) => {
                        let seen = SeenExit {
                            code: c,
                            said: said.clone(),
                        };
                        self.seen_exits().insert(id.clone(), seen);
                        let r = crate::store::RestartRow {
                            exit_code: Some(c),
                            ..i.restart.clone()
                        };
                        self.store.set_restart(&id, &r).await?;
                        (Some(c), said)
                    }
                    None => match self.seen_exits().get(&id) {
                        Some(s) => (Some(s.code), s.said.clone()),
                        None => (None, None),
                    },
                };
                self.test_fail_exit_teardown(&id)?;
                self.teardown(&id, false).await?;
                let how = match (code, said) {
                    (Some(c), Some(w)) => format!("exited with code {c} ({w})"),
                    (Some(c), None) => format!("exited with code {c}"),
                    (None, _) => {
                        "exited with an unknown status (it ended while this daemon was not \
                             its parent: a host reboot, or a daemon restart)"
                            .to_string()
                    }
                };
                let now = super::now_ms();
                let mut r = i.restart.clone();
                r.exit_code = code;
                if r.policy.restarts(code, r.count) {
                    let delay = restart_delay(&r, now, self.started_ms);
                    r.count += 1;
                    if delay > 0 {
                        r.backoff_ms = delay;
                    }
                    r.not_before = now + delay;
                    let msg = format!(
                        "{how}; restart {} (--restart {}) in {} ms",
                        r.count, r.policy, delay
                    );
                    // State and count in one write: a crash between two writes would either
                    // restart at once without counting it, or show the new count on a row still
                    // marked running (and count the exit twice).
                    self.set_with_restart(&id, S::Pending, Some(&msg), "restart", msg.clone(), &r)
                        .await?;
                } else {
                    self.store.set_restart(&id, &r).await?;
                    let why = match r.policy {
                        gpuvisor_wire::RestartPolicy::OnFailure { max: Some(m) }
                            if code != Some(0) =>
                        {
                            format!("{how}; not restarted: --restart {} allows {m}", r.policy)
                        }
                        _ => format!("{how}; not restarted (--restart {})", r.policy),
                    };
                    self.test_hold("exit", &id).await;
                    // Only if the user (terminate) or a preemptor (interrupted) did not change
                    // `desired` meanwhile: they write it without the instance lock, and an exit
                    // must not undo them. If they did, the next pass takes their step.
                    if !self.stop_if_desired_running(&id).await? {
                        tracing::info!(instance = %id, "exited while its desired state changed: not stopping it");
                        return Ok(true);
                    }
                    self.set(
                        &id,
                        S::Stopped,
                        Some(&why),
                        "exited",
                        format!("{why}; container disk wiped"),
                    )
                    .await?;
                }
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
                    Some(PREEMPTED),
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
        Ok(true)
    }

    /// Finishes or rolls back volumes left `pending` by a crash (those no request is making
    /// now): one that a live instance uses gets its image made (idempotent: a complete image is
    /// kept, a partial one replaced) and becomes ready; any other is removed, image and row, as
    /// the failed request that made it would have done. A ready volume is never touched: the
    /// sweep takes the volume's "being made" mark first (skipping it if a request holds it),
    /// reads the row again under it, and its writes are conditional on `pending`.
    pub async fn finish_pending_volumes(&self) -> Result<()> {
        let pending: Vec<_> = self
            .store
            .volumes(None)
            .await?
            .into_iter()
            .filter(|v| v.state == VolumeState::Pending)
            .collect();
        for v in pending {
            let mut making = self.making_guard(&v.tenant_id);
            if !making.claim(&v.name) {
                continue; // a request is making it right now
            }
            // Under the mark: a request that finished meanwhile made it ready or removed it.
            match self.store.volume(&v.tenant_id, &v.name).await? {
                Some(row) if row.state == VolumeState::Pending => {}
                _ => continue,
            }
            let used = self
                .store
                .live_instances(Some(&v.tenant_id))
                .await?
                .iter()
                .any(|i| i.spec.volumes.iter().any(|m| m.name == v.name));
            let (node, t, n, size) = (
                self.node.clone(),
                v.tenant_id.clone(),
                v.name.clone(),
                v.size,
            );
            let key = (v.tenant_id.clone(), v.name.clone());
            if used {
                match blocking(move || node.disks.create_volume(&t, &n, size)).await? {
                    Ok(()) => {
                        self.volume_errors().remove(&key);
                        if self
                            .store
                            .set_volume_state_from(
                                &v.tenant_id,
                                &v.name,
                                VolumeState::Pending,
                                VolumeState::Ready,
                            )
                            .await?
                        {
                            tracing::info!(volume = %v.name, "pending volume finished");
                        }
                        self.wake.notify_one();
                    }
                    Err(e) => {
                        tracing::warn!(volume = %v.name, "cannot finish pending volume: {e}");
                        self.volume_errors().insert(key, e.to_string());
                    }
                }
            } else {
                match blocking(move || node.disks.remove_volume(&t, &n)).await? {
                    Ok(()) => {
                        if self
                            .store
                            .delete_volume_if_pending(&v.tenant_id, &v.name)
                            .await?
                        {
                            tracing::info!(volume = %v.name, "pending volume rolled back");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(volume = %v.name, "cannot roll back pending volume: {e}")
                    }
                }
            }
        }
        Ok(())
    }

    /// Puts back the tap anti-spoofing chain of every VM of this host that runs (its tap
    /// exists) but whose chain is missing or incomplete (`Network::repair_taps`). Each under
    /// the instance's lock, so that a VM being started or torn down is left to that work (a
    /// chain re-added between a teardown's chain and tap removals would be left behind).
    pub async fn repair_vm_taps(&self) -> Result<Vec<String>> {
        let vms: Vec<InstanceRow> = self
            .store
            .live_instances(None)
            .await?
            .into_iter()
            .filter(|i| i.runtime == gpuvisor_wire::RuntimeKind::Vm && !self.is_simulated(i))
            .filter(|i| i.state == S::Running)
            .collect();
        let mut slots = std::collections::HashMap::new();
        let mut repaired = Vec::new();
        for i in vms {
            let slot = match slots.get(&i.tenant_id) {
                Some(s) => *s,
                None => {
                    let Some(t) = self.store.tenant(&i.tenant_id).await? else {
                        continue;
                    };
                    slots.insert(i.tenant_id.clone(), t.net_slot);
                    t.net_slot
                }
            };
            let lock = self.lock_for(&i.id);
            let Ok(_guard) = lock.try_lock() else {
                continue; // being worked on right now
            };
            let node = self.node.clone();
            let (id, host) = (i.id.clone(), i.ip_host);
            let net = gpuvisor_node::net::TenantNet { slot };
            match blocking(move || node.net.repair_tap(&id, &net, host)).await? {
                Ok(true) => {
                    self.event(
                        &i.id,
                        "network",
                        "the VM's anti-spoofing rules were removed outside gpuvisor: put back",
                    )
                    .await;
                    repaired.push(i.id.clone());
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(instance = %i.id, "cannot put back the VM's anti-spoofing rules: {e}")
                }
            }
        }
        Ok(repaired)
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
        // And a running VM's anti-spoofing chain (nftables, lost to `nft flush ruleset`).
        self.repair_vm_taps().await?;
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
        // Bridges of deleted tenants (`tenant rm` removes its bridge, unless a port was still
        // attached then). Listed before the tenants are read: a bridge is only made after its
        // tenant's row, so a tenant created meanwhile is never mistaken for a deleted one.
        let node = self.node.clone();
        let bridges = blocking(move || node.net.tenant_bridges())
            .await?
            .map_err(|e| EngineError::Node(e.into()))?;
        let slots: BTreeSet<u32> = self
            .store
            .tenants()
            .await?
            .iter()
            .map(|t| t.net_slot)
            .collect();
        for slot in bridges.into_iter().filter(|s| !slots.contains(s)) {
            let node = self.node.clone();
            let net = gpuvisor_node::net::TenantNet { slot };
            tracing::info!(slot, "removing the bridge of a deleted tenant");
            if let Err(e) = blocking(move || node.net.teardown_tenant(&net)).await? {
                tracing::warn!(slot, "cannot remove the bridge of a deleted tenant: {e}");
            }
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
            restart: Default::default(),
            runtime: Default::default(),
        }
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_resets_after_a_long_run() {
        assert_eq!(next_backoff(0, 0), 1_000);
        assert_eq!(next_backoff(1_000, 500), 2_000);
        assert_eq!(next_backoff(2_000, 9_999), 4_000);
        assert_eq!(next_backoff(256_000, 0), 300_000);
        assert_eq!(next_backoff(300_000, 0), 300_000);
        assert_eq!(next_backoff(64_000, 10_000), 1_000);
    }

    #[test]
    fn an_unknown_exit_status_still_backs_off_unless_the_run_predates_the_daemon() {
        let daemon_started = 50_000;
        let r = crate::store::RestartRow {
            started_at: 60_000,
            backoff_ms: 2_000,
            ..Default::default()
        };
        // Ran 1 s under this daemon: the backoff doubles, status known or not.
        assert_eq!(restart_delay(&r, 61_000, daemon_started), 4_000);
        // Ran under an earlier daemon (or before a reboot): restarted at once.
        let before = crate::store::RestartRow {
            started_at: 40_000,
            ..r.clone()
        };
        assert_eq!(restart_delay(&before, 61_000, daemon_started), 0);
        // A first restart after a long run: the first delay.
        let first = crate::store::RestartRow { backoff_ms: 0, ..r };
        assert_eq!(restart_delay(&first, 61_000, daemon_started), 1_000);
    }

    #[test]
    fn a_restart_waits_out_its_backoff() {
        let mut r = row(S::Running, S::Pending);
        r.restart.not_before = 5_000;
        assert_eq!(step(&r, Some(&BTreeSet::new()), 4_999), None);
        assert_eq!(
            step(&r, Some(&BTreeSet::new()), 5_000),
            Some(Step::Provision)
        );
        // A stop during the backoff is not held up by it.
        r.desired = S::Stopped;
        assert_eq!(step(&r, Some(&BTreeSet::new()), 0), Some(Step::Stop));
    }

    fn step_at(i: &InstanceRow, running: &BTreeSet<String>) -> Option<Step> {
        step(i, Some(running), 0)
    }

    #[test]
    fn steps_follow_desired_state() {
        let none = BTreeSet::new();
        let running = BTreeSet::from(["aaaaaaaaaaaa".to_string()]);
        assert_eq!(
            step_at(&row(S::Running, S::Pending), &none),
            Some(Step::Provision)
        );
        assert_eq!(
            step_at(&row(S::Running, S::Provisioning), &none),
            Some(Step::Provision)
        );
        assert_eq!(step_at(&row(S::Running, S::Running), &running), None);
        // A pass that does not look takes a running instance to be running.
        assert_eq!(step(&row(S::Running, S::Running), None, 0), None);
        assert_eq!(
            step_at(&row(S::Running, S::Running), &none),
            Some(Step::Exited)
        );
        assert_eq!(
            step_at(&row(S::Stopped, S::Running), &running),
            Some(Step::Stop)
        );
        assert_eq!(step_at(&row(S::Stopped, S::Stopped), &none), None);
        assert_eq!(step_at(&row(S::Running, S::Failed), &none), None);
        assert_eq!(
            step_at(&row(S::Terminated, S::Stopped), &none),
            Some(Step::Terminate)
        );
        assert_eq!(step_at(&row(S::Terminated, S::Terminated), &none), None);
    }
}
