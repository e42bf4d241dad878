-- The octets a job keeps in the store, counted against its tenant's cap: a row's own
-- overhead (512), its input, webhook URL, result or latest progress update, error and stream
-- chunks (each with its row's 128). Kept up to date by every write that changes one
-- (crates/control/src/store/endpoints.rs). OCTET_LENGTH: PostgreSQL, and SQLite 3.43+ (the
-- bundled one).
ALTER TABLE endpoint_jobs ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0;
UPDATE endpoint_jobs SET bytes = 512 + OCTET_LENGTH(input) + OCTET_LENGTH(webhook)
    + OCTET_LENGTH(output) + OCTET_LENGTH(error)
    + (SELECT COALESCE(SUM(OCTET_LENGTH(s.output) + 128), 0) FROM endpoint_job_stream s
       WHERE s.job_id = endpoint_jobs.id);
-- A tenant's sum read from the index alone (no row, however large its texts, is read).
CREATE INDEX endpoint_jobs_bytes ON endpoint_jobs (endpoint_id, bytes);
-- The webhooks due, without a scan of every job.
CREATE INDEX endpoint_jobs_hooks ON endpoint_jobs (webhook_pending, endpoint_id, finished_at);
-- Chunks of jobs purged before purge_queue removed them too.
DELETE FROM endpoint_job_stream WHERE NOT EXISTS
    (SELECT 1 FROM endpoint_jobs j WHERE j.id = endpoint_job_stream.job_id);
