-- Volumes a VM has been given as a raw disk (review H2): a guest may have written any block of
-- them, filesystem metadata included, so the host kernel no longer mounts them for containers
-- (the engine refuses a container that asks for one). 1 once a VM instance is created with the
-- volume; never cleared. Portable SQL (SQLite and PostgreSQL).
ALTER TABLE volumes ADD COLUMN vm_touched BIGINT NOT NULL DEFAULT 0;
-- Volumes that a VM instance still on record mounts (its spec's JSON names them; a '_' in a
-- name matches any character here, which can only mark more volumes, never fewer).
UPDATE volumes SET vm_touched = 1 WHERE EXISTS (
    SELECT 1 FROM instances i
    WHERE i.runtime = 'vm' AND i.tenant_id = volumes.tenant_id
      AND i.spec LIKE ('%"name":"' || volumes.name || '"%')
);
