-- Serverless endpoints (issue 13, item 3). An endpoint is a tenant's queue of jobs and the
-- pool of worker instances (from a template) that the autoscaler keeps for it. `spec` is the
-- JSON of gpuvisor_wire::EndpointSpec.
CREATE TABLE endpoints (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (tenant_id, name)
);
-- Jobs: accepted (committed here) before the client is answered, so a daemon killed at any
-- moment loses none. A worker's claim is a lease (`lease_until`), renewed by its pings and
-- stream posts; an expired lease, or a worker instance gone, puts the job back in the queue
-- until `attempts` reaches the limit. `output`/`error` are '' until set; `expires_at` is when
-- a finished job is forgotten (0 while it is not finished); `stream_read`: the stream chunks
-- already handed to a client (each is handed out once, as RunPod's /stream does).
CREATE TABLE endpoint_jobs (
    id TEXT PRIMARY KEY,
    endpoint_id TEXT NOT NULL,
    state TEXT NOT NULL,
    input TEXT NOT NULL,
    webhook TEXT NOT NULL,
    sync BIGINT NOT NULL,
    exec_timeout_ms BIGINT NOT NULL,
    ttl_ms BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    finished_at BIGINT NOT NULL,
    worker_id TEXT NOT NULL,
    lease_until BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    output TEXT NOT NULL,
    error TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    webhook_pending BIGINT NOT NULL,
    stream_read BIGINT NOT NULL
);
CREATE INDEX endpoint_jobs_queue ON endpoint_jobs (endpoint_id, state, created_at);
CREATE INDEX endpoint_jobs_expiry ON endpoint_jobs (expires_at);
-- A streaming job's partial outputs, in the order the worker sent them.
CREATE TABLE endpoint_job_stream (
    job_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    output TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
-- Workers of an endpoint: `pod_id` is the worker's own name (RUNPOD_POD_ID, a job's
-- `worker_id`), `instance_id` its instance ('' between the row and the instance's creation:
-- the instance is named `ep-<pod_id>`, so a crash in between is found again), `token_hash`
-- the hash of its own credential. `parked`: a flashboot worker stopped with its disk kept, to
-- be started again on the next scale-up.
CREATE TABLE endpoint_workers (
    pod_id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    endpoint_id TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    parked BIGINT NOT NULL
);
CREATE INDEX endpoint_workers_endpoint ON endpoint_workers (endpoint_id);
