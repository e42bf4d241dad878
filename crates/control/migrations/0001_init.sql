-- One schema for SQLite and PostgreSQL: TEXT and BIGINT only, JSON kept as TEXT, times as
-- unix milliseconds. Parameters in queries are $1..$n in order of appearance, which both accept.
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    net_slot BIGINT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    role TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    cpus BIGINT NOT NULL,
    memory BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE gpus (
    uuid TEXT PRIMARY KEY,
    node_id TEXT NOT NULL REFERENCES nodes(id),
    idx BIGINT NOT NULL,
    model TEXT NOT NULL,
    vram BIGINT NOT NULL,
    pci_address TEXT NOT NULL,
    numa_node BIGINT,
    backend TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE images (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    layers TEXT NOT NULL,
    size BIGINT NOT NULL,
    command TEXT NOT NULL,
    env TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE volumes (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    name TEXT NOT NULL,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    node_id TEXT NOT NULL,
    image TEXT NOT NULL,
    state TEXT NOT NULL,
    desired TEXT NOT NULL,
    reason TEXT,
    spec TEXT NOT NULL,
    cpus TEXT NOT NULL,
    gpus TEXT NOT NULL,
    ip_host BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Names are unique per tenant among instances that are not terminated.
CREATE UNIQUE INDEX instances_live_name ON instances (tenant_id, name) WHERE state <> 'terminated';
CREATE INDEX instances_state ON instances (state);

CREATE TABLE events (
    id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX events_instance ON events (instance_id, at);
