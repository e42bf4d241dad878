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
    /// start) at `now`, opens `open` from `now`, and moves every open interval's end to `now`.
    pub async fn usage_step(
        &self,
        close: &[(String, String, i64)],
        open: &[UsageRow],
        now: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
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
        sqlx::query("UPDATE usage_intervals SET end_ms = $1 WHERE is_open = 1 AND end_ms < $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Closes every open interval at its last heartbeat (a starting daemon: the time it was
    /// down is not known to have been used). Returns how many.
    pub async fn usage_close_all(&self) -> Result<u64> {
        Ok(
            sqlx::query("UPDATE usage_intervals SET is_open = 0 WHERE is_open = 1")
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    /// Intervals overlapping `[from, to)`, of one tenant and one subject when given, in
    /// start order.
    pub async fn usage_rows(
        &self,
        from: i64,
        to: i64,
        tenant_id: Option<&str>,
        subject_id: Option<&str>,
    ) -> Result<Vec<UsageRow>> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLS} FROM usage_intervals \
             WHERE start_ms < $1 AND (end_ms > $2 OR is_open = 1) \
             AND ($3 = '' OR tenant_id = $3) AND ($4 = '' OR subject_id = $4) \
             ORDER BY start_ms, subject_id, line"
        )))
        .bind(to)
        .bind(from)
        .bind(tenant_id.unwrap_or("").to_string())
        .bind(subject_id.unwrap_or("").to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(row)
        .collect()
    }
}
