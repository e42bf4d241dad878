-- Metered usage: one row per resource line of an instance or volume while it is billable, at
-- the price it was opened at. The meter (engine::usage) opens and closes rows as states and
-- sizes change and moves `end_ms` of the open ones forward each second; a daemon that starts
-- closes what was left open at its last heartbeat, so a restart is never counted twice.
CREATE TABLE usage_intervals (
    subject_id TEXT NOT NULL,
    line TEXT NOT NULL,
    start_ms BIGINT NOT NULL,
    end_ms BIGINT NOT NULL,
    is_open BIGINT NOT NULL,
    tenant_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    name TEXT NOT NULL,
    resource TEXT NOT NULL,
    model TEXT NOT NULL,
    milli BIGINT NOT NULL,
    interruptible BIGINT NOT NULL,
    quantity DOUBLE PRECISION NOT NULL,
    unit_price DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (subject_id, line, start_ms)
);
CREATE INDEX usage_intervals_open ON usage_intervals (is_open);
CREATE INDEX usage_intervals_tenant ON usage_intervals (tenant_id, end_ms);
CREATE INDEX usage_intervals_end ON usage_intervals (end_ms);
