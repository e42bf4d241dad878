-- The web console's login sessions (issue 15): an API key exchanged for a session token that
-- travels in an HttpOnly cookie. Only the token's SHA-256 is stored. A session is its key's:
-- it ends when the key is revoked (checked on every use), when it expires, or at logout.
-- Portable SQL (SQLite and PostgreSQL).
CREATE TABLE web_sessions (
    hash TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX web_sessions_key ON web_sessions (key_id);
