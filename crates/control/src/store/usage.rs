//! The metered-usage rows (`usage_intervals`, migration 0014).

use super::{Result, Store, StoreError};
use sqlx::any::AnyRow;
use sqlx::Row;

/// One interval of one resource line of an instance or volume, at one price.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    /// Instance id, or `tenant_id/name` of a volume.
    pub subject_id: String,
    /// What is metered, stable for a line: `gpu:MODEL:MILLI[:i]`, `vcpu`, `memory`, `disk`,
    /// `volume`.
    pub line: String,
    pub start_ms: i64,
    /// The last heartbeat while open; the end once closed.
    pub end_ms: i64,
    pub open: bool,
    pub tenant_id: String,
    /// `instance` or `volume`.
    pub subject: String,
    pub name: String,
    pub resource: String,
    /// GPU lines: the model ('' otherwise).
    pub model: String,
    /// GPU lines: each GPU's share, thousandths (0 otherwise).
    pub milli: u32,
    pub interruptible: bool,
    /// Units: GPUs (a fraction counts its share), vCPUs, GiB.
    pub quantity: f64,
    /// Per unit-hour.
    pub unit_price: f64,
}

/// The settings row holding the meter's last step (ms).
const HEARTBEAT: &str = "usage.heartbeat";

const COLS: &str = "subject_id, line, start_ms, end_ms, is_open, tenant_id, subject, name, \
                    resource, model, milli, interruptible, quantity, unit_price";

fn row(r: &AnyRow) -> Result<UsageRow> {
    Ok(UsageRow {
        subject_id: r.try_get("subject_id")?,
        line: r.try_get("line")?,
        start_ms: r.try_get("start_ms")?,
        end_ms: r.try_get("end_ms")?,
        open: r.try_get::<i64, _>("is_open")? != 0,
        tenant_id: r.try_get("tenant_id")?,
        subject: r.try_get("subject")?,
        name: r.try_get("name")?,
        resource: r.try_get("resource")?,
        model: r.try_get("model")?,
        milli: r.try_get::<i64, _>("milli")? as u32,
        interruptible: r.try_get::<i64, _>("interruptible")? != 0,
        quantity: r.try_get("quantity")?,
        unit_price: r.try_get("unit_price")?,
    })
}

/// Writes the heartbeat row inside `tx`.
async fn note_heartbeat(tx: &mut sqlx::Transaction<'_, sqlx::Any>, now: i64) -> Result<()> {
    sqlx::query("DELETE FROM settings WHERE name = $1")
        .bind(HEARTBEAT)
        .execute(&mut **tx)
        .await?;
    sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2)")
        .bind(HEARTBEAT)
        .bind(now.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl Store {
    /// The intervals open now.
    pub async fn usage_open(&self) -> Result<Vec<UsageRow>> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLS} FROM usage_intervals WHERE is_open = 1"
        )))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(row)
        .collect()
    }

    /// One meter step, in one transaction: closes the intervals `close` names (subject, line,
    /// start) at `now`, opens `open` from `now`, and notes `now` as the meter's heartbeat (one
    /// row, not every open interval: an open interval's end is "now" to readers, and the
    /// heartbeat is where a crash ends it, [`Store::usage_close_all`]).
    pub async fn usage_step(
        &self,
        close: &[(String, String, i64)],
        open: &[UsageRow],
        now: i64,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        for (subject, line, start) in close {
            sqlx::query(
                "UPDATE usage_intervals SET end_ms = $1, is_open = 0 \
                 WHERE subject_id = $2 AND line = $3 AND start_ms = $4 AND is_open = 1",
            )
            .bind(now)
            .bind(subject.clone())
            .bind(line.clone())
            .bind(*start)
            .execute(&mut *tx)
            .await?;
        }
        for u in open {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO usage_intervals ({COLS}) VALUES \
                 ($1, $2, $3, $3, 1, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                 ON CONFLICT DO NOTHING"
            )))
            .bind(u.subject_id.clone())
            .bind(u.line.clone())
            .bind(now)
            .bind(u.tenant_id.clone())
            .bind(u.subject.clone())
            .bind(u.name.clone())
            .bind(u.resource.clone())
            .bind(u.model.clone())
            .bind(i64::from(u.milli))
            .bind(i64::from(u.interruptible))
            .bind(u.quantity)
            .bind(u.unit_price)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_write)?;
        }
        note_heartbeat(&mut tx, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Notes the meter's heartbeat alone (a step that changed nothing).
    pub async fn usage_heartbeat(&self, now: i64) -> Result<()> {
        let mut tx = self.begin_write().await?;
        note_heartbeat(&mut tx, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Closes every open interval at the meter's last heartbeat (a starting daemon: the time
    /// it was down is not known to have been used). Returns how many.
    pub async fn usage_close_all(&self) -> Result<u64> {
        let beat: i64 = self
            .setting(HEARTBEAT)
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(sqlx::query(
            "UPDATE usage_intervals SET is_open = 0, \
             end_ms = CASE WHEN start_ms > $1 THEN start_ms ELSE $1 END WHERE is_open = 1",
        )
        .bind(beat)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Intervals overlapping `[from, to)` (open ones run to now), of one tenant when given, in
    /// start order. A tenant's are read through its index.
    pub async fn usage_rows(
        &self,
        from: i64,
        to: i64,
        tenant_id: Option<&str>,
    ) -> Result<Vec<UsageRow>> {
        let q = match tenant_id {
            Some(t) => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLS} FROM usage_intervals WHERE tenant_id = $3 \
                 AND start_ms < $1 AND (end_ms > $2 OR is_open = 1) \
                 ORDER BY start_ms, subject_id, line"
            )))
            .bind(to)
            .bind(from)
            .bind(t.to_string()),
            None => sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLS} FROM usage_intervals \
                 WHERE start_ms < $1 AND (end_ms > $2 OR is_open = 1) \
                 ORDER BY start_ms, subject_id, line"
            )))
            .bind(to)
            .bind(from),
        };
        q.fetch_all(&self.pool).await?.iter().map(row).collect()
    }

    /// Every interval of one instance (or volume), through the primary key.
    pub async fn usage_of(&self, subject_id: &str) -> Result<Vec<UsageRow>> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLS} FROM usage_intervals WHERE subject_id = $1 ORDER BY start_ms, line"
        )))
        .bind(subject_id.to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(row)
        .collect()
    }
}
