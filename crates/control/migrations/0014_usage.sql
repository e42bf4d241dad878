-- Metered usage: one row per resource line of an instance or volume while it is billable, at
-- the price it was opened at. The meter (engine::usage) opens and closes rows as states and
-- sizes change and notes its heartbeat each second (settings 'usage.heartbeat'); a daemon
-- that starts closes what was left open at that heartbeat, so a restart is never counted
-- twice. An open row's `end_ms` is its start until it closes.
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
-- One open interval per line: two meter steps can never both open it.
CREATE UNIQUE INDEX usage_intervals_one_open ON usage_intervals (subject_id, line) WHERE is_open = 1;
CREATE INDEX usage_intervals_tenant ON usage_intervals (tenant_id, end_ms);
CREATE INDEX usage_intervals_end ON usage_intervals (end_ms);
