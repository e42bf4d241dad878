//! The audit log: every mutating call, persisted and hash-chained. Row n's hash is an
//! HMAC-SHA-256, under a key kept outside the store (`<data>/audit.key`, 0600), over row n-1's
//! hash and row n's fields (a JSON array, so no two field lists encode alike): someone who can
//! write the store but not read the key cannot make a row that verifies, so an edited, inserted
//! or removed row breaks the chain from there on, which [`Engine::audit_verify`] reports.
//! Retention removes the oldest rows and moves the anchor (the last removed row's seq and hash)
//! in the same transaction; rows at or below the anchor are a break too. The newest row's seq
//! and hash are also written beside the key (`<data>/audit.head`) after every append, so rows
//! cut off the end of the store show as missing. Root on the host, who can read the key, is not
//! held by any of this.

use super::authz::Op;
use super::tenants::scoped_tenant;
use super::{now_ms, Engine, Principal};
use crate::error::{invalid, Result};
use crate::store::AuditRow;
use crate::telemetry::parse_since;
use gpuvisor_wire as wire;

/// One call to record.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub op: Op,
    /// What it was done to (the request path).
    pub target: String,
    /// The answer's HTTP status.
    pub result: String,
    /// The client's address.
    pub source: String,
}

/// The most rows one `audit list` answer holds.
pub const MAX_AUDIT_PAGE: i64 = 10_000;

fn chain_hash(key: &ring::hmac::Key, r: &AuditRow) -> String {
    let fields = serde_json::json!([
        r.prev_hash,
        r.seq,
        r.at,
        r.key_id,
        r.role,
        r.tenant_id,
        r.op,
        r.target,
        r.result,
        r.source
    ]);
    let tag = ring::hmac::sign(key, fields.to_string().as_bytes());
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The chain's key and where the newest row is noted outside the store.
pub struct AuditSecret {
    key: ring::hmac::Key,
    head_file: Option<std::path::PathBuf>,
}

impl AuditSecret {
    pub fn new(key: &[u8], head_file: Option<std::path::PathBuf>) -> Self {
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
            head_file,
        }
    }

    /// The head noted outside the store: (seq, hash).
    fn noted_head(&self) -> Option<(i64, String)> {
        let text = std::fs::read_to_string(self.head_file.as_ref()?).ok()?;
        let (seq, hash) = text.trim().split_once(' ')?;
        Some((seq.parse().ok()?, hash.to_string()))
    }

    fn note_head(&self, seq: i64, hash: &str) {
        let Some(path) = &self.head_file else { return };
        let tmp = path.with_extension("tmp");
        let r = std::fs::write(&tmp, format!("{seq} {hash}\n"))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = r {
            tracing::error!("cannot note the audit head in {}: {e}", path.display());
        }
    }
}

impl Default for AuditSecret {
    /// A key made up for this process (tests; a daemon sets its own with
    /// [`Engine::set_audit_secret`]).
    fn default() -> Self {
        let mut key = [0u8; 32];
        let _ = getrandom::fill(&mut key);
        Self::new(&key, None)
    }
}

impl Engine {
    /// The audit chain's key and the file its head is noted in (set once at start).
    pub fn set_audit_secret(&self, secret: AuditSecret) {
        *self.audit_secret.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(secret);
    }

    fn audit_secret(&self) -> std::sync::Arc<AuditSecret> {
        self.audit_secret
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Appends `e`, made by `who`, to the log.
    pub async fn audit(&self, who: &Principal, e: AuditEvent) -> Result<()> {
        let mut head = self.audit_lock.lock().await;
        let secret = self.audit_secret();
        let (seq, prev_hash) = match head.take() {
            // This process wrote the last row: no store read per call.
            Some(h) => h,
            None => {
                let stored = self.store.audit_head().await?.unwrap_or((0, String::new()));
                // Rows cut off the store's end stay visible: the next row follows the head
                // noted outside the store, so the gap is there for `verify` to find.
                match secret.noted_head() {
                    Some(noted) if noted.0 > stored.0 => {
                        tracing::error!(
                            stored = stored.0,
                            noted = noted.0,
                            "the audit log's newest rows are missing from the store"
                        );
                        noted
                    }
                    _ => stored,
                }
            }
        };
        let mut row = AuditRow {
            seq: seq + 1,
            at: now_ms(),
            key_id: who.key_id.clone(),
            role: who.role.as_str().to_string(),
            tenant_id: who.tenant_id.clone(),
            op: e.op.name().to_string(),
            target: e.target,
            result: e.result,
            source: e.source,
            prev_hash,
            hash: String::new(),
        };
        row.hash = chain_hash(&secret.key, &row);
        self.store.audit_append(&row).await?;
        secret.note_head(row.seq, &row.hash);
        *head = Some((row.seq, row.hash));
        Ok(())
    }

    /// Rows the caller may see (an admin: all, or one tenant's; a tenant admin: its tenant's),
    /// oldest first.
    pub async fn audit_list(
        &self,
        who: &Principal,
        q: &wire::AuditQuery,
    ) -> Result<Vec<wire::AuditEntry>> {
        who.allow(Op::AuditList)?;
        let names = self.tenant_names().await?;
        let tenant_id = scoped_tenant(who, q.tenant.as_deref(), &names)?;
        let since = match &q.since {
            None => 0,
            Some(s) => parse_since(s, now_ms()).ok_or_else(|| {
                invalid(format!(
                    "since {s:?}: expected a duration back (90s, 10m, 2h, 7d) or epoch milliseconds"
                ))
            })?,
        };
        let limit = q.limit.unwrap_or(1000).clamp(1, MAX_AUDIT_PAGE);
        let rows = self
            .store
            .audit_rows(q.after.unwrap_or(0), since, tenant_id.as_deref(), limit)
            .await?;
        Ok(rows
            .into_iter()
            // An admin's calls are the admins' to read, whatever tenant the admin key is in.
            .filter(|r| who.is_admin() || r.role != wire::Role::Admin.as_str())
            .map(|r| wire::AuditEntry {
                tenant: names.get(&r.tenant_id).cloned().unwrap_or(r.tenant_id),
                seq: r.seq,
                at: r.at,
                key_id: r.key_id,
                role: r.role,
                op: r.op,
                target: r.target,
                result: r.result,
                source: r.source,
                hash: r.hash,
            })
            .collect())
    }

    /// Walks the whole chain from its anchor (admin).
    pub async fn audit_verify(&self, who: &Principal) -> Result<wire::AuditVerification> {
        who.allow(Op::AuditVerify)?;
        let secret = self.audit_secret();
        let anchor = self.store.audit_anchor().await?;
        let (mut seq, mut hash) = anchor.map_or((0, String::new()), |a| (a.seq, a.hash));
        let mut out = fresh_verification();
        // Rows the anchor says retention removed must be gone.
        if let Some(first) = self.store.audit_rows(0, 0, None, 1).await?.first() {
            if first.seq <= seq {
                out.ok = false;
                out.problem = Some(format!(
                    "row {} is still there though the anchor says rows up to {seq} were removed",
                    first.seq
                ));
                return Ok(out);
            }
        }
        loop {
            let page = self.store.audit_rows(seq, 0, None, MAX_AUDIT_PAGE).await?;
            if page.is_empty() || !check_page(&secret.key, &mut seq, &mut hash, &page, &mut out) {
                break;
            }
        }
        // Rows cut off the end: the head noted outside the store is past the store's.
        if out.ok {
            if let Some((noted, noted_hash)) = secret.noted_head() {
                if noted > seq || (noted == seq && noted_hash != hash) {
                    out.ok = false;
                    out.problem = Some(format!(
                        "the log ends at row {seq}, but the daemon wrote up to row {noted}: the newest rows were removed"
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// A verification that has found nothing yet.
fn fresh_verification() -> wire::AuditVerification {
    wire::AuditVerification {
        ok: true,
        rows: 0,
        first_seq: None,
        last_seq: None,
        head_hash: None,
        problem: None,
    }
}

/// Checks that `rows` continue the chain at (`seq`, `hash`), moving both along and counting
/// in `out`; false at the first break (said in `out.problem`).
fn check_page(
    key: &ring::hmac::Key,
    seq: &mut i64,
    hash: &mut String,
    rows: &[AuditRow],
    out: &mut wire::AuditVerification,
) -> bool {
    for r in rows {
        let problem = if r.seq != *seq + 1 {
            Some(format!(
                "row {} follows row {}: rows {}..{} are missing",
                r.seq,
                *seq,
                *seq + 1,
                r.seq - 1
            ))
        } else if r.prev_hash != *hash {
            Some(format!(
                "row {} does not continue the chain of row {}",
                r.seq, *seq
            ))
        } else if chain_hash(key, r) != r.hash {
            Some(format!("row {} was changed after it was written", r.seq))
        } else {
            None
        };
        if problem.is_some() {
            out.ok = false;
            out.problem = problem;
            return false;
        }
        out.rows += 1;
        out.first_seq.get_or_insert(r.seq);
        out.last_seq = Some(r.seq);
        out.head_hash = Some(r.hash.clone());
        *seq = r.seq;
        *hash = r.hash.clone();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"test key")
    }

    fn row(seq: i64, prev: &str) -> AuditRow {
        let mut r = AuditRow {
            seq,
            at: 1000 + seq,
            key_id: "k-1".into(),
            role: "member".into(),
            tenant_id: "t-1".into(),
            op: "instance.create".into(),
            target: "/v1/instances".into(),
            result: "200".into(),
            source: "127.0.0.1".into(),
            prev_hash: prev.into(),
            hash: String::new(),
        };
        r.hash = chain_hash(&key(), &r);
        r
    }

    fn chain(n: i64) -> Vec<AuditRow> {
        let mut rows: Vec<AuditRow> = Vec::new();
        for seq in 1..=n {
            let prev = rows.last().map(|r| r.hash.clone()).unwrap_or_default();
            rows.push(row(seq, &prev));
        }
        rows
    }

    fn verify(anchor: (i64, &str), rows: &[AuditRow]) -> wire::AuditVerification {
        let mut out = fresh_verification();
        let (mut seq, mut hash) = (anchor.0, anchor.1.to_string());
        // Two pages, as the engine reads them.
        let (a, b) = rows.split_at(rows.len() / 2);
        let _ = check_page(&key(), &mut seq, &mut hash, a, &mut out)
            && check_page(&key(), &mut seq, &mut hash, b, &mut out);
        out
    }

    #[test]
    fn a_whole_chain_verifies_and_every_kind_of_tampering_is_found() {
        let rows = chain(6);
        let v = verify((0, ""), &rows);
        assert!(
            v.ok && v.rows == 6 && v.first_seq == Some(1) && v.last_seq == Some(6),
            "{v:?}"
        );
        assert_eq!(v.head_hash.as_deref(), Some(rows[5].hash.as_str()));
        // Retention: rows 1..2 pruned, the anchor holds row 2.
        let v = verify((2, &rows[1].hash), &rows[2..]);
        assert!(v.ok && v.rows == 4, "{v:?}");
        // ...but without the anchor moved, their absence shows.
        let v = verify((0, ""), &rows[2..]);
        assert_eq!(
            v.problem.as_deref(),
            Some("row 3 follows row 0: rows 1..2 are missing")
        );
        // An edited row.
        let mut edited = rows.clone();
        edited[3].result = "200 (was 403)".into();
        let v = verify((0, ""), &edited);
        assert!(!v.ok && v.rows == 3, "{v:?}");
        assert_eq!(
            v.problem.as_deref(),
            Some("row 4 was changed after it was written")
        );
        // An edited row whose own hash was made again: the next row shows it.
        let mut rehashed = edited.clone();
        rehashed[3].hash = chain_hash(&key(), &rehashed[3]);
        let v = verify((0, ""), &rehashed);
        assert_eq!(
            v.problem.as_deref(),
            Some("row 5 does not continue the chain of row 4")
        );
        // A removed row.
        let mut removed = rows.clone();
        removed.remove(2);
        let v = verify((0, ""), &removed);
        assert_eq!(
            v.problem.as_deref(),
            Some("row 4 follows row 2: rows 3..3 are missing")
        );
        // A row inserted with a seq of its own.
        let mut inserted = rows.clone();
        inserted.insert(3, row(4, &rows[2].hash));
        inserted[3].target = "/v1/forged".into();
        inserted[3].hash = chain_hash(&key(), &inserted[3]);
        let v = verify((0, ""), &inserted);
        assert!(!v.ok, "{v:?}");
    }

    #[test]
    fn every_field_and_the_previous_hash_are_in_the_hash() {
        let base = row(1, "");
        type Edit = Box<dyn Fn(&mut AuditRow)>;
        let changed: Vec<Edit> = vec![
            Box::new(|r| r.seq = 2),
            Box::new(|r| r.at += 1),
            Box::new(|r| r.key_id.push('x')),
            Box::new(|r| r.role = "admin".into()),
            Box::new(|r| r.tenant_id.push('x')),
            Box::new(|r| r.op = "instance.terminate".into()),
            Box::new(|r| r.target.push('x')),
            Box::new(|r| r.result = "403".into()),
            Box::new(|r| r.source = "10.0.0.1".into()),
            Box::new(|r| r.prev_hash = "00".into()),
        ];
        for (i, f) in changed.iter().enumerate() {
            let mut r = base.clone();
            f(&mut r);
            assert_ne!(
                chain_hash(&key(), &r),
                base.hash,
                "field {i} is not covered"
            );
        }
        // Fields cannot trade characters: ("ab", "c") and ("a", "bc") differ.
        let mut a = base.clone();
        a.key_id = "ab".into();
        a.role = "c".into();
        let mut b = base.clone();
        b.key_id = "a".into();
        b.role = "bc".into();
        assert_ne!(chain_hash(&key(), &a), chain_hash(&key(), &b));
        // Without the key, a row cannot be made to verify.
        let other = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"another key");
        assert_ne!(chain_hash(&other, &base), base.hash);
    }
}
