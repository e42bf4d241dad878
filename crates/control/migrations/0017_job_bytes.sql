-- The octets a job keeps in the store: its input, its result or error, and its stream chunks
-- (a progress update, at most 1 MiB and replaced, is not counted). Their sum over a tenant's
-- endpoints is held under a cap, so no tenant fills the host's disk with jobs.
ALTER TABLE endpoint_jobs ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0;
