//! Tenants: creation, listing, and the policy an admin sets on each — quotas checked at create
//! time and the scheduling rights (highest priority, preempting other tenants).
//!
//! Key decision: quotas are checked under the placement lock against everything the tenant
//! holds in the store (running and stopped instances keep their reservation, volumes count until
//! removed), so two concurrent creates cannot both slip under a quota.

use super::{now_ms, random_hex, validate, Engine, Principal};
use crate::error::{EngineError, Result};
use crate::store::{InstanceRow, TenantRow, VolumeRow};
use gpuvisor_wire::{self as wire, PriorityClass, TenantPolicy, TenantUsage};

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

/// What a tenant holds: its live instances and its volumes.
pub(crate) fn usage<'a>(
    instances: impl IntoIterator<Item = &'a InstanceRow>,
    volumes: &[VolumeRow],
) -> TenantUsage {
    let mut u = TenantUsage::default();
    for i in instances {
        u.instances += 1;
        u.vcpus += i.spec.vcpus;
        u.memory += i.spec.memory;
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
    u
}

/// (quota name, limit, held, asked, how to show an amount).
type QuotaCheck = (&'static str, Option<u64>, u64, u64, fn(u64) -> String);

/// The first quota `ask` would break, as a message naming it; `None` when all hold.
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
        _ => part(volumes, "volume"),
    }
}

fn wire_tenant(t: TenantRow, usage: Option<TenantUsage>) -> wire::Tenant {
    wire::Tenant {
        id: t.id,
        name: t.name,
        created_at: t.created_at,
        policy: t.policy,
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
        who.require_admin("creating tenants")?;
        validate::name("tenant", &req.name)?;
        if self.store.tenant_by_name(&req.name).await?.is_some() {
            return Err(EngineError::AlreadyExists(format!(
                "tenant {:?} already exists",
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
        who.require_admin("deleting tenants")?;
        let t = self.tenant_named(name).await?;
        if t.id == who.tenant_id {
            return Err(EngineError::InvalidArgument(format!(
                "tenant {name:?} is the tenant of the key making this request: it cannot delete \
                 itself"
            )));
        }
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
        if !cascade && t.deleting_at.is_none() && !(instances.is_empty() && volumes.is_empty()) {
            return Err(EngineError::InUse(format!(
                "tenant {name:?} still owns {}: remove them first, or delete it with --cascade",
                holdings(&instances, &volumes)
            )));
        }
        self.store.mark_tenant_deleting(&t.id, now_ms()).await?;
        let placement = self.place_lock.lock().await;
        for i in self.store.live_instances(Some(&t.id)).await? {
            if i.desired != wire::InstanceState::Terminated {
                self.set_desired_state(&i.id, wire::InstanceState::Terminated)
                    .await?;
                self.event(&i.id, "requested", format!("tenant {name} deleted"))
                    .await;
            }
        }
        drop(placement);
        let done = self.finish_tenant_deletion(&t).await?;
        self.wake.notify_one();
        Ok(wire::TenantRemoval {
            name: t.name,
            deleted: done,
            instances,
            volumes,
        })
    }

    /// Finishes every tenant deletion whose instances are all terminated (the reconciler calls
    /// it on each pass).
    pub(crate) async fn finish_tenant_deletions(&self) -> Result<()> {
        for t in self.store.deleting_tenants().await? {
            if let Err(e) = self.finish_tenant_deletion(&t).await {
                tracing::warn!(tenant = %t.name, "cannot finish deleting the tenant: {e}");
            }
        }
        Ok(())
    }

    /// Removes a deleting tenant's volumes and then the tenant once no instance of it is left
    /// that is not terminated; its bridge goes with it. Returns whether the tenant is gone.
    async fn finish_tenant_deletion(&self, t: &TenantRow) -> Result<bool> {
        if !self.store.live_instances(Some(&t.id)).await?.is_empty() {
            return Ok(false);
        }
        for v in self.store.volumes(Some(&t.id)).await? {
            self.destroy_volume(&t.id, &v.name).await?;
        }
        if !self.store.delete_tenant(&t.id).await? {
            return Ok(false);
        }
        let (node, slot) = (self.node.clone(), t.net_slot);
        let net = gpuvisor_node::net::TenantNet { slot };
        match tokio::task::spawn_blocking(move || node.net.teardown_tenant(&net)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(slot, "cannot remove the bridge of a deleted tenant: {e}"),
            Err(e) => tracing::warn!(slot, "cannot remove the bridge of a deleted tenant: {e}"),
        }
        tracing::info!(tenant = %t.name, "tenant deleted");
        Ok(true)
    }

    pub async fn list_tenants(&self, who: &Principal) -> Result<Vec<wire::Tenant>> {
        Ok(self
            .store
            .tenants()
            .await?
            .into_iter()
            .filter(|t| who.is_admin() || t.id == who.tenant_id)
            .map(|t| wire_tenant(t, None))
            .collect())
    }

    /// A tenant with its policy and what it holds: admins see any, a tenant only itself.
    pub async fn get_tenant(&self, who: &Principal, name: &str) -> Result<wire::Tenant> {
        let t = self
            .store
            .tenant_by_name(name)
            .await?
            .filter(|t| who.is_admin() || t.id == who.tenant_id)
            .ok_or_else(|| EngineError::NotFound(format!("tenant {name:?} not found")))?;
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
        who.require_admin("setting a tenant's policy")?;
        let t = self.tenant_named(name).await?;
        self.store.set_tenant_policy(&t.id, policy).await?;
        self.get_tenant(who, name).await
    }

    /// The tenant a key belongs to (with its policy); gone means the key is no good.
    pub(crate) async fn key_tenant(&self, tenant_id: &str) -> Result<TenantRow> {
        self.store
            .tenant(tenant_id)
            .await?
            .ok_or_else(|| EngineError::Unauthorized("the key's tenant no longer exists".into()))
    }

    pub(crate) async fn tenant_usage(&self, tenant_id: &str) -> Result<TenantUsage> {
        let live = self.store.live_instances(Some(tenant_id)).await?;
        let volumes = self.store.volumes(Some(tenant_id)).await?;
        Ok(usage(&live, &volumes))
    }

    /// Refuses `ask` when it breaks one of the tenant's quotas. Admin keys are the operator's
    /// and bypass quotas of their own tenant only by having none set.
    /// `live` is the live instances the caller already read under the placement lock (any
    /// tenants'; only `tenant`'s count), so the check costs one more query (volumes), not two.
    pub(crate) async fn check_quota(
        &self,
        tenant: &TenantRow,
        live: &[InstanceRow],
        ask: &Ask,
    ) -> Result<()> {
        let volumes = self.store.volumes(Some(&tenant.id)).await?;
        let u = usage(live.iter().filter(|i| i.tenant_id == tenant.id), &volumes);
        match over_quota(&tenant.name, &tenant.policy, &u, ask) {
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
