//! `instance scale` (REST `POST /v1/instances/{id}/scale`, GraphQL `clusterScaleResources`):
//! a new vCPU count, memory size or GPU count for an instance.
//!
//! Key decision: what the runtime can change while the instance runs is changed in place —
//! a container's cgroup (cpuset, memory limit) through the OCI runtime's `update`, a VM's
//! vCPUs and memory by hot-plug, virtio-mem and the balloon (`gpuvisor_node::vm::resize`) —
//! and everything else (a GPU count; a VM's vCPUs taken away or grown past the maximum it
//! booted with, which the runtime refuses) needs the caller's consent to a restart
//! (`restart: true`; a VM given it is restarted rather than changed live): stop, resize in
//! the store, start. A stopped instance is only resized in
//! the store; its next start provisions the new size. The new size passes the same checks as
//! a new instance: the size rules ([`validate::size`]), the tenant's quotas and placement,
//! with the instance's own reservation left out of the host's usage.

use super::authz::Op;
use super::tenants::Ask;
use super::{charged_memory, validate, Engine, Principal};
use crate::error::{EngineError, Result};
use crate::placement::{Assignment, Demand};
use crate::store::InstanceRow;
use gpuvisor_wire::{self as wire, InstanceState, RuntimeKind};
use std::time::Duration;

// Most whole GPUs a scale may ask for: as at creation.
use super::validate::MAX_GPUS;

/// The size an instance is asked to have.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Size {
    vcpus: u32,
    memory: u64,
    /// Whole GPUs.
    gpus: u32,
}

impl Size {
    fn of(row: &InstanceRow) -> Self {
        Self {
            vcpus: row.spec.vcpus,
            memory: row.spec.memory,
            gpus: whole_gpus(row),
        }
    }

    fn asked(row: &InstanceRow, req: &wire::ScaleInstance) -> Self {
        let now = Self::of(row);
        Self {
            vcpus: req.vcpus.unwrap_or(now.vcpus),
            memory: req.memory.unwrap_or(now.memory),
            gpus: req.gpus.unwrap_or(now.gpus),
        }
    }
}

fn whole_gpus(row: &InstanceRow) -> u32 {
    row.gpus.iter().filter(|g| g.milli >= 1000).count() as u32
}

/// The compute share of a fractional GPU (0 when none).
fn fraction_milli(row: &InstanceRow) -> u32 {
    row.gpus
        .iter()
        .filter(|g| g.milli < 1000)
        .map(|g| g.milli)
        .sum()
}

/// How the change can be made.
#[derive(Debug, PartialEq)]
enum Way {
    /// Nothing runs on the host: the store alone.
    Store,
    /// The running container's cgroup, then the store.
    InPlace,
    /// Stop, store, start (consented to).
    Restart,
}

impl Engine {
    /// Resizes an instance the caller may operate; answers it with its new size.
    pub async fn scale_instance(
        &self,
        who: &Principal,
        id: &str,
        req: &wire::ScaleInstance,
    ) -> Result<wire::Instance> {
        who.allow(Op::ScaleInstance)?;
        let row = self.find(who, id).await?;
        super::remote::check_not_departing(&row)?;
        let size = Size::asked(&row, req);
        self.check_scale(&row, size)?;
        validate::disk_io(&req.disk_io)?;
        let row = if req.disk_io.is_unlimited() {
            row
        } else {
            self.set_disk_io(&row, &req.disk_io).await?
        };
        if size == Size::of(&row) {
            self.changed.send_modify(|v| *v += 1);
            return self.get_instance(who, &row.id).await;
        }
        let way = way(&row, size, req.restart)?;
        match way {
            Way::Store => {
                // Under the instance's lock: a start being provisioned meanwhile has the old
                // size or the new one, never a mix.
                let lock = self.lock_for(&row.id);
                let _instance = lock.lock().await;
                let row = self.still(&row.id, size, Way::Store).await?;
                let _place = self.place_lock.lock().await;
                let next = self.resized(&row, size).await?;
                self.store.set_resources(&next, self.tick()).await?;
            }
            Way::InPlace => self.scale_in_place(&row, size).await?,
            Way::Restart => self.scale_by_restart(who, &row, size).await?,
        }
        self.event(&row.id, "scaled", describe(&row, size, &way))
            .await;
        self.changed.send_modify(|v| *v += 1);
        self.get_instance(who, &row.id).await
    }

    /// New disk I/O limits (`change` applied to the instance's): on the running instance
    /// first (the cgroup's throttles, QEMU's), under the instance's lock so that a start being
    /// provisioned meanwhile has the old limits or the new ones; then in the store. A stopped
    /// instance gets them at its next start. Answers the row as it is now.
    async fn set_disk_io(&self, row: &InstanceRow, change: &wire::DiskIo) -> Result<InstanceRow> {
        let lock = self.lock_for(&row.id);
        let _instance = lock.lock().await;
        let mut next = self
            .store
            .instance(&row.id)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("instance {:?} not found", row.id)))?;
        let io = next.spec.disk_io.with(change);
        if io == next.spec.disk_io {
            return Ok(next);
        }
        match next.state {
            InstanceState::Running => {
                let (node, id) = (self.node.clone(), next.id.clone());
                tokio::task::spawn_blocking(move || {
                    node.runtime_of(&id).set_disk_io(&node, &id, &io)
                })
                .await
                .map_err(|e| EngineError::Internal(format!("disk I/O task: {e}")))?
                .map_err(|e| {
                    EngineError::InvalidState(format!(
                        "the disk I/O limits of instance {} could not be changed: {e}",
                        next.id
                    ))
                })?;
            }
            InstanceState::Stopped | InstanceState::Failed | InstanceState::Interrupted => {}
            other => {
                return Err(EngineError::InvalidState(format!(
                "instance {} is {other}: change its disk I/O limits once it is running or stopped",
                next.id
            )))
            }
        }
        let before = next.spec.disk_io;
        next.spec.disk_io = io;
        self.store.set_resources(&next, self.tick()).await?;
        self.event(
            &next.id,
            "scaled",
            format!("disk I/O limits {before} -> {io}"),
        )
        .await;
        Ok(next)
    }

    /// The row again, under the instance's lock: refused when the instance moved on since
    /// the request was judged (and the way to resize it changed).
    async fn still(&self, id: &str, size: Size, judged: Way) -> Result<InstanceRow> {
        let row = self
            .store
            .instance(id)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("instance {id:?} not found")))?;
        match way(&row, size, false) {
            Ok(w) if w == judged => Ok(row),
            _ => Err(EngineError::InvalidState(format!(
                "instance {id} changed state meanwhile (now {}): ask again",
                row.state
            ))),
        }
    }

    /// The request's own rules, before anything is locked.
    fn check_scale(&self, row: &InstanceRow, size: Size) -> Result<()> {
        if matches!(
            row.state,
            InstanceState::Terminated | InstanceState::Terminating
        ) || row.desired == InstanceState::Terminated
        {
            return Err(EngineError::InvalidState(format!(
                "instance {} is {} and cannot be resized",
                row.id, row.state
            )));
        }
        if self.is_simulated(row) {
            return Err(EngineError::InvalidState(format!(
                "instance {} is on simulated node {}: only instances on this host can be resized",
                row.id, row.node_id
            )));
        }
        if size.gpus != whole_gpus(row) {
            if fraction_milli(row) > 0 {
                return Err(EngineError::InvalidArgument(
                    "the instance has a fraction of a GPU: its GPU count cannot change (create a new instance with --gpus)".into(),
                ));
            }
            if row.runtime == RuntimeKind::Vm {
                return Err(EngineError::InvalidArgument(
                    "a VM's passthrough GPUs cannot change: create a new VM with --gpus".into(),
                ));
            }
            if size.gpus > MAX_GPUS {
                return Err(EngineError::InvalidArgument(format!(
                    "gpus {} is absurd: at most {MAX_GPUS}",
                    size.gpus
                )));
            }
        }
        validate::size(size.vcpus, size.memory, row.runtime, &self.host_limits(&[]))
    }

    /// The row with the new size placed: the instance's own reservation is left out of the
    /// host's usage; its GPUs are kept when their count does not change. Checks the tenant's
    /// quotas. Call under the placement lock.
    async fn resized(&self, row: &InstanceRow, size: Size) -> Result<InstanceRow> {
        let live = self.store.live_instances(None).await?;
        let others: Vec<InstanceRow> = live.iter().filter(|i| i.id != row.id).cloned().collect();
        let tenant = self.store.tenant(&row.tenant_id).await?.ok_or_else(|| {
            EngineError::NotFound(format!("the tenant of instance {} is gone", row.id))
        })?;
        let memory = charged_memory(row.runtime, size.memory, self.vm_overhead());
        let milli = fraction_milli(row);
        self.check_quota(
            &tenant,
            &others,
            &Ask {
                instances: 1,
                gpus: size.gpus,
                gpu_milli: milli,
                vcpus: size.vcpus,
                memory,
                disk: row.spec.container_disk,
                volumes: 0,
            },
        )
        .await?;
        let a = self.place_again(row, size, &live)?;
        let mut next = row.clone();
        next.spec.vcpus = size.vcpus;
        next.spec.memory = size.memory;
        next.cpus = a.cpus;
        next.gpus = a.gpus.into_iter().map(Into::into).collect();
        Ok(next)
    }

    /// Placement of the new size on this host, the instance's own usage left out.
    fn place_again(
        &self,
        row: &InstanceRow,
        size: Size,
        live: &[InstanceRow],
    ) -> Result<Assignment> {
        let mut capacity = self
            .host_capacity(live)
            .without(std::slice::from_ref(&row.id));
        let keep = size.gpus == whole_gpus(row);
        if keep {
            // Same GPUs: only the instance's own are offered (a fraction keeps its share).
            capacity
                .gpus
                .retain(|g| row.gpus.iter().any(|b| b.uuid == g.uuid));
        }
        let share = row.gpus.iter().find(|g| g.milli < 1000);
        let demand = Demand {
            whole_gpus: size.gpus,
            milli: share.map_or(0, |g| g.milli),
            vram: share.map(|g| g.vram),
            model: row.gpus.first().map(|g| g.model.clone()),
            vcpus: size.vcpus,
            memory: charged_memory(row.runtime, size.memory, self.vm_overhead()),
            priority: super::pricing::spec_rank(&row.spec),
            interruptible: row.spec.interruptible,
            passthrough: row.runtime == RuntimeKind::Vm,
        };
        self.placer
            .place(&capacity, &demand)
            .map_err(|e| EngineError::InsufficientResources(e.to_string()))
    }

    /// A running container: its cgroup first (under the instance's lock, so the reconciler
    /// does not act on it meanwhile), then the store.
    async fn scale_in_place(&self, row: &InstanceRow, size: Size) -> Result<()> {
        let lock = self.lock_for(&row.id);
        let _instance = lock.lock().await;
        let row = &self.still(&row.id, size, Way::InPlace).await?;
        let mut place = Some(self.place_lock.lock().await);
        let next = self.resized(row, size).await?;
        // Growing needs the room held until the store says so; less memory on the same CPUs
        // does not (until the store is written the host counts the larger size), and a VM's
        // shrink waits for its guest to give memory back: the placement lock is not held
        // meanwhile.
        if next.spec.memory < row.spec.memory && next.cpus == row.cpus {
            place = None;
        }
        let (node, id, cpus, memory) = (
            self.node.clone(),
            row.id.clone(),
            next.cpus.clone(),
            next.spec.memory,
        );
        tokio::task::spawn_blocking(move || node.runtime_of(&id).resize(&node, &id, &cpus, memory))
            .await
            .map_err(|e| EngineError::Internal(format!("resize task: {e}")))?
            .map_err(|e| {
                EngineError::InvalidState(format!(
                    "the instance could not be resized in place ({e}); ask again with restart: true to stop, resize and start it"
                ))
            })?;
        if place.is_none() {
            place = Some(self.place_lock.lock().await);
        }
        self.store.set_resources(&next, self.tick()).await?;
        drop(place);
        Ok(())
    }

    /// Stop, resize in the store, start. The new size is checked before the stop; should it
    /// no longer fit once the instance is stopped (another request took the room), the
    /// instance is started again as it was and the error answered.
    async fn scale_by_restart(&self, who: &Principal, row: &InstanceRow, size: Size) -> Result<()> {
        {
            let _place = self.place_lock.lock().await;
            self.resized(row, size).await?;
        }
        self.set_desired(who, &row.id, InstanceState::Stopped)
            .await?;
        self.wait_stopped(&row.id, "resized").await?;
        // Under the instance's lock (the reconciler provisions nothing meanwhile), from the
        // row as it is now: still stopped by this request, or nothing is written (a start,
        // a terminate or a preemption in between wins, and the host never runs a size the
        // store does not hold).
        let lock = self.lock_for(&row.id);
        let _instance = lock.lock().await;
        let now = self.still(&row.id, size, Way::Store).await?;
        if now.desired != InstanceState::Stopped || now.state == InstanceState::Interrupted {
            return Err(EngineError::InvalidState(format!(
                "instance {} was {} meanwhile: not resized",
                row.id,
                if now.state == InstanceState::Interrupted {
                    "preempted"
                } else {
                    "started again"
                }
            )));
        }
        let row = &now;
        let placed = {
            let _place = self.place_lock.lock().await;
            match self.resized(row, size).await {
                Ok(next) => self
                    .store
                    .set_resources(&next, self.tick())
                    .await
                    .map(drop)
                    .map_err(Into::into),
                Err(e) => Err(e),
            }
        };
        self.set_desired(who, &row.id, InstanceState::Running)
            .await?;
        placed
    }

    /// Waits until the instance is stopped (or failed), up to the stop grace and a minute.
    /// `what`: what the caller stopped it to do (`resized`), for the refusals.
    pub(super) async fn wait_stopped(&self, id: &str, what: &str) -> Result<()> {
        let limit = self.cfg.stop_grace + Duration::from_secs(60);
        let deadline = tokio::time::Instant::now() + limit;
        let mut rx = self.changed.subscribe();
        loop {
            rx.mark_unchanged();
            let row = self
                .store
                .instance(id)
                .await?
                .ok_or_else(|| EngineError::NotFound(format!("instance {id:?} not found")))?;
            if matches!(row.state, InstanceState::Stopped | InstanceState::Failed) {
                return Ok(());
            }
            if matches!(
                row.state,
                InstanceState::Interrupted | InstanceState::Terminating | InstanceState::Terminated
            ) || row.desired != InstanceState::Stopped
            {
                return Err(EngineError::InvalidState(format!(
                    "instance {id} is {} (asked: {}) meanwhile: not {what}",
                    row.state, row.desired
                )));
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(EngineError::DeadlineExceeded(format!(
                    "instance {id} did not stop within {} s: it is left stopping, not {what}; ask again once it is stopped",
                    limit.as_secs()
                )));
            }
        }
    }
}

/// How `size` can be made for `row`; a change the runtime cannot make live without consent
/// is refused with what to do.
fn way(row: &InstanceRow, size: Size, restart: bool) -> Result<Way> {
    match row.state {
        InstanceState::Stopped | InstanceState::Failed | InstanceState::Interrupted => {
            return Ok(Way::Store)
        }
        InstanceState::Running => {}
        other => {
            return Err(EngineError::InvalidState(format!(
                "instance {} is {other}: resize it once it is running or stopped",
                row.id
            )))
        }
    }
    // Containers (their cgroup) and VMs (hot-plug, virtio-mem, the balloon: the runtime
    // refuses what it cannot do live, and the caller is then asked to consent to a restart).
    // A VM with passed-through GPUs boots without room to grow (VFIO pins all of its RAM).
    let live_ok =
        size.gpus == whole_gpus(row) && (row.runtime != RuntimeKind::Vm || row.gpus.is_empty());
    match (live_ok, restart) {
        // A VM whose owner consents to a restart gets one (vCPUs taken away, past the maximum
        // it booted with); without consent the runtime tries in place.
        (true, true) if row.runtime == RuntimeKind::Vm => Ok(Way::Restart),
        (true, _) => Ok(Way::InPlace),
        (false, true) => Ok(Way::Restart),
        (false, false) => Err(EngineError::InvalidState(format!(
            "{} cannot be changed while instance {} runs: ask again with restart: true (it is stopped, resized and started), or stop it first",
            if row.runtime == RuntimeKind::Vm {
                "the size of a VM with passed-through GPUs"
            } else {
                "the GPU count"
            },
            row.id
        ))),
    }
}

/// The event's text: what changed, and how.
fn describe(row: &InstanceRow, size: Size, way: &Way) -> String {
    let before = Size::of(row);
    let mut parts = Vec::new();
    if before.vcpus != size.vcpus {
        parts.push(format!("vCPUs {} → {}", before.vcpus, size.vcpus));
    }
    if before.memory != size.memory {
        parts.push(format!(
            "memory {} → {}",
            wire::format_size(before.memory),
            wire::format_size(size.memory)
        ));
    }
    if before.gpus != size.gpus {
        parts.push(format!("GPUs {} → {}", before.gpus, size.gpus));
    }
    let how = match way {
        Way::Store => "while stopped",
        Way::InPlace => "in place",
        Way::Restart => "by a restart",
    };
    format!("resized {how}: {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: InstanceState, runtime: RuntimeKind, gpus: u32) -> InstanceRow {
        InstanceRow {
            id: "i1".into(),
            name: "n".into(),
            tenant_id: "t".into(),
            node_id: "node".into(),
            image: "busybox".into(),
            runtime,
            state,
            desired: InstanceState::Running,
            reason: None,
            spec: crate::store::InstanceSpec {
                vcpus: 1,
                memory: 64 << 20,
                container_disk: 64 << 20,
                volumes: vec![],
                env: vec![],
                ports: vec![],
                command: vec![],
                priority: Default::default(),
                interruptible: false,
                bid_per_gpu_hour: None,
                ssh_keys: vec![],
                startup_script: None,
                packages: vec![],
                idle_timeout_secs: None,
                disk_io: Default::default(),
                from_snapshot: None,
                restore: None,
                incoming: None,
                outgoing: None,
            },
            cpus: vec![0],
            gpus: (0..gpus)
                .map(|i| wire::GpuBinding {
                    uuid: format!("GPU-{i}"),
                    index: i,
                    model: "A100-80GB".into(),
                    milli: 1000,
                    vram: 80 << 30,
                })
                .collect(),
            ip_host: 2,
            created_at: 0,
            updated_at: 0,
            restart: Default::default(),
        }
    }

    fn size(vcpus: u32, gpus: u32) -> Size {
        Size {
            vcpus,
            memory: 64 << 20,
            gpus,
        }
    }

    #[test]
    fn a_running_container_changes_cpus_in_place_and_gpus_only_by_consent() {
        let r = row(InstanceState::Running, RuntimeKind::Container, 1);
        assert_eq!(way(&r, size(2, 1), false).unwrap(), Way::InPlace);
        let e = way(&r, size(1, 2), false).unwrap_err();
        assert_eq!(e.code(), gpuvisor_wire::code::INVALID_STATE);
        assert!(e.to_string().contains("restart: true"), "{e}");
        assert_eq!(way(&r, size(1, 2), true).unwrap(), Way::Restart);
    }

    #[test]
    fn a_vm_is_resized_in_place_or_by_consented_restart_and_a_stopped_instance_in_the_store() {
        let vm = row(InstanceState::Running, RuntimeKind::Vm, 0);
        assert_eq!(way(&vm, size(2, 0), false).unwrap(), Way::InPlace);
        assert_eq!(way(&vm, size(2, 0), true).unwrap(), Way::Restart);
        let stopped = row(InstanceState::Stopped, RuntimeKind::Vm, 0);
        assert_eq!(way(&stopped, size(2, 0), false).unwrap(), Way::Store);
        let busy = row(InstanceState::Provisioning, RuntimeKind::Container, 0);
        assert_eq!(
            way(&busy, size(2, 0), true).unwrap_err().code(),
            gpuvisor_wire::code::INVALID_STATE
        );
    }

    #[test]
    fn the_event_says_what_changed_and_how() {
        let r = row(InstanceState::Running, RuntimeKind::Container, 0);
        assert_eq!(
            describe(&r, size(3, 0), &Way::InPlace),
            "resized in place: vCPUs 1 → 3"
        );
    }
}
