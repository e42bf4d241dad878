-- Quotas a tenant admin sets on its own tenant, within the admin's policy: the JSON of
-- `gpuvisor_wire::TenantPolicy` (quota fields only; '{}' = none of its own).
ALTER TABLE tenants ADD COLUMN limits TEXT NOT NULL DEFAULT '{}';
