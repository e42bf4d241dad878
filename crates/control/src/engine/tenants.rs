//! Tenants: creation, listing, and the policy an admin sets on each — quotas checked at create
//! time and the scheduling rights (highest priority, preempting other tenants).
//!
//! Key decision: quotas are checked under the placement lock against everything the tenant
//! holds in the store (running and stopped instances keep their reservation, volumes count until
//! removed), so two concurrent creates cannot both slip under a quota.

use super::authz::Op;
use super::{now_ms, random_hex, validate, Engine, Principal};
use crate::error::{EngineError, Result};
use crate::store::{InstanceRow, TenantRow, VolumeRow};
use gpuvisor_wire::{self as wire, PriorityClass, TenantPolicy, TenantUsage};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// What one create (or volume create) adds to a tenant's holdings.
#[derive(Debug, Default, Clone)]
pub(crate) struct Ask {
    pub instances: u32,
    pub gpus: u32,
    pub gpu_milli: u32,
    pub vcpus: u32,
    pub memory: u64,
    pub disk: u64,
    pub volumes: u32,
}

/// What a tenant holds: its live instances, its volumes and its snapshots (their bytes on
/// disk; a snapshot being taken counts with what it may take, its row's `bytes` meanwhile).
pub(crate) fn usage<'a>(
    instances: impl IntoIterator<Item = &'a InstanceRow>,
    volumes: &[VolumeRow],
    snapshots: &[crate::store::SnapshotRow],
    vm_overhead: u64,
) -> TenantUsage {
    let mut u = TenantUsage::default();
    for i in instances {
        u.instances += 1;
        u.vcpus += i.spec.vcpus;
        // A VM's QEMU counts with its guest's RAM (see `charged_memory`).
        u.memory += super::charged_memory(i.runtime, i.spec.memory, vm_overhead);
        u.disk += i.spec.container_disk;
        for g in &i.gpus {
            if g.milli >= 1000 {
                u.gpus += 1;
            } else {
                u.gpu_milli += g.milli;
            }
        }
    }
    u.volumes = volumes.len() as u32;
    u.disk += volumes.iter().map(|v| v.size).sum::<u64>();
    u.disk += snapshots.iter().map(|s| s.bytes).sum::<u64>();
    u
}

/// (quota name, limit, held, asked, how to show an amount).
type QuotaCheck = (&'static str, Option<u64>, u64, u64, fn(u64) -> String);

/// The first quota `ask` would break, as a message naming it; `None` when all hold.
/// The quota fields of `a` and `b` side by side, by name.
fn quota_pairs(
    a: &TenantPolicy,
    b: &TenantPolicy,
) -> [(&'static str, Option<u64>, Option<u64>); 7] {
    let w = |v: Option<u32>| v.map(u64::from);
    [
        ("max_instances", w(a.max_instances), w(b.max_instances)),
        ("max_gpus", w(a.max_gpus), w(b.max_gpus)),
        ("max_gpu_milli", w(a.max_gpu_milli), w(b.max_gpu_milli)),
        ("max_vcpus", w(a.max_vcpus), w(b.max_vcpus)),
        ("max_memory", a.max_memory, b.max_memory),
        ("max_disk", a.max_disk, b.max_disk),
        ("max_volumes", w(a.max_volumes), w(b.max_volumes)),
    ]
}

/// The policy a tenant's creates are held to: the admin's, each quota lowered to the tenant
/// admin's own where that is stricter.
pub(crate) fn effective_policy(t: &TenantRow) -> TenantPolicy {
    fn stricter<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
        match (a, b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        }
    }
    let (p, l) = (&t.policy, &t.limits);
    TenantPolicy {
        max_instances: stricter(p.max_instances, l.max_instances),
        max_gpus: stricter(p.max_gpus, l.max_gpus),
        max_gpu_milli: stricter(p.max_gpu_milli, l.max_gpu_milli),
        max_vcpus: stricter(p.max_vcpus, l.max_vcpus),
        max_memory: stricter(p.max_memory, l.max_memory),
        max_disk: stricter(p.max_disk, l.max_disk),
        max_volumes: stricter(p.max_volumes, l.max_volumes),
        ..p.clone()
    }
}

pub(crate) fn over_quota(
    tenant: &str,
    p: &TenantPolicy,
    u: &TenantUsage,
    ask: &Ask,
) -> Option<String> {
    let fmt = |v: u64| wire::format_size(v);
    let checks: [QuotaCheck; 7] = [
        (
            "max_instances",
            p.max_instances.map(u64::from),
            u.instances.into(),
            ask.instances.into(),
            |v| v.to_string(),
        ),
        (
            "max_gpus",
            p.max_gpus.map(u64::from),
            u.gpus.into(),
            ask.gpus.into(),
            |v| v.to_string(),
        ),
        (
            "max_gpu_milli",
            p.max_gpu_milli.map(u64::from),
            u.gpu_milli.into(),
            ask.gpu_milli.into(),
            |v| format!("{:.3} GPU", v as f64 / 1000.0),
        ),
        (
            "max_vcpus",
            p.max_vcpus.map(u64::from),
            u.vcpus.into(),
            ask.vcpus.into(),
            |v| v.to_string(),
        ),
        ("max_memory", p.max_memory, u.memory, ask.memory, fmt),
        ("max_disk", p.max_disk, u.disk, ask.disk, fmt),
        (
            "max_volumes",
            p.max_volumes.map(u64::from),
            u.volumes.into(),
            ask.volumes.into(),
            |v| v.to_string(),
        ),
    ];
    checks.into_iter().find_map(|(name, limit, used, asked, show)| {
        let limit = limit?;
        (asked > 0 && used.saturating_add(asked) > limit).then(|| {
            format!(
                "tenant {tenant:?} quota {name} would be exceeded: it holds {}, asks {}, quota {} (an admin raises it with `gpuvisor tenant set {tenant} --{} ...`)",
                show(used),
                show(asked),
                show(limit),
                name.replace('_', "-"),
            )
        })
    })
}

/// `2 instances (a, b) and 1 volume (data)`.
fn holdings(instances: &[String], volumes: &[String]) -> String {
    let part = |n: &[String], what: &str| {
        let s = if n.len() == 1 { "" } else { "s" };
        format!("{} {what}{s} ({})", n.len(), n.join(", "))
    };
    match (instances.is_empty(), volumes.is_empty()) {
        (false, false) => format!(
            "{} and {}",
            part(instances, "instance"),
            part(volumes, "volume")
        ),
        (false, true) => part(instances, "instance"),
        (true, false) => part(volumes, "volume"),
        (true, true) => String::new(),
    }
}

fn wire_tenant(t: TenantRow, usage: Option<TenantUsage>) -> wire::Tenant {
    wire::Tenant {
        id: t.id,
        name: t.name,
        created_at: t.created_at,
        policy: t.policy,
        limits: t.limits,
        usage,
        deleting_since: t.deleting_at,
    }
}

impl Engine {
    pub async fn create_tenant(
        &self,
        who: &Principal,
        req: &wire::CreateTenant,
    ) -> Result<wire::Tenant> {
        who.allow(Op::CreateTenant)?;
        validate::name("tenant", &req.name)?;
        if let Some(t) = self.store.tenant_by_name(&req.name).await? {
            let why = if t.deleting_at.is_some() {
                "is still being deleted: try again once it is gone"
            } else {
                "already exists"
            };
            return Err(EngineError::AlreadyExists(format!(
                "tenant {:?} {why}",
                req.name
            )));
        }
        let plan = self.node.net.cfg.plan;
        let t = self
            .store
            .create_tenant(&random_hex(6)?, &req.name, now_ms(), plan.tenants())
            .await?
            .ok_or_else(|| {
                EngineError::InsufficientResources(format!(
                    "the instance address pool {} holds {} tenant networks (/{} each) and every \
                     one is taken: delete a tenant (tenant rm) or give the daemon a larger \
                     --net-pool or a longer --net-tenant-prefix",
                    plan.pool(),
                    plan.tenants(),
                    plan.tenant_len()
                ))
            })?;
        Ok(wire_tenant(t, None))
    }

    /// The address plan tenants' slots were given under is kept in the store (per node). A
    /// different plan at start is refused while this host has live instances or a tenant's
    /// slot is outside it; otherwise it is recorded, and our bridges (made under the old plan,
    /// whose addresses could shadow another tenant's new subnet) are removed, to be made again
    /// on first use.
    pub(crate) async fn check_net_plan(&self) -> Result<()> {
        let plan = self.node.net.cfg.plan;
        let now = format!("{} /{}", plan.pool(), plan.tenant_len());
        let key = format!("net_plan/{}", self.cfg.node_id);
        let before = self.store.setting(&key).await?;
        if before.as_deref() == Some(now.as_str()) {
            return Ok(());
        }
        if let Some(before) = &before {
            let live = self
                .store
                .live_instances(None)
                .await?
                .into_iter()
                .filter(|i| !self.is_simulated(i))
                .count();
            if live > 0 {
                return Err(EngineError::InvalidArgument(format!(
                    "the instance address plan changed from {before} to {now} while {live} \
                     instance(s) of this host are not terminated: terminate them first, or \
                     start with the old --net-pool and --net-tenant-prefix"
                )));
            }
            if let Some(t) = self
                .store
                .tenants()
                .await?
                .into_iter()
                .find(|t| t.net_slot >= plan.tenants())
            {
                return Err(EngineError::InvalidArgument(format!(
                    "tenant {:?} has network slot {}, outside the new address plan {now} ({} \
                     tenant networks): delete tenants, or give a larger plan",
                    t.name,
                    t.net_slot,
                    plan.tenants()
                )));
            }
            tracing::info!(before = %before, now = %now, "instance address plan changed");
        }
        // A new plan, or a new store (bridges of ours left by an earlier install): no bridge of
        // ours was made under it. One with a port attached is left alone (`teardown_tenant`).
        let node = self.node.clone();
        tokio::task::spawn_blocking(
            move || -> std::result::Result<(), gpuvisor_node::net::NetError> {
                for slot in node.net.tenant_bridges()? {
                    node.net
                        .teardown_tenant(&gpuvisor_node::net::TenantNet { slot })?;
                }
                Ok(())
            },
        )
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?
        .map_err(|e| EngineError::Node(e.into()))?;
        self.store.set_setting(&key, &now).await?;
        Ok(())
    }

    /// The tenant called `name`, or `not_found`.
    async fn tenant_named(&self, name: &str) -> Result<TenantRow> {
        self.store
            .tenant_by_name(name)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("tenant {name:?} not found")))
    }

    /// Deletes a tenant (admin). Refused while it owns instances or volumes, unless `cascade`:
    /// then its keys are revoked at once, its instances terminated, and the reconciler removes
    /// its volumes and the tenant when the last instance is gone (`finish_tenant_deletions`),
    /// also after a daemon restart. A tenant that owns nothing is deleted at once. The caller's
    /// own tenant cannot be deleted.
    pub async fn delete_tenant(
        &self,
        who: &Principal,
        name: &str,
        cascade: bool,
    ) -> Result<wire::TenantRemoval> {
        who.allow(Op::DeleteTenant)?;
        let t = self.tenant_named(name).await?;
        if t.id == who.tenant_id {
            return Err(EngineError::InvalidArgument(format!(
                "tenant {name:?} is the tenant of the key making this request: it cannot delete \
                 itself"
            )));
        }
        // Under the placement lock: no instance or volume of the tenant appears between the
        // ownership check and the mark (creates re-read the tenant under this lock).
        let placement = self.place_lock.lock().await;
        let instances: Vec<String> = self
            .store
            .live_instances(Some(&t.id))
            .await?
            .into_iter()
            .map(|i| i.name)
            .collect();
        let volumes: Vec<String> = self
            .store
            .volumes(Some(&t.id))
            .await?
            .into_iter()
            .map(|v| v.name)
            .collect();
        let images = self.store.tenant_image_count(&t.id).await?;
        let pulls = self.running_pulls(&t.id);
        let endpoints = self.store.endpoints(Some(&t.id)).await?.len();
        let snapshots = self.tenant_snapshot_names(&t.id).await?;
        let owns = !(instances.is_empty() && volumes.is_empty())
            || images > 0
            || pulls > 0
            || endpoints > 0
            || !snapshots.is_empty();
        if !cascade && t.deleting_at.is_none() && owns {
            let mut what = holdings(&instances, &volumes);
            if !snapshots.is_empty() {
                let n = snapshots.len();
                let s = if n == 1 { "" } else { "s" };
                let part = format!("{n} snapshot{s} ({})", snapshots.join(", "));
                what = if what.is_empty() {
                    part
                } else {
                    format!("{what} and {part}")
                };
            }
            if pulls > 0 {
                let s = if pulls == 1 { "" } else { "s" };
                what = if what.is_empty() {
                    format!("{pulls} running pull{s}")
                } else {
                    format!("{what} and {pulls} running pull{s}")
                };
            }
            if images > 0 {
                let s = if images == 1 { "" } else { "s" };
                what = if what.is_empty() {
                    format!("{images} pulled image{s}")
                } else {
                    format!("{what} and {images} pulled image{s}")
                };
            }
            if endpoints > 0 {
                let s = if endpoints == 1 { "" } else { "s" };
                what = if what.is_empty() {
                    format!("{endpoints} serverless endpoint{s}")
                } else {
                    format!("{what} and {endpoints} serverless endpoint{s}")
                };
            }
            return Err(EngineError::InUse(format!(
                "tenant {name:?} still owns {what}: remove them first, or delete it with --cascade"
            )));
        }
        self.store.mark_tenant_deleting(&t.id, now_ms()).await?;
        drop(placement);
        self.tenant_deletions.store(true, Ordering::Relaxed);
        let done = self.finish_tenant_deletion(&t).await?;
        self.wake.notify_one();
        Ok(wire::TenantRemoval {
            name: t.name,
            deleted: done,
            instances,
            volumes,
        })
    }

    /// Moves every tenant deletion on (the reconciler calls it on each pass while one is
    /// pending: `tenant_deletions`).
    pub(crate) async fn finish_tenant_deletions(&self) -> Result<()> {
        if !self.tenant_deletions.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let pending = self.store.deleting_tenants().await?;
        for t in &pending {
            if let Err(e) = self.finish_tenant_deletion(t).await {
                tracing::warn!(tenant = %t.name, "cannot finish deleting the tenant: {e}");
            }
        }
        if !pending.is_empty() {
            // Look again on the next pass (an instance terminating, a crash before the mark).
            self.tenant_deletions.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// One step of deleting a marked tenant, idempotent, so a crash anywhere converges: asks
    /// every instance of it that is not terminated to terminate; once none is left, removes its
    /// volumes and snapshots, then the tenant (keys, terminated instances, events) and its
    /// bridge. Returns whether the tenant is gone.
    async fn finish_tenant_deletion(&self, t: &TenantRow) -> Result<bool> {
        // Its endpoints first (with their queues), so no new worker is made for it; the
        // autoscaler terminates the workers of endpoints that are gone.
        for e in self.store.endpoints(Some(&t.id)).await? {
            self.store.delete_endpoint(&e.id).await?;
        }
        let live = self.store.live_instances(Some(&t.id)).await?;
        if !live.is_empty() {
            for i in live {
                if i.desired != wire::InstanceState::Terminated {
                    self.set_desired_state(&i.id, wire::InstanceState::Terminated)
                        .await?;
                    self.event(&i.id, "requested", format!("tenant {} deleted", t.name))
                        .await;
                }
            }
            self.wake.notify_one();
            return Ok(false);
        }
        let volumes = self.store.volumes(Some(&t.id)).await?;
        // A volume a request (admitted before the mark) is still making: wait for it.
        if volumes
            .iter()
            .any(|v| self.is_making_volume(&t.id, &v.name))
        {
            return Ok(false);
        }
        for v in volumes {
            self.destroy_volume(&t.id, &v.name).await?;
        }
        // Its snapshots (no instance is left to take, restore or clone one).
        self.remove_tenant_snapshots(&t.id).await?;
        // Its private images, registry logins and pull jobs (the logins reference the row).
        self.forget_tenant_images(&t.id).await?;
        // Only the caller whose delete removed the row tears the bridge down: its slot may be
        // a new tenant's right after.
        if !self.store.delete_tenant(&t.id).await? {
            return Ok(false);
        }
        let (node, slot) = (self.node.clone(), t.net_slot);
        let net = gpuvisor_node::net::TenantNet { slot };
        let forget = move || {
            node.net.teardown_tenant(&net)?;
            node.net.forget_tenant_connections(&net)
        };
        match tokio::task::spawn_blocking(forget).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(slot, "cannot remove the bridge of a deleted tenant: {e}"),
            Err(e) => tracing::warn!(slot, "cannot remove the bridge of a deleted tenant: {e}"),
        }
        tracing::info!(tenant = %t.name, "tenant deleted");
        Ok(true)
    }

    pub async fn list_tenants(&self, who: &Principal) -> Result<Vec<wire::Tenant>> {
        who.allow(Op::ListTenants)?;
        Ok(self
            .store
            .tenants()
            .await?
            .into_iter()
            .filter(|t| who.is_admin() || t.id == who.tenant_id)
            .map(|t| wire_tenant(t, None))
            .collect())
    }

    /// Tenant `name` as `who` may see it: any for an admin, its own for everyone else (another
    /// is as absent as one that does not exist).
    async fn visible_tenant(&self, who: &Principal, name: &str) -> Result<TenantRow> {
        self.store
            .tenant_by_name(name)
            .await?
            .filter(|t| who.is_admin() || t.id == who.tenant_id)
            .ok_or_else(|| EngineError::NotFound(format!("tenant {name:?} not found")))
    }

    /// A tenant with its policy and what it holds: admins see any, a tenant only itself.
    pub async fn get_tenant(&self, who: &Principal, name: &str) -> Result<wire::Tenant> {
        who.allow(Op::GetTenant)?;
        let t = self.visible_tenant(who, name).await?;
        let u = self.tenant_usage(&t.id).await?;
        Ok(wire_tenant(t, Some(u)))
    }

    /// Replaces a tenant's policy (admin). Lowering a quota below what the tenant holds is
    /// allowed: nothing running is stopped, new creates are refused until it is under again.
    pub async fn set_tenant_policy(
        &self,
        who: &Principal,
        name: &str,
        policy: &TenantPolicy,
    ) -> Result<wire::Tenant> {
        who.allow(Op::SetTenantPolicy)?;
        let t = self.tenant_named(name).await?;
        self.store.set_tenant_policy(&t.id, policy).await?;
        self.get_tenant(who, name).await
    }

    /// Sets a tenant's own quotas (its tenant admin, or an admin): each at most the admin's
    /// (`tenant set`); the stricter of the two applies. Quotas only: priority and preemption
    /// rights are the admin's to grant.
    pub async fn set_tenant_limits(
        &self,
        who: &Principal,
        name: &str,
        limits: &TenantPolicy,
    ) -> Result<wire::Tenant> {
        who.allow(Op::SetTenantLimits)?;
        let t = self.visible_tenant(who, name).await?;
        let defaults = TenantPolicy::default();
        if limits.max_priority != defaults.max_priority
            || limits.preempt_other_tenants != defaults.preempt_other_tenants
        {
            return Err(EngineError::InvalidArgument(
                "a tenant's own limits are quotas only: priority and preemption rights are set by an admin (`tenant set`)".into(),
            ));
        }
        for (what, own, admin) in quota_pairs(limits, &t.policy) {
            if let (Some(own), Some(admin)) = (own, admin) {
                if own > admin {
                    return Err(EngineError::Forbidden(format!(
                        "{what} {own} is above the {admin} an admin allows tenant {:?}",
                        t.name
                    )));
                }
            }
        }
        self.store.set_tenant_limits(&t.id, limits).await?;
        self.get_tenant(who, name).await
    }

    /// The tenant a key belongs to (with its policy); gone means the key is no good.
    /// The key's tenant, refused when it is gone or being deleted. Creates call it again under
    /// the placement lock, so nothing new is made for a tenant once `tenant rm` has begun.
    pub(crate) async fn key_tenant(&self, tenant_id: &str) -> Result<TenantRow> {
        let t =
            self.store.tenant(tenant_id).await?.ok_or_else(|| {
                EngineError::Unauthorized("the key's tenant no longer exists".into())
            })?;
        if t.deleting_at.is_some() {
            return Err(EngineError::Unauthorized(
                "the key's tenant is being deleted".into(),
            ));
        }
        Ok(t)
    }

    pub(crate) async fn tenant_usage(&self, tenant_id: &str) -> Result<TenantUsage> {
        let live = self.store.live_instances(Some(tenant_id)).await?;
        let volumes = self.store.volumes(Some(tenant_id)).await?;
        let snapshots = self.store.snapshots(Some(tenant_id)).await?;
        Ok(usage(&live, &volumes, &snapshots, self.vm_overhead()))
    }

    /// Refuses `ask` when it breaks one of the tenant's quotas. Admin keys are the operator's
    /// and bypass quotas of their own tenant only by having none set.
    /// `live` is the live instances the caller already read under the placement lock (any
    /// tenants'; only `tenant`'s count), so the check costs one more query (volumes; and the
    /// snapshots when the tenant has a disk quota).
    pub(crate) async fn check_quota(
        &self,
        tenant: &TenantRow,
        live: &[InstanceRow],
        ask: &Ask,
    ) -> Result<()> {
        let volumes = self.store.volumes(Some(&tenant.id)).await?;
        // Snapshots count only towards `max_disk`: read only when it is set (not on every
        // create of a tenant without one).
        let snapshots = if effective_policy(tenant).max_disk.is_some() {
            self.store.snapshots(Some(&tenant.id)).await?
        } else {
            Vec::new()
        };
        let u = usage(
            live.iter().filter(|i| i.tenant_id == tenant.id),
            &volumes,
            &snapshots,
            self.vm_overhead(),
        );
        match over_quota(&tenant.name, &effective_policy(tenant), &u, ask) {
            Some(msg) => Err(EngineError::QuotaExceeded(msg)),
            None => Ok(()),
        }
    }

    /// The priority rules: a tenant asks for at most its `max_priority` (admins for any).
    pub(crate) fn check_priority(
        who: &Principal,
        tenant: &TenantRow,
        asked: PriorityClass,
    ) -> Result<()> {
        if who.is_admin() || asked <= tenant.policy.max_priority {
            return Ok(());
        }
        Err(EngineError::Forbidden(format!(
            "tenant {:?} may ask for priority up to {}, not {} (an admin grants more with `gpuvisor tenant set {} --max-priority {}`)",
            tenant.name,
            tenant.policy.max_priority.as_str(),
            asked.as_str(),
            tenant.name,
            asked.as_str()
        )))
    }
}

/// Which tenant a listing covers: an admin names one (by name) or none (all); anyone else
/// always its own, and naming another tenant is `not_found` (as if it did not exist).
pub(crate) fn scoped_tenant(
    who: &Principal,
    asked: Option<&str>,
    names: &BTreeMap<String, String>,
) -> Result<Option<String>> {
    let not_found = |t: &str| EngineError::NotFound(format!("tenant {t:?} not found"));
    match (asked, who.is_admin()) {
        (Some(t), true) => names
            .iter()
            .find(|(_, n)| *n == t)
            .map(|(id, _)| Some(id.clone()))
            .ok_or_else(|| not_found(t)),
        (None, true) => Ok(None),
        (Some(t), false) if t != who.tenant => Err(not_found(t)),
        (_, false) => Ok(Some(who.tenant_id.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_names_the_first_limit_broken() {
        let p = TenantPolicy {
            max_vcpus: Some(4),
            max_memory: Some(1 << 30),
            ..Default::default()
        };
        let u = TenantUsage {
            vcpus: 3,
            memory: 512 << 20,
            ..Default::default()
        };
        let ok = Ask {
            vcpus: 1,
            memory: 512 << 20,
            ..Default::default()
        };
        assert_eq!(over_quota("acme", &p, &u, &ok), None);
        let cpu = Ask {
            vcpus: 2,
            ..Default::default()
        };
        let msg = over_quota("acme", &p, &u, &cpu).unwrap();
        assert!(msg.contains("max_vcpus"), "{msg}");
        assert!(msg.contains("holds 3, asks 2, quota 4"), "{msg}");
        let mem = Ask {
            memory: 513 << 20,
            ..Default::default()
        };
        assert!(over_quota("acme", &p, &u, &mem)
            .unwrap()
            .contains("max_memory"));
        // Unlimited quotas never refuse.
        let none = TenantPolicy::default();
        let big = Ask {
            vcpus: 1000,
            instances: 1000,
            ..Default::default()
        };
        assert_eq!(over_quota("acme", &none, &u, &big), None);
    }
}
