//! Live migration of a running VM (`instance migrate`): the engine's checks, the instance's
//! lock, events; the node moves the running state ([`gpuvisor_node::vm::migrate`]).

use super::authz::Op;
use super::{Engine, Principal};
use crate::error::{EngineError, Result};
use gpuvisor_node::vm::migrate::MigrateAsk;
use gpuvisor_node::vm::VmError;
use gpuvisor_wire::{self as wire, InstanceState, RuntimeKind};

/// The switchover's default and largest pause, ms.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 300;
const MAX_MAX_DOWNTIME_MS: u64 = 60_000;

impl Engine {
    /// Moves running VM `instance` to a new QEMU process without stopping it; answers what the
    /// migration measured once the new process runs. A refused or failed migration leaves the
    /// VM running where it was.
    pub async fn migrate_instance(
        &self,
        who: &Principal,
        instance: &str,
        req: &wire::MigrateInstance,
    ) -> Result<wire::MigrationReport> {
        who.allow(Op::MigrateInstance)?;
        let row = self.find(who, instance).await?;
        super::remote::check_not_departing(&row)?;
        let max_downtime_ms = req.max_downtime_ms.unwrap_or(DEFAULT_MAX_DOWNTIME_MS);
        if !(1..=MAX_MAX_DOWNTIME_MS).contains(&max_downtime_ms) {
            return Err(EngineError::InvalidArgument(format!(
                "max_downtime_ms {max_downtime_ms} is outside 1..={MAX_MAX_DOWNTIME_MS}"
            )));
        }
        let peer = req
            .to
            .as_deref()
            .filter(|t| *t != self.cfg.node_id)
            .map(|to| (to.to_string(), self.peer(to)));
        if let Some((to, None)) = &peer {
            return Err(if self.is_simulated_node(to) {
                EngineError::InvalidArgument(format!(
                    "node {to} is a simulated node: it runs nothing a VM could move to"
                ))
            } else {
                EngineError::InvalidArgument(format!(
                    "node {to:?} is neither this daemon's node ({}) nor one of its peers \
                     ([[peer]] in the daemon's config: {}); leave --to out to move the VM to a \
                     new QEMU process on this host",
                    self.cfg.node_id,
                    self.peer_names()
                ))
            });
        }
        if self.is_simulated(&row) {
            return Err(EngineError::InvalidState(format!(
                "instance {} is on simulated node {}: it has no process to migrate",
                row.name, row.node_id
            )));
        }
        if row.runtime != RuntimeKind::Vm {
            return Err(EngineError::InvalidArgument(format!(
                "instance {} is a container: only VMs migrate live (a container's processes \
                 carry no state that can be moved; stop and start it, its volumes stay)",
                row.name
            )));
        }
        if !row.gpus.is_empty() {
            return Err(EngineError::InvalidArgument(format!(
                "instance {} has passed-through GPUs: VFIO migration needs vendor support, so \
                 it cannot migrate live; stop it and start it again instead",
                row.name
            )));
        }
        // Under the instance's lock: the reconciler neither stops nor provisions it meanwhile.
        let lock = self.lock_for(&row.id);
        let guard = lock.lock().await;
        let row = self
            .store
            .instance(&row.id)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("instance {:?} not found", row.id)))?;
        if (row.state, row.desired) != (InstanceState::Running, InstanceState::Running) {
            return Err(EngineError::InvalidState(format!(
                "instance {} is {} (asked: {}): only a running VM migrates",
                row.name, row.state, row.desired
            )));
        }
        let ask = ask_for(&row, req.postcopy, max_downtime_ms);
        if let Some((to, Some(peer))) = peer {
            let r = self.migrate_away(&row, &to, peer, ask).await;
            drop(guard);
            return r;
        }
        self.event(
            &row.id,
            "migrating",
            "live migration to a new QEMU process started",
        )
        .await;
        let (node, id) = (self.node.clone(), row.id.clone());
        let moved = super::blocking(move || node.migrate(&id, &ask)).await?;
        drop(guard);
        match moved {
            Ok(mut report) => {
                report.node = self.cfg.node_id.clone();
                self.event(
                    &row.id,
                    "migrated",
                    format!(
                        "live migration done: {} (QEMU pid {} -> {})",
                        report.summary(),
                        report.old_pid,
                        report.new_pid
                    ),
                )
                .await;
                self.changed.send_modify(|v| *v += 1);
                Ok(report)
            }
            Err(e) => {
                self.event(&row.id, "migration_failed", e.to_string()).await;
                // A lost post-copy guest ended with its QEMUs: the reconciler sees it.
                self.wake.notify_one();
                // Whether the source's guest runs on (the error says otherwise where not).
                let runs_on = !matches!(
                    &e,
                    gpuvisor_node::NodeError::Vm(
                        VmError::PostcopyLost { .. }
                            | VmError::SwitchIncomplete { .. }
                            | VmError::NotResumed { .. }
                    )
                );
                Err(match node_refusal(e) {
                    EngineError::Internal(e) if runs_on => EngineError::Internal(format!(
                        "the migration of instance {} failed: {e}; the VM runs on in its \
                             QEMU",
                        row.name
                    )),
                    e => e,
                })
            }
        }
    }
}

impl Engine {
    /// At start: migrations a killed daemon left half done are finished or undone
    /// ([`gpuvisor_node::Node::recover_migration`]), each with an event.
    pub(crate) async fn recover_migrations(&self) -> Result<()> {
        let asks: Vec<MigrateAsk> = self
            .store
            .live_instances(None)
            .await?
            .iter()
            .filter(|row| row.runtime == RuntimeKind::Vm && !self.is_simulated(row))
            .map(|row| ask_for(row, false, DEFAULT_MAX_DOWNTIME_MS))
            .collect();
        // One blocking task for all: most VMs have nothing staged (a few file lookups each).
        let node = self.node.clone();
        let done = super::blocking(move || {
            asks.into_iter()
                .filter_map(|ask| node.recover_migration(&ask).map(|what| (ask.id, what)))
                .collect::<Vec<_>>()
        })
        .await?;
        for (id, what) in done {
            tracing::warn!(instance = %id, "{what}");
            self.event(&id, "migration_recovered", what).await;
        }
        Ok(())
    }
}

/// A node error of a migration or a snapshot as the engine answers it: refusals are the
/// caller's (unsupported, invalid state), the rest internal.
pub(crate) fn node_refusal(e: gpuvisor_node::NodeError) -> EngineError {
    match e {
        gpuvisor_node::NodeError::Unsupported { .. }
        | gpuvisor_node::NodeError::RuntimeUnavailable { .. } => EngineError::Node(e),
        gpuvisor_node::NodeError::Vm(
            gpuvisor_node::vm::VmError::Migrate { .. } | gpuvisor_node::vm::VmError::Refused { .. },
        ) => EngineError::InvalidState(e.to_string()),
        e => EngineError::Internal(e.to_string()),
    }
}

/// What the node needs of `row` to move it (or to finish moving it): its CPUs and disk limits.
fn ask_for(row: &crate::store::InstanceRow, postcopy: bool, max_downtime_ms: u64) -> MigrateAsk {
    MigrateAsk {
        id: row.id.clone(),
        postcopy,
        max_downtime_ms,
        cpus: row.cpus.clone(),
        disk_io: row.spec.disk_io,
    }
}
