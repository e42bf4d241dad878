//! Instance snapshots (`snapshots`, migration 0018): the rows; the files are the node's
//! (`<data>/snapshots/<id>/`).

use super::{from_json, json, u, Result, Store, StoreError};
use gpuvisor_wire::{RuntimeKind, SnapshotState};
use sqlx::any::AnyRow;
use sqlx::Row;

/// A snapshot of an instance, `pending` while its files are written.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub instance_id: String,
    pub runtime: RuntimeKind,
    /// The instance row's image name.
    pub image: String,
    pub state: SnapshotState,
    /// A VM's running state was saved.
    pub memory: bool,
    /// How the point in time was made ('' while pending).
    pub consistency: String,
    /// The container (or VM root) disk's size, bytes.
    pub disk_size: u64,
    /// The volumes saved, by name.
    pub volumes: Vec<String>,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// Bytes on the host's disk (0 while pending).
    pub bytes: u64,
    pub created_at: i64,
}

const COLS: &str = "id, tenant_id, name, instance_id, runtime, image, state, memory, consistency, \
     disk_size, volumes, vcpus, memory_bytes, bytes, created_at";

fn row(r: &AnyRow) -> Result<SnapshotRow> {
    let corrupt = |why: String| StoreError::Corrupt {
        table: "snapshots",
        why,
    };
    let state: String = r.try_get("state")?;
    Ok(SnapshotRow {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        name: r.try_get("name")?,
        instance_id: r.try_get("instance_id")?,
        runtime: RuntimeKind::parse(&r.try_get::<String, _>("runtime")?).map_err(corrupt)?,
        image: r.try_get("image")?,
        state: SnapshotState::parse(&state).ok_or_else(|| corrupt(format!("state {state:?}")))?,
        memory: r.try_get::<i64, _>("memory")? != 0,
        consistency: r.try_get("consistency")?,
        disk_size: u("snapshots", r.try_get("disk_size")?)?,
        volumes: from_json("snapshots", &r.try_get::<String, _>("volumes")?)?,
        vcpus: u32::try_from(u("snapshots", r.try_get("vcpus")?)?)
            .map_err(|e| corrupt(format!("vcpus: {e}")))?,
        memory_bytes: u("snapshots", r.try_get("memory_bytes")?)?,
        bytes: u("snapshots", r.try_get("bytes")?)?,
        created_at: r.try_get("created_at")?,
    })
}

/// A size as the store keeps it (BIGINT).
fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    /// Inserts a snapshot row (written `pending` before its files are made); `Conflict` when
    /// its tenant has a snapshot of that name (or the id is taken).
    pub async fn insert_snapshot(&self, s: &SnapshotRow) -> Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO snapshots ({COLS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        )))
        .bind(s.id.clone())
        .bind(s.tenant_id.clone())
        .bind(s.name.clone())
        .bind(s.instance_id.clone())
        .bind(s.runtime.as_str())
        .bind(s.image.clone())
        .bind(s.state.as_str())
        .bind(i64::from(s.memory))
        .bind(s.consistency.clone())
        .bind(big(s.disk_size))
        .bind(json(&s.volumes))
        .bind(i64::from(s.vcpus))
        .bind(big(s.memory_bytes))
        .bind(big(s.bytes))
        .bind(s.created_at)
        .execute(&self.pool)
        .await
        .map_err(StoreError::from_write)?;
        Ok(())
    }

    /// A pending snapshot becomes `ready` with what its files hold (`s`'s runtime, memory,
    /// consistency, sizes, volumes); false if it is not pending (or gone).
    pub async fn mark_snapshot_ready(&self, s: &SnapshotRow) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE snapshots SET state = 'ready', runtime = $1, memory = $2, consistency = $3, \
             disk_size = $4, volumes = $5, vcpus = $6, memory_bytes = $7, bytes = $8 \
             WHERE id = $9 AND state = 'pending'",
        )
        .bind(s.runtime.as_str())
        .bind(i64::from(s.memory))
        .bind(s.consistency.clone())
        .bind(big(s.disk_size))
        .bind(json(&s.volumes))
        .bind(i64::from(s.vcpus))
        .bind(big(s.memory_bytes))
        .bind(big(s.bytes))
        .bind(s.id.clone())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Deletes a snapshot's row; false if there was none.
    pub async fn delete_snapshot(&self, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM snapshots WHERE id = $1")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn snapshot(&self, id: &str) -> Result<Option<SnapshotRow>> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLS} FROM snapshots WHERE id = $1"
        )))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(row)
        .transpose()
    }

    /// Tenant `tenant_id`'s snapshot named `name`.
    pub async fn snapshot_by_name(
        &self,
        tenant_id: &str,
        name: &str,
    ) -> Result<Option<SnapshotRow>> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLS} FROM snapshots WHERE tenant_id = $1 AND name = $2"
        )))
        .bind(tenant_id.to_string())
        .bind(name.to_string())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(row)
        .transpose()
    }

    /// Snapshots of one tenant (by name), or of all tenants with `None` (by tenant, name).
    pub async fn snapshots(&self, tenant_id: Option<&str>) -> Result<Vec<SnapshotRow>> {
        let rows = match tenant_id {
            Some(t) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLS} FROM snapshots WHERE tenant_id = $1 ORDER BY name"
                )))
                .bind(t.to_string())
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLS} FROM snapshots ORDER BY tenant_id, name"
                )))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(row).collect()
    }

    /// Every `pending` snapshot (at start: what a crash left half taken).
    pub async fn pending_snapshots(&self) -> Result<Vec<SnapshotRow>> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLS} FROM snapshots WHERE state = 'pending' ORDER BY created_at, id"
        )))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(row)
        .collect()
    }
}
