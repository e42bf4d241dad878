-- 1 min aggregates of GPU and instance metrics, so the 7-day history survives a restart.
-- entity: `gpu:<uuid>` or `instance:<id>`; avg/max: one number per metric, comma-separated,
-- empty where the metric had no value. Rows older than 7 days are deleted (bounded on disk).
CREATE TABLE metric_minutes (
    entity TEXT NOT NULL,
    at BIGINT NOT NULL,
    avg TEXT NOT NULL,
    max TEXT NOT NULL,
    PRIMARY KEY (entity, at)
);
CREATE INDEX metric_minutes_at ON metric_minutes (at);
