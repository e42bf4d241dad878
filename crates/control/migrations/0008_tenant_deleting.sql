-- `tenant rm --cascade`: when the deletion began (its keys are revoked then); the reconciler
-- removes the tenant's instances and volumes, then the row. NULL: not being deleted.
ALTER TABLE tenants ADD COLUMN deleting_at BIGINT;

-- Daemon-wide settings that must not change under existing objects: `net_plan` (the instance
-- pool and tenant subnet size the tenants' slots were given under).
CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
