-- Restart policies (issue 10, item 3) and crash-safe volumes (item 6). Portable SQL: the same
-- statements run on SQLite and PostgreSQL.
--
-- instances.restart_policy: `no`, `on-failure[:N]` or `always` (gpuvisor_wire::RestartPolicy).
-- restart_count: automatic restarts since the last create/start; restart_not_before: unix ms
-- before which the reconciler does not provision the instance again (crash-loop backoff);
-- restart_backoff_ms: the delay of the last restart (doubled on the next quick exit);
-- started_at: when the instance last became running (a run of 10 s or more resets the backoff);
-- exit_code: the main process's last exit code, when it was seen.
ALTER TABLE instances ADD COLUMN restart_policy TEXT NOT NULL DEFAULT 'always';
ALTER TABLE instances ADD COLUMN restart_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN restart_not_before BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN restart_backoff_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN started_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN exit_code BIGINT;
-- volumes.state: `pending` from the row's insert until the image file is complete (and, for a
-- volume made by `instance create`, until the instance row is written); then `ready`. Volumes
-- from before this migration all have their file.
ALTER TABLE volumes ADD COLUMN state TEXT NOT NULL DEFAULT 'ready';
