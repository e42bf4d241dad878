-- `tenant rm --cascade`: when the deletion began (its keys are revoked then); the reconciler
-- removes the tenant's instances and volumes, then the row. NULL: not being deleted.
ALTER TABLE tenants ADD COLUMN deleting_at BIGINT;
