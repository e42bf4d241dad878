//! The web console's login sessions (`web_sessions`, migration 0019): a token's SHA-256, the
//! key it was exchanged for, and when it expires.

use super::{Result, Store};
use sqlx::Row;

impl Store {
    /// Records a new session, first dropping the expired ones and, past `max_per_key` live
    /// sessions of the same key, its oldest (a key that logs in again and again keeps a
    /// bounded number of rows).
    pub async fn insert_web_session(
        &self,
        hash: &str,
        key_id: &str,
        now: i64,
        expires_at: i64,
        max_per_key: usize,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM web_sessions WHERE expires_at <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let live: Vec<String> = sqlx::query(
            "SELECT hash FROM web_sessions WHERE key_id = $1 ORDER BY created_at DESC, hash",
        )
        .bind(key_id.to_string())
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get("hash"))
        .collect::<std::result::Result<_, _>>()?;
        for old in live.iter().skip(max_per_key.saturating_sub(1)) {
            sqlx::query("DELETE FROM web_sessions WHERE hash = $1")
                .bind(old.clone())
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO web_sessions (hash, key_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(hash.to_string())
        .bind(key_id.to_string())
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The key id and expiry of the session whose token hashes to `hash`, if it has not
    /// expired at `now`.
    pub async fn web_session(&self, hash: &str, now: i64) -> Result<Option<(String, i64)>> {
        let row = sqlx::query(
            "SELECT key_id, expires_at FROM web_sessions WHERE hash = $1 AND expires_at > $2",
        )
        .bind(hash.to_string())
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get("key_id")?, r.try_get("expires_at")?)))
            .transpose()
    }

    /// Ends a session (logout); false when there was none.
    pub async fn delete_web_session(&self, hash: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM web_sessions WHERE hash = $1")
            .bind(hash.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Ends every session of key `key_id` (the key was revoked).
    pub async fn delete_web_sessions_of(&self, key_id: &str) -> Result<u64> {
        let r = sqlx::query("DELETE FROM web_sessions WHERE key_id = $1")
            .bind(key_id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }
}
