//! The engine: gpuvisor's one typed command set. The REST API, and later GraphQL, call these
//! methods and nothing else; every business rule (who may see what, validation, placement,
//! state transitions) lives here.
//!
//! Key decision: commands only write *desired* state to the store and wake the reconciler
//! ([`reconcile`]), which alone touches the host. A crash at any point therefore leaves a
//! store the reconciler can converge from, and the same code path serves normal operation and
//! recovery.

pub mod audit;
pub mod authz;
pub mod console;
mod gpuadmin;
pub mod images;
pub mod ingress;
pub mod limits;
mod metrics;
pub use metrics::MetricsWatch;
pub mod migration;
pub mod pricing;
mod reconcile;
pub mod remote;
mod scale;
pub mod serverless;
pub mod session;
pub mod snapshots;
pub mod templates;
mod tenants;
mod usage;
pub mod validate;
pub mod websession;

use crate::error::{invalid, EngineError, Result};
use crate::placement::{
    Assignment, Cluster, Demand, GpuSlot, HostCapacity, PlacementError, Placer, Resident, SimNode,
};
use crate::store::{EventRow, InstanceRow, InstanceSpec, KeyRow, Store, TenantRow, VolumeRow};
use authz::Op;
use gpuvisor_node::Node;
use gpuvisor_wire as wire;
use gpuvisor_wire::{InstanceState, Role};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Engine settings that are policy rather than host facts.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub node_id: String,
    pub hostname: String,
    /// Instances allowed per pinned CPU (1 = exclusive).
    pub cpu_ratio: u32,
    /// SIGTERM → SIGKILL grace on stop.
    pub stop_grace: Duration,
    /// How often the reconciler looks at the host when nothing woke it.
    pub resync: Duration,
    /// How often the reconciler sweeps the host: orphaned objects, stale zombies (30 s).
    pub sweep_every: Duration,
    /// Scheduler policy over the simulated nodes.
    pub simulated_policy: gpuvisor_scheduler::Policy,
}

/// Active keys one tenant may hold.
pub const MAX_KEYS_PER_TENANT: usize = 256;

/// Who is calling: resolved from an API key by [`Engine::authenticate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub tenant_id: String,
    pub tenant: String,
    pub role: Role,
    /// The key it authenticated with (what the audit log names).
    pub key_id: String,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
    fn scope(&self) -> Option<&str> {
        (!self.is_admin()).then_some(self.tenant_id.as_str())
    }
}

/// An exit reaped by the reconciler: its code and the process's last words.
#[derive(Debug, Clone)]
pub(crate) struct SeenExit {
    pub(crate) code: i32,
    pub(crate) said: Option<String>,
}

pub struct Engine {
    pub(crate) store: Store,
    pub(crate) node: Arc<Node>,
    placer: Box<dyn Placer>,
    pub(crate) cfg: EngineConfig,
    /// Serialises placement decisions (capacity snapshot → insert).
    place_lock: tokio::sync::Mutex<()>,
    /// Serialises audit log appends (head → next row).
    /// The newest audit row written, (seq, hash): read once, then kept by `Engine::audit`.
    audit_lock: tokio::sync::Mutex<Option<(i64, String)>>,
    /// The audit chain's key and head note ([`audit`]).
    audit_secret: std::sync::RwLock<Arc<audit::AuditSecret>>,
    /// One lock per instance: one host operation on an instance at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) wake: Notify,
    last_ts: AtomicI64,
    /// Bumped on every instance state change; long-polling readers wait on it.
    changed: tokio::sync::watch::Sender<u64>,
    /// Newest readings, history, alarms and cordoned GPUs (fed by `run_telemetry`).
    pub(crate) telemetry: crate::telemetry::Telemetry,
    /// Ids of the simulated nodes (GPU backend `simulated-node`), from the store at
    /// [`Engine::bootstrap`] and from [`Engine::register_simulated_nodes`].
    simulated_nodes: std::sync::RwLock<std::collections::HashSet<String>>,
    /// Exec bounds and running execs, retention policy ([`limits`]).
    limits: limits::LimitState,
    /// The price list ([`pricing`]), set at start.
    pricing: std::sync::RwLock<Arc<pricing::Pricing>>,
    /// The other daemons a VM may migrate to ([`remote`]), set at start.
    peers: std::sync::RwLock<Arc<remote::Peers>>,
    /// Live migrations this daemon receives, by migration id ([`remote`]).
    incoming: Mutex<HashMap<String, remote::Receiving>>,
    /// The proxy's settings and link key ([`ingress`]), set at start.
    ingress: ingress::IngressState,
    serverless: serverless::Serverless,
    /// One meter step at a time ([`usage`]).
    meter_lock: tokio::sync::Mutex<()>,
    /// Admin key revocations one at a time (the last one is never revoked).
    revoke_lock: tokio::sync::Mutex<()>,
    /// A tenant deletion may be pending (`tenant rm --cascade`): the reconciler looks at the
    /// store only then. True at start, so a deletion a crash interrupted is found.
    pub(crate) tenant_deletions: std::sync::atomic::AtomicBool,
    /// Registry settings, pull jobs, the credential key ([`images`]).
    registry: images::RegistryState,
    /// (tenant id, name) of the volumes a request is making right now: their `pending` rows
    /// are not a crash's leftovers, so the reconciler leaves them alone.
    making_volumes: Mutex<std::collections::HashSet<(String, String)>>,
    /// (tenant id, name) of pending volumes the reconciler could not finish, and why: the
    /// reason an instance waiting for one of them shows.
    volume_errors: Mutex<HashMap<(String, String), String>>,
    /// Exits reaped whose instance's teardown has not completed yet, with the last words
    /// read then (a retry of the `Exited` step cannot reap them again, and the teardown may
    /// have removed what the words were read from).
    seen_exits: Mutex<HashMap<String, SeenExit>>,
    /// When this daemon process started (unix ms): an instance whose run started before it
    /// ended while another daemon (or none, a reboot) was its parent.
    pub(crate) started_ms: i64,
}

/// The "being made" marks one request (or one reconciler pass) holds: [`MakingGuard::claim`]
/// takes a mark only if nobody holds it, and the marks it took end when the guard is dropped,
/// also when the request's future is dropped half-way (its client went away): the pending rows
/// it leaves are then the reconciler's to finish or roll back, not hidden from it until a
/// restart. A guard never ends a mark it did not take.
pub(crate) struct MakingGuard<'a> {
    engine: &'a Engine,
    tenant_id: String,
    names: Vec<String>,
}

impl MakingGuard<'_> {
    /// Marks `name` as being made by the guard's holder; false if someone else holds it.
    pub(crate) fn claim(&mut self, name: &str) -> bool {
        if !self.engine.try_mark_making(&self.tenant_id, name) {
            return false;
        }
        self.names.push(name.to_string());
        true
    }

    /// Ends the mark of `name` now (the guard took it).
    fn release(&mut self, name: &str) {
        if let Some(at) = self.names.iter().position(|n| n == name) {
            self.names.remove(at);
            self.engine.unmark_making(&self.tenant_id, name);
        }
    }
}

impl Drop for MakingGuard<'_> {
    fn drop(&mut self) {
        for n in &self.names {
            self.engine.unmark_making(&self.tenant_id, n);
        }
    }
}

pub const ADMIN_TENANT: &str = "admin";

/// `gpus.backend` of the GPUs of simulated nodes (see [`Engine::register_simulated_nodes`]).
pub const SIMULATED_NODE_BACKEND: &str = "simulated-node";

/// A stable synthetic UUID for GPU `index` of simulated node `node`.
fn simulated_gpu_uuid(node: &str, index: usize) -> String {
    let h = Sha256::digest(format!("gpuvisor-simulated-node/{node}/{index}").as_bytes());
    let x: String = h.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// Lowercase hex of `b`.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| EngineError::Internal(format!("getrandom: {e}")))?;
    Ok(hex(&buf))
}

/// Runs host work (the node's blocking calls) off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EngineError::Internal(format!("host task: {e}")))
}

/// Instance ids: 12 lowercase hex characters (they name veths, which allow 15).
pub fn new_instance_id() -> Result<String> {
    random_hex(6)
}

/// What the store keeps of an API key: its SHA-256, hex (also what key caches are keyed by).
pub fn hash_key(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Engine {
    pub fn new(
        store: Store,
        node: Arc<Node>,
        placer: Box<dyn Placer>,
        cfg: EngineConfig,
    ) -> Arc<Self> {
        let telemetry = metrics::telemetry_for(&node, &cfg.hostname);
        Arc::new(Self {
            store,
            node,
            placer,
            cfg,
            place_lock: tokio::sync::Mutex::new(()),
            audit_lock: tokio::sync::Mutex::new(None),
            audit_secret: std::sync::RwLock::new(Arc::new(audit::AuditSecret::default())),
            locks: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            last_ts: AtomicI64::new(0),
            changed: tokio::sync::watch::Sender::new(0),
            telemetry,
            simulated_nodes: std::sync::RwLock::new(std::collections::HashSet::new()),
            limits: Default::default(),
            pricing: Default::default(),
            peers: Default::default(),
            incoming: Default::default(),
            ingress: Default::default(),
            serverless: Default::default(),
            meter_lock: tokio::sync::Mutex::new(()),
            revoke_lock: tokio::sync::Mutex::new(()),
            tenant_deletions: std::sync::atomic::AtomicBool::new(true),
            registry: Default::default(),
            making_volumes: Mutex::new(Default::default()),
            volume_errors: Mutex::new(Default::default()),
            seen_exits: Mutex::new(Default::default()),
            started_ms: now_ms(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    /// A strictly increasing timestamp, so events keep their order within one millisecond.
    pub(crate) fn tick(&self) -> i64 {
        let now = now_ms();
        let mut prev = self.last_ts.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev + 1);
            match self
                .last_ts
                .compare_exchange(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }

    /// Records an observed state; `updated_at` comes from [`Engine::tick`], so every change is
    /// visible to a reader that compares timestamps.
    pub(crate) async fn set_state(
        &self,
        id: &str,
        st: InstanceState,
        reason: Option<&str>,
    ) -> Result<()> {
        self.store.set_state(id, st, reason, self.tick()).await?;
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    /// [`Engine::set_state`] and the restart bookkeeping in one store write.
    pub(crate) async fn set_state_and_restart(
        &self,
        id: &str,
        st: InstanceState,
        reason: Option<&str>,
        r: &crate::store::RestartRow,
    ) -> Result<()> {
        self.store
            .set_state_and_restart(id, st, reason, self.tick(), r)
            .await?;
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    pub(crate) async fn set_desired_state(&self, id: &str, desired: InstanceState) -> Result<()> {
        self.store.set_desired(id, desired, self.tick()).await?;
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    /// `desired: running -> stopped`, only if nobody changed `desired` meanwhile (see
    /// [`Store::stop_if_desired_running`]); true if it changed.
    pub(crate) async fn stop_if_desired_running(&self, id: &str) -> Result<bool> {
        let changed = self.store.stop_if_desired_running(id, self.tick()).await?;
        if changed {
            self.changed.send_modify(|v| *v += 1);
        }
        Ok(changed)
    }

    /// Answers the instance as soon as its `updated_at` differs from `since`, or at `timeout`:
    /// `--wait` costs one request per state change instead of a polling loop.
    pub async fn watch_instance(
        &self,
        who: &Principal,
        id: &str,
        since: i64,
        timeout: Duration,
    ) -> Result<wire::Instance> {
        who.allow(Op::GetInstance)?;
        let deadline = tokio::time::Instant::now() + timeout.min(Duration::from_secs(30));
        let mut rx = self.changed.subscribe();
        loop {
            rx.mark_unchanged();
            let row = self.find(who, id).await?;
            if row.updated_at != since {
                return self.instance_with_usage(row).await;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return self.instance_with_usage(row).await;
            }
        }
    }

    pub(crate) fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(id.to_string()).or_default().clone()
    }

    pub(crate) fn drop_lock(&self, id: &str) {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(id);
    }

    pub(crate) async fn event(&self, id: &str, kind: &str, message: impl Into<String>) {
        let e = EventRow {
            instance_id: id.to_string(),
            at: self.tick(),
            kind: kind.to_string(),
            message: message.into(),
        };
        let eid = random_hex(8).unwrap_or_else(|_| format!("{}-{}", e.at, kind));
        if let Err(err) = self.store.add_event(&eid, &e).await {
            tracing::warn!(instance = id, "cannot record event: {err}");
        }
    }

    // --- start-up ---------------------------------------------------------------------------

    /// Records the node and its GPUs, and creates the admin tenant and its first key on a fresh
    /// store. Returns that key's secret the one time it is created.
    pub async fn bootstrap(&self) -> Result<Option<String>> {
        let now = now_ms();
        let cpus = self.node.instance_cpus().unwrap_or_default().len() as u32;
        let mem = self.node.cfg.root.mem_total().unwrap_or(0);
        self.store
            .upsert_node(&self.cfg.node_id, &self.cfg.hostname, cpus, mem, now)
            .await?;
        let before: Vec<(String, String)> = self
            .store
            .gpus()
            .await?
            .into_iter()
            .filter(|g| g.node_id == self.cfg.node_id)
            .map(|g| (g.uuid, g.pci_address))
            .collect();
        self.sync_gpus(now).await?;
        self.follow_gpu_renames(&before).await?;
        let simulated = self
            .store
            .gpus()
            .await?
            .into_iter()
            .filter(|g| g.backend == SIMULATED_NODE_BACKEND)
            .map(|g| g.node_id);
        self.simulated_nodes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(simulated);
        for (uuid, reason) in self.store.cordons().await? {
            self.telemetry.cordon(&uuid, &reason);
        }
        self.check_net_plan().await?;
        // Snapshots a crash left half taken, and files no row names (engine::snapshots).
        if let Err(e) = self.sweep_snapshots().await {
            tracing::warn!("snapshot sweep: {e}");
        }
        // Live migrations a crash cut short (engine::migration).
        if let Err(e) = self.recover_migrations().await {
            tracing::warn!("migration recovery: {e}");
        }
        if let Err(e) = self.recover_arrivals().await {
            tracing::warn!("recovery of migrations between nodes: {e}");
        }
        if !self.store.tenants().await?.is_empty() {
            return Ok(None);
        }
        let t = self
            .store
            .create_tenant(&random_hex(6)?, ADMIN_TENANT, now, u32::MAX)
            .await?
            .ok_or_else(|| EngineError::Internal("no network slot for the admin tenant".into()))?;
        let (_, secret) = self.new_key(&t, Role::Admin).await?;
        Ok(Some(secret))
    }

    /// Writes this host's GPU inventory (whole GPUs, GPUs in MIG mode and their slices) to the
    /// store, replacing what was there.
    pub(crate) async fn sync_gpus(&self, now: i64) -> Result<()> {
        let rows: Vec<crate::store::GpuRow> = self
            .node
            .gpus()
            .iter()
            .map(|g| crate::store::GpuRow {
                uuid: g.uuid.clone(),
                node_id: self.cfg.node_id.clone(),
                index: g.index,
                model: g.model.clone(),
                vram: g.vram,
                pci_address: g.pci_address.clone(),
                numa_node: g.numa_node,
                backend: self.node.backend().as_str().to_string(),
            })
            .collect();
        self.store
            .replace_gpus(&self.cfg.node_id, &rows, now)
            .await?;
        Ok(())
    }

    /// Registers simulated nodes (like KWOK's fake nodes): rows in `nodes` and `gpus` (backend
    /// `simulated-node`, stable synthetic UUIDs) that placement may use when this host cannot
    /// take a request. Nothing of theirs exists on the host. Nodes without GPUs are skipped.
    pub async fn register_simulated_nodes(
        &self,
        nodes: &[gpuvisor_scheduler::Node],
    ) -> Result<usize> {
        const MIB: u64 = 1 << 20;
        let now = now_ms();
        let mut n = 0;
        for node in nodes.iter().filter(|n| !n.gpus.is_empty()) {
            if node.name == self.cfg.node_id {
                return Err(invalid(format!(
                    "simulated node {:?} has this host's name",
                    node.name
                )));
            }
            self.store
                .upsert_node(
                    &node.name,
                    &node.name,
                    (node.cpu_milli / 1000) as u32,
                    node.memory_mib * MIB,
                    now,
                )
                .await?;
            let rows: Vec<crate::store::GpuRow> = node
                .gpus
                .iter()
                .enumerate()
                .map(|(i, g)| crate::store::GpuRow {
                    uuid: simulated_gpu_uuid(&node.name, i),
                    node_id: node.name.clone(),
                    index: i as u32,
                    model: g.model.clone(),
                    vram: g.vram_mib * MIB,
                    pci_address: String::new(),
                    numa_node: g.numa,
                    backend: SIMULATED_NODE_BACKEND.to_string(),
                })
                .collect();
            self.store.replace_gpus(&node.name, &rows, now).await?;
            self.simulated_nodes
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node.name.clone());
            n += 1;
        }
        Ok(n)
    }

    /// The simulated nodes in the store, with their GPUs in index order.
    async fn simulated_nodes(&self) -> Result<Vec<SimNode>> {
        let mut gpus: BTreeMap<String, Vec<GpuSlot>> = BTreeMap::new();
        for g in self.store.gpus().await? {
            if g.backend == SIMULATED_NODE_BACKEND {
                gpus.entry(g.node_id).or_default().push(GpuSlot {
                    uuid: g.uuid,
                    index: g.index,
                    model: g.model,
                    vram: g.vram,
                    numa_node: g.numa_node,
                    used_milli: 0,
                    used_vram: 0,
                    mig: false,
                    passthrough: false,
                });
            }
        }
        if gpus.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .store
            .nodes()
            .await?
            .into_iter()
            .filter_map(|n| {
                let g = gpus.remove(&n.id)?;
                Some(SimNode {
                    id: n.id,
                    cpus: n.cpus,
                    memory: n.memory,
                    gpus: g,
                })
            })
            .collect())
    }

    /// Whether an instance lives on a simulated node rather than on this host. Decided by the
    /// node's kind, never by its id differing from ours (an id from an older store, a renamed
    /// host): a local instance taken for a simulated one would never be stopped or cleaned up.
    pub(crate) fn is_simulated(&self, i: &InstanceRow) -> bool {
        self.is_simulated_node(&i.node_id)
    }

    /// Whether `node` is a simulated node (registered with GPU backend `simulated-node`).
    pub(crate) fn is_simulated_node(&self, node: &str) -> bool {
        self.simulated_nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(node)
    }

    // --- auth, tenants, keys --------------------------------------------------------------------

    pub async fn authenticate(&self, secret: Option<&str>) -> Result<Principal> {
        let secret = secret.ok_or_else(|| {
            EngineError::Unauthorized("no API key: pass --api-key or set GPUVISOR_API_KEY".into())
        })?;
        if secret.starts_with(wire::SESSION_TOKEN_PREFIX) {
            return Ok(self.session_principal(secret).await?.0);
        }
        let k = self
            .store
            .key_by_hash(&hash_key(secret))
            .await?
            .ok_or_else(|| EngineError::Unauthorized("the API key is unknown or revoked".into()))?;
        self.principal_of_key(k).await
    }

    /// Who a live key (or a session of it) acts as: refused when its tenant is gone or going.
    pub(crate) async fn principal_of_key(&self, k: KeyRow) -> Result<Principal> {
        let t = self.key_tenant(&k.tenant_id).await?;
        Ok(Principal {
            tenant_id: t.id,
            tenant: t.name,
            role: k.role,
            key_id: k.id,
        })
    }

    /// Whether key `id` still works: not revoked, its tenant there and not being removed. A
    /// store error counts as yes (a session is not cut for a hiccup of the store).
    pub async fn key_active(&self, id: &str) -> bool {
        match self.store.key(id).await {
            Ok(Some(k)) if k.revoked_at.is_none() => !matches!(
                self.key_tenant(&k.tenant_id).await,
                Err(EngineError::Unauthorized(_))
            ),
            Ok(_) => false,
            Err(_) => true,
        }
    }

    async fn new_key(&self, t: &TenantRow, role: Role) -> Result<(KeyRow, String)> {
        // 256 bits of entropy; only the SHA-256 is stored. A fast hash is right here: the secret
        // is random, not a password, so there is nothing for a slow hash to protect.
        let secret = format!("gv_{}", random_hex(32)?);
        let row = KeyRow {
            id: format!("k-{}", random_hex(6)?),
            tenant_id: t.id.clone(),
            role,
            created_at: now_ms(),
            revoked_at: None,
        };
        self.store.insert_key(&row, &hash_key(&secret)).await?;
        Ok((row, secret))
    }

    fn wire_key(k: &KeyRow, tenants: &BTreeMap<String, String>) -> wire::ApiKey {
        wire::ApiKey {
            id: k.id.clone(),
            tenant: tenants.get(&k.tenant_id).cloned().unwrap_or_default(),
            role: k.role,
            created_at: k.created_at,
            revoked: k.revoked_at.is_some(),
        }
    }

    async fn tenant_names(&self) -> Result<BTreeMap<String, String>> {
        Ok(self
            .store
            .tenants()
            .await?
            .into_iter()
            .map(|t| (t.id, t.name))
            .collect())
    }

    pub async fn create_key(
        &self,
        who: &Principal,
        req: &wire::CreateKey,
    ) -> Result<wire::CreatedKey> {
        who.allow(Op::CreateKey)?;
        if !who.may_manage_role(req.role) {
            return Err(EngineError::Forbidden(format!(
                "a {} key cannot make {} keys",
                who.role.as_str(),
                req.role.as_str()
            )));
        }
        let t = self
            .store
            .tenant_by_name(&req.tenant)
            .await?
            // A tenant admin's own tenant only; another tenant is as absent as it looks to it.
            .filter(|t| who.is_admin() || t.id == who.tenant_id)
            .ok_or_else(|| {
                EngineError::NotFound(format!(
                    "tenant {:?} not found (see `gpuvisor tenant list`)",
                    req.tenant
                ))
            })?;
        if t.deleting_at.is_some() {
            return Err(EngineError::InvalidState(format!(
                "tenant {:?} is being deleted: no new keys",
                t.name
            )));
        }
        // Every key has its own rate buckets: an unbounded number of them would be an
        // unbounded allowance (and store).
        let active = self
            .store
            .keys()
            .await?
            .iter()
            .filter(|k| k.tenant_id == t.id && k.revoked_at.is_none())
            .count();
        if active >= MAX_KEYS_PER_TENANT {
            return Err(EngineError::QuotaExceeded(format!(
                "tenant {:?} holds {active} active keys, the most a tenant may: revoke some first",
                t.name
            )));
        }
        let (row, secret) = self.new_key(&t, req.role).await?;
        Ok(wire::CreatedKey {
            key: Self::wire_key(&row, &self.tenant_names().await?),
            secret,
        })
    }

    pub async fn list_keys(&self, who: &Principal) -> Result<Vec<wire::ApiKey>> {
        who.allow(Op::ListKeys)?;
        let names = self.tenant_names().await?;
        Ok(self
            .store
            .keys()
            .await?
            .iter()
            .filter(|k| who.is_admin() || k.tenant_id == who.tenant_id)
            .map(|k| Self::wire_key(k, &names))
            .collect())
    }

    pub async fn revoke_key(&self, who: &Principal, id: &str) -> Result<wire::ApiKey> {
        who.allow(Op::RevokeKey)?;
        let not_found = || EngineError::NotFound(format!("key {id:?} not found"));
        let key = self
            .store
            .key(id)
            .await?
            .filter(|k| who.is_admin() || k.tenant_id == who.tenant_id)
            .ok_or_else(not_found)?;
        if !who.may_manage_role(key.role) {
            return Err(EngineError::Forbidden(format!(
                "a {} key cannot revoke {} keys",
                who.role.as_str(),
                key.role.as_str()
            )));
        }
        // One revocation at a time: two racing ones cannot both pass the last-admin check
        // (the store's conditional update alone leaves that race on PostgreSQL).
        let _one = self.revoke_lock.lock().await;
        let revoked = self.store.revoke_key(id, now_ms()).await?;
        if revoked {
            // Its console sessions end with it (each use checks the key too).
            self.store.delete_web_sessions_of(id).await?;
        }
        if !revoked && key.revoked_at.is_none() && key.role == wire::Role::Admin {
            return Err(EngineError::InvalidState(
                "this is the last admin key: nobody could administer the daemon without it; \
                 create another admin key first (gpuvisor key create --tenant TENANT --role admin)"
                    .into(),
            ));
        }
        let k = self.store.key(id).await?.ok_or_else(not_found)?;
        Ok(Self::wire_key(&k, &self.tenant_names().await?))
    }

    // --- GPUs ------------------------------------------------------------------------------------

    /// This host's GPUs in inventory order (each GPU in MIG mode followed by its slices), then
    /// the simulated nodes' GPUs.
    pub async fn list_gpus(&self, who: &Principal) -> Result<Vec<wire::Gpu>> {
        who.allow(Op::ListGpus)?;
        let live = self.store.live_instances(None).await?;
        let cordoned = self.telemetry.cordoned();
        let backend = self.node.backend().as_str();
        let host = self.node.gpus().into_iter().map(|g| {
            let mut gpu = wire::Gpu {
                uuid: g.uuid,
                index: g.index,
                model: g.model,
                vram: g.vram,
                pci_address: g.pci_address,
                numa_node: g.numa_node,
                backend: backend.to_string(),
                mig_enabled: g.mig_enabled,
                mig: g.mig.map(|m| m.slice),
                ..Default::default()
            };
            self.fill_driver(&mut gpu);
            gpu
        });
        let simulated = self
            .store
            .gpus()
            .await?
            .into_iter()
            .filter(|g| g.backend == SIMULATED_NODE_BACKEND)
            .map(|g| wire::Gpu {
                uuid: g.uuid,
                index: g.index,
                model: g.model,
                vram: g.vram,
                pci_address: g.pci_address,
                numa_node: g.numa_node,
                backend: g.backend,
                ..Default::default()
            });
        let mut out: Vec<wire::Gpu> = host.chain(simulated).collect();
        for gpu in &mut out {
            gpu.cordoned = cordoned.get(&gpu.uuid).cloned();
            for i in &live {
                for b in i.gpus.iter().filter(|b| b.uuid == gpu.uuid) {
                    gpu.allocated_milli += b.milli;
                    gpu.allocated_vram += b.vram;
                    // Totals are everyone's; ids only the caller's own (or all for admins).
                    if who.is_admin() || i.tenant_id == who.tenant_id {
                        gpu.instances.push(i.id.clone());
                    }
                }
            }
        }
        Ok(out)
    }

    // --- images: engine::images -------------------------------------------------------------

    // --- volumes -----------------------------------------------------------------------------

    async fn volume_user(&self, tenant_id: &str, name: &str) -> Result<Option<String>> {
        Ok(self
            .store
            .live_instances(Some(tenant_id))
            .await?
            .into_iter()
            .find(|i| i.spec.volumes.iter().any(|v| v.name == name))
            .map(|i| i.id))
    }

    async fn wire_volume(
        &self,
        v: VolumeRow,
        names: &BTreeMap<String, String>,
    ) -> Result<wire::Volume> {
        Ok(wire::Volume {
            in_use_by: self.volume_user(&v.tenant_id, &v.name).await?,
            tenant: names.get(&v.tenant_id).cloned().unwrap_or_default(),
            name: v.name,
            size: v.size,
            state: v.state,
            created_at: v.created_at,
            vm_only: v.vm_touched,
        })
    }

    /// Marks a volume as being made; false if it already is (by someone else).
    fn try_mark_making(&self, tenant_id: &str, name: &str) -> bool {
        self.making_volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((tenant_id.to_string(), name.to_string()))
    }

    fn unmark_making(&self, tenant_id: &str, name: &str) {
        self.making_volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(tenant_id.to_string(), name.to_string()));
    }

    /// An empty set of "being made" marks for volumes of `tenant_id` (see [`MakingGuard`]).
    pub(crate) fn making_guard(&self, tenant_id: &str) -> MakingGuard<'_> {
        MakingGuard {
            engine: self,
            tenant_id: tenant_id.to_string(),
            names: Vec::new(),
        }
    }

    /// See `seen_exits`.
    pub(crate) fn seen_exits(&self) -> std::sync::MutexGuard<'_, HashMap<String, SeenExit>> {
        self.seen_exits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// See `volume_errors`.
    pub(crate) fn volume_errors(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, String), String>> {
        self.volume_errors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a request is making this volume right now (see `making_volumes`).
    pub(crate) fn is_making_volume(&self, tenant_id: &str, name: &str) -> bool {
        self.making_volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(tenant_id.to_string(), name.to_string()))
    }

    /// Validates and records a new volume: the row only, `pending`, and marked as being made in
    /// `making` (the caller's guard, created before this is called: a request dropped in here
    /// leaves no mark behind).
    async fn reserve_volume(
        &self,
        making: &mut MakingGuard<'_>,
        tenant_id: &str,
        name: &str,
        size: u64,
    ) -> Result<VolumeRow> {
        validate::name("volume", name)?;
        validate::volume_size(size)?;
        if self.store.volume(tenant_id, name).await?.is_some() {
            return Err(EngineError::AlreadyExists(format!(
                "volume {name:?} already exists"
            )));
        }
        let row = VolumeRow {
            tenant_id: tenant_id.to_string(),
            name: name.to_string(),
            size,
            created_at: now_ms(),
            state: wire::VolumeState::Pending,
            vm_touched: false,
        };
        // Row first, pending: a crash after it leaves a row the reconciler finishes or removes
        // (`finish_pending_volumes`), never an image file nobody knows about.
        if !making.claim(name) {
            return Err(EngineError::AlreadyExists(format!(
                "volume {name:?} is being created by another request"
            )));
        }
        if let Err(e) = self.store.insert_volume(&row).await {
            making.release(name);
            return Err(e.into());
        }
        Ok(row)
    }

    /// Makes the image of a reserved (pending) volume; the row goes again if that fails. The
    /// row stays `pending`: the caller says when it is ready.
    async fn format_volume(&self, row: &VolumeRow) -> Result<()> {
        let (node, t, n, size) = (
            self.node.clone(),
            row.tenant_id.clone(),
            row.name.clone(),
            row.size,
        );
        let made = tokio::task::spawn_blocking(move || node.disks.create_volume(&t, &n, size))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()));
        let err = match made {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => EngineError::Node(e.into()),
            Err(e) => e,
        };
        self.rollback_volumes(&row.tenant_id, std::slice::from_ref(&row.name))
            .await;
        Err(err)
    }

    /// Marks volumes made by a request `ready` (their marks end with the request's guard). An
    /// error if one of them is no longer `pending`: nothing may have removed a volume while its
    /// request held the mark, and a request must not answer success for a volume that is gone.
    async fn volumes_ready(&self, tenant_id: &str, names: &[String]) -> Result<()> {
        for n in names {
            let done = self
                .store
                .set_volume_state_from(
                    tenant_id,
                    n,
                    wire::VolumeState::Pending,
                    wire::VolumeState::Ready,
                )
                .await?;
            if !done {
                return Err(EngineError::Internal(format!(
                    "volume {n:?} is no longer pending while its request made it; it was not \
                     marked ready"
                )));
            }
        }
        // The meter bills volumes from now (engine::usage).
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    pub async fn create_volume(
        &self,
        who: &Principal,
        req: &wire::CreateVolume,
    ) -> Result<wire::Volume> {
        who.allow(Op::CreateVolume)?;
        let tenant = self.key_tenant(&who.tenant_id).await?;
        // Before the reservation: a request dropped while reserving leaves no mark.
        let mut making = self.making_guard(&who.tenant_id);
        // Quota check and row under the placement lock, like instance creates, so the two
        // cannot race a quota; the image is made after, without holding everyone's creates.
        let row = {
            let _guard = self.place_lock.lock().await;
            self.key_tenant(&who.tenant_id).await?; // not being deleted meanwhile
            let live = self.store.live_instances(Some(&tenant.id)).await?;
            self.check_quota(
                &tenant,
                &live,
                &tenants::Ask {
                    disk: req.size,
                    volumes: 1,
                    ..Default::default()
                },
            )
            .await?;
            self.reserve_volume(&mut making, &who.tenant_id, &req.name, req.size)
                .await?
        };
        self.format_volume(&row).await?;
        self.volumes_ready(&row.tenant_id, std::slice::from_ref(&row.name))
            .await?;
        drop(making);
        let row = VolumeRow {
            state: wire::VolumeState::Ready,
            ..row
        };
        self.wire_volume(row, &self.tenant_names().await?).await
    }

    pub async fn list_volumes(&self, who: &Principal) -> Result<Vec<wire::Volume>> {
        who.allow(Op::ListVolumes)?;
        let names = self.tenant_names().await?;
        let mut out = Vec::new();
        for v in self.store.volumes(who.scope()).await? {
            out.push(self.wire_volume(v, &names).await?);
        }
        Ok(out)
    }

    pub async fn remove_volume(&self, who: &Principal, name: &str) -> Result<wire::Volume> {
        who.allow(Op::RemoveVolume)?;
        let v = self
            .store
            .volume(&who.tenant_id, name)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("volume {name:?} not found")))?;
        if let Some(user) = self.volume_user(&who.tenant_id, name).await? {
            return Err(EngineError::InUse(format!(
                "volume {name:?} is used by instance {user}: terminate it first"
            )));
        }
        if self.is_making_volume(&who.tenant_id, name) {
            return Err(EngineError::InUse(format!(
                "volume {name:?} is being created: try again in a moment"
            )));
        }
        let (node, t, n) = (self.node.clone(), who.tenant_id.clone(), name.to_string());
        tokio::task::spawn_blocking(move || node.disks.remove_volume(&t, &n))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Node(e.into()))?;
        self.store.delete_volume(&who.tenant_id, name).await?;
        self.changed.send_modify(|v| *v += 1);
        self.wire_volume(v, &self.tenant_names().await?).await
    }

    // --- instances ---------------------------------------------------------------------------

    fn host_capacity(&self, live: &[InstanceRow]) -> HostCapacity {
        let root = &self.node.cfg.root;
        let cpus: Vec<(u32, u32)> = self
            .node
            .instance_cpus()
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                let node = (0..8)
                    .find(|n| {
                        root.path(format!("/sys/devices/system/cpu/cpu{c}/node{n}"))
                            .exists()
                    })
                    .unwrap_or(0);
                (c, node)
            })
            .collect();
        let gpus: Vec<GpuSlot> = self
            .node
            .gpus()
            .iter()
            // A GPU in MIG mode is placed on through its slices only.
            .filter(|g| g.schedulable())
            // A cordoned GPU (or a slice of one) (fatal XID, off the bus) takes no new instances.
            .filter(|g| {
                !self.telemetry.is_cordoned(&g.uuid)
                    && !g
                        .mig
                        .as_ref()
                        .is_some_and(|m| self.telemetry.is_cordoned(&m.slice.parent_uuid))
            })
            // A GPU on no driver, nouveau or pci-stub is for nobody.
            .filter(|g| self.gpu_use(g) != gpuadmin::GpuUse::Unusable)
            .map(|g| GpuSlot {
                uuid: g.uuid.clone(),
                index: g.index,
                model: g.model.clone(),
                vram: g.vram,
                numa_node: g.numa_node,
                used_milli: 0,
                used_vram: 0,
                mig: g.mig.is_some(),
                // A GPU handed to vfio-pci is for VMs; containers cannot open it. Placement
                // gives each kind of request only its kind of GPU.
                passthrough: self.is_passthrough(g),
            })
            .collect();
        // Instances being evicted have already given their resources to their preemptor.
        let residents = live
            .iter()
            .filter(|i| !self.is_simulated(i))
            .filter(|i| reserves(i))
            .map(|i| resident(i, self.vm_overhead()))
            .collect();
        HostCapacity::new(
            gpus,
            cpus,
            self.cfg.cpu_ratio,
            root.mem_total().unwrap_or(0),
            residents,
        )
    }
}

impl Engine {
    /// GPUs sharing an IOMMU group go to one VM together: when placement split a group (it
    /// places GPUs one by one), the VM's GPUs are picked again as whole groups of free vfio-pci
    /// GPUs, if some exist that add up to what it asked for (smallest groups first). Otherwise
    /// the assignment stays and the passthrough plan refuses it, naming the group.
    fn whole_groups(&self, capacity: &HostCapacity, a: &mut Assignment) {
        let inventory = self.node.gpus();
        let group_of = |uuid: &str| {
            inventory
                .iter()
                .find(|g| g.uuid == uuid && g.is_physical())
                .and_then(|g| g.iommu_group)
        };
        let vfio: Vec<&crate::placement::GpuSlot> =
            capacity.gpus.iter().filter(|g| g.passthrough).collect();
        // Every GPU of the group, whatever its driver or cordon: a unit short of one is no unit.
        let members = |group: u32| {
            inventory
                .iter()
                .filter(|g| g.is_physical() && g.iommu_group == Some(group))
                .count()
        };
        let split = a.gpus.iter().any(|x| {
            group_of(&x.uuid).is_some_and(|grp| {
                a.gpus
                    .iter()
                    .filter(|y| group_of(&y.uuid) == Some(grp))
                    .count()
                    < members(grp)
            })
        });
        if !split {
            return;
        }
        let model = a.gpus.first().map(|g| g.model.clone());
        // Whole groups (or lone GPUs) of free GPUs of the model placed.
        let mut units: std::collections::BTreeMap<(u32, String), Vec<&crate::placement::GpuSlot>> =
            Default::default();
        for g in &vfio {
            let key = match group_of(&g.uuid) {
                Some(grp) => (grp, String::new()),
                None => (u32::MAX, g.uuid.clone()),
            };
            units.entry(key).or_default().push(g);
        }
        let mut units: Vec<Vec<&crate::placement::GpuSlot>> = units
            .into_values()
            .filter(|u| {
                u.iter().all(|g| {
                    g.used_milli == 0 && g.used_vram == 0 && Some(&g.model) == model.as_ref()
                }) && u
                    .first()
                    .and_then(|g| group_of(&g.uuid))
                    .is_none_or(|grp| members(grp) == u.len())
            })
            .collect();
        units.sort_by_key(|u| (u.len(), u.iter().map(|g| g.index).min()));
        let want = a.gpus.len();
        // Subset sum over the units (a host has a handful): the first fit in that order.
        fn pick(
            units: &[Vec<&crate::placement::GpuSlot>],
            want: usize,
            from: usize,
            out: &mut Vec<usize>,
        ) -> bool {
            if want == 0 {
                return true;
            }
            for i in from..units.len() {
                if units[i].len() <= want {
                    out.push(i);
                    if pick(units, want - units[i].len(), i + 1, out) {
                        return true;
                    }
                    out.pop();
                }
            }
            false
        }
        let mut chosen = Vec::new();
        if !pick(&units, want, 0, &mut chosen) {
            return;
        }
        let picked: Vec<&crate::placement::GpuSlot> = chosen
            .into_iter()
            .flat_map(|i| std::mem::take(&mut units[i]))
            .collect();
        a.gpus = picked
            .into_iter()
            .map(|g| crate::placement::GpuAssignment {
                uuid: g.uuid.clone(),
                index: g.index,
                model: g.model.clone(),
                milli: 1000,
                vram: g.vram,
            })
            .collect();
    }
}

/// An instance as placement sees it.
fn simulated_choice(a: crate::placement::ClusterAssignment) -> (String, Assignment, Vec<String>) {
    (
        a.node_id,
        Assignment {
            gpus: a.gpus,
            cpus: Vec::new(),
        },
        a.victims,
    )
}

/// The memory an instance holds on its host, for placement and the tenant's memory quota: a
/// container's `--memory`; a VM's guest RAM plus its QEMU's own allowance (`vm_overhead`, what
/// the VM's cgroup allows beyond the guest's RAM, `vm::qemu::VmSpec::memory_limit`).
pub(crate) fn charged_memory(runtime: wire::RuntimeKind, memory: u64, vm_overhead: u64) -> u64 {
    match runtime {
        wire::RuntimeKind::Vm => memory.saturating_add(vm_overhead),
        wire::RuntimeKind::Container => memory,
    }
}

/// Why a container cannot have volume `name` (review H2): a VM had it as a raw disk, so its
/// filesystem metadata is whatever a guest wrote, and mounting it for a container would have
/// the host kernel's ext4 driver parse it. (`e2fsck -fn` first would only narrow that: a
/// consistent filesystem can still be hostile, and e2fsck itself would parse it as root.)
pub(crate) fn vm_touched_refusal(name: &str) -> String {
    format!(
        "volume {name:?} has been attached to a VM: a guest may have written any of its blocks, \
         and the host does not mount guest-written filesystems for containers; use it from VMs \
         (--runtime vm), or copy its data out through a VM into another volume"
    )
}

/// Whether an instance holds its GPUs, CPUs and memory in placement (and pays for them):
/// from creation until it is terminated, stopped or not; not once a preemptor took them.
pub(crate) fn reserves(i: &InstanceRow) -> bool {
    i.state.holds_resources()
        && i.state != InstanceState::Interrupted
        && i.desired != InstanceState::Interrupted
}

fn resident(i: &InstanceRow, vm_overhead: u64) -> Resident {
    Resident {
        id: i.id.clone(),
        gpus: i
            .gpus
            .iter()
            .map(|g| (g.uuid.clone(), g.milli, g.vram))
            .collect(),
        cpus: i.cpus.clone(),
        vcpus: i.spec.vcpus,
        memory: charged_memory(i.runtime, i.spec.memory, vm_overhead),
        priority: pricing::spec_rank(&i.spec),
        interruptible: i.spec.interruptible,
    }
}

impl Engine {
    /// QEMU's memory beyond a VM's RAM on this host: the KVM allowance when the VM runtime runs
    /// guests under KVM, else the emulator's (TCG), the larger (also for simulated nodes and a
    /// daemon without a VM runtime), so that a VM is never under-counted.
    pub(crate) fn vm_overhead(&self) -> u64 {
        use gpuvisor_node::vm::{qemu, Accel};
        let kvm = self
            .node
            .runtime(wire::RuntimeKind::Vm)
            .ok()
            .and_then(|r| r.accel())
            .is_some_and(|a| a == Accel::Kvm.describe());
        if kvm {
            qemu::OVERHEAD_KVM
        } else {
            qemu::OVERHEAD_TCG
        }
    }

    pub(crate) async fn wire_instance(&self, i: InstanceRow) -> Result<wire::Instance> {
        let tenant = self.store.tenant(&i.tenant_id).await?;
        Ok(self.wire_instance_of(i, tenant.as_ref()))
    }

    fn wire_instance_of(&self, i: InstanceRow, tenant: Option<&TenantRow>) -> wire::Instance {
        let simulated = self.is_simulated(&i);
        // No address when the tenant's slot is outside the pool (the plan was shrunk).
        let ip = tenant.filter(|_| !simulated).and_then(|t| {
            self.node
                .net
                .address(
                    &gpuvisor_node::net::TenantNet { slot: t.net_slot },
                    i.ip_host,
                )
                .ok()
                .map(|a| a.to_string())
        });
        let gpu_fraction = self.fraction_guarantee(&i.gpus);
        let urls = self.instance_urls(&i);
        let last_activity_at =
            (i.state == InstanceState::Running && !simulated).then(|| self.last_activity(&i));
        wire::Instance {
            urls,
            last_activity_at,
            idle_timeout_secs: i.spec.idle_timeout_secs,
            disk_io: i.spec.disk_io,
            gpu_fraction,
            id: i.id,
            node: i.node_id,
            name: i.name,
            tenant: tenant.map(|t| t.name.clone()).unwrap_or(i.tenant_id),
            image: i.image,
            runtime: i.runtime,
            state: i.state,
            reason: i.reason,
            desired: i.desired,
            vcpus: i.spec.vcpus,
            cpus: i.cpus,
            memory: i.spec.memory,
            container_disk: i.spec.container_disk,
            gpus: i.gpus,
            volumes: i.spec.volumes,
            env: serverless::redact_env(i.spec.env),
            ports: i.spec.ports,
            command: i.spec.command,
            priority: i.spec.priority,
            interruptible: i.spec.interruptible,
            bid_per_gpu_hour: i.spec.bid_per_gpu_hour,
            restart: i.restart.policy,
            restart_count: i.restart.count,
            exit_code: i.restart.exit_code,
            accel: self
                .node
                .runtime(i.runtime)
                .ok()
                .and_then(|r| r.accel())
                .filter(|_| !simulated),
            ip,
            gpu_usage: Vec::new(),
            guest_memory: None,
            cost: None,
            created_at: i.created_at,
            updated_at: i.updated_at,
        }
    }

    /// What a request is judged against: the largest machine it could land on (this host, or
    /// a simulated node).
    pub(crate) fn host_limits(&self, sim: &[SimNode]) -> validate::HostLimits {
        let mut limits = validate::HostLimits {
            gpus: self.node.gpus().iter().filter(|g| g.schedulable()).count() as u32,
            cpus: self
                .node
                .instance_cpus()
                .map(|c| c.len() as u32)
                .unwrap_or(0),
            cpu_ratio: self.cfg.cpu_ratio,
            memory: self.node.cfg.root.mem_total().unwrap_or(0),
        };
        // A request is judged against the largest machine it could land on.
        for n in sim {
            limits.gpus = limits.gpus.max(n.gpus.len() as u32);
            limits.cpus = limits
                .cpus
                .max(n.cpus.saturating_mul(limits.cpu_ratio.max(1)));
            limits.memory = limits.memory.max(n.memory);
        }
        limits
    }

    /// Validates, places and records a new instance; the reconciler provisions it.
    pub async fn create_instance(
        &self,
        who: &Principal,
        req: &wire::CreateInstance,
    ) -> Result<wire::Instance> {
        self.create_with(who, req, None).await
    }

    /// An instance arriving by live migration ([`remote`]): created as `req` asks, with the
    /// source's id and address, here, preempting nobody; the caller holds its lock.
    pub(crate) async fn create_arrival(
        &self,
        who: &Principal,
        req: &wire::CreateInstance,
        arrival: &remote::Arrival,
    ) -> Result<wire::Instance> {
        self.create_with(who, req, Some(arrival)).await
    }

    async fn create_with(
        &self,
        who: &Principal,
        req: &wire::CreateInstance,
        arrival: Option<&remote::Arrival>,
    ) -> Result<wire::Instance> {
        who.allow(Op::CreateInstance)?;
        // A clone: the snapshot gives (and bounds) the image, runtime and disk size.
        let clone_of = match &req.from_snapshot {
            Some(s) => Some(self.clone_source(who, s).await?),
            None => None,
        };
        let resolved = match &clone_of {
            Some(s) => {
                let r = self
                    .resolve_request(who, &snapshots::seed_request(req, s))
                    .await?;
                snapshots::check_clone(&r, s)?;
                self.check_clone_image(&who.tenant_id, s).await?;
                r
            }
            None => self.resolve_request(who, req).await?,
        };
        let req = &resolved;
        let sim = self.simulated_nodes().await?;
        let limits = self.host_limits(&sim);
        validate::create(req, &limits)?;
        pricing::check_bid(req.interruptible, req.bid_per_gpu_hour)?;
        // Fractions on this host need the limiter; simulated nodes run nothing.
        let local_ok = req.gpu_fraction.is_none() || self.node.limiters.library().is_some();
        if !local_ok && sim.is_empty() {
            return Err(EngineError::Unavailable(
                "fractional GPUs need libgpuvisor_limiter.so on this host: build it with `cargo build --release -p gpuvisor-limiter` and copy it to /usr/local/lib/gpuvisor/, or use --gpus".into(),
            ));
        }
        // The tenant's own image of that name, else the public one (engine::images).
        let image = self
            .store
            .image_visible(&who.tenant_id, &req.image)
            .await?
            .ok_or_else(|| {
                EngineError::NotFound(format!(
                    "image {:?} not found (see `gpuvisor image list`)",
                    req.image
                ))
            })?;
        if let Some(m) = &req.gpu_model {
            let host_gpus: Vec<_> = self
                .node
                .gpus()
                .into_iter()
                .filter(|g| g.schedulable())
                .collect();
            let slice = host_gpus
                .iter()
                .any(|g| g.mig.is_some() && g.model.eq_ignore_ascii_case(m));
            if slice && req.runtime() == wire::RuntimeKind::Vm {
                return Err(invalid(format!(
                    "{m} is a MIG slice: a VM takes whole GPUs by passthrough, not MIG slices (use a container, or a whole GPU's model)"
                )));
            }
            if slice && req.gpu_fraction.is_some() {
                return Err(invalid(format!(
                    "{m} is a MIG slice: it is used whole, not in fractions (use --gpus 1)"
                )));
            }
            if slice && req.gpus.unwrap_or(1) > 1 {
                return Err(invalid(format!(
                    "{m} is a MIG slice and a CUDA process sees one MIG device: use --gpus 1"
                )));
            }
            let mut known: Vec<&str> = host_gpus.iter().map(|g| g.model.as_str()).collect();
            known.extend(
                sim.iter()
                    .flat_map(|n| n.gpus.iter().map(|g| g.model.as_str())),
            );
            known.sort_unstable();
            known.dedup();
            if !known.iter().any(|k| k.eq_ignore_ascii_case(m)) {
                return Err(EngineError::NotFound(format!(
                    "GPU model {m:?} is not on this host (it has: {})",
                    if known.is_empty() {
                        "no GPUs".to_string()
                    } else {
                        known.join(", ")
                    }
                )));
            }
        }
        if req.runtime() == wire::RuntimeKind::Vm {
            self.check_passthrough_gpus(req)?;
        }
        // Every check that needs no lock comes before anything is made (volumes below).
        // A VM boots its image's init; a command given after `--` is run once by cloud-init,
        // as root. The image's CMD is a container's default: a VM does not inherit it (it
        // would become a root command nobody asked for).
        let vm = req.runtime() == wire::RuntimeKind::Vm;
        let mut command = if req.command.is_empty() && !vm {
            image.command.clone()
        } else {
            req.command.clone()
        };
        // A container runs its startup script before its command, at every start.
        if let (Some(script), false) = (&req.startup_script, vm) {
            if !command.is_empty() {
                command = templates::with_startup_script(script, &command);
            }
        }
        if command.is_empty() && req.runtime() == wire::RuntimeKind::Container {
            return Err(invalid(format!(
                "image {:?} has no default command: give one after `--`",
                req.image
            )));
        }
        // An image is a stranger's: its entries for platform-owned names are dropped (the
        // user's were refused above). A VM gets none: its init sets its environment (and
        // `--env` is refused for VMs).
        let mut env: Vec<String> = image
            .env
            .iter()
            .filter(|_| !vm)
            .filter(|kv| {
                let name = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
                !gpuvisor_wire::platform_env(name)
            })
            .cloned()
            .collect();
        env.extend(req.env.iter().cloned());
        let tenant = self.key_tenant(&who.tenant_id).await?;
        Self::check_priority(who, &tenant, req.priority)?;

        let _guard = self.place_lock.lock().await;
        self.key_tenant(&who.tenant_id).await?; // not being deleted meanwhile
        if let Some(s) = &clone_of {
            self.snapshot_still_there(s).await?; // not deleted meanwhile
        }
        let live = self.store.live_instances(None).await?;
        let id = match arrival {
            Some(a) => a.id.clone(),
            None => new_instance_id()?,
        };
        let name = req.name.clone().unwrap_or_else(|| format!("i-{id}"));
        if live
            .iter()
            .any(|i| i.tenant_id == who.tenant_id && i.name == name)
        {
            return Err(EngineError::AlreadyExists(format!(
                "an instance named {name:?} already exists"
            )));
        }
        // Volumes: exist (or have a size to be created with) and are not in use.
        let mut to_create = Vec::new();
        for v in &req.volumes {
            if let Some(user) = live.iter().find(|i| {
                i.tenant_id == who.tenant_id && i.spec.volumes.iter().any(|m| m.name == v.name)
            }) {
                return Err(EngineError::InUse(format!(
                    "volume {:?} is already used by instance {}",
                    v.name, user.id
                )));
            }
            let existing = self.store.volume(&who.tenant_id, &v.name).await?;
            // A VM wrote this volume's blocks as a raw disk: the host kernel would parse a
            // guest's filesystem metadata to mount it for a container (review H2).
            if !vm && existing.as_ref().is_some_and(|e| e.vm_touched) {
                return Err(EngineError::InvalidState(vm_touched_refusal(&v.name)));
            }
            if existing
                .as_ref()
                .is_some_and(|e| e.state == wire::VolumeState::Pending)
            {
                return Err(EngineError::InUse(format!(
                    "volume {:?} is being created: try again in a moment",
                    v.name
                )));
            }
            if existing.is_none() {
                match v.size {
                    Some(size) => to_create.push((v.name.clone(), size)),
                    None => {
                        return Err(EngineError::NotFound(format!(
                            "volume {:?} not found: create it with `gpuvisor volume create` or give a size (NAME:/path:SIZE)",
                            v.name
                        )))
                    }
                }
            }
        }
        let milli = req
            .gpu_fraction
            .map(|f| (f * 1000.0).round() as u32)
            .unwrap_or(0);
        self.check_quota(
            &tenant,
            &live,
            &tenants::Ask {
                instances: 1,
                gpus: req.gpus.unwrap_or(0),
                gpu_milli: milli,
                vcpus: req.vcpus,
                memory: charged_memory(req.runtime(), req.memory, self.vm_overhead()),
                disk: req.container_disk + to_create.iter().map(|(_, s)| *s).sum::<u64>(),
                volumes: to_create.len() as u32,
            },
        )
        .await?;
        // Without the right to preempt other tenants, only the market evicts their instances
        // (an on-demand request, or a higher bid, takes an interruptible one's GPU), never a
        // priority class.
        let protected: std::collections::BTreeSet<String> =
            if who.is_admin() || tenant.policy.preempt_other_tenants {
                Default::default()
            } else {
                live.iter()
                    .filter(|i| {
                        i.tenant_id != who.tenant_id
                            && !pricing::outbids(req.interruptible, req.bid_per_gpu_hour, &i.spec)
                    })
                    .map(|i| i.id.clone())
                    .collect()
            };
        let demand = Demand {
            whole_gpus: req.gpus.unwrap_or(0),
            milli,
            vram: req.vram,
            model: req.gpu_model.clone(),
            vcpus: req.vcpus,
            memory: charged_memory(req.runtime(), req.memory, self.vm_overhead()),
            // Without a bid a spot request takes free GPUs at the floor and outbids nobody.
            priority: pricing::market_rank(req.priority, req.interruptible, req.bid_per_gpu_hour),
            interruptible: req.interruptible,
            passthrough: req.runtime() == wire::RuntimeKind::Vm,
        };
        let capacity = self.host_capacity(&live).protecting(&protected);
        let (node_id, mut assignment, victims) =
            self.choose(&capacity, sim, &live, &protected, &demand, local_ok)?;
        // What a spot instance pays: its bid, refused under the floor of the model it got;
        // without one, that floor (recorded, so its rank and price stay what they were).
        let bid = match (req.interruptible, assignment.gpus.first()) {
            (false, _) => None,
            (true, None) => req.bid_per_gpu_hour,
            (true, Some(g)) => Some(
                self.pricing()
                    .interruptible_rate(&g.model, req.bid_per_gpu_hour)?,
            ),
        };
        let simulated = self.is_simulated_node(&node_id);
        if arrival.is_some() && (simulated || !victims.is_empty()) {
            return Err(EngineError::InsufficientResources(format!(
                "node {} has no room for the VM without {}",
                self.cfg.node_id,
                if simulated {
                    "a simulated node"
                } else {
                    "preempting other instances"
                }
            )));
        }
        if let (true, Some(s)) = (simulated, &clone_of) {
            return Err(EngineError::InsufficientResources(format!(
                "snapshot {:?} is on this host, which has no room for the clone (placement \
                 chose simulated node {node_id})",
                s.name
            )));
        }
        if !simulated && demand.passthrough && victims.is_empty() {
            self.whole_groups(&capacity, &mut assignment);
        }
        // Simulated nodes run nothing: only a local instance needs its runtime, and a local VM
        // the passthrough plan of the GPUs it was given, made here, under the placement lock,
        // so that a VM that could not start is refused now with the plan's reason. (After
        // the request's own refusals and placement's, so that they are the same on every
        // host, with or without a VM runtime.)
        if !simulated {
            if req.runtime() == wire::RuntimeKind::Vm && !assignment.gpus.is_empty() {
                let uuids: Vec<String> = assignment.gpus.iter().map(|g| g.uuid.clone()).collect();
                let node = self.node.clone();
                tokio::task::spawn_blocking(move || node.passthrough(&uuids))
                    .await
                    .map_err(|e| EngineError::Internal(format!("passthrough plan task: {e}")))?
                    .map_err(|e| {
                        EngineError::Unavailable(format!("the VM cannot be given its GPUs: {e}"))
                    })?;
            }
            self.node
                .runtime(req.runtime())
                .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        }
        let used_hosts: Vec<u8> = live
            .iter()
            .filter(|i| i.tenant_id == who.tenant_id && !self.is_simulated(i))
            .map(|i| i.ip_host)
            .collect();
        // Instances on simulated nodes have no address on this host (ip_host 0).
        let ip_host = if let Some(a) = arrival {
            if used_hosts.contains(&a.ip_host) {
                return Err(EngineError::InUse(format!(
                    "the VM's address is taken in tenant {}'s network on node {}",
                    tenant.name, self.cfg.node_id
                )));
            }
            a.ip_host
        } else if simulated {
            0
        } else {
            let hosts = self.node.net.cfg.plan.hosts();
            let n = hosts.clone().count();
            hosts
                .into_iter()
                .find(|h| !used_hosts.contains(h))
                .ok_or_else(|| {
                    EngineError::InsufficientResources(format!(
                        "the tenant's network on this host is full ({n} instances in a /{})",
                        self.node.net.cfg.plan.tenant_len()
                    ))
                })?
        };
        // TCP ports get host ports from the proxy's pool (on this host; none elsewhere).
        let mut ports = req.ports.clone();
        if self.is_simulated_node(&node_id) {
            ports.iter_mut().for_each(|p| p.host_port = None);
        } else {
            self.assign_host_ports(&mut ports, &live)?;
        }
        // New volumes stay `pending` until the instance row that uses them is written: a crash
        // or an error before that leaves only pending volumes, which are rolled back (here, or
        // by the reconciler after a crash), never a ready volume nobody asked for.
        let mut created = Vec::new();
        let mut making = self.making_guard(&who.tenant_id);
        for (n, size) in &to_create {
            let made = match self
                .reserve_volume(&mut making, &who.tenant_id, n, *size)
                .await
            {
                Ok(row) => {
                    created.push(n.clone());
                    self.format_volume(&row).await.inspect_err(|_| {
                        created.pop();
                    })
                }
                Err(e) => Err(e),
            };
            if let Err(e) = made {
                self.rollback_volumes(&who.tenant_id, &created).await;
                return Err(e);
            }
        }
        let now = self.tick();
        let row = InstanceRow {
            id: id.clone(),
            name,
            tenant_id: tenant.id.clone(),
            node_id,
            image: image.name.clone(),
            runtime: req.runtime(),
            state: if arrival.is_some() {
                InstanceState::Provisioning
            } else {
                InstanceState::Pending
            },
            desired: InstanceState::Running,
            reason: None,
            spec: InstanceSpec {
                vcpus: req.vcpus,
                memory: req.memory,
                container_disk: req.container_disk,
                volumes: req.volumes.clone(),
                env,
                ports,
                command,
                priority: req.priority,
                interruptible: req.interruptible,
                bid_per_gpu_hour: bid,
                ssh_keys: req.ssh_keys.clone(),
                startup_script: req.startup_script.clone().filter(|_| vm),
                packages: req.packages.clone(),
                idle_timeout_secs: req.idle_timeout_secs,
                disk_io: gpuvisor_wire::DiskIo::default().with(&req.disk_io),
                from_snapshot: clone_of.as_ref().map(|s| s.id.clone()),
                restore: None,
                incoming: arrival.map(|a| a.incoming.clone()),
                outgoing: None,
            },
            cpus: assignment.cpus,
            gpus: assignment.gpus.into_iter().map(Into::into).collect(),
            ip_host,
            created_at: now,
            updated_at: now,
            restart: crate::store::RestartRow {
                policy: req.restart,
                ..Default::default()
            },
        };
        // A VM's volumes are marked before the VM can exist: from then on a guest may write
        // their blocks, and no container is given them (see `vm_touched_refusal`).
        if vm && !req.volumes.is_empty() {
            let names: Vec<String> = req.volumes.iter().map(|v| v.name.clone()).collect();
            if let Err(e) = self.store.mark_vm_touched(&who.tenant_id, &names).await {
                self.rollback_volumes(&who.tenant_id, &created).await;
                return Err(e.into());
            }
        }
        // Victims first: a crash after this leaves them evicted and the new instance absent,
        // never two instances on one GPU.
        for v in &victims {
            if let Err(e) = self.set_desired_state(v, InstanceState::Interrupted).await {
                self.rollback_volumes(&who.tenant_id, &created).await;
                return Err(e);
            }
            // Another tenant's victim learns the priority, not the preemptor's id.
            let same_tenant = live
                .iter()
                .any(|i| &i.id == v && i.tenant_id == who.tenant_id);
            let by = if same_tenant {
                format!("instance {id}")
            } else {
                "another tenant's instance".to_string()
            };
            let victim = live.iter().find(|i| &i.id == v);
            let why = match victim {
                Some(i) if i.spec.priority < req.priority => {
                    format!("{} priority", req.priority.as_str())
                }
                _ if !req.interruptible => "on demand".to_string(),
                _ => format!(
                    "a higher bid, {} per GPU-hour",
                    bid.map_or_else(|| "-".into(), |b| b.to_string())
                ),
            };
            self.event(v, "preempted", format!("preempted by {by} ({why})"))
                .await;
        }
        if let Err(e) = self.store.insert_instance(&row).await {
            self.rollback_volumes(&who.tenant_id, &created).await;
            return Err(e.into());
        }
        // Part of the workload later placements measure against (an arrival is not a demand
        // of this host's tenants).
        if arrival.is_none() {
            self.placer.accepted(&who.tenant_id, &capacity, &demand);
        }
        // The instance exists: its volumes are ready. (Should this fail, the rows stay pending
        // and the reconciler finishes them: a live instance uses them.)
        if let Err(e) = self.volumes_ready(&who.tenant_id, &created).await {
            tracing::warn!(instance = %id, "volumes stay pending for the reconciler: {e}");
        }
        drop(_guard);
        let how = match arrival {
            Some(a) => format!(
                "arriving from node {} by live migration",
                a.incoming.from_node
            ),
            None => format!("created by tenant {}", tenant.name),
        };
        self.event(&id, "created", how).await;
        self.wake.notify_one();
        self.wire_instance(row).await
    }

    /// Where a new instance goes: this host as it is, else a simulated node as it is, else
    /// this host by preemption, else the simulated nodes by the scheduler's cheapest eviction
    /// plan over all of them. Nobody is evicted while the request fits somewhere.
    fn choose(
        &self,
        capacity: &HostCapacity,
        sim: Vec<SimNode>,
        live: &[InstanceRow],
        protected: &std::collections::BTreeSet<String>,
        demand: &Demand,
        local_ok: bool,
    ) -> Result<(String, Assignment, Vec<String>)> {
        let local_err = if local_ok {
            match self.placer.place(capacity, demand) {
                Ok(a) => return Ok((self.cfg.node_id.clone(), a, Vec::new())),
                Err(e) => e,
            }
        } else {
            PlacementError::GpuShare {
                model: "any (this host has no GPU limiter)".into(),
                milli: demand.milli,
                vram: 0,
            }
        };
        let mut cluster = None;
        if !sim.is_empty() {
            let residents: Vec<(String, Resident)> = live
                .iter()
                .filter(|i| self.is_simulated(i))
                .filter(|i| i.state.holds_resources() && i.desired != InstanceState::Interrupted)
                .map(|i| {
                    let mut r = resident(i, self.vm_overhead());
                    r.interruptible &= !protected.contains(&i.id);
                    (i.node_id.clone(), r)
                })
                .collect();
            // gvfrag measures against the cluster's residents and the demands this daemon's
            // placer has seen lately.
            let mut c = Cluster::new(sim, &residents, self.cfg.simulated_policy)
                .map_err(|e| EngineError::Internal(e.to_string()))?
                .with_recent(self.placer.recent_demands());
            if let Ok(a) = c.place(demand) {
                return Ok(simulated_choice(a));
            }
            cluster = Some(c);
        }
        if local_ok {
            // Room may be made by evicting interruptible, strictly lower-priority instances.
            if let Some(victims) = self
                .placer
                .plan_preemption(capacity, demand)
                .ok()
                .filter(|v| !v.is_empty())
            {
                if let Ok(a) = self.placer.place(&capacity.without(&victims), demand) {
                    return Ok((self.cfg.node_id.clone(), a, victims));
                }
            }
        }
        if let Some(a) = cluster.and_then(|mut c| c.preempt(demand).ok()) {
            return Ok(simulated_choice(a));
        }
        Err(EngineError::InsufficientResources(local_err.to_string()))
    }

    /// Removes a volume's image and then its row (a failed request's volumes, a tenant being
    /// deleted). A volume whose image cannot be removed keeps its row.
    pub(crate) async fn destroy_volume(&self, tenant_id: &str, name: &str) -> Result<()> {
        let (node, t, n) = (self.node.clone(), tenant_id.to_string(), name.to_string());
        tokio::task::spawn_blocking(move || node.disks.remove_volume(&t, &n))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(|e| EngineError::Node(e.into()))?;
        self.store.delete_volume(tenant_id, name).await?;
        Ok(())
    }

    /// Removes volumes a failed request made. One whose image cannot be removed keeps its
    /// `pending` row, so the reconciler retries (`finish_pending_volumes`).
    async fn rollback_volumes(&self, tenant_id: &str, names: &[String]) {
        for n in names {
            if let Err(e) = self.destroy_volume(tenant_id, n).await {
                tracing::warn!(volume = %n, "rollback: {e}");
            }
        }
    }

    /// Finds an instance by id or name that the caller may see; others' instances are 404.
    pub(crate) async fn find(&self, who: &Principal, id_or_name: &str) -> Result<InstanceRow> {
        let not_found = || EngineError::NotFound(format!("instance {id_or_name:?} not found"));
        let row = match self.store.instance(id_or_name).await? {
            Some(r) => Some(r),
            None => {
                self.store
                    .instance_by_name(&who.tenant_id, id_or_name)
                    .await?
            }
        };
        match row {
            Some(r) if who.is_admin() || r.tenant_id == who.tenant_id => Ok(r),
            _ => Err(not_found()),
        }
    }

    pub async fn get_instance(&self, who: &Principal, id: &str) -> Result<wire::Instance> {
        who.allow(Op::GetInstance)?;
        let row = self.find(who, id).await?;
        self.instance_with_usage(row).await
    }

    /// The instance as `get` answers it: with its cost, and its limiter usage when it has a
    /// GPU share.
    async fn instance_with_usage(&self, row: InstanceRow) -> Result<wire::Instance> {
        let cost = self.instance_cost(&row).await?;
        let vm_running = row.runtime == wire::RuntimeKind::Vm
            && row.state == InstanceState::Running
            && !self.is_simulated(&row);
        let mut inst = self.wire_instance(row).await?;
        inst.cost = Some(cost);
        if vm_running {
            inst.guest_memory = self.guest_memory(&inst.id).await;
        }
        if let Some(usage) = self.node.limiters.usage(&inst.id) {
            inst.gpu_usage = inst
                .gpus
                .iter()
                .zip(usage)
                .map(|(g, u)| wire::GpuUsage {
                    uuid: g.uuid.clone(),
                    vram_used: u.used_bytes,
                    vram_quota: u.quota_bytes,
                    share_milli: u.share_bp / 10,
                    util_milli: u.util_bp / 10,
                    launches: u.launches,
                })
                .collect();
        }
        Ok(inst)
    }

    /// A running VM's memory from its balloon (QMP, bounded by the monitor's deadlines);
    /// `None` when QEMU does not answer.
    async fn guest_memory(&self, id: &str) -> Option<wire::GuestMemory> {
        let (node, id) = (self.node.clone(), id.to_string());
        let got = tokio::task::spawn_blocking(move || node.guest_memory(&id))
            .await
            .ok()?;
        match got {
            Ok(Some(m)) => Some(wire::GuestMemory {
                actual: m.actual,
                total: m.total,
                used: m.total.zip(m.available).map(|(t, a)| t.saturating_sub(a)),
                available: m.available,
                reported_at: m.updated_at,
            }),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %e, "guest memory not read");
                None
            }
        }
    }

    pub async fn list_instances(&self, who: &Principal) -> Result<Vec<wire::Instance>> {
        who.allow(Op::ListInstances)?;
        // One tenants query for the whole list, not one per instance.
        let tenants: BTreeMap<String, TenantRow> = self
            .store
            .tenants()
            .await?
            .into_iter()
            .map(|t| (t.id.clone(), t))
            .collect();
        Ok(self
            .store
            .live_instances(who.scope())
            .await?
            .into_iter()
            .map(|r| {
                let t = tenants.get(&r.tenant_id);
                self.wire_instance_of(r, t)
            })
            .collect())
    }

    async fn set_desired(
        &self,
        who: &Principal,
        id: &str,
        desired: InstanceState,
    ) -> Result<wire::Instance> {
        let row = self.find(who, id).await?;
        // A live migration to another node that is unresolved: the guest may run there; this
        // copy must not be started (or removed) until the daemon knows.
        remote::check_not_departing(&row)?;
        let allowed = match desired {
            InstanceState::Stopped => !matches!(
                row.state,
                InstanceState::Terminated | InstanceState::Terminating
            ),
            InstanceState::Running => {
                matches!(
                    row.state,
                    InstanceState::Stopped
                        | InstanceState::Failed
                        | InstanceState::Running
                        | InstanceState::Pending
                        | InstanceState::Provisioning
                ) && row.desired != InstanceState::Terminated
            }
            _ => row.state != InstanceState::Terminated,
        };
        if !allowed {
            return Err(EngineError::InvalidState(format!(
                "instance {} is {} and cannot be made {}",
                row.id, row.state, desired
            )));
        }
        // Waiting out a restart's backoff: a start ends the wait.
        let in_backoff = row.desired == InstanceState::Running
            && row.state == InstanceState::Pending
            && row.restart.not_before > now_ms();
        if desired == InstanceState::Running
            && (row.desired != desired || row.state == InstanceState::Failed || in_backoff)
        {
            // A start by the user begins a new count for `on-failure:N` and a new backoff
            // (and, during a backoff, provisions at once).
            let fresh = crate::store::RestartRow {
                policy: row.restart.policy,
                started_at: row.restart.started_at,
                exit_code: row.restart.exit_code,
                ..Default::default()
            };
            self.store.set_restart(&row.id, &fresh).await?;
        }
        if row.desired != desired {
            self.set_desired_state(&row.id, desired).await?;
            if desired == InstanceState::Running && row.state == InstanceState::Failed {
                self.set_state(&row.id, InstanceState::Pending, None)
                    .await?;
            }
            self.event(&row.id, "requested", format!("{desired} requested"))
                .await;
        } else if desired == InstanceState::Running && row.state == InstanceState::Failed {
            self.set_state(&row.id, InstanceState::Pending, None)
                .await?;
            self.event(&row.id, "requested", "retry requested").await;
        } else if in_backoff {
            self.event(
                &row.id,
                "requested",
                "start requested: restart backoff ended",
            )
            .await;
        }
        self.wake.notify_one();
        self.get_instance(who, &row.id).await
    }

    pub async fn stop_instance(&self, who: &Principal, id: &str) -> Result<wire::Instance> {
        who.allow(Op::StopInstance)?;
        self.set_desired(who, id, InstanceState::Stopped).await
    }

    pub async fn start_instance(&self, who: &Principal, id: &str) -> Result<wire::Instance> {
        who.allow(Op::StartInstance)?;
        self.set_desired(who, id, InstanceState::Running).await
    }

    pub async fn terminate_instance(&self, who: &Principal, id: &str) -> Result<wire::Instance> {
        who.allow(Op::TerminateInstance)?;
        let row = self.find(who, id).await?;
        if row.state == InstanceState::Terminated {
            return self.wire_instance(row).await;
        }
        self.set_desired(who, id, InstanceState::Terminated).await
    }

    pub async fn instance_events(&self, who: &Principal, id: &str) -> Result<Vec<wire::Event>> {
        who.allow(Op::InstanceEvents)?;
        let row = self.find(who, id).await?;
        Ok(self
            .store
            .events(&row.id)
            .await?
            .into_iter()
            .map(|e| wire::Event {
                at: e.at,
                instance: e.instance_id,
                kind: e.kind,
                message: e.message,
            })
            .collect())
    }

    /// Up to 1 MiB of the instance's log from logical `offset` (offsets count every byte the
    /// instance wrote; an offset rotated away answers from the oldest byte kept).
    pub async fn instance_logs(
        &self,
        who: &Principal,
        id: &str,
        offset: u64,
    ) -> Result<wire::Logs> {
        who.allow(Op::InstanceLogs)?;
        let row = self.find(who, id).await?;
        let (node, rid) = (self.node.clone(), row.id.clone());
        let (start, data) =
            tokio::task::spawn_blocking(move || node.read_log(&rid, offset, 1 << 20))
                .await
                .map_err(|e| EngineError::Internal(format!("reading log: {e}")))??;
        Ok(wire::Logs {
            offset: start,
            next: start + data.len() as u64,
            data: String::from_utf8_lossy(&data).into_owned(),
        })
    }
}
