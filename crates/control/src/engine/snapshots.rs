//! Instance snapshots (REST `POST /v1/instances/{id}/snapshots`, `/v1/snapshots`, `POST
//! /v1/instances/{id}/restore`; `instance create --from-snapshot`): an instance's disks, and
//! a VM's running state when asked, saved on its host by the node layer
//! (`gpuvisor_node::snapshot`, `<data>/snapshots/<id>/`).
//!
//! Key decisions:
//! - A row is written `pending` (under the placement lock, which tenant deletion marks under)
//!   before the files are made, and becomes `ready` once `Node::take_snapshot` has renamed them
//!   into place; the copy runs under the instance's lock, so the reconciler neither stops nor
//!   provisions the instance meanwhile. A pending row found at start is a crash's leftover and
//!   goes with its files ([`Engine::sweep_snapshots`]), as do files no row names.
//! - Only a running instance on this host is snapshotted: its container disk is ephemeral
//!   (wiped at every stop), so a stopped instance has nothing but volumes to save.
//! - Restore is a one-shot spec field ([`RestoreSpec`]): the instance is stopped, its volumes
//!   rolled back now (they are not attached), `spec.restore` written, and the instance started;
//!   the provision copies the snapshot's disk (and resumes a VM's running state) and the
//!   reconciler clears the field once the instance runs. A clone's `spec.from_snapshot` is
//!   persistent instead: its disk starts from the snapshot at every provision, as an image's
//!   would (disks only: a VM clone boots afresh).
//! - A snapshot is refused removal while an instance that is not terminated still starts from
//!   it (a clone, or a restore not yet applied); the check and the removal are under the
//!   placement lock, as are a clone's creation and a restore's spec write, so none of them
//!   finds a snapshot gone that it was told exists.

use super::authz::Op;
use super::{now_ms, random_hex, validate, Engine, Principal};
use crate::error::{EngineError, Result};
use crate::store::{InstanceRow, RestoreSpec, SnapshotRow, StoreError};
use gpuvisor_wire::{self as wire, format_size, InstanceState, RuntimeKind, SnapshotState};
use std::collections::{BTreeSet, HashMap};

/// Snapshots one tenant may hold.
pub const MAX_SNAPSHOTS_PER_TENANT: usize = 32;

use super::blocking;

/// `req` with what a clone of `s` leaves unset taken from the snapshot: its image, runtime and
/// disk size (before the template and the defaults, so that they do not choose another).
pub(crate) fn seed_request(req: &wire::CreateInstance, s: &SnapshotRow) -> wire::CreateInstance {
    let mut out = req.clone();
    if out.image.is_empty() {
        out.image = s.image.clone();
    }
    if out.runtime.is_none() {
        out.runtime = Some(s.runtime);
    }
    if out.container_disk == 0 {
        out.container_disk = s.disk_size;
    }
    out
}

/// A clone runs the snapshot's image, in its runtime, on a disk of its size: a request (or its
/// template) that says otherwise is refused.
pub(crate) fn check_clone(req: &wire::CreateInstance, s: &SnapshotRow) -> Result<()> {
    if req.image != s.image {
        return Err(EngineError::InvalidArgument(format!(
            "snapshot {:?} is of image {:?}, not {:?}: a clone runs the image its disk was made \
             on (leave out --image)",
            s.name, s.image, req.image
        )));
    }
    if req.runtime() != s.runtime {
        return Err(EngineError::InvalidArgument(format!(
            "snapshot {:?} is of a {} instance: a clone is one too (leave out --runtime)",
            s.name, s.runtime
        )));
    }
    if req.container_disk != s.disk_size {
        return Err(EngineError::InvalidArgument(format!(
            "snapshot {:?} holds a {} disk: a clone's disk is that size (leave out \
             --container-disk)",
            s.name,
            format_size(s.disk_size)
        )));
    }
    Ok(())
}

fn not_found(id_or_name: &str) -> EngineError {
    EngineError::NotFound(format!(
        "snapshot {id_or_name:?} not found (see `gpuvisor snapshot list`)"
    ))
}

/// "a, b and c".
fn and_list(items: &[String]) -> String {
    match items.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

impl Engine {
    /// Saves a running instance's disks (and, for a VM with `memory`, its running state) as a
    /// new snapshot of its tenant. Answers once the snapshot is complete.
    pub async fn create_snapshot(
        &self,
        who: &Principal,
        instance: &str,
        req: &wire::CreateSnapshot,
    ) -> Result<wire::Snapshot> {
        who.allow(Op::SnapshotInstance)?;
        validate::name("snapshot", &req.name)?;
        let row = self.find(who, instance).await?;
        super::remote::check_not_departing(&row)?;
        check_snapshottable(&row, self.is_simulated(&row), req.memory)?;
        let need = self.snapshot_need(&row, req.memory).await?;
        let mut snap = SnapshotRow {
            id: random_hex(16)?,
            tenant_id: row.tenant_id.clone(),
            name: req.name.clone(),
            instance_id: row.id.clone(),
            runtime: row.runtime,
            image: row.image.clone(),
            state: SnapshotState::Pending,
            memory: req.memory,
            consistency: String::new(),
            disk_size: row.spec.container_disk,
            volumes: row.spec.volumes.iter().map(|v| v.name.clone()).collect(),
            vcpus: row.spec.vcpus,
            memory_bytes: row.spec.memory,
            // What it may take, counted against the tenant's disk quota and the host's free
            // space while it is taken; the real size once ready.
            bytes: need,
            created_at: now_ms(),
        };
        self.reserve_snapshot(&snap, &row).await?;
        // Under the instance's lock: the reconciler neither stops nor provisions it meanwhile.
        let lock = self.lock_for(&row.id);
        let guard = lock.lock().await;
        match self.take_snapshot(&snap).await {
            Ok(meta) => {
                snap.runtime = meta.runtime;
                snap.memory = meta.memory;
                snap.consistency = meta.consistency;
                snap.disk_size = meta.disk_size;
                snap.volumes = meta.volumes;
                snap.vcpus = meta.vcpus;
                snap.memory_bytes = meta.memory_bytes;
                snap.bytes = meta.bytes;
                let marked = self.store.mark_snapshot_ready(&snap).await;
                if !matches!(marked, Ok(true)) {
                    self.discard_snapshot(&snap.id).await;
                    drop(guard);
                    return Err(match marked {
                        Err(e) => e.into(),
                        Ok(_) => EngineError::Internal(format!(
                            "snapshot {:?} was no longer pending once taken; it was discarded",
                            snap.name
                        )),
                    });
                }
                snap.state = SnapshotState::Ready;
            }
            Err(e) => {
                // take_snapshot leaves no files on error: the row goes.
                if let Err(d) = self.store.delete_snapshot(&snap.id).await {
                    tracing::warn!(snapshot = %snap.id, "cannot remove a failed snapshot's row (the next start does): {d}");
                }
                return Err(e);
            }
        }
        drop(guard);
        self.event(
            &row.id,
            "snapshot",
            format!(
                "snapshot {} taken ({}, {})",
                snap.name,
                format_size(snap.bytes),
                snap.consistency
            ),
        )
        .await;
        self.wire_snapshot(snap).await
    }

    /// Refuses a snapshot that could not fit: the data dir's filesystem must have room for
    /// everything the copy could take (the whole disk, every volume and, with `memory`, the
    /// VM's RAM), since the allocated sizes are the node's to know.
    /// The most a snapshot of `row` may take: its disk, its volumes, and with `memory` its RAM
    /// (with QEMU's allowance for device state).
    async fn snapshot_need(&self, row: &InstanceRow, memory: bool) -> Result<u64> {
        let mut need = row.spec.container_disk;
        for v in &row.spec.volumes {
            if let Some(vol) = self.store.volume(&row.tenant_id, &v.name).await? {
                need = need.saturating_add(vol.size);
            }
        }
        if memory {
            need = need.saturating_add(row.spec.memory.saturating_add(64 << 20));
        }
        Ok(need)
    }

    /// Free bytes of the filesystem holding the snapshots.
    async fn snapshot_fs_free(&self) -> Result<(u64, u64)> {
        let root = self.node.snapshots_root();
        let dir = if root.exists() {
            root
        } else {
            self.node.cfg.data_dir.clone()
        };
        let shown = dir.display().to_string();
        blocking(move || {
            nix::sys::statvfs::statvfs(&dir).map(|st| {
                #[allow(clippy::unnecessary_cast)] // u32 on some targets
                let (avail, total, frsize) = (
                    st.blocks_available() as u64,
                    st.blocks() as u64,
                    st.fragment_size() as u64,
                );
                (avail.saturating_mul(frsize), total.saturating_mul(frsize))
            })
        })
        .await?
        .map_err(|e| EngineError::Internal(format!("cannot read the free space of {shown}: {e}")))
    }

    /// Writes the pending row: under the placement lock (a tenant being deleted is marked
    /// under it), after the tenant's name and count checks.
    async fn reserve_snapshot(&self, snap: &SnapshotRow, row: &InstanceRow) -> Result<()> {
        let _place = self.place_lock.lock().await;
        let tenant = self
            .store
            .tenant(&snap.tenant_id)
            .await?
            .ok_or_else(|| EngineError::NotFound("the instance's tenant is gone".into()))?;
        if tenant.deleting_at.is_some() {
            return Err(EngineError::InvalidState(format!(
                "tenant {:?} is being deleted: no new snapshots",
                tenant.name
            )));
        }
        let held = self.store.snapshots(Some(&snap.tenant_id)).await?;
        let taken = || {
            EngineError::AlreadyExists(format!(
                "a snapshot named {:?} already exists in tenant {:?}",
                snap.name, tenant.name
            ))
        };
        if held.iter().any(|s| s.name == snap.name) {
            return Err(taken());
        }
        if held.len() >= MAX_SNAPSHOTS_PER_TENANT {
            return Err(EngineError::QuotaExceeded(format!(
                "tenant {:?} holds {} snapshots, the most a tenant may \
                 ({MAX_SNAPSHOTS_PER_TENANT}): remove some first (gpuvisor snapshot rm)",
                tenant.name,
                held.len()
            )));
        }
        // The tenant's disk quota counts its snapshots (`tenants::usage`), this one at what it
        // may take.
        let live = self.store.live_instances(None).await?;
        self.check_quota(
            &tenant,
            &live,
            &super::tenants::Ask {
                disk: snap.bytes,
                ..Default::default()
            },
        )
        .await?;
        // The host keeps room for everyone else: snapshots being taken count at what they may
        // take, and a margin (1 GiB or 5 % of the filesystem) is never given to snapshots.
        let (free, total) = self.snapshot_fs_free().await?;
        let taking: u64 = self
            .store
            .pending_snapshots()
            .await?
            .iter()
            .map(|s| s.bytes)
            .sum();
        let margin = (1u64 << 30).max(total / 20);
        let room = free.saturating_sub(taking).saturating_sub(margin);
        if room < snap.bytes {
            return Err(EngineError::InsufficientResources(format!(
                "not enough free space for the snapshot: it may take up to {} (the instance's {} disk{}{}); the snapshots' filesystem has {} free, {} of it held for snapshots being taken and {} kept for the host; free some space or remove snapshots",
                format_size(snap.bytes),
                format_size(row.spec.container_disk),
                if row.spec.volumes.is_empty() { "" } else { ", its volumes" },
                if snap.memory { " and its memory" } else { "" },
                format_size(free),
                format_size(taking),
                format_size(margin),
            )));
        }
        match self.store.insert_snapshot(snap).await {
            Err(StoreError::Conflict(_)) => Err(taken()),
            other => other.map_err(Into::into),
        }
    }

    /// The node's copy, from the row as it is now (call under the instance's lock): refused
    /// when the instance stopped meanwhile.
    async fn take_snapshot(
        &self,
        snap: &SnapshotRow,
    ) -> Result<gpuvisor_node::snapshot::SnapshotMeta> {
        let row = self
            .store
            .instance(&snap.instance_id)
            .await?
            .ok_or_else(|| {
                EngineError::NotFound(format!("instance {:?} not found", snap.instance_id))
            })?;
        if (row.state, row.desired) != (InstanceState::Running, InstanceState::Running) {
            return Err(EngineError::InvalidState(format!(
                "instance {} is {} (asked: {}) meanwhile: no snapshot taken",
                row.id, row.state, row.desired
            )));
        }
        let volumes: Vec<String> = row.spec.volumes.iter().map(|v| v.name.clone()).collect();
        let (node, id, sid, tenant) = (
            self.node.clone(),
            row.id.clone(),
            snap.id.clone(),
            row.tenant_id.clone(),
        );
        let (memory, size) = (snap.memory, (row.spec.vcpus, row.spec.memory));
        let digest = self
            .store
            .image_visible(&row.tenant_id, &row.image)
            .await?
            .map(|i| i.digest)
            .unwrap_or_default();
        if digest.is_empty() && row.runtime == RuntimeKind::Container {
            return Err(EngineError::InvalidState(format!(
                "the image {:?} of instance {} is gone: a container's disk means nothing without its image's layers",
                row.image, row.id
            )));
        }
        let ask = gpuvisor_node::snapshot::SnapshotAsk {
            tenant,
            image_digest: digest,
            volumes,
            memory,
            vcpus: size.0,
            memory_bytes: size.1,
        };
        blocking(move || node.take_snapshot(&id, &sid, &ask))
            .await?
            // What the runtime cannot do, or not to this VM as it is, is the caller's to change.
            .map_err(|e| match super::migration::node_refusal(e) {
                EngineError::InvalidState(m) => {
                    EngineError::InvalidState(format!("{m}; nothing was kept"))
                }
                EngineError::Internal(e) => EngineError::Internal(format!(
                    "snapshot {:?} of instance {} could not be taken: {e}; nothing was kept",
                    snap.name, row.id
                )),
                e => e,
            })
    }

    /// Removes a snapshot's files, then its row; logged, not answered (a failed request's
    /// leftovers: the next start's sweep retries).
    async fn discard_snapshot(&self, sid: &str) {
        if let Err(e) = self.destroy_snapshot(sid).await {
            tracing::warn!(snapshot = %sid, "cannot discard a snapshot (the next start does): {e}");
        }
    }

    /// Removes a snapshot's files, then its row (a row whose files could not go stays).
    async fn destroy_snapshot(&self, sid: &str) -> Result<()> {
        let (node, id) = (self.node.clone(), sid.to_string());
        blocking(move || node.remove_snapshot(&id)).await??;
        self.store.delete_snapshot(sid).await?;
        Ok(())
    }

    /// Snapshots the caller may see: every tenant's for an admin, else its own.
    pub async fn list_snapshots(&self, who: &Principal) -> Result<Vec<wire::Snapshot>> {
        who.allow(Op::ListSnapshots)?;
        let rows = self.store.snapshots(who.scope()).await?;
        self.wire_snapshots(rows).await
    }

    pub async fn get_snapshot(&self, who: &Principal, id_or_name: &str) -> Result<wire::Snapshot> {
        who.allow(Op::GetSnapshot)?;
        let s = self.find_snapshot(who, id_or_name).await?;
        self.wire_snapshot(s).await
    }

    /// Removes a snapshot, files and row; refused while an instance that is not terminated
    /// starts from it (a clone, or a restore not applied yet).
    pub async fn delete_snapshot(
        &self,
        who: &Principal,
        id_or_name: &str,
    ) -> Result<wire::Snapshot> {
        who.allow(Op::DeleteSnapshot)?;
        let s = self.find_snapshot(who, id_or_name).await?;
        if s.state == SnapshotState::Pending {
            return Err(EngineError::InUse(format!(
                "snapshot {:?} is being taken: remove it once it is ready",
                s.name
            )));
        }
        {
            // Clones and restores are recorded under this lock too.
            let _place = self.place_lock.lock().await;
            let users = self.snapshot_users(&s.id).await?;
            if !users.is_empty() {
                return Err(EngineError::InUse(format!(
                    "snapshot {:?} is used by {}: terminate the clones first; a restore is done \
                     once its instance runs",
                    s.name,
                    and_list(&users)
                )));
            }
            self.destroy_snapshot(&s.id).await?;
        }
        self.wire_snapshot(s).await
    }

    /// The live instances that start from snapshot `sid`, described.
    async fn snapshot_users(&self, sid: &str) -> Result<Vec<String>> {
        Ok(self
            .store
            .live_instances(None)
            .await?
            .into_iter()
            .filter_map(|i| {
                let restore = i.spec.restore.as_ref().filter(|r| r.snapshot == sid);
                if restore.is_some_and(|r| !r.applied) {
                    Some(format!(
                        "instance {} ({}, being restored from it)",
                        i.name, i.id
                    ))
                } else if restore.is_some() && i.runtime == RuntimeKind::Vm {
                    Some(format!(
                        "VM {} ({}, restored from it: it boots the snapshot's base and kernel until it restarts)",
                        i.name, i.id
                    ))
                } else if i.spec.from_snapshot.as_deref() == Some(sid) {
                    Some(format!("instance {} ({}, a clone)", i.name, i.id))
                } else {
                    None
                }
            })
            .collect())
    }

    /// Rolls an instance back to one of its own snapshots: stops it if it runs, rolls its
    /// volumes back now, and starts it from the snapshot's disk (a VM from its saved running
    /// state when it has one). Answers the instance, starting.
    pub async fn restore_instance(
        &self,
        who: &Principal,
        instance: &str,
        req: &wire::RestoreInstance,
    ) -> Result<wire::Instance> {
        who.allow(Op::RestoreInstance)?;
        let row = self.find(who, instance).await?;
        super::remote::check_not_departing(&row)?;
        if self.is_simulated(&row) {
            return Err(EngineError::InvalidState(format!(
                "instance {} is on simulated node {}: it has no disks to restore",
                row.id, row.node_id
            )));
        }
        let snap = self.snapshot_in(&row.tenant_id, &req.snapshot).await?;
        check_restorable(&row, &snap)?;
        self.check_clone_image(&row.tenant_id, &snap).await?;
        let stop_first = match row.state {
            _ if matches!(
                row.desired,
                InstanceState::Terminated | InstanceState::Interrupted
            ) =>
            {
                return Err(EngineError::InvalidState(format!(
                    "instance {} is being {}: it cannot be restored",
                    row.id,
                    if row.desired == InstanceState::Terminated {
                        "terminated"
                    } else {
                        "preempted"
                    }
                )))
            }
            InstanceState::Running
            | InstanceState::Pending
            | InstanceState::Provisioning
            | InstanceState::Stopping => true,
            InstanceState::Stopped | InstanceState::Failed => false,
            other => {
                return Err(EngineError::InvalidState(format!(
                    "instance {} is {other}: it cannot be restored (create a new one with \
                     --from-snapshot {})",
                    row.id, snap.name
                )))
            }
        };
        if stop_first {
            if row.desired != InstanceState::Stopped {
                self.set_desired(who, &row.id, InstanceState::Stopped)
                    .await?;
            }
            self.wait_stopped(&row.id, "restored").await?;
        }
        let volumes = self.apply_restore(&row.id, &snap).await?;
        let what = if volumes.is_empty() {
            String::new()
        } else {
            format!(
                "; volume{} {} rolled back",
                plural(volumes.len()),
                and_list(&volumes)
            )
        };
        self.event(
            &row.id,
            "restored",
            format!(
                "restored from snapshot {}{what}; its disk{} at this start",
                snap.name,
                if snap.memory {
                    " and running state"
                } else {
                    ""
                }
            ),
        )
        .await;
        self.set_desired(who, &row.id, InstanceState::Running).await
    }

    /// Under the instance's lock, on the stopped instance: its volumes that the snapshot saved
    /// are rolled back, and `spec.restore` is written for the next provision. Answers the
    /// volumes rolled back.
    async fn apply_restore(&self, id: &str, snap: &SnapshotRow) -> Result<Vec<String>> {
        let lock = self.lock_for(id);
        let _instance = lock.lock().await;
        let row = self
            .store
            .instance(id)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("instance {id:?} not found")))?;
        let stopped = matches!(row.state, InstanceState::Stopped | InstanceState::Failed)
            && !matches!(
                row.desired,
                InstanceState::Terminated | InstanceState::Interrupted
            );
        if !stopped {
            return Err(EngineError::InvalidState(format!(
                "instance {id} is {} (asked: {}) meanwhile: not restored",
                row.state, row.desired
            )));
        }
        // The volumes it still mounts (one it no longer has keeps its own content).
        let volumes: Vec<String> = snap
            .volumes
            .iter()
            .filter(|n| row.spec.volumes.iter().any(|v| &v.name == *n))
            .cloned()
            .collect();
        let (node, sid, tenant, names) = (
            self.node.clone(),
            snap.id.clone(),
            row.tenant_id.clone(),
            volumes.clone(),
        );
        blocking(move || node.restore_volumes(&sid, &tenant, &names))
            .await?
            .map_err(|e| {
                EngineError::InvalidState(format!(
                    "the volumes of instance {id} could not be rolled back to snapshot {:?}: {e} \
                     (a volume rolled back before the error keeps the snapshot's content; the \
                     instance stays stopped)",
                    snap.name
                ))
            })?;
        let _place = self.place_lock.lock().await;
        self.snapshot_still_there(snap).await?;
        let mut spec = row.spec.clone();
        spec.restore = Some(RestoreSpec {
            snapshot: snap.id.clone(),
            memory: snap.memory,
            applied: false,
        });
        self.store.set_spec(id, &spec, self.tick()).await?;
        Ok(volumes)
    }

    /// The snapshot a clone starts from: the caller's tenant's own, ready.
    pub(crate) async fn clone_source(
        &self,
        who: &Principal,
        id_or_name: &str,
    ) -> Result<SnapshotRow> {
        let s = self.snapshot_in(&who.tenant_id, id_or_name).await?;
        if s.state != SnapshotState::Ready {
            return Err(EngineError::InvalidState(format!(
                "snapshot {:?} is still being taken: clone it once it is ready",
                s.name
            )));
        }
        Ok(s)
    }

    /// A container clone's (or restore's) image must still be the one its disk was made over
    /// (a name imported again may hold other layers).
    pub(crate) async fn check_clone_image(&self, tenant_id: &str, s: &SnapshotRow) -> Result<()> {
        if s.runtime != RuntimeKind::Container {
            return Ok(());
        }
        let meta = self
            .node
            .snapshot_meta(&s.id)
            .map_err(|e| EngineError::Internal(format!("snapshot {:?}: {e}", s.name)))?;
        let now = self
            .store
            .image_visible(tenant_id, &s.image)
            .await?
            .map(|i| i.digest)
            .unwrap_or_default();
        if !meta.image_digest.is_empty() && meta.image_digest != now {
            return Err(EngineError::InvalidState(format!(
                "snapshot {:?} was taken over image {:?} at {}; that image is now {}: a clone's disk only means the same files over the same layers",
                s.name,
                s.image,
                meta.image_digest,
                if now.is_empty() { "gone".to_string() } else { now }
            )));
        }
        Ok(())
    }

    /// Refuses when snapshot `s` is no longer there (removed since it was looked up). Call
    /// under the placement lock.
    pub(crate) async fn snapshot_still_there(&self, s: &SnapshotRow) -> Result<()> {
        match self.store.snapshot(&s.id).await? {
            Some(now) if now.state == SnapshotState::Ready => Ok(()),
            _ => Err(EngineError::NotFound(format!(
                "snapshot {:?} was removed meanwhile",
                s.name
            ))),
        }
    }

    /// A snapshot of tenant `tenant_id`, by id, else by name.
    async fn snapshot_in(&self, tenant_id: &str, id_or_name: &str) -> Result<SnapshotRow> {
        if let Some(s) = self
            .store
            .snapshot(id_or_name)
            .await?
            .filter(|s| s.tenant_id == tenant_id)
        {
            return Ok(s);
        }
        self.store
            .snapshot_by_name(tenant_id, id_or_name)
            .await?
            .ok_or_else(|| not_found(id_or_name))
    }

    /// A snapshot the caller may see, by id (any tenant's for an admin) or by name in its own
    /// tenant; others' are not found.
    async fn find_snapshot(&self, who: &Principal, id_or_name: &str) -> Result<SnapshotRow> {
        if let Some(s) = self
            .store
            .snapshot(id_or_name)
            .await?
            .filter(|s| who.is_admin() || s.tenant_id == who.tenant_id)
        {
            return Ok(s);
        }
        self.store
            .snapshot_by_name(&who.tenant_id, id_or_name)
            .await?
            .ok_or_else(|| not_found(id_or_name))
    }

    async fn wire_snapshot(&self, s: SnapshotRow) -> Result<wire::Snapshot> {
        let mut out = self.wire_snapshots(vec![s]).await?;
        out.pop()
            .ok_or_else(|| EngineError::Internal("snapshot vanished while answered".into()))
    }

    async fn wire_snapshots(&self, rows: Vec<SnapshotRow>) -> Result<Vec<wire::Snapshot>> {
        let tenants = self.tenant_names().await?;
        let mut names: HashMap<String, String> = self
            .store
            .live_instances(None)
            .await?
            .into_iter()
            .map(|i| (i.id, i.name))
            .collect();
        let mut out = Vec::with_capacity(rows.len());
        for s in rows {
            // A terminated instance's row is kept a while: its name too.
            if !names.contains_key(&s.instance_id) {
                if let Some(i) = self.store.instance(&s.instance_id).await? {
                    names.insert(i.id, i.name);
                }
            }
            out.push(wire::Snapshot {
                tenant: tenants.get(&s.tenant_id).cloned().unwrap_or_default(),
                instance_name: names.get(&s.instance_id).cloned(),
                id: s.id,
                name: s.name,
                instance_id: s.instance_id,
                runtime: s.runtime,
                image: s.image,
                state: s.state,
                memory: s.memory,
                consistency: s.consistency,
                disk_size: s.disk_size,
                volumes: s.volumes,
                vcpus: s.vcpus,
                memory_bytes: s.memory_bytes,
                bytes: s.bytes,
                created_at: s.created_at,
            });
        }
        Ok(out)
    }

    /// At start, before anything else runs: snapshots a crash left `pending` go, files and
    /// row, after the node has undone what the cut-short copy left in their instance (a VM's
    /// copy jobs, a guest it paused); and so do snapshot directories no row names.
    pub(crate) async fn sweep_snapshots(&self) -> Result<()> {
        for s in self.store.pending_snapshots().await? {
            tracing::warn!(snapshot = %s.id, name = %s.name, "removing a snapshot a crash left half taken");
            let (node, id) = (self.node.clone(), s.instance_id.clone());
            if let Err(e) = blocking(move || node.abandon_snapshot(&id)).await? {
                tracing::warn!(instance = %s.instance_id, snapshot = %s.id, "cannot undo a cut-short snapshot in its instance: {e}");
            }
            self.discard_snapshot(&s.id).await;
        }
        let known: BTreeSet<String> = self
            .store
            .snapshots(None)
            .await?
            .into_iter()
            .map(|s| s.id)
            .collect();
        let node = self.node.clone();
        let on_disk = blocking(move || node.snapshot_ids()).await?;
        for sid in on_disk.into_iter().filter(|s| !known.contains(s)) {
            tracing::warn!(snapshot = %sid, "removing snapshot files no row names");
            let (node, id) = (self.node.clone(), sid.clone());
            if let Err(e) = blocking(move || node.remove_snapshot(&id)).await? {
                tracing::warn!(snapshot = %sid, "cannot remove orphaned snapshot files: {e}");
            }
        }
        Ok(())
    }

    /// Every snapshot of a tenant being deleted (its instances are gone): files, then rows.
    pub(crate) async fn remove_tenant_snapshots(&self, tenant_id: &str) -> Result<()> {
        for s in self.store.snapshots(Some(tenant_id)).await? {
            self.destroy_snapshot(&s.id).await?;
        }
        Ok(())
    }

    /// The names of a tenant's snapshots (what `tenant rm` without --cascade names).
    pub(crate) async fn tenant_snapshot_names(&self, tenant_id: &str) -> Result<Vec<String>> {
        Ok(self
            .store
            .snapshots(Some(tenant_id))
            .await?
            .into_iter()
            .map(|s| s.name)
            .collect())
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Whether `row` can be snapshotted now: on this host, running, and `memory` only for a VM.
fn check_snapshottable(row: &InstanceRow, simulated: bool, memory: bool) -> Result<()> {
    if simulated {
        return Err(EngineError::InvalidState(format!(
            "instance {} is on simulated node {}: it has no disks to snapshot",
            row.id, row.node_id
        )));
    }
    if memory && row.runtime != RuntimeKind::Vm {
        return Err(EngineError::InvalidArgument(
            "--memory saves a VM's running state: a container's snapshot holds its disk and \
             volumes, not its processes (leave --memory out)"
                .into(),
        ));
    }
    match (row.state, row.desired) {
        (InstanceState::Running, InstanceState::Running) => Ok(()),
        (InstanceState::Stopped | InstanceState::Failed | InstanceState::Interrupted, _) => {
            Err(EngineError::InvalidState(format!(
                "instance {} is {}: its disk is ephemeral and wiped at stop; snapshot it while \
                 it runs",
                row.name, row.state
            )))
        }
        (state, desired) => Err(EngineError::InvalidState(format!(
            "instance {} is {state} (asked: {desired}): snapshot it while it runs",
            row.name
        ))),
    }
}

/// Whether `snap` may restore `row`: ready, its own, and a saved running state only into the
/// size it was saved at.
fn check_restorable(row: &InstanceRow, snap: &SnapshotRow) -> Result<()> {
    if snap.state != SnapshotState::Ready {
        return Err(EngineError::InvalidState(format!(
            "snapshot {:?} is still being taken: restore it once it is ready",
            snap.name
        )));
    }
    if snap.instance_id != row.id {
        return Err(EngineError::InvalidArgument(format!(
            "snapshot {:?} is of instance {}, not of {}: an instance is restored from its own \
             snapshots; use `instance create --from-snapshot {}` to clone",
            snap.name, snap.instance_id, row.name, snap.name
        )));
    }
    if snap.memory && (row.spec.vcpus, row.spec.memory) != (snap.vcpus, snap.memory_bytes) {
        return Err(EngineError::InvalidState(format!(
            "snapshot {:?} saved the VM's running state with {} vCPUs and {} of memory, and the \
             instance now has {} and {}: a running state resumes only at its own size (scale \
             the instance back with `instance scale`, then restore)",
            snap.name,
            snap.vcpus,
            format_size(snap.memory_bytes),
            row.spec.vcpus,
            format_size(row.spec.memory)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::InstanceSpec;

    fn instance(state: InstanceState, runtime: RuntimeKind) -> InstanceRow {
        InstanceRow {
            id: "i1".into(),
            name: "web".into(),
            tenant_id: "t".into(),
            node_id: "node".into(),
            image: "busybox".into(),
            runtime,
            state,
            desired: InstanceState::Running,
            reason: None,
            spec: InstanceSpec {
                vcpus: 2,
                memory: 1 << 30,
                container_disk: 10 << 30,
                ..Default::default()
            },
            cpus: vec![0],
            gpus: vec![],
            ip_host: 2,
            created_at: 0,
            updated_at: 0,
            restart: Default::default(),
        }
    }

    fn snap(memory: bool) -> SnapshotRow {
        SnapshotRow {
            id: "ab".into(),
            tenant_id: "t".into(),
            name: "s1".into(),
            instance_id: "i1".into(),
            runtime: RuntimeKind::Vm,
            image: "busybox".into(),
            state: SnapshotState::Ready,
            memory,
            consistency: "paused with memory".into(),
            disk_size: 10 << 30,
            volumes: vec![],
            vcpus: 2,
            memory_bytes: 1 << 30,
            bytes: 1 << 20,
            created_at: 0,
        }
    }

    #[test]
    fn only_a_running_instance_on_this_host_is_snapshotted() {
        let running = instance(InstanceState::Running, RuntimeKind::Container);
        assert!(check_snapshottable(&running, false, false).is_ok());
        let e = check_snapshottable(&running, true, false).unwrap_err();
        assert_eq!(e.code(), wire::code::INVALID_STATE);
        let e = check_snapshottable(&running, false, true).unwrap_err();
        assert_eq!(e.code(), wire::code::INVALID_ARGUMENT, "{e}");
        let stopped = instance(InstanceState::Stopped, RuntimeKind::Container);
        let e = check_snapshottable(&stopped, false, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "instance web is stopped: its disk is ephemeral and wiped at stop; snapshot it \
             while it runs"
        );
        let vm = instance(InstanceState::Running, RuntimeKind::Vm);
        assert!(check_snapshottable(&vm, false, true).is_ok());
    }

    #[test]
    fn a_restore_is_an_instances_own_snapshot_at_its_size() {
        let vm = instance(InstanceState::Running, RuntimeKind::Vm);
        assert!(check_restorable(&vm, &snap(true)).is_ok());
        let mut other = snap(false);
        other.instance_id = "i2".into();
        let e = check_restorable(&vm, &other).unwrap_err();
        assert_eq!(e.code(), wire::code::INVALID_ARGUMENT);
        assert!(e.to_string().contains("--from-snapshot s1"), "{e}");
        let mut bigger = vm.clone();
        bigger.spec.memory = 2 << 30;
        let e = check_restorable(&bigger, &snap(true)).unwrap_err();
        assert!(
            e.to_string()
                .contains("scale the instance back with `instance scale`"),
            "{e}"
        );
        // Disks only: the size does not matter.
        assert!(check_restorable(&bigger, &snap(false)).is_ok());
        let mut pending = snap(false);
        pending.state = SnapshotState::Pending;
        assert_eq!(
            check_restorable(&vm, &pending).unwrap_err().code(),
            wire::code::INVALID_STATE
        );
    }

    #[test]
    fn a_clone_takes_the_snapshots_image_runtime_and_disk() {
        let s = snap(true);
        let req = wire::CreateInstance::default();
        let seeded = seed_request(&req, &s);
        assert_eq!(seeded.image, "busybox");
        assert_eq!(seeded.runtime, Some(RuntimeKind::Vm));
        assert_eq!(seeded.container_disk, 10 << 30);
        assert!(check_clone(&seeded, &s).is_ok());
        for bad in [
            wire::CreateInstance {
                image: "ubuntu".into(),
                ..seeded.clone()
            },
            wire::CreateInstance {
                runtime: Some(RuntimeKind::Container),
                ..seeded.clone()
            },
            wire::CreateInstance {
                container_disk: 20 << 30,
                ..seeded.clone()
            },
        ] {
            let e = check_clone(&bad, &s).unwrap_err();
            assert_eq!(e.code(), wire::code::INVALID_ARGUMENT, "{e}");
        }
    }
}
