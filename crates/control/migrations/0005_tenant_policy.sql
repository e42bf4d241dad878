-- What an admin allows a tenant: quotas and scheduling rights, as the JSON of
-- `gpuvisor_wire::TenantPolicy` ('{}' = the defaults: no quota, priority up to normal, no
-- preemption of other tenants' instances).
ALTER TABLE tenants ADD COLUMN policy TEXT NOT NULL DEFAULT '{}';
