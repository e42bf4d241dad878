-- Instance templates (issue 12, item 7): owner '' = public (an admin's, every tenant's to use),
-- else the owning tenant's id. A name is unique per owner; a tenant sees its own and the
-- public ones, its own first. `spec` is the JSON of gpuvisor_wire::TemplateSpec.
CREATE TABLE templates (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (owner, name)
);
