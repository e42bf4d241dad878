-- Every mutating API call, hash-chained: hash = SHA-256 over the previous row's hash and this
-- row's fields (engine::audit), so an edited or removed row breaks the chain. Retention
-- removes the oldest rows and moves the anchor (the last removed row's seq and hash) forward.
CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    key_id TEXT NOT NULL,
    role TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    op TEXT NOT NULL,
    target TEXT NOT NULL,
    result TEXT NOT NULL,
    source TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_tenant ON audit_log (tenant_id, seq);

CREATE TABLE audit_anchor (
    id BIGINT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
