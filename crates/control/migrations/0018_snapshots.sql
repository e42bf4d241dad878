-- Instance snapshots (issue 14, item 1): an instance's disks (and a VM's running state) saved
-- on this host under <data>/snapshots/<id>/ (crates/node/src/snapshot.rs). A row is written
-- `pending` before the files are made and becomes `ready` once they are complete; a pending
-- row found at start is a crash's leftover and goes with its files. `image` is the instance
-- row's image name (a clone runs the same image); `memory` 1 when a VM's running state was
-- saved; `volumes` the JSON list of the volume names saved; sizes in bytes; `vcpus` and
-- `memory_bytes` the instance's size when taken (a memory snapshot restores only into it).
-- A name is unique per tenant. Portable SQL (SQLite and PostgreSQL).
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    name TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    runtime TEXT NOT NULL,
    image TEXT NOT NULL,
    state TEXT NOT NULL,
    memory BIGINT NOT NULL,
    consistency TEXT NOT NULL,
    disk_size BIGINT NOT NULL,
    volumes TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_bytes BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (tenant_id, name)
);
