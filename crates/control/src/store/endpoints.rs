//! Serverless endpoints, their jobs and their workers (migration 0016).
//!
//! A job is claimed by one conditional `UPDATE` (`state = 'IN_QUEUE'` rechecked), so two
//! workers can never hold it at once; it ends by another (`state` not final), so the first
//! result wins and a late one changes nothing: each job ends exactly once.

use super::{json, Result, Store, StoreError};
use gpuvisor_wire::{EndpointSpec, JobState};
use sqlx::any::AnyRow;
use sqlx::Row;

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointRow {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub spec: EndpointSpec,
    pub created_at: i64,
}

/// A job; `input`, `output` and `error` are JSON text (`output`/`error` '' when unset).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobRow {
    pub id: String,
    pub endpoint_id: String,
    pub state: String,
    pub input: String,
    pub webhook: String,
    pub sync: bool,
    pub exec_timeout_ms: i64,
    pub ttl_ms: i64,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub worker_id: String,
    pub lease_until: i64,
    pub attempts: i64,
    pub output: String,
    pub error: String,
    pub expires_at: i64,
}

impl JobRow {
    pub fn state(&self) -> JobState {
        JobState::parse(&self.state).unwrap_or(JobState::Failed)
    }
}

/// What the lease and timeout checks need of a running job (no input, no output).
#[derive(Debug, Clone, PartialEq)]
pub struct RunningJob {
    pub id: String,
    pub endpoint_id: String,
    pub worker_id: String,
    pub lease_until: i64,
    pub started_at: i64,
    pub exec_timeout_ms: i64,
    pub attempts: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    pub pod_id: String,
    /// '' until its instance is made.
    pub instance_id: String,
    pub endpoint_id: String,
    pub created_at: i64,
    pub parked: bool,
}

/// One job's end ([`Store::job_ends`]): its final state, and how long it was queued and ran
/// (`None`: it never ran).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnd {
    pub state: String,
    pub delay_ms: Option<u64>,
    pub exec_ms: Option<u64>,
}

/// How many of the newest job ends [`Store::job_ends`] gives for percentiles.
pub const JOB_ENDS_SAMPLE: i64 = 2_000;

/// Per endpoint and state: how many jobs, the oldest's creation, how many were retried.
#[derive(Debug, Clone, PartialEq)]
pub struct JobTally {
    pub endpoint_id: String,
    pub state: String,
    pub count: u64,
    pub oldest: i64,
    pub retried: u64,
}

fn endpoint(r: &AnyRow) -> Result<EndpointRow> {
    let spec: String = r.try_get("spec")?;
    Ok(EndpointRow {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        name: r.try_get("name")?,
        spec: serde_json::from_str(&spec).map_err(|e| StoreError::Corrupt {
            table: "endpoints",
            why: e.to_string(),
        })?,
        created_at: r.try_get("created_at")?,
    })
}

/// The most stream output one job keeps, in bytes (its chunks together).
pub const MAX_STREAM_BYTES: i64 = 64 << 20;
/// The most stream output one `take_stream` hands out, in bytes.
const PAGE_BYTES: usize = 16 << 20;

macro_rules! job_cols {
    () => {
        "id, endpoint_id, state, input, webhook, sync, exec_timeout_ms, ttl_ms, created_at, \
         started_at, finished_at, worker_id, lease_until, attempts, output, error, expires_at"
    };
}

/// A job row's own weight in `bytes` (ids, times, states, the row's overhead), so that many
/// tiny jobs count too.
pub const JOB_ROW_OCTETS: i64 = 512;
/// A stream chunk row's own weight (job id, sequence, the row's overhead), likewise.
pub const CHUNK_ROW_OCTETS: i64 = 128;

/// A text's size in the store, as the `bytes` column counts it.
fn octets(s: &str) -> i64 {
    i64::try_from(s.len()).unwrap_or(i64::MAX)
}

fn job(r: &AnyRow) -> Result<JobRow> {
    Ok(JobRow {
        id: r.try_get("id")?,
        endpoint_id: r.try_get("endpoint_id")?,
        state: r.try_get("state")?,
        input: r.try_get("input")?,
        webhook: r.try_get("webhook")?,
        sync: r.try_get::<i64, _>("sync")? != 0,
        exec_timeout_ms: r.try_get("exec_timeout_ms")?,
        ttl_ms: r.try_get("ttl_ms")?,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        worker_id: r.try_get("worker_id")?,
        lease_until: r.try_get("lease_until")?,
        attempts: r.try_get("attempts")?,
        output: r.try_get("output")?,
        error: r.try_get("error")?,
        expires_at: r.try_get("expires_at")?,
    })
}

fn worker(r: &AnyRow) -> Result<WorkerRow> {
    Ok(WorkerRow {
        pod_id: r.try_get("pod_id")?,
        instance_id: r.try_get("instance_id")?,
        endpoint_id: r.try_get("endpoint_id")?,
        created_at: r.try_get("created_at")?,
        parked: r.try_get::<i64, _>("parked")? != 0,
    })
}

impl Store {
    // --- endpoints ---------------------------------------------------------------------

    /// `Conflict` when the tenant has an endpoint of that name.
    pub async fn insert_endpoint(&self, e: &EndpointRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO endpoints (id, tenant_id, name, spec, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(e.id.clone())
        .bind(e.tenant_id.clone())
        .bind(e.name.clone())
        .bind(json(&e.spec))
        .bind(e.created_at)
        .execute(&self.pool)
        .await
        .map_err(StoreError::from_write)?;
        Ok(())
    }

    /// A tenant's endpoints, or all (`None`), by name.
    pub async fn endpoints(&self, tenant_id: Option<&str>) -> Result<Vec<EndpointRow>> {
        let rows = match tenant_id {
            Some(t) => {
                sqlx::query(
                    "SELECT id, tenant_id, name, spec, created_at FROM endpoints \
                     WHERE tenant_id = $1 ORDER BY name",
                )
                .bind(t.to_string())
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT id, tenant_id, name, spec, created_at FROM endpoints \
                     ORDER BY tenant_id, name",
                )
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(endpoint).collect()
    }

    pub async fn endpoint(&self, id: &str) -> Result<Option<EndpointRow>> {
        sqlx::query("SELECT id, tenant_id, name, spec, created_at FROM endpoints WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(endpoint)
            .transpose()
    }

    pub async fn endpoint_by_name(
        &self,
        tenant_id: &str,
        name: &str,
    ) -> Result<Option<EndpointRow>> {
        sqlx::query(
            "SELECT id, tenant_id, name, spec, created_at FROM endpoints WHERE tenant_id = $1 AND name = $2",
        )
        .bind(tenant_id.to_string())
        .bind(name.to_string())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(endpoint)
        .transpose()
    }

    pub async fn set_endpoint_spec(&self, id: &str, spec: &EndpointSpec) -> Result<bool> {
        Ok(sqlx::query("UPDATE endpoints SET spec = $1 WHERE id = $2")
            .bind(json(spec))
            .bind(id.to_string())
            .execute(&self.pool)
            .await?
            .rows_affected()
            == 1)
    }

    /// Removes the endpoint and its jobs in one transaction (its workers are the caller's:
    /// instances to terminate first).
    pub async fn delete_endpoint(&self, id: &str) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "DELETE FROM endpoint_job_stream WHERE job_id IN \
             (SELECT id FROM endpoint_jobs WHERE endpoint_id = $1)",
        )
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        for q in [
            "DELETE FROM endpoint_jobs WHERE endpoint_id = $1",
            "DELETE FROM endpoint_job_ends WHERE endpoint_id = $1",
        ] {
            sqlx::query(q)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        let n = sqlx::query("DELETE FROM endpoints WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    // --- jobs --------------------------------------------------------------------------

    pub async fn insert_job(&self, j: &JobRow) -> Result<()> {
        sqlx::query(concat!(
            "INSERT INTO endpoint_jobs (",
            job_cols!(),
            ", webhook_pending, stream_read, bytes) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, 0, 0, $18)"
        ))
        .bind(j.id.clone())
        .bind(j.endpoint_id.clone())
        .bind(j.state.clone())
        .bind(j.input.clone())
        .bind(j.webhook.clone())
        .bind(i64::from(j.sync))
        .bind(j.exec_timeout_ms)
        .bind(j.ttl_ms)
        .bind(j.created_at)
        .bind(j.started_at)
        .bind(j.finished_at)
        .bind(j.worker_id.clone())
        .bind(j.lease_until)
        .bind(j.attempts)
        .bind(j.output.clone())
        .bind(j.error.clone())
        .bind(j.expires_at)
        .bind(JOB_ROW_OCTETS + octets(&j.input) + octets(&j.webhook) + octets(&j.output) + octets(&j.error))
        .execute(&self.pool)
        .await
        .map_err(StoreError::from_write)?;
        Ok(())
    }

    /// The octets the jobs of a tenant's endpoints keep in the store (inputs, results, stream
    /// chunks, progress, rows): what `[proxy] job_storage_per_tenant` caps. Read from the
    /// `endpoint_jobs_bytes` index alone.
    pub async fn tenant_job_bytes(&self, tenant_id: &str) -> Result<u64> {
        let n: i64 = sqlx::query(
            "SELECT CAST(COALESCE(SUM(j.bytes), 0) AS BIGINT) AS n FROM endpoint_jobs j \
             JOIN endpoints e ON e.id = j.endpoint_id WHERE e.tenant_id = $1",
        )
        .bind(tenant_id.to_string())
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub async fn job(&self, id: &str) -> Result<Option<JobRow>> {
        sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            " FROM endpoint_jobs WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(job)
        .transpose()
    }

    /// The oldest queued job of `endpoint_id`, now `worker_id`'s until `lease_until`; `None`
    /// when the queue is empty. A job another claim took first is skipped.
    pub async fn claim_job(
        &self,
        endpoint_id: &str,
        worker_id: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Option<JobRow>> {
        for _ in 0..16 {
            let Some(id) = sqlx::query(
                "SELECT id FROM endpoint_jobs WHERE endpoint_id = $1 AND state = 'IN_QUEUE' \
                 ORDER BY created_at, id LIMIT 1",
            )
            .bind(endpoint_id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get::<String, _>("id"))
            .transpose()?
            else {
                return Ok(None);
            };
            let took = sqlx::query(
                "UPDATE endpoint_jobs SET state = 'IN_PROGRESS', worker_id = $1, \
                 lease_until = $2, started_at = $3, attempts = attempts + 1 \
                 WHERE id = $4 AND state = 'IN_QUEUE'",
            )
            .bind(worker_id.to_string())
            .bind(lease_until)
            .bind(now)
            .bind(id.clone())
            .execute(&self.pool)
            .await?
            .rows_affected();
            if took == 1 {
                return self.job(&id).await;
            }
        }
        Ok(None)
    }

    /// Extends the leases of `worker_id`'s running jobs among `ids`.
    pub async fn renew_leases(&self, worker_id: &str, ids: &[String], until: i64) -> Result<()> {
        for id in ids {
            sqlx::query(
                "UPDATE endpoint_jobs SET lease_until = $1 \
                 WHERE id = $2 AND worker_id = $3 AND state = 'IN_PROGRESS' AND lease_until < $4",
            )
            .bind(until)
            .bind(id.clone())
            .bind(worker_id.to_string())
            .bind(until)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Ends a job that has not ended: `false` when it had (the first end wins).
    #[allow(clippy::too_many_arguments)]
    pub async fn finish_job(
        &self,
        id: &str,
        state: JobState,
        output: &str,
        error: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<bool> {
        self.finish_job_by(id, "", state, output, error, now, expires_at)
            .await
    }

    /// A running job's interim output (a progress update); nothing once it has ended.
    pub async fn set_job_progress(&self, id: &str, worker_id: &str, output: &str) -> Result<()> {
        sqlx::query(
            "UPDATE endpoint_jobs SET output = $1, bytes = bytes - OCTET_LENGTH(output) + $2 \
             WHERE id = $3 AND worker_id = $4 AND state = 'IN_PROGRESS'",
        )
        .bind(output.to_string())
        .bind(octets(output))
        .bind(id.to_string())
        .bind(worker_id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A running job back to the queue (its worker was lost), if `worker_id` still holds it.
    /// The worker stays named (a late result of its attempt may still end the job), and the
    /// stream chunks of its attempt that no client has been given are dropped.
    pub async fn requeue_job(&self, id: &str, worker_id: &str) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE endpoint_jobs SET state = 'IN_QUEUE', lease_until = 0, output = '', \
             bytes = bytes - OCTET_LENGTH(output) \
             WHERE id = $1 AND worker_id = $2 AND state = 'IN_PROGRESS'",
        )
        .bind(id.to_string())
        .bind(worker_id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            sqlx::query(
                "UPDATE endpoint_jobs SET bytes = bytes - (SELECT \
                 CAST(COALESCE(SUM(OCTET_LENGTH(s.output) + $1), 0) AS BIGINT) \
                 FROM endpoint_job_stream s \
                 WHERE s.job_id = $2 AND s.seq > endpoint_jobs.stream_read) WHERE id = $3",
            )
            .bind(CHUNK_ROW_OCTETS)
            .bind(id.to_string())
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "DELETE FROM endpoint_job_stream WHERE job_id = $1 AND seq > \
                 (SELECT stream_read FROM endpoint_jobs WHERE id = $2)",
            )
            .bind(id.to_string())
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Ends a job with a worker's result: only the worker holding it, or the last one to have
    /// held it while it waits in the queue again (its lost lease's result still counts); ''
    /// for anyone ([`Store::finish_job`]). From a live state only: the first end wins.
    #[allow(clippy::too_many_arguments)]
    pub async fn finish_job_by(
        &self,
        id: &str,
        worker_id: &str,
        state: JobState,
        output: &str,
        error: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        // What it was before (for its end's record), locked against a claim in between (SQLite:
        // the write transaction already holds the database).
        let before = sqlx::query(if self.sqlite {
            "SELECT endpoint_id, state, worker_id, created_at, started_at FROM endpoint_jobs \
             WHERE id = $1"
        } else {
            "SELECT endpoint_id, state, worker_id, created_at, started_at FROM endpoint_jobs \
             WHERE id = $1 FOR UPDATE"
        })
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let n = sqlx::query(
            "UPDATE endpoint_jobs SET state = $1, output = $2, error = $3, finished_at = $4, \
             expires_at = $5, lease_until = 0, \
             bytes = bytes - OCTET_LENGTH(output) - OCTET_LENGTH(error) + $9, \
             webhook_pending = CASE WHEN webhook = '' THEN 0 ELSE 1 END \
             WHERE id = $6 AND ($7 = '' OR worker_id = $8) AND state IN ('IN_QUEUE', 'IN_PROGRESS')",
        )
        .bind(state.as_str())
        .bind(output.to_string())
        .bind(error.to_string())
        .bind(now)
        .bind(expires_at)
        .bind(id.to_string())
        .bind(worker_id.to_string())
        .bind(worker_id.to_string())
        .bind(octets(output) + octets(error))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if let (1, Some(r)) = (n, before) {
            let endpoint: String = r.try_get("endpoint_id")?;
            // It ran if a worker held it, or if its last holder's late result ends it back in
            // the queue. Ended from the queue otherwise (cancelled, expired): it never ran.
            let held_by: String = r.try_get("worker_id")?;
            let ran = r.try_get::<String, _>("state")? == JobState::InProgress.as_str()
                || (!worker_id.is_empty() && held_by == worker_id);
            let (created, started): (i64, i64) =
                (r.try_get("created_at")?, r.try_get("started_at")?);
            let (delay, exec) = if ran {
                ((started - created).max(0), (now - started).max(0))
            } else {
                (-1, -1)
            };
            sqlx::query(
                "INSERT INTO endpoint_job_ends (endpoint_id, finished_at, state, delay_ms, exec_ms) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(endpoint)
            .bind(now)
            .bind(state.as_str())
            .bind(delay)
            .bind(exec)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// The ends of `endpoint_id`'s jobs at or after `since`: how many in each final state,
    /// and the newest [`JOB_ENDS_SAMPLE`] of them (for percentiles).
    pub async fn job_ends(
        &self,
        endpoint_id: &str,
        since: i64,
    ) -> Result<(Vec<(String, u64)>, Vec<JobEnd>)> {
        let counts = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM endpoint_job_ends \
             WHERE endpoint_id = $1 AND finished_at >= $2 GROUP BY state",
        )
        .bind(endpoint_id.to_string())
        .bind(since)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.try_get("state")?,
                u64::try_from(r.try_get::<i64, _>("n")?).unwrap_or(0),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
        let sample = sqlx::query(
            "SELECT state, delay_ms, exec_ms FROM endpoint_job_ends \
             WHERE endpoint_id = $1 AND finished_at >= $2 ORDER BY finished_at DESC LIMIT $3",
        )
        .bind(endpoint_id.to_string())
        .bind(since)
        .bind(JOB_ENDS_SAMPLE)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            let ms = |c: &str| -> Result<Option<u64>> {
                Ok(u64::try_from(r.try_get::<i64, _>(c)?).ok())
            };
            Ok(JobEnd {
                state: r.try_get("state")?,
                delay_ms: ms("delay_ms")?,
                exec_ms: ms("exec_ms")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        Ok((counts, sample))
    }

    /// Forgets the job ends before `before`; how many.
    pub async fn prune_job_ends(&self, before: i64) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM endpoint_job_ends WHERE finished_at < $1")
                .bind(before)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    /// Of `ids`, those `worker_id` must stop: ended without a result (cancelled, timed out)
    /// or now another worker's. Not the ones a result ended, nor unknown ones.
    pub async fn jobs_to_stop(&self, worker_id: &str, ids: &[String]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for id in ids {
            let stop = sqlx::query(
                "SELECT id FROM endpoint_jobs WHERE id = $1 AND (state IN ('CANCELLED', 'TIMED_OUT') \
                 OR (state = 'IN_PROGRESS' AND worker_id <> $2))",
            )
            .bind(id.clone())
            .bind(worker_id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .is_some();
            if stop {
                out.push(id.clone());
            }
        }
        Ok(out)
    }

    /// Every running job's lease to at least `until` (a daemon that starts gives workers
    /// time to ping it before judging their leases).
    pub async fn extend_all_leases(&self, until: i64) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE endpoint_jobs SET lease_until = $1 WHERE state = 'IN_PROGRESS' AND lease_until < $2",
        )
        .bind(until)
        .bind(until)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Jobs waiting in an endpoint's queue.
    pub async fn queued_jobs(&self, endpoint_id: &str) -> Result<u64> {
        let n: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM endpoint_jobs WHERE endpoint_id = $1 AND state = 'IN_QUEUE'",
        )
        .bind(endpoint_id.to_string())
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// A failed or timed-out job queued again as new (`retry`); `false` in another state.
    pub async fn retry_job(&self, id: &str, now: i64) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE endpoint_jobs SET state = 'IN_QUEUE', worker_id = '', lease_until = 0, \
             started_at = 0, finished_at = 0, expires_at = 0, attempts = 0, output = '', \
             error = '', created_at = $1, webhook_pending = 0, stream_read = 0, \
             bytes = $2 + OCTET_LENGTH(input) + OCTET_LENGTH(webhook) \
             WHERE id = $3 AND state IN ('FAILED', 'TIMED_OUT')",
        )
        .bind(now)
        .bind(JOB_ROW_OCTETS)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            sqlx::query("DELETE FROM endpoint_job_stream WHERE job_id = $1")
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Removes the queued (not yet running) jobs of an endpoint, with the stream chunks of
    /// their earlier attempts; how many. The jobs go first (`RETURNING` names them), so a
    /// requeue at the same moment either made its job queued before (it goes, chunks and
    /// all) or after (it stays, with its chunks).
    pub async fn purge_queue(&self, endpoint_id: &str) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let gone: Vec<String> = sqlx::query(
            "DELETE FROM endpoint_jobs WHERE endpoint_id = $1 AND state = 'IN_QUEUE' RETURNING id",
        )
        .bind(endpoint_id.to_string())
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get("id"))
        .collect::<std::result::Result<_, _>>()?;
        for id in &gone {
            sqlx::query("DELETE FROM endpoint_job_stream WHERE job_id = $1")
                .bind(id.clone())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(gone.len() as u64)
    }

    /// Every running job, light.
    pub async fn running_jobs(&self) -> Result<Vec<RunningJob>> {
        sqlx::query(
            "SELECT id, endpoint_id, worker_id, lease_until, started_at, exec_timeout_ms, attempts \
             FROM endpoint_jobs WHERE state = 'IN_PROGRESS'",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(RunningJob {
                id: r.try_get("id")?,
                endpoint_id: r.try_get("endpoint_id")?,
                worker_id: r.try_get("worker_id")?,
                lease_until: r.try_get("lease_until")?,
                started_at: r.try_get("started_at")?,
                exec_timeout_ms: r.try_get("exec_timeout_ms")?,
                attempts: r.try_get("attempts")?,
            })
        })
        .collect()
    }

    /// Queued jobs whose time to live ran out.
    pub async fn expired_queued_jobs(&self, now: i64) -> Result<Vec<String>> {
        sqlx::query(
            "SELECT id FROM endpoint_jobs WHERE state = 'IN_QUEUE' AND created_at + ttl_ms < $1",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok(r.try_get("id")?))
        .collect()
    }

    /// Forgets finished jobs past their retention; one whose webhook is still to be called
    /// is kept until `hooks_until` (the webhook is then given up); how many.
    /// Answers (jobs forgotten, of them with a webhook never called).
    pub async fn delete_expired_jobs(&self, now: i64, hooks_until: i64) -> Result<(u64, u64)> {
        macro_rules! gone {
            () => {
                "expires_at > 0 AND expires_at < $1 AND (webhook_pending = 0 OR expires_at < $2)"
            };
        }
        let mut tx = self.begin_write().await?;
        let dropped: i64 = sqlx::query(concat!(
            "SELECT COUNT(*) AS n FROM endpoint_jobs WHERE webhook_pending = 1 AND ",
            gone!()
        ))
        .bind(now)
        .bind(hooks_until)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        sqlx::query(concat!(
            "DELETE FROM endpoint_job_stream WHERE job_id IN (SELECT id FROM endpoint_jobs WHERE ",
            gone!(),
            ")"
        ))
        .bind(now)
        .bind(hooks_until)
        .execute(&mut *tx)
        .await?;
        let n = sqlx::query(concat!("DELETE FROM endpoint_jobs WHERE ", gone!()))
            .bind(now)
            .bind(hooks_until)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok((n, u64::try_from(dropped).unwrap_or(0)))
    }

    /// Per endpoint and state: the count, the oldest job and how many were retried.
    pub async fn job_tallies(&self) -> Result<Vec<JobTally>> {
        sqlx::query(
            "SELECT endpoint_id, state, COUNT(*) AS n, MIN(created_at) AS oldest, \
             SUM(CASE WHEN attempts > 1 THEN 1 ELSE 0 END) AS retried \
             FROM endpoint_jobs GROUP BY endpoint_id, state",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(JobTally {
                endpoint_id: r.try_get("endpoint_id")?,
                state: r.try_get("state")?,
                count: u64::try_from(r.try_get::<i64, _>("n")?).unwrap_or(0),
                oldest: r.try_get("oldest")?,
                retried: u64::try_from(r.try_get::<i64, _>("retried")?).unwrap_or(0),
            })
        })
        .collect()
    }

    /// How many ended jobs of each endpoint have a webhook still to call.
    pub async fn pending_webhooks(&self) -> Result<Vec<(String, i64)>> {
        sqlx::query(
            "SELECT endpoint_id, COUNT(*) AS n FROM endpoint_jobs WHERE webhook_pending = 1 \
             GROUP BY endpoint_id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("endpoint_id")?, r.try_get("n")?)))
        .collect()
    }

    /// Up to `limit` of an endpoint's ended jobs whose webhook is due, oldest end first,
    /// taken (marked called) before they are returned: a call is made at most once.
    pub async fn take_webhooks(&self, endpoint_id: &str, limit: i64) -> Result<Vec<JobRow>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            " FROM endpoint_jobs WHERE endpoint_id = $1 AND webhook_pending = 1 \
             ORDER BY finished_at LIMIT $2"
        ))
        .bind(endpoint_id.to_string())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let jobs: Vec<JobRow> = rows.iter().map(job).collect::<Result<_>>()?;
        for j in &jobs {
            sqlx::query("UPDATE endpoint_jobs SET webhook_pending = 0 WHERE id = $1")
                .bind(j.id.clone())
                .execute(&self.pool)
                .await?;
        }
        Ok(jobs)
    }

    /// Appends a streaming job's partial output (while it runs on `worker_id`), unless the job
    /// has `max_chunks` or [`MAX_STREAM_BYTES`] already: `None` then; else whether it was
    /// appended.
    pub async fn append_stream(
        &self,
        job_id: &str,
        worker_id: &str,
        output: &str,
        max_chunks: i64,
    ) -> Result<Option<bool>> {
        let mut tx = self.begin_write().await?;
        // A no-op write first: it takes the job row's lock (PostgreSQL), so appends of one
        // job are serialized and MAX(seq)+1 is never computed twice.
        let running = sqlx::query(
            "UPDATE endpoint_jobs SET lease_until = lease_until WHERE id = $1 AND worker_id = $2 AND state = 'IN_PROGRESS'",
        )
        .bind(job_id.to_string())
        .bind(worker_id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if running {
            let r = sqlx::query(
                "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(OCTET_LENGTH(output)), 0) AS BIGINT) AS bytes \
                 FROM endpoint_job_stream WHERE job_id = $1",
            )
            .bind(job_id.to_string())
            .fetch_one(&mut *tx)
            .await?;
            let (n, bytes): (i64, i64) = (r.try_get("n")?, r.try_get("bytes")?);
            let len = i64::try_from(output.len()).unwrap_or(i64::MAX);
            if n >= max_chunks || bytes.saturating_add(len) > MAX_STREAM_BYTES {
                return Ok(None);
            }
            sqlx::query(
                "INSERT INTO endpoint_job_stream (job_id, seq, output) VALUES ($1, \
                 (SELECT COALESCE(MAX(seq), 0) + 1 FROM endpoint_job_stream WHERE job_id = $2), $3)",
            )
            .bind(job_id.to_string())
            .bind(job_id.to_string())
            .bind(output.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_write)?;
            sqlx::query("UPDATE endpoint_jobs SET bytes = bytes + $1 WHERE id = $2")
                .bind(len + CHUNK_ROW_OCTETS)
                .bind(job_id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Some(running))
    }

    /// The stream chunks not handed out before (at most `limit`), now marked handed out.
    pub async fn take_stream(&self, job_id: &str, limit: i64) -> Result<Vec<String>> {
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE endpoint_jobs SET stream_read = stream_read WHERE id = $1")
            .bind(job_id.to_string())
            .execute(&mut *tx)
            .await?;
        let read: i64 = sqlx::query("SELECT stream_read FROM endpoint_jobs WHERE id = $1")
            .bind(job_id.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get("stream_read"))
            .transpose()?
            .unwrap_or(0);
        let rows = sqlx::query(
            "SELECT seq, output FROM endpoint_job_stream WHERE job_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3",
        )
        .bind(job_id.to_string())
        .bind(read)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut out: Vec<String> = Vec::with_capacity(rows.len());
        let mut last = read;
        let mut bytes = 0;
        for r in &rows {
            let chunk: String = r.try_get("output")?;
            // One answer holds at most PAGE_BYTES (and always one chunk): the rest next time.
            if !out.is_empty() && bytes + chunk.len() > PAGE_BYTES {
                break;
            }
            bytes += chunk.len();
            last = r.try_get("seq")?;
            out.push(chunk);
        }
        if last > read {
            sqlx::query(
                "UPDATE endpoint_jobs SET stream_read = $1 WHERE id = $2 AND stream_read = $3",
            )
            .bind(last)
            .bind(job_id.to_string())
            .bind(read)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    // --- workers -----------------------------------------------------------------------

    /// A worker about to be made (its instance comes next: [`Store::set_worker_instance`]).
    pub async fn insert_worker(
        &self,
        pod_id: &str,
        endpoint_id: &str,
        token_hash: &str,
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO endpoint_workers (pod_id, instance_id, endpoint_id, token_hash, created_at, parked) \
             VALUES ($1, '', $2, $3, $4, 0)",
        )
        .bind(pod_id.to_string())
        .bind(endpoint_id.to_string())
        .bind(token_hash.to_string())
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(StoreError::from_write)?;
        Ok(())
    }

    pub async fn workers(&self) -> Result<Vec<WorkerRow>> {
        sqlx::query(
            "SELECT pod_id, instance_id, endpoint_id, created_at, parked FROM endpoint_workers ORDER BY created_at, pod_id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(worker)
        .collect()
    }

    /// The worker whose credential hashes to `token_hash`.
    pub async fn worker_by_token(&self, token_hash: &str) -> Result<Option<WorkerRow>> {
        self.one_worker(
            "SELECT pod_id, instance_id, endpoint_id, created_at, parked FROM endpoint_workers \
             WHERE token_hash = $1",
            token_hash,
        )
        .await
    }

    pub async fn worker_by_pod(&self, pod_id: &str) -> Result<Option<WorkerRow>> {
        self.one_worker(
            "SELECT pod_id, instance_id, endpoint_id, created_at, parked FROM endpoint_workers \
             WHERE pod_id = $1",
            pod_id,
        )
        .await
    }

    async fn one_worker(&self, sql: &'static str, key: &str) -> Result<Option<WorkerRow>> {
        sqlx::query(sql)
            .bind(key.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(worker)
            .transpose()
    }

    /// Names the worker's instance; `false` when its row is gone (the endpoint was removed
    /// meanwhile: the caller removes the instance).
    pub async fn set_worker_instance(&self, pod_id: &str, instance_id: &str) -> Result<bool> {
        Ok(
            sqlx::query("UPDATE endpoint_workers SET instance_id = $1 WHERE pod_id = $2")
                .bind(instance_id.to_string())
                .bind(pod_id.to_string())
                .execute(&self.pool)
                .await?
                .rows_affected()
                == 1,
        )
    }

    pub async fn set_worker_parked(&self, pod_id: &str, parked: bool) -> Result<()> {
        sqlx::query("UPDATE endpoint_workers SET parked = $1 WHERE pod_id = $2")
            .bind(i64::from(parked))
            .bind(pod_id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn delete_worker(&self, pod_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM endpoint_workers WHERE pod_id = $1")
            .bind(pod_id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
