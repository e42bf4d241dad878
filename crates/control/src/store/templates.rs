//! Instance templates (`templates`, migration 0015).

use super::{json, Result, Store, StoreError};
use gpuvisor_wire::TemplateSpec;
use sqlx::any::AnyRow;
use sqlx::Row;

/// A template; `owner` is '' for a public one, else the tenant's id.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateRow {
    pub owner: String,
    pub name: String,
    pub spec: TemplateSpec,
    pub created_at: i64,
}

fn row(r: &AnyRow) -> Result<TemplateRow> {
    let spec: String = r.try_get("spec")?;
    Ok(TemplateRow {
        owner: r.try_get("owner")?,
        name: r.try_get("name")?,
        spec: serde_json::from_str(&spec).map_err(|e| StoreError::Corrupt {
            table: "templates",
            why: e.to_string(),
        })?,
        created_at: r.try_get("created_at")?,
    })
}

impl Store {
    /// Inserts a template; `Conflict` when its owner has one of that name.
    pub async fn insert_template(&self, t: &TemplateRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO templates (owner, name, spec, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(t.owner.clone())
        .bind(t.name.clone())
        .bind(json(&t.spec))
        .bind(t.created_at)
        .execute(&self.pool)
        .await
        .map_err(StoreError::from_write)?;
        Ok(())
    }

    /// The public templates and `tenant_id`'s, by name; all of them for `None`.
    pub async fn templates(&self, tenant_id: Option<&str>) -> Result<Vec<TemplateRow>> {
        let rows = match tenant_id {
            Some(t) => {
                sqlx::query(
                    "SELECT owner, name, spec, created_at FROM templates \
                 WHERE owner = '' OR owner = $1 ORDER BY name, owner",
                )
                .bind(t.to_string())
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT owner, name, spec, created_at FROM templates ORDER BY name, owner",
                )
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(row).collect()
    }

    /// `owner`'s template `name` ('' = the public one).
    pub async fn template(&self, owner: &str, name: &str) -> Result<Option<TemplateRow>> {
        sqlx::query(
            "SELECT owner, name, spec, created_at FROM templates WHERE owner = $1 AND name = $2",
        )
        .bind(owner.to_string())
        .bind(name.to_string())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(row)
        .transpose()
    }

    pub async fn delete_template(&self, owner: &str, name: &str) -> Result<bool> {
        Ok(
            sqlx::query("DELETE FROM templates WHERE owner = $1 AND name = $2")
                .bind(owner.to_string())
                .bind(name.to_string())
                .execute(&self.pool)
                .await?
                .rows_affected()
                == 1,
        )
    }
}
