-- One row per job end (issue 15: an endpoint's rates and latency in the console and the API):
-- how it ended, how long it waited in the queue and how long it ran (-1: it never ran, e.g.
-- cancelled or expired in the queue). Written with the end itself; kept 15 minutes (pruned by
-- finished_at on every pass of the queue's clock, hence its own index).
-- Portable SQL (SQLite and PostgreSQL).
CREATE TABLE endpoint_job_ends (
    endpoint_id TEXT NOT NULL,
    finished_at BIGINT NOT NULL,
    state TEXT NOT NULL,
    delay_ms BIGINT NOT NULL,
    exec_ms BIGINT NOT NULL
);
CREATE INDEX endpoint_job_ends_at ON endpoint_job_ends (endpoint_id, finished_at);
CREATE INDEX endpoint_job_ends_finished ON endpoint_job_ends (finished_at);
