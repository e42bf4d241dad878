//! The store: desired state and history, on SQLite (default, WAL, in the data dir) or PostgreSQL,
//! through one code path (`sqlx::AnyPool`). Only portable SQL is used: TEXT and BIGINT columns,
//! JSON as TEXT, `$n` parameters in order of appearance. Everything above talks to [`Store`]; no
//! SQL lives anywhere else.

use crate::telemetry::history::MinuteRecord;
use gpuvisor_wire::{InstanceState, Role};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;

mod endpoints;
mod snapshots;
mod templates;
mod usage;
mod web_sessions;
pub use endpoints::{
    EndpointRow, JobEnd, JobRow, JobTally, RunningJob, WorkerRow, CHUNK_ROW_OCTETS, JOB_ROW_OCTETS,
    MAX_STREAM_BYTES,
};
pub use snapshots::SnapshotRow;
pub use templates::TemplateRow;
pub use usage::UsageRow;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row in {table}: {why}")]
    Corrupt { table: &'static str, why: String },
    #[error("unique constraint: {0}")]
    Conflict(String),
    /// A write's own task ended without an answer (a panic, or the runtime shutting down).
    #[error("store write task: {0}")]
    Task(String),
}

impl StoreError {
    fn from_write(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                StoreError::Conflict(d.message().to_string())
            }
            _ => StoreError::Db(e),
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, Clone, PartialEq)]
pub struct TenantRow {
    pub id: String,
    pub name: String,
    pub net_slot: u32,
    pub created_at: i64,
    pub policy: gpuvisor_wire::TenantPolicy,
    /// The tenant admin's own quotas, within `policy`'s (quota fields only).
    pub limits: gpuvisor_wire::TenantPolicy,
    /// Set by `tenant rm --cascade`: its keys are revoked and its instances terminating; the
    /// reconciler removes the rest and then the row.
    pub deleting_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyRow {
    pub id: String,
    pub tenant_id: String,
    pub role: Role,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub id: String,
    pub hostname: String,
    pub cpus: u32,
    pub memory: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GpuRow {
    pub uuid: String,
    pub node_id: String,
    pub index: u32,
    pub model: String,
    pub vram: u64,
    pub pci_address: String,
    pub numa_node: Option<u32>,
    pub backend: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageRow {
    /// The tenant id of the tenant that pulled it; `""` = public (admin import, or published).
    pub owner: String,
    pub name: String,
    pub digest: String,
    pub layers: Vec<String>,
    pub size: u64,
    pub command: Vec<String>,
    pub env: Vec<String>,
    /// Where it came from: the registry reference of a pull, `""` for imports.
    pub source: String,
    pub created_at: i64,
}

/// A tenant's login to one registry; `secret` is the sealed password.
#[derive(Debug, Clone, PartialEq)]
pub struct CredentialRow {
    pub tenant_id: String,
    pub host: String,
    pub username: String,
    pub secret: String,
    pub created_at: i64,
}

/// A registry pull job (`running`, `done`, `failed`).
#[derive(Debug, Clone, PartialEq)]
pub struct PullRow {
    pub id: String,
    pub tenant_id: String,
    pub reference: String,
    pub name: String,
    pub state: String,
    pub error: Option<String>,
    pub digest: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VolumeRow {
    pub tenant_id: String,
    pub name: String,
    pub size: u64,
    pub created_at: i64,
    /// `pending` until the image file is complete (see [`gpuvisor_wire::VolumeState`]).
    pub state: gpuvisor_wire::VolumeState,
    /// A VM has been given it as a raw disk: its blocks are a guest's, never mounted by the
    /// host kernel for a container ([`Store::mark_vm_touched`]).
    pub vm_touched: bool,
}

/// An instance's restart policy and its bookkeeping (see `engine::reconcile`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RestartRow {
    pub policy: gpuvisor_wire::RestartPolicy,
    /// Automatic restarts since the last create/start.
    pub count: u32,
    /// Unix ms before which the instance is not provisioned again (crash-loop backoff).
    pub not_before: i64,
    /// The delay before the last automatic restart, ms (0: none yet).
    pub backoff_ms: i64,
    /// When the instance last became running, unix ms.
    pub started_at: i64,
    /// The main process's last exit code, when it was seen.
    pub exit_code: Option<i32>,
}

/// What the user asked for, stored as JSON: everything about an instance that is not placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct InstanceSpec {
    pub vcpus: u32,
    pub memory: u64,
    pub container_disk: u64,
    pub volumes: Vec<gpuvisor_wire::VolumeMount>,
    pub env: Vec<String>,
    pub ports: Vec<gpuvisor_wire::PortSpec>,
    pub command: Vec<String>,
    #[serde(default)]
    pub priority: gpuvisor_wire::PriorityClass,
    #[serde(default)]
    pub interruptible: bool,
    /// Interruptible: what it pays per GPU-hour (its bid, else the floor when it was placed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bid_per_gpu_hour: Option<f64>,
    /// VMs: SSH public keys for the guest's user (cloud-init).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// VMs: a script cloud-init runs once at first boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_script: Option<String>,
    /// VMs: packages cloud-init installs at first boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// Stopped after this many seconds unused (`engine::ingress::run_idle`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    /// Disk I/O limits, per disk.
    #[serde(default, skip_serializing_if = "gpuvisor_wire::DiskIo::is_unlimited")]
    pub disk_io: gpuvisor_wire::DiskIo,
    /// A clone (`instance create --from-snapshot`): the id of the snapshot whose disk is
    /// copied into the instance's new disk at every provision, as an image would be (disks
    /// only, never a VM's running state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    /// `instance restore`, one shot: the next provision starts from this snapshot (and a VM
    /// from its running state when it has one); the reconciler clears it once the instance
    /// runs. It wins over `from_snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSpec>,
    /// VMs: a live migration from another node brought it here (`engine::remote`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<crate::engine::remote::IncomingSpec>,
    /// VMs: a live migration to another node is under way (`engine::remote`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outgoing: Option<crate::engine::remote::OutgoingSpec>,
}

/// What the next provision of a restored instance starts from ([`InstanceSpec::restore`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreSpec {
    /// The snapshot's id.
    pub snapshot: String,
    /// Resume the VM's saved running state.
    #[serde(default)]
    pub memory: bool,
    /// The instance runs from it (set once `running`): the next provision starts from the
    /// image again and drops it. Until then a VM still boots the snapshot's base and kernel
    /// links, so the snapshot stays.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub applied: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRow {
    pub id: String,
    pub name: String,
    pub tenant_id: String,
    pub node_id: String,
    pub image: String,
    pub state: InstanceState,
    pub desired: InstanceState,
    pub reason: Option<String>,
    pub spec: InstanceSpec,
    pub cpus: Vec<u32>,
    pub gpus: Vec<gpuvisor_wire::GpuBinding>,
    /// Host number of the instance's address in its tenant's /24.
    pub ip_host: u8,
    pub created_at: i64,
    pub updated_at: i64,
    pub restart: RestartRow,
    /// Container or micro-VM.
    pub runtime: gpuvisor_wire::RuntimeKind,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    pub seq: i64,
    pub at: i64,
    pub key_id: String,
    pub role: String,
    pub tenant_id: String,
    pub op: String,
    pub target: String,
    pub result: String,
    pub source: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The chain's starting point after retention: the last removed row's seq and hash.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditAnchor {
    pub seq: i64,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub instance_id: String,
    pub at: i64,
    pub kind: String,
    pub message: String,
}

fn json<T: Serialize>(v: &T) -> String {
    // Serialising plain data structs to JSON cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

fn from_json<T: DeserializeOwned>(table: &'static str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
        table,
        why: e.to_string(),
    })
}

fn u(table: &'static str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        table,
        why: format!("negative value {v}"),
    })
}

fn tenant(r: &AnyRow) -> Result<TenantRow> {
    Ok(TenantRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        net_slot: u("tenants", r.try_get("net_slot")?)? as u32,
        created_at: r.try_get("created_at")?,
        policy: from_json("tenants", &r.try_get::<String, _>("policy")?)?,
        limits: from_json("tenants", &r.try_get::<String, _>("limits")?)?,
        deleting_at: r.try_get("deleting_at")?,
    })
}

fn key(r: &AnyRow) -> Result<KeyRow> {
    let role: String = r.try_get("role")?;
    Ok(KeyRow {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        role: Role::parse(&role).ok_or(StoreError::Corrupt {
            table: "api_keys",
            why: format!("role {role:?}"),
        })?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

fn gpu(r: &AnyRow) -> Result<GpuRow> {
    let numa: Option<i64> = r.try_get("numa_node")?;
    Ok(GpuRow {
        uuid: r.try_get("uuid")?,
        node_id: r.try_get("node_id")?,
        index: u("gpus", r.try_get("idx")?)? as u32,
        model: r.try_get("model")?,
        vram: u("gpus", r.try_get("vram")?)?,
        pci_address: r.try_get("pci_address")?,
        numa_node: numa.map(|n| n as u32),
        backend: r.try_get("backend")?,
    })
}

/// `1.5,,3` for [1.5, NaN, 3]: shortest round-trip form of each value, empty for NaN.
fn encode_values(v: &[f32]) -> String {
    v.iter()
        .map(|x| {
            if x.is_finite() {
                x.to_string()
            } else {
                String::new()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn decode_values(s: &str) -> Vec<f32> {
    if s.is_empty() {
        return Vec::new();
    }
    s.split(',')
        .map(|x| x.parse().unwrap_or(f32::NAN))
        .collect()
}

fn image(r: &AnyRow) -> Result<ImageRow> {
    Ok(ImageRow {
        owner: r.try_get("owner")?,
        source: r.try_get("source")?,
        name: r.try_get("name")?,
        digest: r.try_get("digest")?,
        layers: from_json("images", &r.try_get::<String, _>("layers")?)?,
        size: u("images", r.try_get("size")?)?,
        command: from_json("images", &r.try_get::<String, _>("command")?)?,
        env: from_json("images", &r.try_get::<String, _>("env")?)?,
        created_at: r.try_get("created_at")?,
    })
}

fn credential(r: &AnyRow) -> Result<CredentialRow> {
    Ok(CredentialRow {
        tenant_id: r.try_get("tenant_id")?,
        host: r.try_get("host")?,
        username: r.try_get("username")?,
        secret: r.try_get("secret")?,
        created_at: r.try_get("created_at")?,
    })
}

fn pull(r: &AnyRow) -> Result<PullRow> {
    Ok(PullRow {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        reference: r.try_get("reference")?,
        name: r.try_get("name")?,
        state: r.try_get("state")?,
        error: r.try_get("error")?,
        digest: r.try_get("digest")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn volume(r: &AnyRow) -> Result<VolumeRow> {
    Ok(VolumeRow {
        tenant_id: r.try_get("tenant_id")?,
        name: r.try_get("name")?,
        size: u("volumes", r.try_get("size")?)?,
        created_at: r.try_get("created_at")?,
        state: {
            let s: String = r.try_get("state")?;
            gpuvisor_wire::VolumeState::parse(&s).ok_or(StoreError::Corrupt {
                table: "volumes",
                why: format!("state {s:?}"),
            })?
        },
        vm_touched: r.try_get::<i64, _>("vm_touched")? != 0,
    })
}

fn state(s: &str) -> Result<InstanceState> {
    InstanceState::parse(s).ok_or(StoreError::Corrupt {
        table: "instances",
        why: format!("state {s:?}"),
    })
}

fn instance(r: &AnyRow) -> Result<InstanceRow> {
    Ok(InstanceRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        tenant_id: r.try_get("tenant_id")?,
        node_id: r.try_get("node_id")?,
        image: r.try_get("image")?,
        state: state(&r.try_get::<String, _>("state")?)?,
        desired: state(&r.try_get::<String, _>("desired")?)?,
        reason: r.try_get("reason")?,
        spec: from_json("instances", &r.try_get::<String, _>("spec")?)?,
        cpus: from_json("instances", &r.try_get::<String, _>("cpus")?)?,
        gpus: from_json("instances", &r.try_get::<String, _>("gpus")?)?,
        ip_host: u("instances", r.try_get("ip_host")?)? as u8,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        restart: {
            let p: String = r.try_get("restart_policy")?;
            let code: Option<i64> = r.try_get("exit_code")?;
            RestartRow {
                policy: gpuvisor_wire::RestartPolicy::parse(&p).map_err(|why| {
                    StoreError::Corrupt {
                        table: "instances",
                        why,
                    }
                })?,
                count: u32::try_from(r.try_get::<i64, _>("restart_count")?).unwrap_or(u32::MAX),
                not_before: r.try_get("restart_not_before")?,
                backoff_ms: r.try_get("restart_backoff_ms")?,
                started_at: r.try_get("started_at")?,
                exit_code: code.and_then(|c| i32::try_from(c).ok()),
            }
        },
        runtime: gpuvisor_wire::RuntimeKind::parse(&r.try_get::<String, _>("runtime")?).map_err(
            |why| StoreError::Corrupt {
                table: "instances",
                why,
            },
        )?,
    })
}

const INSTANCE_COLS: &str = "id, name, tenant_id, node_id, image, state, desired, reason, spec, cpus, gpus, ip_host, created_at, updated_at, \
     restart_policy, restart_count, restart_not_before, restart_backoff_ms, started_at, exit_code, runtime";

/// The store handle; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    /// SQLite: write transactions take the write lock when they begin ([`Store::begin_write`]).
    sqlite: bool,
    /// The live instances as last read ([`Store::live_instances`]).
    live: Arc<LiveCache>,
}

/// The live (not terminated) instance rows, read once and reused until an instance write.
///
/// Listing instances is the hottest read (every `instance list`, the reconciler, telemetry,
/// the console) and, through SQLite's worker thread, its costliest: each row crosses a
/// channel between threads and is converted twice. Every write to `instances` goes through a
/// `Store` method that runs it on a task of its own ([`Store::write_instances`]) holding a
/// [`Writing`] guard, whose drop (after the commit, or the rollback of a failed transaction)
/// bumps `generation`. A reader tags what it read with the
/// generation seen *before* its query, so a write that commits during the query leaves the
/// entry stale, never a stale entry current. This holds because one daemon owns a store (the
/// data dir's lock; a PostgreSQL store is not shared between daemons either): a write by
/// another process would not be seen until this one's next write.
#[derive(Debug, Default)]
struct LiveCache {
    generation: AtomicU64,
    rows: std::sync::Mutex<Option<(u64, Arc<Vec<InstanceRow>>)>>,
    /// One reader refreshes a stale list at a time; those who waited take its result (many
    /// readers wake together: a second's live metrics streams, the reconciler, the meter).
    refresh: tokio::sync::Mutex<()>,
}

/// Held by the task of each write to `instances` ([`Store::write_instances`]): its drop,
/// once the write is over (or its task panicked), marks the cached list stale.
struct Writing(Arc<LiveCache>);

impl Drop for Writing {
    fn drop(&mut self) {
        self.0.generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl Store {
    /// Connects (`sqlite://path?mode=rwc` or `postgres://...`) and applies migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 8 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    // Per connection (SQLite does not keep it in the file): with WAL, a commit
                    // is durable against a crash of the daemon without an fsync each, as every
                    // connection of the pool must agree (one left at the default FULL made
                    // its writes wait for the disk: 60-150 ms behind a migrating VM's I/O).
                    if sqlite {
                        sqlx::query("PRAGMA synchronous=NORMAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        if sqlite {
            // WAL: readers never block the writer; the setting persists in the file.
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
        }
        MIGRATOR.run(&pool).await?;
        Ok(Self {
            pool,
            sqlite,
            live: Arc::default(),
        })
    }

    /// A transaction that writes. On SQLite it takes the write lock at once (`BEGIN
    /// IMMEDIATE`, waiting out the busy timeout): a deferred one that reads first and writes
    /// after another connection committed fails with SQLITE_BUSY_SNAPSHOT, which no wait cures
    /// (the fuzzer hit it: `tenant rm` beside the usage meter's writes).
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(if self.sqlite {
            self.pool.begin_with("BEGIN IMMEDIATE").await?
        } else {
            self.pool.begin().await?
        })
    }

    /// The SQLite URL for a file in the data dir.
    pub fn sqlite_url(path: &std::path::Path) -> String {
        format!("sqlite://{}?mode=rwc", path.display())
    }

    // --- tenants -------------------------------------------------------------------------

    /// Creates a tenant with the lowest free network slot below `slots`; `None` when every
    /// slot is taken. Two creations racing for one slot are told apart from a name clash and
    /// the loser retries with the next free slot.
    pub async fn create_tenant(
        &self,
        id: &str,
        name: &str,
        now: i64,
        slots: u32,
    ) -> Result<Option<TenantRow>> {
        let mut attempt = 0;
        loop {
            let slot = self.free_net_slot().await?;
            if slot >= i64::from(slots) {
                return Ok(None);
            }
            let r = sqlx::query(
                "INSERT INTO tenants (id, name, net_slot, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(id.to_string())
            .bind(name.to_string())
            .bind(slot)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(StoreError::from_write);
            match r {
                Ok(_) => {
                    return Ok(Some(TenantRow {
                        id: id.into(),
                        name: name.into(),
                        net_slot: slot as u32,
                        created_at: now,
                        policy: Default::default(),
                        limits: Default::default(),
                        deleting_at: None,
                    }))
                }
                Err(StoreError::Conflict(_))
                    if attempt < 8 && self.tenant_by_name(name).await?.is_none() =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn free_net_slot(&self) -> Result<i64> {
        let slots: Vec<i64> = sqlx::query("SELECT net_slot FROM tenants ORDER BY net_slot")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>("net_slot"))
            .collect::<std::result::Result<_, _>>()?;
        let mut slot = 0i64;
        for s in slots {
            if s == slot {
                slot += 1;
            } else if s > slot {
                break;
            }
        }
        Ok(slot)
    }

    pub async fn tenants(&self) -> Result<Vec<TenantRow>> {
        sqlx::query(
            "SELECT id, name, net_slot, created_at, policy, limits, deleting_at FROM tenants ORDER BY created_at, name",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(tenant)
        .collect()
    }

    pub async fn tenant_by_name(&self, name: &str) -> Result<Option<TenantRow>> {
        sqlx::query("SELECT id, name, net_slot, created_at, policy, limits, deleting_at FROM tenants WHERE name = $1")
            .bind(name.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(tenant)
            .transpose()
    }

    /// Replaces a tenant's policy; false when no such tenant.
    pub async fn set_tenant_policy(
        &self,
        id: &str,
        policy: &gpuvisor_wire::TenantPolicy,
    ) -> Result<bool> {
        let r = sqlx::query("UPDATE tenants SET policy = $1 WHERE id = $2")
            .bind(json(policy))
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Replaces a tenant admin's own quotas; false when no such tenant.
    pub async fn set_tenant_limits(
        &self,
        id: &str,
        limits: &gpuvisor_wire::TenantPolicy,
    ) -> Result<bool> {
        let r = sqlx::query("UPDATE tenants SET limits = $1 WHERE id = $2")
            .bind(json(limits))
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Marks a tenant as being deleted and revokes its keys, in one transaction.
    pub async fn mark_tenant_deleting(&self, id: &str, now: i64) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE tenants SET deleting_at = $1 WHERE id = $2 AND deleting_at IS NULL")
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE tenant_id = $2 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A daemon setting (`settings` table).
    pub async fn setting(&self, name: &str) -> Result<Option<String>> {
        Ok(sqlx::query("SELECT value FROM settings WHERE name = $1")
            .bind(name.to_string())
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get::<String, _>("value"))
            .transpose()?)
    }

    pub async fn set_setting(&self, name: &str, value: &str) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM settings WHERE name = $1")
            .bind(name.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2)")
            .bind(name.to_string())
            .bind(value.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Tenants being deleted (`tenant rm --cascade`).
    pub async fn deleting_tenants(&self) -> Result<Vec<TenantRow>> {
        sqlx::query(
            "SELECT id, name, net_slot, created_at, policy, limits, deleting_at FROM tenants \
             WHERE deleting_at IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(tenant)
        .collect()
    }

    /// Deletes a tenant that holds nothing any more: its keys, its terminated instances and
    /// their events, then the row (its network slot is free again). Refused (false, nothing
    /// deleted) while it has an instance that is not terminated, a volume or a snapshot; false
    /// too when the row was already gone (only one caller sees true).
    pub async fn delete_tenant(&self, id: &str) -> Result<bool> {
        let id = id.to_string();
        self.write_instances(move |s| async move {
            let mut tx = s.begin_write().await?;
            let held: i64 = sqlx::query(
                "SELECT (SELECT COUNT(*) FROM instances WHERE tenant_id = $1 AND state <> 'terminated') \
                 + (SELECT COUNT(*) FROM volumes WHERE tenant_id = $1) \
                 + (SELECT COUNT(*) FROM snapshots WHERE tenant_id = $1) AS n",
            )
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
            if held > 0 {
                return Ok(false);
            }
            for q in [
                "DELETE FROM events WHERE instance_id IN \
                 (SELECT id FROM instances WHERE tenant_id = $1 AND state = 'terminated')",
                "DELETE FROM instances WHERE tenant_id = $1 AND state = 'terminated'",
                "DELETE FROM api_keys WHERE tenant_id = $1",
                "DELETE FROM templates WHERE owner = $1",
            ] {
                sqlx::query(q)
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            // A row committed after the count (PostgreSQL's read committed) makes this fail on its
            // foreign key: nothing is deleted and the caller tries again.
            let gone = sqlx::query("DELETE FROM tenants WHERE id = $1")
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from_write)?
                .rows_affected()
                == 1;
            tx.commit().await?;
            Ok(gone)
        })
        .await
    }

    pub async fn tenant(&self, id: &str) -> Result<Option<TenantRow>> {
        sqlx::query(
            "SELECT id, name, net_slot, created_at, policy, limits, deleting_at FROM tenants WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(tenant)
        .transpose()
    }

    // --- keys ----------------------------------------------------------------------------

    pub async fn insert_key(&self, k: &KeyRow, hash: &str) -> Result<()> {
        sqlx::query("INSERT INTO api_keys (id, tenant_id, role, hash, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(k.id.clone())
            .bind(k.tenant_id.clone())
            .bind(k.role.as_str())
            .bind(hash.to_string())
            .bind(k.created_at)
            .execute(&self.pool)
            .await
            .map_err(StoreError::from_write)?;
        Ok(())
    }

    /// The live (not revoked) key with this hash.
    pub async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRow>> {
        sqlx::query("SELECT id, tenant_id, role, created_at, revoked_at FROM api_keys WHERE hash = $1 AND revoked_at IS NULL")
            .bind(hash.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(key)
            .transpose()
    }

    pub async fn keys(&self) -> Result<Vec<KeyRow>> {
        sqlx::query("SELECT id, tenant_id, role, created_at, revoked_at FROM api_keys ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(key)
            .collect()
    }

    pub async fn key(&self, id: &str) -> Result<Option<KeyRow>> {
        sqlx::query(
            "SELECT id, tenant_id, role, created_at, revoked_at FROM api_keys WHERE id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(key)
        .transpose()
    }

    /// Revokes a live key; never the last live admin key (false then, as for a key already
    /// revoked), in one statement.
    pub async fn revoke_key(&self, id: &str, now: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL \
             AND (role <> 'admin' OR \
             (SELECT COUNT(*) FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL) > 1)",
        )
        .bind(now)
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    // --- nodes and GPUs -------------------------------------------------------------------

    pub async fn upsert_node(
        &self,
        id: &str,
        hostname: &str,
        cpus: u32,
        memory: u64,
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO nodes (id, hostname, cpus, memory, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, cpus = excluded.cpus, \
             memory = excluded.memory, updated_at = excluded.updated_at",
        )
        .bind(id.to_string())
        .bind(hostname.to_string())
        .bind(i64::from(cpus))
        .bind(memory as i64)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn nodes(&self) -> Result<Vec<NodeRow>> {
        sqlx::query("SELECT id, hostname, cpus, memory FROM nodes ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(NodeRow {
                    id: r.try_get("id")?,
                    hostname: r.try_get("hostname")?,
                    cpus: u("nodes", r.try_get("cpus")?)? as u32,
                    memory: u("nodes", r.try_get("memory")?)?,
                })
            })
            .collect()
    }

    /// Replaces the node's GPU inventory with `gpus`.
    pub async fn replace_gpus(&self, node_id: &str, gpus: &[GpuRow], now: i64) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM gpus WHERE node_id = $1")
            .bind(node_id.to_string())
            .execute(&mut *tx)
            .await?;
        for g in gpus {
            sqlx::query(
                "INSERT INTO gpus (uuid, node_id, idx, model, vram, pci_address, numa_node, backend, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(g.uuid.clone())
            .bind(node_id.to_string())
            .bind(i64::from(g.index))
            .bind(g.model.clone())
            .bind(g.vram as i64)
            .bind(g.pci_address.clone())
            .bind(g.numa_node.map(i64::from))
            .bind(g.backend.clone())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_write)?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn gpus(&self) -> Result<Vec<GpuRow>> {
        sqlx::query("SELECT uuid, node_id, idx, model, vram, pci_address, numa_node, backend FROM gpus ORDER BY node_id, idx")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(gpu)
            .collect()
    }

    /// Cordons a GPU; a GPU already cordoned keeps its first reason. True when newly cordoned.
    pub async fn cordon(&self, uuid: &str, reason: &str, now: i64) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO gpu_cordons (uuid, reason, at) VALUES ($1, $2, $3) ON CONFLICT (uuid) DO NOTHING",
        )
        .bind(uuid.to_string())
        .bind(reason.to_string())
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(StoreError::from_write)?;
        Ok(r.rows_affected() == 1)
    }

    /// Lifts a cordon; true when there was one.
    pub async fn uncordon(&self, uuid: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM gpu_cordons WHERE uuid = $1")
            .bind(uuid.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Renames a GPU everywhere the store names it (its instances' bindings, its cordon): the
    /// same card seen under another UUID (`PCI-<address>` while the driver could not tell
    /// its `GPU-` UUID). Returns the ids of the instances rewritten.
    pub async fn rename_gpu(&self, old: &str, new: &str) -> Result<Vec<String>> {
        let (old, new) = (old.to_string(), new.to_string());
        self.write_instances(move |s| async move {
            let mut tx = s.begin_write().await?;
            let rows = sqlx::query("SELECT id, gpus FROM instances")
                .fetch_all(&mut *tx)
                .await?;
            let mut changed = Vec::new();
            for r in rows {
                let id: String = r.try_get("id")?;
                let mut gpus: Vec<gpuvisor_wire::GpuBinding> =
                    from_json("instances", &r.try_get::<String, _>("gpus")?)?;
                if !gpus.iter().any(|b| b.uuid == old) {
                    continue;
                }
                for b in gpus.iter_mut().filter(|b| b.uuid == old) {
                    b.uuid = new.to_string();
                }
                sqlx::query("UPDATE instances SET gpus = $1 WHERE id = $2")
                    .bind(json(&gpus))
                    .bind(id.clone())
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from_write)?;
                changed.push(id);
            }
            // A cordon moves to the new name unless that one is cordoned already.
            sqlx::query(
                "UPDATE gpu_cordons SET uuid = $1 WHERE uuid = $2 \
                 AND NOT EXISTS (SELECT 1 FROM gpu_cordons c WHERE c.uuid = $1)",
            )
            .bind(new.to_string())
            .bind(old.to_string())
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_write)?;
            sqlx::query("DELETE FROM gpu_cordons WHERE uuid = $1")
                .bind(old.to_string())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(changed)
        })
        .await
    }

    /// (GPU UUID, reason) of every cordon, oldest first.
    pub async fn cordons(&self) -> Result<Vec<(String, String)>> {
        sqlx::query("SELECT uuid, reason FROM gpu_cordons ORDER BY at, uuid")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("uuid")?, r.try_get("reason")?)))
            .collect()
    }

    // --- metric history ---------------------------------------------------------------------

    /// Saves closed metric minutes (`(entity, record)`); a minute already saved is kept.
    pub async fn save_metric_minutes(&self, rows: &[(String, MinuteRecord)]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for (entity, r) in rows {
            sqlx::query(
                "INSERT INTO metric_minutes (entity, at, avg, max) VALUES ($1, $2, $3, $4) ON CONFLICT (entity, at) DO NOTHING",
            )
            .bind(entity.clone())
            .bind(r.start)
            .bind(encode_values(&r.avg))
            .bind(encode_values(&r.max))
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_write)?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every saved minute from `since` (ms) on, by entity, oldest first.
    pub async fn metric_minutes(&self, since: i64) -> Result<BTreeMap<String, Vec<MinuteRecord>>> {
        let rows = sqlx::query(
            "SELECT entity, at, avg, max FROM metric_minutes WHERE at >= $1 ORDER BY entity, at",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        let mut out: BTreeMap<String, Vec<MinuteRecord>> = BTreeMap::new();
        for r in &rows {
            let entity: String = r.try_get("entity")?;
            out.entry(entity).or_default().push(MinuteRecord {
                start: r.try_get("at")?,
                avg: decode_values(&r.try_get::<String, _>("avg")?),
                max: decode_values(&r.try_get::<String, _>("max")?),
            });
        }
        Ok(out)
    }

    /// Deletes saved minutes older than `before` (ms); returns how many.
    pub async fn prune_metric_minutes(&self, before: i64) -> Result<u64> {
        let r = sqlx::query("DELETE FROM metric_minutes WHERE at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    // --- images (owner '' = public), registry credentials, pull jobs ----------------------

    pub async fn insert_image(&self, i: &ImageRow) -> Result<()> {
        sqlx::query("INSERT INTO images (owner, name, digest, layers, size, command, env, source, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
            .bind(i.owner.clone())
            .bind(i.name.clone())
            .bind(i.digest.clone())
            .bind(json(&i.layers))
            .bind(i.size as i64)
            .bind(json(&i.command))
            .bind(json(&i.env))
            .bind(i.source.clone())
            .bind(i.created_at)
            .execute(&self.pool)
            .await
            .map_err(StoreError::from_write)?;
        Ok(())
    }

    /// Every image, public and private.
    pub async fn images(&self) -> Result<Vec<ImageRow>> {
        sqlx::query("SELECT owner, name, digest, layers, size, command, env, source, created_at FROM images ORDER BY name, owner")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(image)
            .collect()
    }

    /// The images a tenant sees: its own and the public ones.
    pub async fn images_visible(&self, tenant_id: &str) -> Result<Vec<ImageRow>> {
        sqlx::query("SELECT owner, name, digest, layers, size, command, env, source, created_at FROM images WHERE owner = '' OR owner = $1 ORDER BY name, owner")
        .bind(tenant_id.to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(image)
        .collect()
    }

    /// The public image of that name.
    pub async fn image(&self, name: &str) -> Result<Option<ImageRow>> {
        self.image_of("", name).await
    }

    /// The image `name` of `owner` (`""`: public).
    pub async fn image_of(&self, owner: &str, name: &str) -> Result<Option<ImageRow>> {
        sqlx::query("SELECT owner, name, digest, layers, size, command, env, source, created_at FROM images WHERE owner = $1 AND name = $2")
        .bind(owner.to_string())
        .bind(name.to_string())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(image)
        .transpose()
    }

    /// The image `name` as `tenant_id` sees it: its own, else the public one.
    pub async fn image_visible(&self, tenant_id: &str, name: &str) -> Result<Option<ImageRow>> {
        if let Some(own) = self.image_of(tenant_id, name).await? {
            return Ok(Some(own));
        }
        self.image_of("", name).await
    }

    /// Deletes the public image `name`.
    pub async fn delete_image(&self, name: &str) -> Result<bool> {
        self.delete_image_of("", name).await
    }

    pub async fn delete_image_of(&self, owner: &str, name: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM images WHERE owner = $1 AND name = $2")
            .bind(owner.to_string())
            .bind(name.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Makes `owner`'s image public; a public image of the same name is a conflict.
    pub async fn publish_image(&self, owner: &str, name: &str) -> Result<bool> {
        let r = sqlx::query("UPDATE images SET owner = '' WHERE owner = $1 AND name = $2")
            .bind(owner.to_string())
            .bind(name.to_string())
            .execute(&self.pool)
            .await
            .map_err(StoreError::from_write)?;
        Ok(r.rows_affected() > 0)
    }

    /// Inserts or replaces a tenant's login to `host`.
    pub async fn put_credential(&self, c: &CredentialRow) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM registry_credentials WHERE tenant_id = $1 AND host = $2")
            .bind(c.tenant_id.clone())
            .bind(c.host.clone())
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO registry_credentials (tenant_id, host, username, secret, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(c.tenant_id.clone())
            .bind(c.host.clone())
            .bind(c.username.clone())
            .bind(c.secret.clone())
            .bind(c.created_at)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from_write)?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn credential(&self, tenant_id: &str, host: &str) -> Result<Option<CredentialRow>> {
        sqlx::query("SELECT tenant_id, host, username, secret, created_at FROM registry_credentials WHERE tenant_id = $1 AND host = $2")
            .bind(tenant_id.to_string())
            .bind(host.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(credential)
            .transpose()
    }

    pub async fn credentials(&self, tenant_id: &str) -> Result<Vec<CredentialRow>> {
        sqlx::query("SELECT tenant_id, host, username, secret, created_at FROM registry_credentials WHERE tenant_id = $1 ORDER BY host")
            .bind(tenant_id.to_string())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(credential)
            .collect()
    }

    pub async fn delete_credential(&self, tenant_id: &str, host: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM registry_credentials WHERE tenant_id = $1 AND host = $2")
            .bind(tenant_id.to_string())
            .bind(host.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    pub async fn insert_pull(&self, p: &PullRow) -> Result<()> {
        sqlx::query("INSERT INTO image_pulls (id, tenant_id, reference, name, state, error, digest, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
            .bind(p.id.clone())
            .bind(p.tenant_id.clone())
            .bind(p.reference.clone())
            .bind(p.name.clone())
            .bind(p.state.clone())
            .bind(p.error.clone())
            .bind(p.digest.clone())
            .bind(p.created_at)
            .bind(p.updated_at)
            .execute(&self.pool)
            .await
            .map_err(StoreError::from_write)?;
        Ok(())
    }

    pub async fn finish_pull(
        &self,
        id: &str,
        state: &str,
        error: Option<&str>,
        digest: Option<&str>,
        at: i64,
    ) -> Result<()> {
        sqlx::query("UPDATE image_pulls SET state = $1, error = $2, digest = $3, updated_at = $4 WHERE id = $5")
            .bind(state.to_string())
            .bind(error.map(str::to_string))
            .bind(digest.map(str::to_string))
            .bind(at)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn pull(&self, id: &str) -> Result<Option<PullRow>> {
        sqlx::query("SELECT id, tenant_id, reference, name, state, error, digest, created_at, updated_at FROM image_pulls WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(pull)
            .transpose()
    }

    /// Pulls in state `state`, oldest first.
    pub async fn pulls_in(&self, state: &str) -> Result<Vec<PullRow>> {
        sqlx::query("SELECT id, tenant_id, reference, name, state, error, digest, created_at, updated_at FROM image_pulls WHERE state = $1 ORDER BY created_at")
        .bind(state.to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(pull)
        .collect()
    }

    /// How many private images a tenant owns (for `tenant rm`: objects it still owns).
    pub async fn tenant_image_count(&self, tenant_id: &str) -> Result<u64> {
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM images WHERE owner = $1")
            .bind(tenant_id.to_string())
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok(n.max(0) as u64)
    }

    /// Removes a tenant's private images, registry logins and pull jobs (for `tenant rm`; the
    /// caller garbage-collects the layers afterwards). Returns the images removed.
    pub async fn delete_tenant_registry_data(&self, tenant_id: &str) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let images = sqlx::query("DELETE FROM images WHERE owner = $1")
            .bind(tenant_id.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        for sql in [
            "DELETE FROM registry_credentials WHERE tenant_id = $1",
            "DELETE FROM image_pulls WHERE tenant_id = $1",
        ] {
            sqlx::query(sql)
                .bind(tenant_id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(images)
    }

    /// Forgets finished pull jobs older than `before`.
    pub async fn prune_pulls(&self, before: i64) -> Result<u64> {
        let r = sqlx::query("DELETE FROM image_pulls WHERE state <> 'running' AND updated_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    // --- volumes --------------------------------------------------------------------------

    pub async fn insert_volume(&self, v: &VolumeRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO volumes (tenant_id, name, size, created_at, state, vm_touched) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(v.tenant_id.clone())
        .bind(v.name.clone())
        .bind(v.size as i64)
        .bind(v.created_at)
        .bind(v.state.as_str())
        .bind(i64::from(v.vm_touched))
        .execute(&self.pool)
        .await
        .map_err(StoreError::from_write)?;
        Ok(())
    }

    /// Sets a volume's state; false if there is no such volume.
    pub async fn set_volume_state(
        &self,
        tenant_id: &str,
        name: &str,
        state: gpuvisor_wire::VolumeState,
    ) -> Result<bool> {
        let r = sqlx::query("UPDATE volumes SET state = $1 WHERE tenant_id = $2 AND name = $3")
            .bind(state.as_str())
            .bind(tenant_id.to_string())
            .bind(name.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Moves a volume from state `from` to `to`; false if it was not in `from` (or is gone).
    pub async fn set_volume_state_from(
        &self,
        tenant_id: &str,
        name: &str,
        from: gpuvisor_wire::VolumeState,
        to: gpuvisor_wire::VolumeState,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE volumes SET state = $1 WHERE tenant_id = $2 AND name = $3 AND state = $4",
        )
        .bind(to.as_str())
        .bind(tenant_id.to_string())
        .bind(name.to_string())
        .bind(from.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Deletes a volume's row only while it is `pending`; false if it was not (a ready volume is
    /// never removed by this).
    pub async fn delete_volume_if_pending(&self, tenant_id: &str, name: &str) -> Result<bool> {
        let r = sqlx::query(
            "DELETE FROM volumes WHERE tenant_id = $1 AND name = $2 AND state = 'pending'",
        )
        .bind(tenant_id.to_string())
        .bind(name.to_string())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Volumes of one tenant, or of all tenants with `None`.
    pub async fn volumes(&self, tenant_id: Option<&str>) -> Result<Vec<VolumeRow>> {
        let rows = match tenant_id {
            Some(t) => {
                sqlx::query("SELECT tenant_id, name, size, created_at, state, vm_touched FROM volumes WHERE tenant_id = $1 ORDER BY name")
                    .bind(t.to_string())
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT tenant_id, name, size, created_at, state, vm_touched FROM volumes ORDER BY tenant_id, name")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(volume).collect()
    }

    pub async fn volume(&self, tenant_id: &str, name: &str) -> Result<Option<VolumeRow>> {
        sqlx::query("SELECT tenant_id, name, size, created_at, state, vm_touched FROM volumes WHERE tenant_id = $1 AND name = $2")
            .bind(tenant_id.to_string())
            .bind(name.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(volume)
            .transpose()
    }

    /// Records that a VM is given these volumes of the tenant as raw disks (review H2): from
    /// now on a guest may have written their blocks. Never cleared.
    pub async fn mark_vm_touched(&self, tenant_id: &str, names: &[String]) -> Result<()> {
        for name in names {
            sqlx::query("UPDATE volumes SET vm_touched = 1 WHERE tenant_id = $1 AND name = $2")
                .bind(tenant_id.to_string())
                .bind(name.clone())
                .execute(&self.pool)
                .await
                .map_err(StoreError::from_write)?;
        }
        Ok(())
    }

    pub async fn delete_volume(&self, tenant_id: &str, name: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM volumes WHERE tenant_id = $1 AND name = $2")
            .bind(tenant_id.to_string())
            .bind(name.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    // --- instances ------------------------------------------------------------------------

    pub async fn insert_instance(&self, i: &InstanceRow) -> Result<()> {
        let i = i.clone();
        self.write_instances(move |s| async move {
            sqlx::query(
                "INSERT INTO instances (id, name, tenant_id, node_id, image, state, desired, reason, spec, cpus, gpus, ip_host, created_at, updated_at, \
                 restart_policy, restart_count, restart_not_before, restart_backoff_ms, started_at, exit_code, runtime) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)",
            )
            .bind(i.id.clone())
            .bind(i.name.clone())
            .bind(i.tenant_id.clone())
            .bind(i.node_id.clone())
            .bind(i.image.clone())
            .bind(i.state.as_str())
            .bind(i.desired.as_str())
            .bind(i.reason.clone())
            .bind(json(&i.spec))
            .bind(json(&i.cpus))
            .bind(json(&i.gpus))
            .bind(i64::from(i.ip_host))
            .bind(i.created_at)
            .bind(i.updated_at)
            .bind(i.restart.policy.to_string())
            .bind(i64::from(i.restart.count))
            .bind(i.restart.not_before)
            .bind(i.restart.backoff_ms)
            .bind(i.restart.started_at)
            .bind(i.restart.exit_code.map(i64::from))
            .bind(i.runtime.as_str())
            .execute(&s.pool)
            .await
            .map_err(StoreError::from_write)?;
            Ok(())
        })
        .await
    }

    pub async fn instance(&self, id: &str) -> Result<Option<InstanceRow>> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {INSTANCE_COLS} FROM instances WHERE id = $1"
        )))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(instance)
        .transpose()
    }

    /// The live (not terminated) instance with this name in a tenant, else the newest
    /// terminated one.
    pub async fn instance_by_name(
        &self,
        tenant_id: &str,
        name: &str,
    ) -> Result<Option<InstanceRow>> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {INSTANCE_COLS} FROM instances WHERE tenant_id = $1 AND name = $2 \
             ORDER BY CASE WHEN state = 'terminated' THEN 1 ELSE 0 END, created_at DESC LIMIT 1"
        )))
        .bind(tenant_id.to_string())
        .bind(name.to_string())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(instance)
        .transpose()
    }

    /// Runs a write to `instances` to its end on a task of its own, then marks the cached
    /// list stale. The caller may stop waiting (its future dropped) without the cache
    /// missing the write: a statement already queued or sent commits after the caller is
    /// gone, and only the task knows when.
    async fn write_instances<T, F, Fut>(&self, write: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Store) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let stale = Writing(self.live.clone());
        let job = write(self.clone());
        tokio::spawn(async move {
            let out = job.await;
            drop(stale);
            out
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Instances not terminated, of one tenant or all, oldest first.
    pub async fn live_instances(&self, tenant_id: Option<&str>) -> Result<Vec<InstanceRow>> {
        let all = self.all_live().await?;
        Ok(match tenant_id {
            Some(t) => all.iter().filter(|r| r.tenant_id == t).cloned().collect(),
            None => all.as_ref().clone(),
        })
    }

    /// Instance `id`'s row if it is live (not terminated), from the cached list.
    pub async fn live_instance(&self, id: &str) -> Result<Option<InstanceRow>> {
        Ok(self.all_live().await?.iter().find(|r| r.id == id).cloned())
    }

    /// Every live instance: the cached list while no instance write happened since it was
    /// read ([`LiveCache`]), else one query.
    async fn all_live(&self) -> Result<Arc<Vec<InstanceRow>>> {
        let cached = |seen: u64| match &*self.live.rows.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((g, rows)) if *g == seen => Some(rows.clone()),
            _ => None,
        };
        if let Some(rows) = cached(self.live.generation.load(Ordering::SeqCst)) {
            return Ok(rows);
        }
        let _one = self.live.refresh.lock().await;
        // Read by the one before us while we waited, if no write came since.
        let seen = self.live.generation.load(Ordering::SeqCst);
        if let Some(rows) = cached(seen) {
            return Ok(rows);
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {INSTANCE_COLS} FROM instances WHERE state <> 'terminated' ORDER BY created_at, id"
        )))
        .fetch_all(&self.pool)
        .await?;
        let rows = Arc::new(rows.iter().map(instance).collect::<Result<Vec<_>>>()?);
        let mut slot = self.live.rows.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(|(g, _)| *g <= seen) {
            *slot = Some((seen, rows.clone()));
        }
        Ok(rows)
    }

    /// A new size: the spec (vCPUs, memory), the pinned CPUs and the GPUs (`instance
    /// scale`); false if the instance does not exist.
    pub async fn set_resources(&self, i: &InstanceRow, now: i64) -> Result<bool> {
        let i = i.clone();
        self.write_instances(move |s| async move {
            let r = sqlx::query(
                "UPDATE instances SET spec = $1, cpus = $2, gpus = $3, updated_at = $4 WHERE id = $5",
            )
            .bind(json(&i.spec))
            .bind(json(&i.cpus))
            .bind(json(&i.gpus))
            .bind(now)
            .bind(i.id.clone())
            .execute(&s.pool)
            .await
            .map_err(StoreError::from_write)?;
            Ok(r.rows_affected() > 0)
        })
        .await
    }

    /// Removes instance `id`'s row, with its events, if it is terminated (an instance that
    /// left this node by live migration and comes back); true when one went.
    pub async fn delete_terminated_instance(&self, id: &str) -> Result<bool> {
        let id = id.to_string();
        self.write_instances(move |s| async move {
            let mut tx = s.begin_write().await?;
            sqlx::query(
                "DELETE FROM events WHERE instance_id IN (SELECT id FROM instances \
                 WHERE id = $1 AND state = 'terminated')",
            )
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            let n = sqlx::query("DELETE FROM instances WHERE id = $1 AND state = 'terminated'")
                .bind(&id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok(n > 0)
        })
        .await
    }

    /// Writes an instance's spec alone (a restore to apply, or applied); false if the instance
    /// does not exist. The caller holds the instance's lock (the spec is read, changed and
    /// written whole).
    pub async fn set_spec(&self, id: &str, spec: &InstanceSpec, now: i64) -> Result<bool> {
        let (id, spec) = (id.to_string(), json(spec));
        self.write_instances(move |s| async move {
            let r = sqlx::query("UPDATE instances SET spec = $1, updated_at = $2 WHERE id = $3")
                .bind(spec)
                .bind(now)
                .bind(id)
                .execute(&s.pool)
                .await
                .map_err(StoreError::from_write)?;
            Ok(r.rows_affected() > 0)
        })
        .await
    }

    /// Sets the observed state (and reason); returns false if the instance does not exist.
    pub async fn set_state(
        &self,
        id: &str,
        st: InstanceState,
        reason: Option<&str>,
        now: i64,
    ) -> Result<bool> {
        let (id, reason) = (id.to_string(), reason.map(str::to_string));
        self.write_instances(move |s| async move {
            let r = sqlx::query(
                "UPDATE instances SET state = $1, reason = $2, updated_at = $3 WHERE id = $4",
            )
            .bind(st.as_str())
            .bind(reason)
            .bind(now)
            .bind(id.to_string())
            .execute(&s.pool)
            .await
            .map_err(StoreError::from_write)?;
            Ok(r.rows_affected() > 0)
        })
        .await
    }

    pub async fn set_desired(&self, id: &str, desired: InstanceState, now: i64) -> Result<bool> {
        let id = id.to_string();
        self.write_instances(move |s| async move {
            let r = sqlx::query("UPDATE instances SET desired = $1, updated_at = $2 WHERE id = $3")
                .bind(desired.as_str())
                .bind(now)
                .bind(id.to_string())
                .execute(&s.pool)
                .await?;
            Ok(r.rows_affected() > 0)
        })
        .await
    }

    /// The reconciler's own desired-state write after an exit its policy does not restart:
    /// `running` becomes `stopped` only if nobody changed it meanwhile (a terminate, or a
    /// preemptor's `interrupted`, which are written without the instance lock). True if it
    /// changed the row.
    pub async fn stop_if_desired_running(&self, id: &str, now: i64) -> Result<bool> {
        let id = id.to_string();
        self.write_instances(move |s| async move {
            let r = sqlx::query(
                "UPDATE instances SET desired = 'stopped', updated_at = $1 \
                 WHERE id = $2 AND desired = 'running'",
            )
            .bind(now)
            .bind(id.to_string())
            .execute(&s.pool)
            .await?;
            Ok(r.rows_affected() > 0)
        })
        .await
    }

    /// [`Store::set_state`] and [`Store::set_restart`] in one statement (a crash cannot leave
    /// one without the other); false if the instance does not exist.
    pub async fn set_state_and_restart(
        &self,
        id: &str,
        st: InstanceState,
        reason: Option<&str>,
        now: i64,
        r: &RestartRow,
    ) -> Result<bool> {
        let (id, reason, r) = (id.to_string(), reason.map(str::to_string), r.clone());
        self.write_instances(move |s| async move {
            let q = sqlx::query(
                "UPDATE instances SET state = $1, reason = $2, updated_at = $3, restart_count = $4, \
                 restart_not_before = $5, restart_backoff_ms = $6, started_at = $7, exit_code = $8 \
                 WHERE id = $9",
            )
            .bind(st.as_str())
            .bind(reason)
            .bind(now)
            .bind(i64::from(r.count))
            .bind(r.not_before)
            .bind(r.backoff_ms)
            .bind(r.started_at)
            .bind(r.exit_code.map(i64::from))
            .bind(id.to_string())
            .execute(&s.pool)
            .await
            .map_err(StoreError::from_write)?;
            Ok(q.rows_affected() > 0)
        })
        .await
    }

    /// Writes an instance's restart bookkeeping (everything but the policy, which is fixed at
    /// create); false if the instance does not exist.
    pub async fn set_restart(&self, id: &str, r: &RestartRow) -> Result<bool> {
        let (id, r) = (id.to_string(), r.clone());
        self.write_instances(move |s| async move {
            let q = sqlx::query(
                "UPDATE instances SET restart_count = $1, restart_not_before = $2, \
                 restart_backoff_ms = $3, started_at = $4, exit_code = $5 WHERE id = $6",
            )
            .bind(i64::from(r.count))
            .bind(r.not_before)
            .bind(r.backoff_ms)
            .bind(r.started_at)
            .bind(r.exit_code.map(i64::from))
            .bind(id.to_string())
            .execute(&s.pool)
            .await?;
            Ok(q.rows_affected() > 0)
        })
        .await
    }

    // --- events ---------------------------------------------------------------------------

    pub async fn add_event(&self, id: &str, e: &EventRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO events (id, instance_id, at, kind, message) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id.to_string())
        .bind(e.instance_id.clone())
        .bind(e.at)
        .bind(e.kind.clone())
        .bind(e.message.clone())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn events(&self, instance_id: &str) -> Result<Vec<EventRow>> {
        sqlx::query("SELECT instance_id, at, kind, message FROM events WHERE instance_id = $1 ORDER BY at, id")
            .bind(instance_id.to_string())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(Self::event_row)
            .collect()
    }

    /// The newest events of `owner` (an instance or a GPU) at or after `since`, newest first,
    /// at most `limit`.
    pub async fn recent_events(
        &self,
        owner: &str,
        since: i64,
        limit: u32,
    ) -> Result<Vec<EventRow>> {
        sqlx::query(
            "SELECT instance_id, at, kind, message FROM events WHERE instance_id = $1 AND at >= $2 \
             ORDER BY at DESC, id DESC LIMIT $3",
        )
        .bind(owner.to_string())
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(Self::event_row)
        .collect()
    }

    fn event_row(r: &AnyRow) -> Result<EventRow> {
        Ok(EventRow {
            instance_id: r.try_get("instance_id")?,
            at: r.try_get("at")?,
            kind: r.try_get("kind")?,
            message: r.try_get("message")?,
        })
    }

    // --- audit log ----------------------------------------------------------------------------

    fn audit_row(r: &AnyRow) -> Result<AuditRow> {
        Ok(AuditRow {
            seq: r.try_get("seq")?,
            at: r.try_get("at")?,
            key_id: r.try_get("key_id")?,
            role: r.try_get("role")?,
            tenant_id: r.try_get("tenant_id")?,
            op: r.try_get("op")?,
            target: r.try_get("target")?,
            result: r.try_get("result")?,
            source: r.try_get("source")?,
            prev_hash: r.try_get("prev_hash")?,
            hash: r.try_get("hash")?,
        })
    }

    /// The newest row's (seq, hash), else the anchor's, else none (an empty log).
    pub async fn audit_head(&self) -> Result<Option<(i64, String)>> {
        if let Some(r) = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?
        {
            return Ok(Some((r.try_get("seq")?, r.try_get("hash")?)));
        }
        Ok(self.audit_anchor().await?.map(|a| (a.seq, a.hash)))
    }

    pub async fn audit_anchor(&self) -> Result<Option<AuditAnchor>> {
        sqlx::query("SELECT seq, hash FROM audit_anchor WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?
            .map(|r| {
                Ok(AuditAnchor {
                    seq: r.try_get("seq")?,
                    hash: r.try_get("hash")?,
                })
            })
            .transpose()
    }

    /// Appends a row (its seq must be the head's + 1: the primary key refuses a second writer
    /// of the same seq).
    pub async fn audit_append(&self, a: &AuditRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (seq, at, key_id, role, tenant_id, op, target, result, source, \
             prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(a.seq)
        .bind(a.at)
        .bind(a.key_id.clone())
        .bind(a.role.clone())
        .bind(a.tenant_id.clone())
        .bind(a.op.clone())
        .bind(a.target.clone())
        .bind(a.result.clone())
        .bind(a.source.clone())
        .bind(a.prev_hash.clone())
        .bind(a.hash.clone())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Rows with seq > `after`, oldest first, at most `limit`; of one tenant when given; at or
    /// after `since` (ms).
    pub async fn audit_rows(
        &self,
        after: i64,
        since: i64,
        tenant_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditRow>> {
        sqlx::query(
            "SELECT seq, at, key_id, role, tenant_id, op, target, result, source, prev_hash, hash \
             FROM audit_log WHERE seq > $1 AND at >= $2 AND ($3 = '' OR tenant_id = $3) \
             ORDER BY seq LIMIT $4",
        )
        .bind(after)
        .bind(since)
        .bind(tenant_id.unwrap_or("").to_string())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(Self::audit_row)
        .collect()
    }

    /// Removes the rows older than `before` (ms) and moves the anchor to the last one removed,
    /// in one transaction. Returns how many went.
    pub async fn audit_prune(&self, before: i64) -> Result<u64> {
        let mut tx = self.begin_write().await?;
        let last =
            sqlx::query("SELECT seq, hash FROM audit_log WHERE at < $1 ORDER BY seq DESC LIMIT 1")
                .bind(before)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(last) = last else {
            return Ok(0);
        };
        let (seq, hash): (i64, String) = (last.try_get("seq")?, last.try_get("hash")?);
        let n = sqlx::query("DELETE FROM audit_log WHERE seq <= $1")
            .bind(seq)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM audit_anchor WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO audit_anchor (id, seq, hash) VALUES (1, $1, $2)")
            .bind(seq)
            .bind(hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(n)
    }

    // --- retention --------------------------------------------------------------------------

    /// Deletes events older than `before` (ms) and, per instance, all but the newest
    /// `keep_per_instance`. Returns how many rows went.
    pub async fn prune_events(&self, before: i64, keep_per_instance: u64) -> Result<u64> {
        let old = sqlx::query("DELETE FROM events WHERE at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?
            .rows_affected();
        let keep = i64::try_from(keep_per_instance).unwrap_or(i64::MAX);
        let extra = sqlx::query(
            "DELETE FROM events WHERE id IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER \
             (PARTITION BY instance_id ORDER BY at DESC, id DESC) AS rn FROM events) ranked \
             WHERE rn > $1)",
        )
        .bind(keep)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(old + extra)
    }

    /// Deletes instances terminated before `before` (ms; by their last change) with their
    /// events. Returns how many instance rows went.
    pub async fn prune_terminated(&self, before: i64) -> Result<u64> {
        self.write_instances(move |s| async move {
            let mut tx = s.begin_write().await?;
            sqlx::query(
                "DELETE FROM events WHERE instance_id IN (SELECT id FROM instances \
                 WHERE state = 'terminated' AND updated_at < $1)",
            )
            .bind(before)
            .execute(&mut *tx)
            .await?;
            let n =
                sqlx::query("DELETE FROM instances WHERE state = 'terminated' AND updated_at < $1")
                    .bind(before)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            tx.commit().await?;
            Ok(n)
        })
        .await
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::Store;

    /// Every connection of the SQLite pool writes with `synchronous=NORMAL`, not only the
    /// first one (SQLite keeps the setting per connection).
    #[tokio::test]
    async fn every_sqlite_connection_is_synchronous_normal() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&Store::sqlite_url(&dir.path().join("s.db")))
            .await
            .unwrap();
        // All four at once: the pool must open each of them.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(store.pool.acquire().await.unwrap());
        }
        for conn in held.iter_mut() {
            let (mode,): (i64,) = sqlx::query_as("PRAGMA synchronous")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!(
                mode, 1,
                "a connection writes with synchronous={mode} (1 = NORMAL)"
            );
        }
    }
}
