//! Live migration between two gpuvisor daemons (`instance migrate ID --to NODE`): the
//! engine's two halves, and the seam to the other daemon ([`Peer`], made by the API layer
//! from the `[[peer]]` settings: its HTTPS API with an admin key of it).
//!
//! The source decides. It offers the VM ([`wire::MigrationOffer`]); the destination makes
//! the instance (same id, name and address, its tenant by name, its own placement and
//! quota) under the instance's lock, held until the end, and starts its QEMU waiting for
//! the state. The source opens the two byte channels, mirrors the disk and sends the state
//! ([`gpuvisor_node::vm::remote`]); once its guest is paused for good (copy completed, or
//! switched to post-copy) it tells the destination to run, and only once the destination
//! says it runs is the source torn down. Any failure before that leaves the guest on the
//! source (resumed), the destination's instance removed.
//!
//! Both sides record the migration in the instance's spec (`outgoing` on the source,
//! `incoming` on the destination), so a restarted daemon knows what it was doing: the
//! destination removes a half-received instance (unless its guest runs), the source asks
//! the destination and finishes or resumes.

use super::authz::Op;
use super::{Engine, Principal};
use crate::error::{EngineError, Result};
use crate::store::{InstanceRow, InstanceSpec};
use gpuvisor_node::vm::migrate::{millis, MigrateAsk};
use gpuvisor_node::vm::qemu::VmSpec;
use gpuvisor_node::vm::VmError;
use gpuvisor_wire::{self as wire, InstanceState, MigrationChannel, MigrationPhase, Role};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// Another gpuvisor daemon, as the source of a migration reaches it. Blocking calls (made
/// from the migration's blocking task); errors are the peer's words or why it was not
/// reached.
pub trait Peer: Send + Sync {
    fn offer(
        &self,
        offer: &wire::MigrationOffer,
    ) -> std::result::Result<wire::MigrationAccepted, String>;
    /// One byte channel of migration `id`, relayed over the peer's API: the local end.
    fn channel(&self, id: &str, channel: MigrationChannel) -> std::result::Result<OwnedFd, String>;
    /// The guest may run there now.
    fn run(&self, id: &str) -> std::result::Result<(), String>;
    /// The guest stays here (`lost`: the guest is lost, post-copy was cut): remove what was
    /// made there. `Ok` only once the peer says nothing of it is left.
    fn drop_migration(&self, id: &str, lost: bool) -> std::result::Result<(), String>;
    fn phase(&self, id: &str) -> std::result::Result<MigrationPhase, String>;
}

/// The peers by node id.
pub type Peers = BTreeMap<String, Arc<dyn Peer>>;

/// A migration under way, as the instance's spec records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingSpec {
    pub migration: String,
    pub from_node: String,
    /// The source QEMU's recorded start (dropped once the guest runs here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<Box<VmSpec>>,
    /// The guest runs here: the source was told so.
    #[serde(default)]
    pub ran: bool,
    /// Its post-copy was cut and its half here removed: the source restarts it from its disk.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lost: bool,
    /// Every byte of its state is here (a post-copy's last pages come after the guest runs),
    /// or it is no longer a received guest to watch: see [`Engine::settle_arrivals`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub settled: bool,
}

/// The source's record of a migration it is making.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingSpec {
    pub migration: String,
    pub to_node: String,
    /// Its post-copy was cut: the destination's half must be removed before this one may
    /// start again (asked until it says it is).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lost: bool,
}

/// How often the arrivals whose post-copy still pulls pages are looked at.
const ARRIVAL_TICK: std::time::Duration = std::time::Duration::from_secs(2);
/// Departures are resolved every this many ticks (a minute).
const DEPARTURE_TICKS: u32 = 30;

/// Where a received guest stands, from its QEMU's migration status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Landing {
    /// Pages still coming (post-copy), or its QEMU did not answer this time.
    Arriving,
    /// Every page here; or its QEMU's last migration is another one (a memory snapshot
    /// since, a move away that failed: their statuses are not an incoming post-copy's; a
    /// row that is leaving again is not looked at).
    Settled,
    /// Nothing left to watch and nothing to say it arrived: no QEMU of it runs (stopped, or
    /// ended: its exit is the reconciler's to report and act on), or the one that runs did
    /// not arrive by migration (status `none`: started afresh since).
    Gone,
    /// The post-copy stream broke before the last pages came (`postcopy-paused`: nothing
    /// here resumes it, the source is done or gone).
    Broken,
}

/// `status`: Ok(Some(its QEMU's migration status)), Ok(None) where no QEMU of it runs, Err
/// where the running QEMU did not answer.
fn arrival_verdict(status: &std::result::Result<Option<String>, String>) -> Landing {
    match status {
        Err(_) => Landing::Arriving,
        Ok(Some(s)) if s == "postcopy-paused" => Landing::Broken,
        Ok(Some(s)) if matches!(s.as_str(), "postcopy-active" | "postcopy-recover") => {
            Landing::Arriving
        }
        Ok(None) => Landing::Gone,
        Ok(Some(s)) if s == "none" => Landing::Gone,
        Ok(Some(_)) => Landing::Settled,
    }
}

/// An instance arriving: what the destination's create keeps from the source.
pub(crate) struct Arrival {
    pub id: String,
    pub ip_host: u8,
    pub incoming: IncomingSpec,
}

/// A received migration the destination holds (its instance's lock with it).
pub(crate) struct Receiving {
    id: String,
    postcopy: bool,
    /// `run` is starting the guest: a `drop` now is refused.
    starting: bool,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

/// Longest a received migration may wait for its source to finish (the source's own
/// deadlines, mirror then copy, are 10 minutes each).
const RECEIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// What an unresolved departure comes to.
enum Departure {
    /// The guest runs there: the instance here ends.
    Finish,
    /// It never ran there and nothing of it is left there: the guest resumes here.
    Keep,
    /// A lost post-copy whose half there is gone: the instance may start here again.
    Restart,
}

/// Refuses what would run, resume or change instance `row` while a live migration of it to
/// another node is unresolved (its guest may run there).
pub(crate) fn check_not_departing(row: &InstanceRow) -> Result<()> {
    match &row.spec.outgoing {
        Some(o) if row.state != InstanceState::Terminated => {
            Err(EngineError::InvalidState(format!(
                "instance {} is live-migrating to node {} (or that node has not said whether \
                 the guest runs there): try again once it has",
                row.name, o.to_node
            )))
        }
        _ => Ok(()),
    }
}

/// Why a migration to a peer ended without moving the guest.
enum Away {
    /// The guest runs on here (refused, or failed before the destination ran).
    Stayed(String),
    /// The guest did not leave, but does not run on here either (it could not be resumed,
    /// or its QEMU ended): the reason says which. Nothing of the departure is left.
    NotRunning(String),
    /// Post-copy was cut: neither side has the whole guest; `dropped`: the destination
    /// confirmed its half is gone.
    Lost { why: String, dropped: bool },
    /// The guest is paused here and the destination did not say whether it runs there.
    Unknown(String),
}

impl Engine {
    /// Sets the peers (at start).
    pub fn set_peers(&self, peers: Peers) {
        *self.peers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(peers);
    }

    /// The peers' node ids, for errors.
    pub(crate) fn peer_names(&self) -> String {
        let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
        if peers.is_empty() {
            "none".into()
        } else {
            peers.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }

    /// The migrations being received here, by id.
    fn receivings(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Receiving>> {
        self.incoming.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn peer(&self, node: &str) -> Option<Arc<dyn Peer>> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
    }

    /// The source's half (see the module doc): `row` runs here, its lock is held by the
    /// caller. Answers once the guest runs on `to` and the instance here is gone.
    pub(crate) async fn migrate_away(
        &self,
        row: &InstanceRow,
        to: &str,
        peer: Arc<dyn Peer>,
        ask: MigrateAsk,
    ) -> Result<wire::MigrationReport> {
        let node = self.node.clone();
        let id = row.id.clone();
        let vm = super::blocking(move || node.vm()?.outgoing_spec(&node, &id))
            .await?
            .map_err(super::migration::node_refusal)?;
        let tenant = self.store.tenant(&row.tenant_id).await?.ok_or_else(|| {
            EngineError::Internal(format!("tenant {} of {} is gone", row.tenant_id, row.id))
        })?;
        let image = self
            .store
            .image_visible(&row.tenant_id, &row.image)
            .await?
            .ok_or_else(|| EngineError::Internal(format!("image {} is gone", row.image)))?;
        let address = self
            .address_in(&tenant, row)
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        // `<instance>.<nonce>`: the destination finds the instance a migration id names.
        let migration = format!("{}.{}", row.id, super::new_instance_id()?);
        let offer = wire::MigrationOffer {
            migration: migration.clone(),
            from_node: self.cfg.node_id.clone(),
            instance: row.id.clone(),
            tenant: tenant.name.clone(),
            address: address.to_string(),
            create: create_request(row),
            image_digest: image.digest.clone(),
            vm: serde_json::to_value(&vm)
                .map_err(|e| EngineError::Internal(format!("the VM's spec: {e}")))?,
            postcopy: ask.postcopy,
        };
        // Recorded first: a restarted daemon asks `to` what became of it.
        let mut spec = row.spec.clone();
        spec.outgoing = Some(OutgoingSpec {
            migration: migration.clone(),
            to_node: to.to_string(),
            lost: false,
        });
        self.store.set_spec(&row.id, &spec, self.tick()).await?;
        self.event(
            &row.id,
            "migrating",
            format!("live migration to node {to} started"),
        )
        .await;
        let (node, id) = (self.node.clone(), row.id.clone());
        let offer_id = migration.clone();
        let started = std::time::Instant::now();
        let sent = super::blocking(move || send_to_peer(&node, &id, &ask, &*peer, &offer)).await?;
        match sent {
            Ok(sent) => {
                let stats = sent.stats;
                let report = wire::MigrationReport {
                    instance: row.id.clone(),
                    node: to.to_string(),
                    downtime_ms: stats.downtime_ms.unwrap_or(0),
                    total_ms: stats
                        .total_ms
                        .unwrap_or(u64::try_from(started.elapsed().as_millis()).unwrap_or(0)),
                    transferred_bytes: stats.transferred,
                    dirty_sync_count: stats.dirty_sync_count,
                    cpu_throttle_percent: stats.cpu_throttle_percent,
                    postcopy: sent.postcopy,
                    paused_copy: sent.paused_at.is_some(),
                    old_pid: sent.pid,
                    new_pid: 0,
                };
                self.moved_away(
                    &row.id,
                    to,
                    &format!("live migration to node {to} done: {}", report.summary()),
                )
                .await?;
                Ok(report)
            }
            Err(Away::Stayed(why)) => {
                self.store.set_spec(&row.id, &row.spec, self.tick()).await?;
                self.event(&row.id, "migration_failed", why.clone()).await;
                Err(EngineError::Unavailable(format!(
                    "live migration of {} to node {to} failed: {why}; the VM runs on here",
                    row.name
                )))
            }
            Err(Away::NotRunning(why)) => {
                self.store.set_spec(&row.id, &row.spec, self.tick()).await?;
                self.event(&row.id, "migration_failed", why.clone()).await;
                self.wake.notify_one();
                Err(EngineError::Internal(format!(
                    "live migration of {} to node {to} failed: {why}",
                    row.name
                )))
            }
            Err(Away::Lost { why, dropped }) => {
                // Until the destination has removed its half, the departure stays recorded
                // (lost): `run_departures` asks it again, and nothing starts this one.
                let mut spec = row.spec.clone();
                if !dropped {
                    spec.outgoing = Some(OutgoingSpec {
                        migration: offer_id.clone(),
                        to_node: to.to_string(),
                        lost: true,
                    });
                }
                self.store.set_spec(&row.id, &spec, self.tick()).await?;
                self.event(&row.id, "migration_failed", why.clone()).await;
                // Neither half runs on: the source's QEMU goes. The instance restarts from
                // its disk here only once the destination has removed its half; else it
                // stays stopped until someone checks (never two of it).
                let _ = self.teardown(&row.id, false).await;
                if !dropped {
                    self.store
                        .set_desired(&row.id, InstanceState::Stopped, self.tick())
                        .await?;
                }
                self.wake.notify_one();
                Err(EngineError::Internal(if dropped {
                    format!(
                        "live migration of {} to node {to} failed after the switch to \
                         post-copy: {why}; the guest is lost and the instance restarts from its \
                         disk here",
                        row.name
                    )
                } else {
                    format!(
                        "live migration of {} to node {to} failed after the switch to \
                         post-copy: {why}; the guest is lost, and node {to} did not confirm it \
                         removed its half: the instance stays stopped here until it does \
                         (asked every minute), then can be started",
                        row.name
                    )
                }))
            }
            Err(Away::Unknown(why)) => {
                self.event(&row.id, "migration_unresolved", why.clone())
                    .await;
                Err(EngineError::Unavailable(format!(
                    "live migration of {} to node {to}: {why}; the guest is paused here until \
                     node {to} answers (asked again every minute)",
                    row.name
                )))
            }
        }
    }

    /// The guest runs on `to`: the instance here ends (its QEMU, disk and address go).
    async fn moved_away(&self, id: &str, to: &str, what: &str) -> Result<()> {
        self.store
            .set_desired(id, InstanceState::Terminated, self.tick())
            .await?;
        if let Err(e) = self.teardown(id, false).await {
            // The sweep removes what is left: the row is terminated.
            tracing::warn!(instance = %id, "removing the migrated source: {e}");
        }
        self.set_state(
            id,
            InstanceState::Terminated,
            Some(&format!("migrated to node {to}")),
        )
        .await?;
        self.event(id, "migrated", what.to_string()).await;
        self.wake.notify_one();
        Ok(())
    }

    /// The destination's half, first step: makes the offered instance and starts its QEMU
    /// waiting for the state; holds the instance's lock until the migration ends.
    pub async fn accept_migration(
        self: &Arc<Self>,
        who: &Principal,
        offer: &wire::MigrationOffer,
    ) -> Result<wire::MigrationAccepted> {
        who.allow(Op::ReceiveMigration)?;
        let invalid = |m: String| EngineError::InvalidArgument(m);
        if offer.instance.len() != 12
            || !offer
                .instance
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid(
                "the instance id is not 12 lowercase hex digits".into(),
            ));
        }
        if offer.create.runtime != Some(wire::RuntimeKind::Vm) {
            return Err(invalid("only VMs migrate between hosts".into()));
        }
        let c = &offer.create;
        if c.gpus.is_some_and(|g| g > 0)
            || c.gpu_fraction.is_some()
            || c.gpu_model.is_some()
            || c.template.is_some()
            || c.from_snapshot.is_some()
            || !c.volumes.is_empty()
            || !c.env.is_empty()
        {
            return Err(invalid(
                "a migrating VM has no GPUs, volumes, environment, template or snapshot here"
                    .into(),
            ));
        }
        if offer.from_node == self.cfg.node_id {
            return Err(invalid(format!(
                "the offer comes from this node ({}): a [[peer]] points back at it",
                self.cfg.node_id
            )));
        }
        if migration_instance(&offer.migration) != Some(offer.instance.as_str()) {
            return Err(invalid(
                "the migration id is not <instance id>.<nonce>".into(),
            ));
        }
        let vm: VmSpec = serde_json::from_value(offer.vm.clone())
            .map_err(|e| invalid(format!("the VM's spec: {e}")))?;
        if vm.id != offer.instance {
            return Err(invalid("the VM's spec is another instance's".into()));
        }
        let tenant = self
            .store
            .tenant_by_name(&offer.tenant)
            .await?
            .ok_or_else(|| {
                EngineError::NotFound(format!(
                    "tenant {:?} does not exist on node {}: create it there first (same name)",
                    offer.tenant, self.cfg.node_id
                ))
            })?;
        let image = self
            .store
            .image_visible(&tenant.id, &offer.create.image)
            .await?
            .filter(|i| i.digest == offer.image_digest)
            .ok_or_else(|| {
                EngineError::NotFound(format!(
                    "node {} has no image {:?} with digest {} for tenant {}: import the same \
                     image there first",
                    self.cfg.node_id, offer.create.image, offer.image_digest, offer.tenant
                ))
            })?;
        let net = gpuvisor_node::net::TenantNet {
            slot: tenant.net_slot,
        };
        let ip_host = self
            .node
            .net
            .cfg
            .plan
            .hosts()
            .find(|h| {
                self.node
                    .net
                    .address(&net, *h)
                    .is_ok_and(|a| a.to_string() == offer.address)
            })
            .ok_or_else(|| {
                EngineError::InvalidState(format!(
                    "address {} is outside tenant {}'s network on node {}: the guest keeps its \
                     address, so the tenant's network must be the same on both nodes",
                    offer.address, offer.tenant, self.cfg.node_id
                ))
            })?;
        let guard = self
            .lock_for(&offer.instance)
            .try_lock_owned()
            .map_err(|_| {
                EngineError::InUse(format!(
                    "instance {} is being worked on at node {}",
                    offer.instance, self.cfg.node_id
                ))
            })?;
        if let Some(r) = self.store.instance(&offer.instance).await? {
            // Only that peer's instance, in that tenant, comes back over its old row: one that
            // left this node for it, or an earlier arrival from it that never ran.
            let from = offer.from_node.as_str();
            let left_for = r.spec.outgoing.as_ref().is_some_and(|o| o.to_node == from);
            let tried = r
                .spec
                .incoming
                .as_ref()
                .is_some_and(|i| i.from_node == from && !i.ran);
            if r.state != InstanceState::Terminated
                || r.tenant_id != tenant.id
                || !(left_for || tried)
            {
                return Err(EngineError::AlreadyExists(format!(
                    "instance {} already exists at node {}",
                    offer.instance, self.cfg.node_id
                )));
            }
            self.store
                .delete_terminated_instance(&offer.instance)
                .await?;
        }
        let principal = Principal {
            tenant_id: tenant.id.clone(),
            tenant: tenant.name.clone(),
            role: Role::Admin,
            key_id: who.key_id.clone(),
        };
        let arrival = Arrival {
            id: offer.instance.clone(),
            ip_host,
            incoming: IncomingSpec {
                migration: offer.migration.clone(),
                from_node: offer.from_node.clone(),
                vm: Some(Box::new(vm.clone())),
                ran: false,
                lost: false,
                settled: false,
            },
        };
        let mut create = offer.create.clone();
        create.image = image.name.clone();
        self.create_arrival(&principal, &create, &arrival).await?;
        // From here every error removes the arrival (the reconciler must never boot it).
        let made = async {
            let row = self
                .store
                .instance(&offer.instance)
                .await?
                .ok_or_else(|| EngineError::Internal("the arriving instance is gone".into()))?;
            let mut plan = self.plan(&row).await?;
            plan.incoming = Some(Box::new(vm));
            let node = self.node.clone();
            super::blocking(move || node.provision(&plan))
                .await?
                .map_err(|e| {
                    EngineError::Unavailable(format!("its QEMU could not start here: {e}"))
                })?;
            Ok::<_, EngineError>(row)
        }
        .await;
        let row = match made {
            Ok(row) => row,
            Err(e) => {
                self.arrival_failed(&offer.instance, &e.to_string()).await;
                return Err(e);
            }
        };
        self.receivings().insert(
            offer.migration.clone(),
            Receiving {
                id: row.id.clone(),
                postcopy: offer.postcopy,
                starting: false,
                _guard: guard,
            },
        );
        // A source that never finishes (its daemon gone) does not hold this one forever.
        let (me, mid) = (self.clone(), offer.migration.clone());
        tokio::spawn(async move {
            tokio::time::sleep(RECEIVE_TIMEOUT).await;
            // Not one being started (its guest may run by now: it is the run's to finish).
            let taken = {
                let mut m = me.receivings();
                match m.get(&mid) {
                    Some(r) if !r.starting => m.remove(&mid),
                    _ => None,
                }
            };
            if let Some(r) = taken {
                me.arrival_failed(&r.id, "the source did not finish it in time")
                    .await;
            }
        });
        self.event(
            &row.id,
            "migrating",
            format!("live migration from node {} started", offer.from_node),
        )
        .await;
        Ok(wire::MigrationAccepted {
            migration: offer.migration.clone(),
            instance: row.id,
            node: self.cfg.node_id.clone(),
        })
    }

    /// The destination: one byte channel of received migration `migration`; the daemon's
    /// end, which the API relays.
    pub async fn migration_channel(
        &self,
        who: &Principal,
        migration: &str,
        channel: MigrationChannel,
    ) -> Result<OwnedFd> {
        who.allow(Op::ReceiveMigration)?;
        let (id, postcopy) = self.receiving(migration)?;
        let node = self.node.clone();
        super::blocking(move || {
            let vm = node.vm()?;
            match channel {
                MigrationChannel::Disk => vm.receive_disk(&id),
                MigrationChannel::State => vm.receive_state(&id, postcopy),
            }
        })
        .await?
        .map_err(super::migration::node_refusal)
    }

    fn receiving(&self, migration: &str) -> Result<(String, bool)> {
        self.receivings()
            .get(migration)
            .map(|r| (r.id.clone(), r.postcopy))
            .ok_or_else(|| {
                EngineError::NotFound(format!("no migration {migration:?} is being received here"))
            })
    }

    /// The destination: the source is done, the guest runs here. The guest is made ready
    /// (all of the state in, pinned, throttled) while still paused; then that it runs here is
    /// recorded, and only then is it resumed: from that record on the source must never
    /// resume, whatever happens to this call.
    pub async fn run_migration(
        &self,
        who: &Principal,
        migration: &str,
    ) -> Result<wire::MigrationStatus> {
        who.allow(Op::ReceiveMigration)?;
        let id = {
            let mut m = self.receivings();
            match m.get_mut(migration) {
                Some(r) if !r.starting => {
                    r.starting = true;
                    Some((r.id.clone(), r.postcopy))
                }
                Some(_) => {
                    return Err(EngineError::InUse(format!(
                        "migration {migration} is being started here"
                    )))
                }
                None => None,
            }
        };
        let Some((id, postcopy)) = id else {
            // Asked again (the answer was lost): what happened.
            return match self.arrival_phase(migration).await? {
                MigrationPhase::Running => Ok(status(migration, MigrationPhase::Running)),
                _ => Err(EngineError::NotFound(format!(
                    "no migration {migration:?} is being received here"
                ))),
            };
        };
        let not_starting = || {
            if let Some(r) = self.receivings().get_mut(migration) {
                r.starting = false;
            }
        };
        let row = match self.store.instance(&id).await {
            Ok(Some(row)) => row,
            Ok(None) => {
                not_starting();
                return Err(EngineError::Internal(
                    "the arriving instance is gone".into(),
                ));
            }
            Err(e) => {
                not_starting();
                return Err(e.into());
            }
        };
        let (node, nid, cpus, io) = (
            self.node.clone(),
            id.clone(),
            row.cpus.clone(),
            row.spec.disk_io,
        );
        let t0 = std::time::Instant::now();
        let ready = super::blocking(move || node.vm()?.ready_received(&node, &nid, &cpus, &io))
            .await
            .and_then(|r| r.map_err(super::migration::node_refusal));
        let marked = match ready {
            Ok(()) => self.mark_ran(&row, !postcopy).await,
            Err(e) => Err(e),
        };
        if let Err(e) = marked {
            // Not run: the source may keep the guest (it drops this one).
            not_starting();
            return Err(e);
        }
        let t1 = std::time::Instant::now();
        let (node, nid) = (self.node.clone(), id.clone());
        let resumed = super::blocking(move || node.vm()?.resume_received(&nid)).await?;
        tracing::info!(
            instance = %id,
            ready_and_recorded_ms = millis(t1 - t0),
            resume_ms = millis(t1.elapsed()),
            "received guest resumed"
        );
        let taken = self.receivings().remove(migration);
        let from = row
            .spec
            .incoming
            .as_ref()
            .map(|i| i.from_node.clone())
            .unwrap_or_default();
        if let Err(e) = resumed {
            // Recorded as run here: the source does not take it back. The guest is lost at
            // its switchover: the instance fails here and its restart policy acts.
            let why = format!("the received guest could not be resumed: {e}");
            tracing::error!(instance = %id, "{why}");
            self.set_state(&id, InstanceState::Failed, Some(&why))
                .await?;
            self.event(&id, "migration_failed", why.clone()).await;
            self.wake.notify_one();
            drop(taken);
            return Err(EngineError::Internal(why));
        }
        self.set_state(&id, InstanceState::Running, None).await?;
        self.event(
            &id,
            "migrated",
            format!("arrived from node {from} by live migration"),
        )
        .await;
        if !postcopy {
            // Recorded settled with its run: a pre-copy's state was all here before it ran.
            self.event(
                &id,
                "migration_settled",
                format!("all of its state arrived from node {from}"),
            )
            .await;
        }
        drop(taken);
        Ok(status(migration, MigrationPhase::Running))
    }

    /// Records that the received guest of `row` runs here (before it is resumed): the
    /// migration's id stays in the spec, for a source that asks.
    /// `whole`: every byte of the state is here already (a pre-copy): nothing to watch.
    async fn mark_ran(&self, row: &InstanceRow, whole: bool) -> Result<()> {
        self.update_incoming(&row.id, |i| {
            i.ran = true;
            i.settled |= whole;
            i.vm = None;
            true
        })
        .await
    }

    /// Changes the arrival record of instance `id` (read afresh; written where `change`
    /// says it changed something; nothing where the row or its record is gone).
    async fn update_incoming(
        &self,
        id: &str,
        change: impl FnOnce(&mut IncomingSpec) -> bool,
    ) -> Result<()> {
        let Some(mut row) = self.store.instance(id).await? else {
            return Ok(());
        };
        if row.spec.incoming.as_mut().is_some_and(change) {
            self.store.set_spec(id, &row.spec, self.tick()).await?;
        }
        Ok(())
    }

    /// The destination: the guest stays on the source (or, `lost`, is lost: post-copy was
    /// cut); what was made here goes. Refused while the guest is being started here, and
    /// for a guest that runs here unless it is lost.
    pub async fn drop_migration(
        &self,
        who: &Principal,
        migration: &str,
        lost: bool,
    ) -> Result<wire::MigrationStatus> {
        who.allow(Op::ReceiveMigration)?;
        let taken = {
            let mut m = self.receivings();
            match m.get(migration) {
                Some(r) if r.starting && !lost => {
                    return Err(EngineError::InUse(format!(
                        "migration {migration} is being started here"
                    )))
                }
                Some(_) => m.remove(migration),
                None => None,
            }
        };
        if let Some(r) = taken {
            let why = if lost {
                "its post-copy was cut"
            } else {
                "the source kept the guest"
            };
            self.arrival_failed(&r.id, why).await;
            drop(r);
            return Ok(status(migration, MigrationPhase::Gone));
        }
        match self.arrival_phase(migration).await? {
            MigrationPhase::Gone | MigrationPhase::Unknown => {
                Ok(status(migration, MigrationPhase::Gone))
            }
            MigrationPhase::Running if lost => {
                let id = migration_instance(migration)
                    .unwrap_or_default()
                    .to_string();
                let _guard = self.lock_for(&id).lock_owned().await;
                self.lose_arrival(&id, "its post-copy was cut").await?;
                Ok(status(migration, MigrationPhase::Gone))
            }
            MigrationPhase::Running => Err(EngineError::InvalidState(format!(
                "migration {migration} has ended: the guest runs here"
            ))),
            MigrationPhase::Waiting => Err(EngineError::InUse(format!(
                "migration {migration} is being received here"
            ))),
        }
    }

    /// The destination: where migration `migration` stands.
    pub async fn migration_phase(
        &self,
        who: &Principal,
        migration: &str,
    ) -> Result<wire::MigrationStatus> {
        who.allow(Op::ReceiveMigration)?;
        Ok(status(migration, self.arrival_phase(migration).await?))
    }

    /// From the instance's row, whatever its state (an instance that ran here and ended since
    /// says `running`: its source must not resume): `gone` only when it never ran here.
    async fn arrival_phase(&self, migration: &str) -> Result<MigrationPhase> {
        if self.receivings().contains_key(migration) {
            return Ok(MigrationPhase::Waiting);
        }
        let Some(id) = migration_instance(migration) else {
            return Ok(MigrationPhase::Unknown);
        };
        let row = self.store.instance(id).await?;
        Ok(
            match row.as_ref().and_then(|r| {
                r.spec
                    .incoming
                    .as_ref()
                    .filter(|i| i.migration == migration)
                    .map(|i| (i.ran && !i.lost, r.state))
            }) {
                Some((true, _)) => MigrationPhase::Running,
                Some((false, InstanceState::Terminated)) => MigrationPhase::Gone,
                Some((false, _)) => MigrationPhase::Waiting,
                None => MigrationPhase::Unknown,
            },
        )
    }

    /// An arrival that will not run: its QEMU, disk and address go, the row ends.
    /// A received guest whose post-copy broke after it ran here (its instance's lock held):
    /// recorded as lost first (from then on this node answers `gone` and the source restarts
    /// it from its disk, whatever happens to the removal), then removed here. One owner of
    /// the recovery: the source, told by [`Engine::drop_migration`] or by asking the phase.
    async fn lose_arrival(&self, id: &str, why: &str) -> Result<()> {
        self.update_incoming(id, |i| {
            i.lost = true;
            true
        })
        .await?;
        self.arrival_failed(id, why).await;
        Ok(())
    }

    async fn arrival_failed(&self, id: &str, why: &str) {
        let _ = self
            .store
            .set_desired(id, InstanceState::Terminated, self.tick())
            .await;
        if let Err(e) = self.teardown(id, false).await {
            tracing::warn!(instance = %id, "removing a failed arrival: {e}");
        }
        let reason = format!("live migration failed: {why}");
        let _ = self
            .set_state(id, InstanceState::Terminated, Some(&reason))
            .await;
        self.event(id, "migration_failed", reason).await;
    }

    /// At start, the arrivals a killed daemon left: one whose guest was not yet recorded as
    /// running here is removed (its source keeps it); one recorded as running here runs
    /// (resumed if the daemon died before it was).
    pub(crate) async fn recover_arrivals(&self) -> Result<()> {
        for row in self.store.live_instances(None).await? {
            let Some(i) = row.spec.incoming.clone() else {
                continue;
            };
            if !i.ran {
                self.arrival_failed(
                    &row.id,
                    &format!("cut short by a daemon restart (from node {})", i.from_node),
                )
                .await;
                continue;
            }
            if row.state != InstanceState::Provisioning {
                continue;
            }
            let (node, id) = (self.node.clone(), row.id.clone());
            let resumed = super::blocking(move || node.vm()?.resume_received(&id)).await?;
            match resumed {
                Ok(()) => {
                    self.set_state(&row.id, InstanceState::Running, None)
                        .await?;
                    self.event(
                        &row.id,
                        "migration_recovered",
                        format!(
                            "arrived from node {} (resumed after a daemon restart)",
                            i.from_node
                        ),
                    )
                    .await;
                }
                // The reconciler sees a VM without its QEMU and acts on its restart policy.
                Err(e) => tracing::warn!(instance = %row.id, "resuming a received guest: {e}"),
            }
        }
        Ok(())
    }

    /// Departures a killed daemon left unresolved (or a destination that did not answer):
    /// asked about at their destination every minute until it answers; finished where the
    /// guest runs there, resumed here once the destination confirms it is gone there. Runs
    /// for the daemon's life (a look at the store's live rows a minute when none is left).
    /// Also watches the arrivals whose post-copy is still pulling pages, every
    /// [`ARRIVAL_TICK`] ([`Engine::settle_arrivals`]).
    pub async fn run_departures(self: Arc<Self>) {
        let mut tick = 0u32;
        loop {
            if tick.is_multiple_of(DEPARTURE_TICKS) {
                self.resolve_departures().await;
            }
            if let Err(e) = self.settle_arrivals().await {
                tracing::warn!("arrivals: {e}");
            }
            tick = tick.wrapping_add(1);
            tokio::time::sleep(ARRIVAL_TICK).await;
        }
    }

    async fn resolve_departures(&self) {
        let rows = match self.store.live_instances(None).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("departures: {e}");
                return;
            }
        };
        for row in rows {
            let Some(o) = row.spec.outgoing.clone() else {
                continue;
            };
            let lock = self.lock_for(&row.id);
            let Ok(_guard) = lock.try_lock() else {
                continue; // a migration under way
            };
            if let Err(e) = self.resolve_departure(&row, &o).await {
                tracing::warn!(instance = %row.id, "departure: {e}");
            }
        }
    }

    /// Received guests that run here and are not settled: their QEMU's migration status is
    /// asked every tick. Settled once it has every page (`migration_settled`: from then on
    /// nothing of the guest is left at the source). A post-copy whose stream broke before
    /// its last pages came (`postcopy-paused`) leaves a guest that would wait forever for
    /// them: it is lost here as when its source says so ([`Engine::lose_arrival`]: removed,
    /// `migration_failed`), and its source restarts it from its disk.
    pub(crate) async fn settle_arrivals(&self) -> Result<()> {
        for row in self.store.live_instances(None).await? {
            let Some(i) = row.spec.incoming.clone() else {
                continue;
            };
            if !i.ran || i.settled || i.lost || row.state != InstanceState::Running {
                continue;
            }
            if row.spec.outgoing.is_some() {
                continue; // leaving again: its QEMU's status is that migration's
            }
            if let Err(e) = self.settle_arrival(&row.id, &i).await {
                tracing::warn!(instance = %row.id, "arrival: {e}");
            }
        }
        Ok(())
    }

    async fn settle_arrival(&self, id: &str, i: &IncomingSpec) -> Result<()> {
        let lock = self.lock_for(id);
        let Ok(_guard) = lock.try_lock() else {
            return Ok(()); // an operation on it under way
        };
        let (node, nid) = (self.node.clone(), id.to_string());
        let status = super::blocking(move || {
            Ok::<_, gpuvisor_node::NodeError>(node.vm()?.migration_status(&node, &nid))
        })
        .await??;
        let verdict = arrival_verdict(&status);
        if verdict == Landing::Arriving {
            return Ok(());
        }
        if verdict == Landing::Broken {
            let why = format!(
                "its post-copy stream from node {} broke before the last pages of its memory \
                 arrived (the guest could not run on here; its source restarts it from its disk)",
                i.from_node
            );
            tracing::error!(instance = %id, "{why}");
            return self.lose_arrival(id, &why).await;
        }
        self.mark_settled(id, &i.migration).await?;
        if verdict == Landing::Gone {
            let why = format!(
                "the QEMU that received it from node {} ended before all of its memory was \
                 seen to arrive: if pages were still coming, the guest was lost with it (the \
                 instance's exit and restart are reported on their own)",
                i.from_node
            );
            tracing::warn!(instance = %id, "{why}");
            self.event(id, "migration_unsettled", why).await;
            return Ok(());
        }
        self.event(
            id,
            "migration_settled",
            format!("all of its state arrived from node {}", i.from_node),
        )
        .await;
        Ok(())
    }

    /// Records that the arrival `migration` of `id` needs no more watching (a no-op where the
    /// row has moved on: another migration's, or none).
    pub(crate) async fn mark_settled(&self, id: &str, migration: &str) -> Result<()> {
        self.update_incoming(id, |i| {
            let change = i.migration == migration && !i.settled;
            i.settled |= change;
            change
        })
        .await
    }

    /// One departure: true once resolved.
    async fn resolve_departure(&self, row: &InstanceRow, o: &OutgoingSpec) -> Result<bool> {
        // Freshly read under the lock: a migration that ended meanwhile is not one.
        let Some(row) = self.store.instance(&row.id).await? else {
            return Ok(true);
        };
        if row.spec.outgoing.as_ref() != Some(o) || row.state == InstanceState::Terminated {
            return Ok(true);
        }
        let row = &row;
        let (mid, lost) = (o.migration.clone(), o.lost);
        let (node, id) = (self.node.clone(), row.id.clone());
        // Whether the destination may have run it: once the copy here went whole.
        let whole = lost
            || super::blocking(move || node.vm().map_or(true, |vm| vm.sent_whole(&id)))
                .await
                .unwrap_or(true);
        if !whole {
            // The destination never had the whole state, so it cannot have run the guest:
            // it resumes here now (a copy that paused it must not wait on the other node),
            // and the other node's half is dropped as far as it answers.
            if let Some(peer) = self.peer(&o.to_node) {
                let mid = mid.clone();
                let _ = super::blocking(move || peer.drop_migration(&mid, false)).await;
            }
            self.keep_departed(row).await?;
            return Ok(true);
        }
        let Some(peer) = self.peer(&o.to_node) else {
            let why = format!(
                "a live migration to node {} is unresolved and that node is not a [[peer]] any \
                 more: the guest stays paused here if it was",
                o.to_node
            );
            self.event(&row.id, "migration_unresolved", why).await;
            return Ok(false);
        };
        let asked = super::blocking(move || {
            if lost {
                return peer.drop_migration(&mid, true).map(|()| Departure::Restart);
            }
            match peer.phase(&mid) {
                Ok(MigrationPhase::Running) => Ok(Departure::Finish),
                Ok(MigrationPhase::Waiting | MigrationPhase::Gone) => {
                    peer.drop_migration(&mid, false).map(|()| Departure::Keep)
                }
                Ok(MigrationPhase::Unknown) => Err(
                    "it has no record of the migration and the copy here had completed, so it \
                     may have run the guest: check it there"
                        .to_string(),
                ),
                Err(e) => Err(e),
            }
        })
        .await?;
        match asked {
            Ok(Departure::Finish) => {
                self.moved_away(
                    &row.id,
                    &o.to_node,
                    &format!(
                        "live migration to node {} finished after a daemon restart",
                        o.to_node
                    ),
                )
                .await?;
                Ok(true)
            }
            Ok(Departure::Keep) => {
                self.keep_departed(row).await?;
                Ok(true)
            }
            Ok(Departure::Restart) => {
                let mut spec = row.spec.clone();
                spec.outgoing = None;
                self.store.set_spec(&row.id, &spec, self.tick()).await?;
                self.event(
                    &row.id,
                    "migration_recovered",
                    format!(
                        "node {} removed its half of the lost post-copy: the instance may be \
                         started here",
                        o.to_node
                    ),
                )
                .await;
                Ok(true)
            }
            Err(e) => {
                let why = format!(
                    "node {} did not say whether the guest runs there ({e}): it stays paused \
                     here if it was; asked again in a minute",
                    o.to_node
                );
                tracing::warn!(instance = %row.id, "{why}");
                self.event(&row.id, "migration_unresolved", why).await;
                Ok(false)
            }
        }
    }

    /// A departure that did not happen: the guest resumes here, and the departure's record
    /// goes (nothing of it is left at the destination), whatever became of the guest: one
    /// that could not be resumed is said so once, and stays paused for the operator (stop
    /// and start), never trapped behind a departure.
    async fn keep_departed(&self, row: &InstanceRow) -> Result<()> {
        let (node, id) = (self.node.clone(), row.id.clone());
        let kept = super::blocking(move || node.vm()?.keep_sent(&node, &id)).await?;
        let (kind, what) = match kept {
            Ok(true) => (
                "migration_recovered",
                "the guest stays on this node".to_string(),
            ),
            Ok(false) => (
                "migration_recovered",
                "the guest stays on this node; its QEMU no longer runs, so the instance \
                 restarts as its policy says"
                    .to_string(),
            ),
            Err(e) => (
                "migration_failed",
                format!(
                    "the migration did not happen but the guest could not be resumed here \
                     ({e}): it stays paused in its QEMU (stop and start the instance)"
                ),
            ),
        };
        let mut spec = row.spec.clone();
        spec.outgoing = None;
        self.store.set_spec(&row.id, &spec, self.tick()).await?;
        self.event(&row.id, kind, what).await;
        self.wake.notify_one();
        Ok(())
    }
}

/// The instance a migration id (`<instance>.<nonce>`) names.
fn migration_instance(migration: &str) -> Option<&str> {
    let hex = |s: &str| {
        s.len() == 12
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let (id, nonce) = migration.split_once('.')?;
    (hex(id) && hex(nonce)).then_some(id)
}

fn status(migration: &str, phase: MigrationPhase) -> wire::MigrationStatus {
    wire::MigrationStatus {
        migration: migration.to_string(),
        phase,
    }
}

/// Blocking: the whole exchange with the peer and the node's send. The guest resumes here
/// only while the destination cannot have run it: before the copy completed, or once the
/// destination has confirmed its half is gone.
fn send_to_peer(
    node: &gpuvisor_node::Node,
    id: &str,
    ask: &MigrateAsk,
    peer: &dyn Peer,
    offer: &wire::MigrationOffer,
) -> std::result::Result<gpuvisor_node::vm::remote::Sent, Away> {
    let mid = offer.migration.as_str();
    let vm = node.vm().map_err(|e| Away::Stayed(e.to_string()))?;
    if let Err(e) = peer.offer(offer) {
        // Its answer may be what was lost: nothing of it is left there either way.
        let _ = peer.drop_migration(mid, false);
        return Err(Away::Stayed(format!("the destination refused it: {e}")));
    }
    let channels = peer
        .channel(mid, MigrationChannel::Disk)
        .and_then(|d| Ok((d, peer.channel(mid, MigrationChannel::State)?)));
    let (disk, state) = match channels {
        Ok(c) => c,
        Err(e) => {
            let _ = peer.drop_migration(mid, false);
            return Err(Away::Stayed(format!("opening its channels: {e}")));
        }
    };
    // At a post-copy switch: an answer lost on the way is not a guest lost.
    let mut run_there = || {
        peer.run(mid)
            .or_else(|e| match peer.phase(mid) {
                Ok(MigrationPhase::Running) => Ok(()),
                _ => Err(e),
            })
            .map_err(|e| VmError::Migrate {
                id: id.to_string(),
                why: format!("the destination did not run the guest: {e}"),
            })
    };
    // Right before the copy: the connection `run` will use is made now, not in the pause.
    let mut warm = || {
        let _ = peer.phase(mid);
    };
    let sent = match vm.send(node, id, ask, disk, state, &mut warm, &mut run_there) {
        Ok(s) => s,
        Err(gpuvisor_node::NodeError::Vm(e @ VmError::PostcopyLost { .. })) => {
            let dropped = peer.drop_migration(mid, true).is_ok();
            return Err(Away::Lost {
                why: e.to_string(),
                dropped,
            });
        }
        Err(e) => {
            // Not run there (only a post-copy switch asks it to): the guest runs on here, or
            // is paused here if it could not be resumed (said once; the departure's record
            // goes either way).
            let _ = peer.drop_migration(mid, false);
            return Err(match e {
                gpuvisor_node::NodeError::Vm(e @ VmError::NotResumed { .. }) => {
                    Away::NotRunning(e.to_string())
                }
                e => Away::Stayed(e.to_string()),
            });
        }
    };
    if sent.ran_there {
        return Ok(sent); // it runs there since the switch
    }
    // The guest is paused here for good unless the destination confirms it did not run it.
    let ran = match peer.run(mid) {
        Ok(()) => return Ok(sent.run_now()),
        Err(e) => e,
    };
    match peer.phase(mid) {
        Ok(MigrationPhase::Running) => return Ok(sent.run_now()),
        Ok(MigrationPhase::Waiting | MigrationPhase::Gone) => {}
        Ok(MigrationPhase::Unknown) => {
            return Err(Away::Unknown(format!(
                "the destination did not run it ({ran}) and has no record of it"
            )))
        }
        Err(e) => {
            return Err(Away::Unknown(format!(
                "the destination did not run it ({ran}) and did not say where it stands: {e}"
            )))
        }
    }
    if let Err(e) = peer.drop_migration(mid, false) {
        return Err(Away::Unknown(format!(
            "the destination did not run it ({ran}) and did not confirm it removed it: {e}"
        )));
    }
    match vm.keep_sent(node, id) {
        Ok(true) => Err(Away::Stayed(format!(
            "the destination did not run it: {ran}"
        ))),
        Ok(false) => Err(Away::NotRunning(format!(
            "the destination did not run it ({ran}), and its QEMU here ended meanwhile: the \
             instance restarts as its restart policy says"
        ))),
        Err(k) => Err(Away::NotRunning(format!(
            "the destination did not run it ({ran}) and the guest could not be resumed here \
             ({k}): it stays paused in its QEMU (stop and start the instance)"
        ))),
    }
}

/// The request that made `row`, as the destination creates it: its own host ports.
fn create_request(row: &InstanceRow) -> wire::CreateInstance {
    let s: &InstanceSpec = &row.spec;
    wire::CreateInstance {
        template: None,
        image: row.image.clone(),
        name: Some(row.name.clone()),
        gpus: None,
        gpu_fraction: None,
        vram: None,
        gpu_model: None,
        vcpus: s.vcpus,
        memory: s.memory,
        container_disk: s.container_disk,
        volumes: s.volumes.clone(),
        env: Vec::new(),
        ports: s
            .ports
            .iter()
            .cloned()
            .map(|mut p| {
                p.host_port = None;
                p
            })
            .collect(),
        command: s.command.clone(),
        priority: s.priority,
        interruptible: s.interruptible,
        bid_per_gpu_hour: s.bid_per_gpu_hour,
        restart: row.restart.policy,
        runtime: Some(wire::RuntimeKind::Vm),
        ssh_keys: s.ssh_keys.clone(),
        startup_script: s.startup_script.clone(),
        packages: s.packages.clone(),
        idle_timeout_secs: s.idle_timeout_secs,
        disk_io: s.disk_io,
        from_snapshot: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broken post-copy stream fails the guest; pages still coming (or a QEMU that did not
    /// answer) are waited for; anything else has nothing left to watch (never a guest
    /// failed for another migration's status).
    #[test]
    fn an_arrival_is_judged_by_its_qemus_migration_status() {
        let of = |s: &str| Ok(Some(s.to_string()));
        assert_eq!(arrival_verdict(&of("postcopy-paused")), Landing::Broken);
        for s in ["postcopy-active", "postcopy-recover"] {
            assert_eq!(arrival_verdict(&of(s)), Landing::Arriving, "{s}");
        }
        assert_eq!(arrival_verdict(&Err("no answer".into())), Landing::Arriving);
        for s in ["completed", "failed", "cancelled", "active"] {
            assert_eq!(arrival_verdict(&of(s)), Landing::Settled, "{s}");
        }
        // No QEMU, or one started afresh: not "arrived".
        assert_eq!(arrival_verdict(&Ok(None)), Landing::Gone);
        assert_eq!(arrival_verdict(&of("none")), Landing::Gone);
    }

    #[test]
    fn a_migration_id_names_its_instance() {
        assert_eq!(
            migration_instance("0123456789ab.ba9876543210"),
            Some("0123456789ab")
        );
        for bad in [
            "0123456789ab",
            "0123456789ab.",
            "0123456789AB.ba9876543210",
            "../../etc.ba9876543210",
            "0123456789ab.ba9876543210.x",
        ] {
            assert_eq!(migration_instance(bad), None, "{bad}");
        }
    }

    #[test]
    fn nothing_runs_or_changes_an_instance_whose_departure_is_unresolved() {
        let mut row = InstanceRow {
            id: "0123456789ab".into(),
            name: "vm".into(),
            tenant_id: "t".into(),
            node_id: "n".into(),
            image: "busybox".into(),
            runtime: wire::RuntimeKind::Vm,
            state: InstanceState::Running,
            desired: InstanceState::Running,
            reason: None,
            spec: InstanceSpec::default(),
            cpus: vec![0],
            gpus: vec![],
            ip_host: 2,
            created_at: 0,
            updated_at: 0,
            restart: Default::default(),
        };
        assert!(check_not_departing(&row).is_ok());
        row.spec.outgoing = Some(OutgoingSpec {
            migration: "0123456789ab.ba9876543210".into(),
            to_node: "node-b".into(),
            lost: false,
        });
        let e = check_not_departing(&row).unwrap_err().to_string();
        assert!(e.contains("node-b"), "{e}");
        // Once it has left (terminated here), the record is history only.
        row.state = InstanceState::Terminated;
        assert!(check_not_departing(&row).is_ok());
    }
}
