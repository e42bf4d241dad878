-- GPUs that take no new instances: cordoned by a fatal XID or by an operator, until
-- `gpuvisor gpu uncordon`. Kept apart from `gpus`, which is rewritten from the host at start.
CREATE TABLE gpu_cordons (
    uuid TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    at BIGINT NOT NULL
);
