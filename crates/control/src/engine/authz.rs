//! Who may do what: every operation of the [`Engine`](super::Engine) names itself ([`Op`])
//! and asks [`Principal::allow`] first, so every front end (REST today, GraphQL next) applies
//! the same rule. An operation needs one [`Access`]; a role grants a set of them. Tenancy (which
//! objects a caller sees) is the operations' own business, after this check.

use super::Principal;
use crate::error::{EngineError, Result};
use gpuvisor_wire::Role;

/// What an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The host-wide Prometheus page.
    Scrape,
    /// Reading the caller's tenant's objects.
    Read,
    /// Creating and operating the tenant's instances, volumes, pulls, logins.
    Operate,
    /// The tenant's keys.
    ManageTenant,
    /// Tenants, quotas, GPUs, public images: the host's operator.
    Admin,
}

impl Access {
    /// The roles that have it, as a sentence fragment.
    fn roles(self) -> String {
        let names: Vec<&str> = Role::ALL
            .into_iter()
            .filter(|r| grants(*r, self))
            .map(Role::as_str)
            .collect();
        match names.split_last() {
            Some((last, [])) => format!("an {last}"),
            Some((last, rest)) => format!("an {} or {last}", rest.join(", ")),
            None => "no".into(),
        }
    }
}

/// Whether `role` has `access`.
pub fn grants(role: Role, access: Access) -> bool {
    use Access::*;
    match role {
        Role::Admin => true,
        Role::TenantAdmin => matches!(access, Read | Operate | ManageTenant),
        Role::Member => matches!(access, Read | Operate),
        Role::Viewer => matches!(access, Read),
        Role::Metrics => matches!(access, Scrape),
    }
}

macro_rules! ops {
    ($($op:ident => $name:literal, $access:ident;)*) => {
        /// Every operation of the engine a caller can ask for.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Op { $($op),* }

        impl Op {
            pub const ALL: &'static [Op] = &[$(Op::$op),*];

            /// The operation's stable name (the audit log's, GraphQL's).
            pub fn name(self) -> &'static str {
                match self { $(Op::$op => $name),* }
            }

            pub fn access(self) -> Access {
                match self { $(Op::$op => Access::$access),* }
            }
        }
    };
}

ops! {
    ScrapeMetrics => "metrics.scrape", Scrape;
    ListTenants => "tenant.list", Read;
    GetTenant => "tenant.get", Read;
    CreateTenant => "tenant.create", Admin;
    DeleteTenant => "tenant.delete", Admin;
    SetTenantPolicy => "tenant.set_policy", Admin;
    SetTenantLimits => "tenant.set_limits", ManageTenant;
    ListKeys => "key.list", Read;
    CreateKey => "key.create", ManageTenant;
    RevokeKey => "key.revoke", ManageTenant;
    ListGpus => "gpu.list", Read;
    GpuStats => "gpu.stats", Read;
    GpuMetrics => "gpu.metrics", Read;
    BindVfio => "gpu.bind_vfio", Admin;
    ReleaseGpu => "gpu.release", Admin;
    CordonGpu => "gpu.cordon", Admin;
    UncordonGpu => "gpu.uncordon", Admin;
    MigState => "gpu.mig_list", Admin;
    MigCreate => "gpu.mig_create", Admin;
    MigDestroy => "gpu.mig_destroy", Admin;
    ListImages => "image.list", Read;
    ImportImage => "image.import", Admin;
    UploadImage => "image.upload", Admin;
    RemoveImage => "image.remove", Operate;
    PublishImage => "image.publish", Admin;
    StartPull => "image.pull", Operate;
    GetPull => "image.pull_status", Read;
    ListRegistries => "registry.list", Read;
    RegistryLogin => "registry.login", Operate;
    RegistryLogout => "registry.logout", Operate;
    ListVolumes => "volume.list", Read;
    CreateVolume => "volume.create", Operate;
    RemoveVolume => "volume.remove", Operate;
    ListInstances => "instance.list", Read;
    GetInstance => "instance.get", Read;
    CreateInstance => "instance.create", Operate;
    StopInstance => "instance.stop", Operate;
    StartInstance => "instance.start", Operate;
    TerminateInstance => "instance.terminate", Operate;
    ScaleInstance => "instance.scale", Operate;
    SnapshotInstance => "instance.snapshot", Operate;
    RestoreInstance => "instance.restore", Operate;
    MigrateInstance => "instance.migrate", Admin;
    ReceiveMigration => "migration.receive", Admin;
    ListSnapshots => "snapshot.list", Read;
    GetSnapshot => "snapshot.get", Read;
    DeleteSnapshot => "snapshot.delete", Operate;
    CreateLink => "instance.link", Operate;
    InstanceLogs => "instance.logs", Read;
    InstanceEvents => "instance.events", Read;
    InstanceMetrics => "instance.metrics", Read;
    Exec => "instance.exec", Operate;
    ExecSession => "instance.exec_session", Operate;
    Console => "instance.console", Operate;
    Display => "instance.display", Operate;
    HostChecks => "host.checks", Admin;
    GpuEvents => "gpu.events", Admin;
    AuditList => "audit.list", ManageTenant;
    Usage => "usage.list", Read;
    ListGpuTypes => "gpu.types", Read;
    ListTemplates => "template.list", Read;
    GetTemplate => "template.get", Read;
    CreateTemplate => "template.create", Operate;
    RemoveTemplate => "template.remove", Operate;
    AuditVerify => "audit.verify", Admin;
    ListEndpoints => "endpoint.list", Read;
    GetEndpoint => "endpoint.get", Read;
    CreateEndpoint => "endpoint.create", Operate;
    UpdateEndpoint => "endpoint.update", Operate;
    RemoveEndpoint => "endpoint.remove", Operate;
    RunJob => "endpoint.run", Operate;
    JobStatus => "endpoint.job_status", Read;
    CancelJob => "endpoint.job_cancel", Operate;
    RetryJob => "endpoint.job_retry", Operate;
    PurgeQueue => "endpoint.purge_queue", Operate;
    EndpointHealth => "endpoint.health", Read;
}

impl Op {
    /// Whether it changes anything (what the audit log records).
    pub fn mutating(self) -> bool {
        !matches!(self.access(), Access::Read | Access::Scrape)
            && !matches!(self, Op::MigState | Op::AuditList | Op::AuditVerify)
            // A job is the tenant's workload (its data, at a workload's rate), not a change
            // of what the tenant has; the endpoint's own changes are recorded.
            && self != Op::RunJob
    }
}

impl Principal {
    /// `Forbidden` unless this caller's role may do `op`.
    pub fn allow(&self, op: Op) -> Result<()> {
        let need = op.access();
        if grants(self.role, need) {
            return Ok(());
        }
        Err(EngineError::Forbidden(format!(
            "{} needs {} key (this one is {})",
            op.name(),
            need.roles(),
            self.role.as_str()
        )))
    }

    /// The roles of keys this caller may make or revoke: any for an admin; members and
    /// viewers for a tenant admin (not its peers, whom the admin appoints: a rogue tenant admin
    /// cannot revoke the others); none otherwise.
    pub fn may_manage_role(&self, role: Role) -> bool {
        match self.role {
            Role::Admin => true,
            Role::TenantAdmin => matches!(role, Role::Member | Role::Viewer),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(role: Role) -> Principal {
        Principal {
            tenant_id: "t".into(),
            tenant: "t".into(),
            role,
            key_id: "k-1".into(),
        }
    }

    #[test]
    fn each_role_gets_exactly_its_accesses() {
        use Access::*;
        let table = [
            (
                Role::Admin,
                vec![Scrape, Read, Operate, ManageTenant, Admin],
            ),
            (Role::TenantAdmin, vec![Read, Operate, ManageTenant]),
            (Role::Member, vec![Read, Operate]),
            (Role::Viewer, vec![Read]),
            (Role::Metrics, vec![Scrape]),
        ];
        for (role, have) in table {
            for a in [Scrape, Read, Operate, ManageTenant, Admin] {
                assert_eq!(grants(role, a), have.contains(&a), "{role:?} {a:?}");
            }
        }
    }

    #[test]
    fn refusals_name_the_operation_and_who_may() {
        let e = who(Role::Viewer).allow(Op::CreateInstance).unwrap_err();
        assert_eq!(
            e.to_string(),
            "instance.create needs an admin, tenant-admin or member key (this one is viewer)"
        );
        let e = who(Role::Member).allow(Op::CreateTenant).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tenant.create needs an admin key (this one is member)"
        );
        assert!(who(Role::Metrics).allow(Op::ScrapeMetrics).is_ok());
        assert!(who(Role::Metrics).allow(Op::ListInstances).is_err());
    }

    #[test]
    fn names_are_unique_and_reads_do_not_mutate() {
        let mut names: Vec<&str> = Op::ALL.iter().map(|o| o.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Op::ALL.len());
        assert!(!Op::ListInstances.mutating() && Op::CreateInstance.mutating());
        assert!(!Op::MigState.mutating() && Op::MigCreate.mutating());
    }

    #[test]
    fn tenant_admins_manage_only_lesser_keys() {
        let ta = who(Role::TenantAdmin);
        assert!(ta.may_manage_role(Role::Member) && ta.may_manage_role(Role::Viewer));
        assert!(!ta.may_manage_role(Role::TenantAdmin));
        assert!(!ta.may_manage_role(Role::Admin) && !ta.may_manage_role(Role::Metrics));
        assert!(!who(Role::Member).may_manage_role(Role::Viewer));
    }
}
