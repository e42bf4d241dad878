-- Registry pulls (issue 10, item 1).
-- Images get an owner: the tenant that pulled one ('' = public: imported by an admin, or
-- published with `image publish`). A name is unique per owner; a tenant sees its own images
-- and the public ones, its own first. The table is rebuilt because SQLite cannot change a
-- primary key in place.
CREATE TABLE images_v6 (
    owner TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    layers TEXT NOT NULL,
    size BIGINT NOT NULL,
    command TEXT NOT NULL,
    env TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    PRIMARY KEY (owner, name)
);
INSERT INTO images_v6 (owner, name, digest, layers, size, command, env, source, created_at)
    SELECT '', name, digest, layers, size, command, env, '', created_at FROM images;
DROP TABLE images;
ALTER TABLE images_v6 RENAME TO images;

-- Registry credentials per tenant and host: the password is sealed (ChaCha20-Poly1305, key in
-- the daemon's private data dir), never stored or shown in clear.
CREATE TABLE registry_credentials (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    host TEXT NOT NULL,
    username TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, host)
);

-- Pull jobs: a job still 'running' when the daemon starts is resumed (its partial downloads
-- are kept under <data>/images/pull).
CREATE TABLE image_pulls (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    reference TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    digest TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
