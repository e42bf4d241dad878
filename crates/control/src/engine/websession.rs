//! The web console's login sessions: an API key exchanged (`POST /v1/sessions`) for a random
//! session token that the browser keeps in an HttpOnly cookie, so the key itself never sits in
//! the page's reach. A token acts exactly as its key does (same principal, same role, same
//! audit name); it ends at logout, at expiry, or when its key is revoked or its tenant goes
//! (both checked on every use). Only the token's SHA-256 is stored. How the cookie travels and
//! the cross-site checks are the API's (`gpuvisor::api`); here is what a token is.

use super::{hash_key, now_ms, random_hex, Engine, Principal};
use crate::error::{EngineError, Result};
use gpuvisor_wire::{self as wire, Role, SESSION_TOKEN_PREFIX};

/// How long a session lasts after login (no sliding renewal: a stolen cookie dies on time).
pub const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;
/// Live sessions one key may hold; a further login ends its oldest.
pub const MAX_SESSIONS_PER_KEY: usize = 16;

fn ended() -> EngineError {
    EngineError::Unauthorized(
        "the console session is unknown, expired or logged out: log in again".into(),
    )
}

impl Engine {
    /// Exchanges an API key for a new session: `(token, what it is)`. A metrics key (it only
    /// scrapes `/metrics`) and a session token are refused.
    pub async fn login(&self, api_key: &str) -> Result<(String, wire::WebSession)> {
        if api_key.starts_with(SESSION_TOKEN_PREFIX) {
            return Err(EngineError::Unauthorized(
                "log in with an API key, not a session token".into(),
            ));
        }
        let p = self.authenticate(Some(api_key)).await?;
        if p.role == Role::Metrics {
            return Err(EngineError::Forbidden(
                "a metrics key only scrapes /metrics; it cannot open the console".into(),
            ));
        }
        let token = format!("{SESSION_TOKEN_PREFIX}{}", random_hex(32)?);
        let now = now_ms();
        let expires_at = now + SESSION_TTL_MS;
        self.store
            .insert_web_session(
                &hash_key(&token),
                &p.key_id,
                now,
                expires_at,
                MAX_SESSIONS_PER_KEY,
            )
            .await?;
        Ok((token, session_of(p, expires_at)))
    }

    /// The principal a session token acts as, and when the session expires.
    pub(crate) async fn session_principal(&self, token: &str) -> Result<(Principal, i64)> {
        let (key_id, expires_at) = self
            .store
            .web_session(&hash_key(token), now_ms())
            .await?
            .ok_or_else(ended)?;
        let key = self
            .store
            .key(&key_id)
            .await?
            .filter(|k| k.revoked_at.is_none())
            .ok_or_else(|| {
                EngineError::Unauthorized(
                    "the API key of this console session was revoked: log in again".into(),
                )
            })?;
        Ok((self.principal_of_key(key).await?, expires_at))
    }

    /// What the session of `token` is (`GET /v1/sessions/current`).
    pub async fn web_session(&self, token: &str) -> Result<wire::WebSession> {
        let (p, expires_at) = self.session_principal(token).await?;
        Ok(session_of(p, expires_at))
    }

    /// Ends the session of `token` (logout); `Unauthorized` when it had already ended.
    pub async fn logout(&self, token: &str) -> Result<()> {
        if self.store.delete_web_session(&hash_key(token)).await? {
            Ok(())
        } else {
            Err(ended())
        }
    }
}

fn session_of(p: Principal, expires_at: i64) -> wire::WebSession {
    wire::WebSession {
        tenant: p.tenant,
        role: p.role,
        key_id: p.key_id,
        expires_at,
    }
}
