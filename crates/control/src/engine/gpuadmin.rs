//! Host preparation commands on GPUs: hand a GPU to vfio-pci for passthrough and give it back;
//! cordon and uncordon; MIG layout (list, create, destroy) with the inventory re-read after
//! each change so new slices are schedulable at once.
//!
//! Why in the engine and not a local CLI tool: only the engine knows whether an instance uses the
//! GPU, and unbinding the driver under a running container kills its CUDA context. The sysfs
//! work is the node layer's (`gpuvisor_node::vfio`); this file adds the rules: admin only, refused
//! while any live instance (running or stopped, which keep their reservation) holds the GPU, and
//! never on simulated GPUs.

use super::authz::Op;
use super::{Engine, Principal};
use crate::error::{invalid, EngineError, Result};
use gpuvisor_node::gpu::{BackendKind, GpuDevice};
use gpuvisor_node::mig::{self, MigError};
use gpuvisor_node::vfio::{self, VfioError};
use gpuvisor_wire as wire;

impl Engine {
    /// Binds a GPU (by UUID, index or PCI address) and its companion functions to vfio-pci.
    pub async fn bind_vfio(&self, who: &Principal, gpu: &str) -> Result<wire::Gpu> {
        who.allow(Op::BindVfio)?;
        self.vfio_op(who, gpu, true).await
    }

    /// Gives a GPU back to the host driver (clears the override, unbinds vfio-pci, probes).
    pub async fn release_gpu(&self, who: &Principal, gpu: &str) -> Result<wire::Gpu> {
        who.allow(Op::ReleaseGpu)?;
        self.vfio_op(who, gpu, false).await
    }

    /// Cordons a GPU by hand (maintenance): placement skips it (and its MIG slices) until
    /// `uncordon`; instances already on it keep running. Persisted.
    pub async fn cordon_gpu(
        &self,
        who: &Principal,
        gpu: &str,
        reason: Option<&str>,
    ) -> Result<wire::Gpu> {
        who.allow(Op::CordonGpu)?;
        let dev = self.gpu_by_ref(gpu)?;
        let reason = match reason.map(str::trim) {
            Some(r) if !r.is_empty() => format!("operator: {r}"),
            _ => "operator".to_string(),
        };
        if self
            .store
            .cordon(&dev.uuid, &reason, super::now_ms())
            .await?
        {
            self.telemetry.cordon(&dev.uuid, &reason);
            self.event(
                &dev.uuid,
                "cordoned",
                format!("GPU {} cordoned: {reason}", dev.index),
            )
            .await;
        }
        self.listed_gpu(who, &dev.uuid).await
    }

    /// Lifts a cordon (after the GPU was reset, or maintenance is over). Refused when the GPU
    /// is not cordoned, so a typo does not pass silently.
    pub async fn uncordon_gpu(&self, who: &Principal, gpu: &str) -> Result<wire::Gpu> {
        who.allow(Op::UncordonGpu)?;
        let dev = self.gpu_by_ref(gpu)?;
        let stored = self.store.uncordon(&dev.uuid).await?;
        let live = self.telemetry.uncordon(&dev.uuid);
        if !stored && !live {
            return Err(EngineError::InvalidState(format!(
                "GPU {} is not cordoned",
                dev.uuid
            )));
        }
        self.event(
            &dev.uuid,
            "uncordoned",
            format!("GPU {} uncordoned", dev.index),
        )
        .await;
        self.listed_gpu(who, &dev.uuid).await
    }

    /// A GPU's MIG profiles, placements and instances.
    pub async fn mig_state(&self, who: &Principal, gpu: &str) -> Result<wire::mig::MigState> {
        who.allow(Op::MigState)?;
        let dev = self.mig_parent(gpu)?;
        self.mig_task(move |ctl| mig::state(ctl, &dev.uuid)).await
    }

    /// Makes a GPU instance of `profile` with one compute instance spanning it; the new slice is
    /// in the inventory (and schedulable) when this returns.
    pub async fn mig_create(
        &self,
        who: &Principal,
        gpu: &str,
        profile: &str,
    ) -> Result<wire::mig::GpuInstance> {
        who.allow(Op::MigCreate)?;
        let dev = self.mig_parent(gpu)?;
        if profile.trim().is_empty() {
            return Err(invalid(
                "give a MIG profile, e.g. 1g.10gb (see `gpuvisor gpu mig list`)",
            ));
        }
        let profile = profile.to_string();
        let _guard = self.place_lock.lock().await;
        let gi = self
            .mig_task(move |ctl| mig::create(ctl, &dev.uuid, &profile))
            .await?;
        self.refresh_inventory().await?;
        Ok(gi)
    }

    /// Destroys GPU instance `gi` and its compute instances; refused while an instance (running
    /// or stopped) holds one of its slices.
    pub async fn mig_destroy(
        &self,
        who: &Principal,
        gpu: &str,
        gi: u32,
    ) -> Result<wire::mig::GpuInstance> {
        who.allow(Op::MigDestroy)?;
        let dev = self.mig_parent(gpu)?;
        let _guard = self.place_lock.lock().await;
        let slices: Vec<String> = self
            .node
            .gpus()
            .into_iter()
            .filter(|g| {
                g.mig
                    .as_ref()
                    .is_some_and(|m| m.slice.parent_uuid == dev.uuid && m.slice.gi == gi)
            })
            .map(|g| g.uuid)
            .collect();
        let users = self.holders(&slices).await?;
        if !users.is_empty() {
            return Err(EngineError::InUse(format!(
                "GPU instance {gi} of GPU {} is used by {}: terminate it first",
                dev.index,
                users.join(", ")
            )));
        }
        let done = self
            .mig_task(move |ctl| mig::destroy(ctl, &dev.uuid, gi))
            .await?;
        self.refresh_inventory().await?;
        Ok(done)
    }

    /// The physical GPU a MIG command names (a slice's UUID names its parent).
    fn mig_parent(&self, gpu: &str) -> Result<GpuDevice> {
        let dev = self.gpu_by_ref(gpu)?;
        match &dev.mig {
            Some(m) => self.gpu_by_ref(&m.slice.parent_uuid),
            None => Ok(dev),
        }
    }

    /// Runs `f` against this host's MIG control on a blocking thread.
    async fn mig_task<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn mig::MigControl) -> std::result::Result<T, MigError> + Send + 'static,
    ) -> Result<T> {
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || match node.mig.as_deref() {
            Some(ctl) => f(ctl).map_err(mig_error),
            None => Err(EngineError::Unavailable(
                "this host has no MIG control (no NVML; simulate with --simulate-gpus 1xA100-80GB:mig)"
                    .into(),
            )),
        })
        .await
        .map_err(|e| EngineError::Internal(format!("MIG task: {e}")))?
    }

    /// Re-reads the GPU inventory and writes it to the store.
    /// Returns whether the inventory changed.
    async fn refresh_inventory(&self) -> Result<bool> {
        let before = self.node.gpus();
        let node = self.node.clone();
        let after = tokio::task::spawn_blocking(move || node.refresh_gpus())
            .await
            .map_err(|e| EngineError::Internal(format!("inventory task: {e}")))??;
        self.sync_gpus(super::now_ms()).await?;
        Ok(before != after)
    }

    /// Picks up MIG layout changes made outside gpuvisor (`nvidia-smi mig`, mig-parted): the
    /// reconciler calls this with its orphan sweep. Instances bound to a slice that is gone
    /// are reported (their containers lost the device); nothing is moved.
    pub(crate) async fn follow_mig_changes(&self) -> Result<()> {
        if self.node.mig.is_none() {
            return Ok(());
        }
        let _guard = self.place_lock.lock().await;
        if !self.refresh_inventory().await? {
            return Ok(());
        }
        let known: Vec<String> = self.node.gpus().into_iter().map(|g| g.uuid).collect();
        tracing::info!(devices = known.len(), "GPU inventory changed (MIG layout)");
        for i in self.store.live_instances(None).await? {
            if self.is_simulated(&i) {
                continue;
            }
            for b in i.gpus.iter().filter(|b| !known.contains(&b.uuid)) {
                let msg = format!(
                    "GPU {} is no longer on this host (MIG layout changed)",
                    b.uuid
                );
                tracing::warn!(instance = %i.id, "{msg}");
                self.event(&i.id, "gpu_gone", msg).await;
            }
        }
        Ok(())
    }

    /// Ids of the live instances (running or stopped: both keep their reservation) bound to any
    /// of `uuids`.
    async fn holders(&self, uuids: &[String]) -> Result<Vec<String>> {
        Ok(self
            .store
            .live_instances(None)
            .await?
            .into_iter()
            .filter(|i| i.gpus.iter().any(|b| uuids.contains(&b.uuid)))
            .map(|i| i.id)
            .collect())
    }

    async fn listed_gpu(&self, who: &Principal, uuid: &str) -> Result<wire::Gpu> {
        self.list_gpus(who)
            .await?
            .into_iter()
            .find(|g| g.uuid == uuid)
            .ok_or_else(|| EngineError::NotFound(format!("GPU {uuid} is not recorded")))
    }

    async fn vfio_op(&self, who: &Principal, gpu: &str, bind: bool) -> Result<wire::Gpu> {
        who.allow(if bind { Op::BindVfio } else { Op::ReleaseGpu })?;
        let verb = if bind { "bind-vfio" } else { "release" };
        let dev = self.gpu_by_ref(gpu)?;
        if self.node.backend() == BackendKind::Simulated {
            return Err(EngineError::InvalidState(format!(
                "GPU {} is simulated: it cannot be bound to vfio-pci (simulate GPUs bound to it with `serve --simulate-gpus 1xH100-80GB:vfio`)",
                dev.uuid
            )));
        }
        if let Some(m) = &dev.mig {
            return Err(EngineError::InvalidState(format!(
                "{} is a MIG slice of GPU {}: bind or release the whole GPU",
                dev.uuid, m.slice.parent_uuid
            )));
        }
        // Held from the in-use check to the last sysfs write: a create cannot land on a GPU
        // while it changes hands, and a bind cannot start under a create being placed.
        let _guard = self.place_lock.lock().await;
        // The GPU itself or, in MIG mode, any of its slices.
        let mut held: Vec<String> = vec![dev.uuid.clone()];
        held.extend(
            self.node
                .gpus()
                .into_iter()
                .filter(|g| {
                    g.mig
                        .as_ref()
                        .is_some_and(|m| m.slice.parent_uuid == dev.uuid)
                })
                .map(|g| g.uuid),
        );
        let users = self.holders(&held).await?;
        if !users.is_empty() {
            return Err(EngineError::InUse(format!(
                "GPU {} is used by instance{} {}: terminate {} first",
                dev.index,
                if users.len() == 1 { "" } else { "s" },
                users.join(", "),
                if users.len() == 1 { "it" } else { "them" },
            )));
        }
        let root = self.node.cfg.root.clone();
        let pci = dev.pci_address.clone();
        let sys = self.node.sys_writer();
        let done = tokio::task::spawn_blocking(move || {
            if bind {
                vfio::bind_vfio_with(&root, &pci, &*sys)
            } else {
                vfio::release_with(&root, &pci, &*sys)
            }
        })
        .await
        .map_err(|e| EngineError::Internal(format!("{verb} task: {e}")))?
        .map_err(vfio_error)?;
        // The driver changed: the inventory (which names the GPU `PCI-<address>` where no
        // driver tells its UUID) is read again, still under the placement lock, so the next
        // create is placed on the GPU's name now, and what named it before follows.
        let before: Vec<(String, String)> = self
            .node
            .gpus()
            .into_iter()
            .map(|g| (g.uuid, g.pci_address))
            .collect();
        self.refresh_inventory().await?;
        self.follow_gpu_renames(&before).await?;
        tracing::info!(
            gpu = %dev.uuid,
            pci = %done.pci,
            functions = ?done.functions,
            driver = ?done.driver,
            unchanged = done.unchanged,
            "gpu {verb}"
        );
        let now_named = self
            .node
            .gpus()
            .into_iter()
            .find(|g| g.is_physical() && g.pci_address == dev.pci_address)
            .map_or(dev.uuid.clone(), |g| g.uuid);
        self.listed_gpu(who, &now_named).await
    }

    /// The same card under its driver's name: `before` is (UUID, PCI address) of the GPUs as
    /// they were named (the store's last inventory at start, the node's before a driver
    /// change). A GPU named by the `PCI-<address>` placeholder (no driver could tell its UUID)
    /// that is now at that address under a `GPU-` UUID is the same card: instance bindings and
    /// cordons are renamed, so placement counts its residents and keeps its cordon. Bindings
    /// naming `PCI-<address>` are matched by that address even when the store's inventory no
    /// longer lists them. (Two different `GPU-` UUIDs at one address are two cards: nothing.)
    pub(crate) async fn follow_gpu_renames(&self, before: &[(String, String)]) -> Result<()> {
        if self.node.backend() == BackendKind::Simulated {
            return Ok(());
        }
        let now: Vec<GpuDevice> = self
            .node
            .gpus()
            .into_iter()
            .filter(|g| g.is_physical())
            .collect();
        let mut old: Vec<(String, String)> = before.to_vec();
        for i in self.store.live_instances(None).await? {
            for b in &i.gpus {
                if let Some(addr) = b.uuid.strip_prefix("PCI-") {
                    old.push((b.uuid.clone(), addr.to_string()));
                }
            }
        }
        old.sort();
        old.dedup();
        for (uuid, addr) in old {
            if now.iter().any(|g| g.uuid == uuid) {
                continue;
            }
            let Some(g) = now.iter().find(|g| g.pci_address == addr) else {
                continue;
            };
            // Only towards the driver's name: a `GPU-` UUID that is now `PCI-<address>` may be
            // another card (the one remembered was swapped out), so nothing follows it.
            if !uuid.starts_with("PCI-") || g.uuid.starts_with("PCI-") {
                continue;
            }
            let ids = self.store.rename_gpu(&uuid, &g.uuid).await?;
            if let Some(reason) = self.telemetry.cordoned().get(&uuid).cloned() {
                self.telemetry.uncordon(&uuid);
                self.telemetry.cordon(&g.uuid, &reason);
            }
            if !ids.is_empty() {
                tracing::info!(from = %uuid, to = %g.uuid, instances = ?ids, "GPU renamed");
            }
        }
        Ok(())
    }

    /// A GPU of this host by UUID, index or PCI address (an index or address names the physical
    /// GPU, never one of its MIG slices).
    pub(crate) fn gpu_by_ref(&self, gpu: &str) -> Result<GpuDevice> {
        let g = gpu.trim();
        if g.is_empty() {
            return Err(invalid("give a GPU UUID, index or PCI address"));
        }
        let pci = gpuvisor_node::gpu::normalise_pci_address(g);
        self.node
            .gpus()
            .into_iter()
            .find(|d| {
                d.uuid.eq_ignore_ascii_case(g)
                    || (d.is_physical()
                        && (d.index.to_string() == g
                            || pci.as_deref() == Some(d.pci_address.as_str())))
            })
            .ok_or_else(|| {
                EngineError::NotFound(format!(
                    "no GPU {g:?} on this host (see `gpuvisor gpu list`)"
                ))
            })
    }

    /// Who may be placed on a GPU, from its driver now (read from sysfs, so binds made
    /// outside gpuvisor count too): containers on `nvidia`, VMs on `vfio-pci`, nobody on any
    /// other driver or none (nouveau, pci-stub: host check says so). A simulated GPU is for
    /// VMs when simulated so (`:vfio`), else for containers; a MIG slice is for containers.
    pub(crate) fn gpu_use(&self, g: &GpuDevice) -> GpuUse {
        if self.node.backend() == BackendKind::Simulated {
            return if g.is_physical() && g.is_vfio() {
                GpuUse::Vms
            } else {
                GpuUse::Containers
            };
        }
        if !g.is_physical() {
            return GpuUse::Containers;
        }
        match vfio::current_driver(&self.node.cfg.root, &g.pci_address).as_deref() {
            Some(vfio::VFIO_DRIVER) => GpuUse::Vms,
            Some("nvidia") => GpuUse::Containers,
            _ => GpuUse::Unusable,
        }
    }

    /// True when the GPU is for VMs (bound to vfio-pci, or simulated so).
    pub(crate) fn is_passthrough(&self, g: &GpuDevice) -> bool {
        self.gpu_use(g) == GpuUse::Vms
    }

    /// Sets the live driver and passthrough readiness of a listed GPU from sysfs (a simulated
    /// one's from the simulation: `vfio-pci` for `:vfio` GPUs, none otherwise).
    pub(crate) fn fill_driver(&self, gpu: &mut wire::Gpu) {
        if self.node.backend() == BackendKind::Simulated {
            if let Some(d) = self.node.gpus().into_iter().find(|d| d.uuid == gpu.uuid) {
                gpu.passthrough_ready = self.is_passthrough(&d);
                gpu.driver = d.driver;
            }
            return;
        }
        gpu.driver = vfio::current_driver(&self.node.cfg.root, &gpu.pci_address);
        gpu.passthrough_ready =
            gpu.mig.is_none() && gpu.driver.as_deref() == Some(vfio::VFIO_DRIVER);
    }

    /// A VM takes whole GPUs bound to vfio-pci: refuses, saying how to get one, a VM asking
    /// for GPUs on a host with none bound (of the model asked for). Placement would only say
    /// that none is free.
    pub(crate) fn check_passthrough_gpus(&self, req: &wire::CreateInstance) -> Result<()> {
        let Some(wanted) = req.gpus else {
            return Ok(());
        };
        let gpus: Vec<GpuDevice> = self
            .node
            .gpus()
            .into_iter()
            .filter(|g| g.schedulable() && g.is_physical())
            .filter(|g| {
                req.gpu_model
                    .as_ref()
                    .is_none_or(|m| g.model.eq_ignore_ascii_case(m))
            })
            .collect();
        let (vfio_gpus, host_gpus): (Vec<&GpuDevice>, Vec<&GpuDevice>) =
            gpus.iter().partition(|g| self.is_passthrough(g));
        if vfio_gpus
            .iter()
            .any(|g| !self.telemetry.is_cordoned(&g.uuid))
        {
            return Ok(());
        }
        if !vfio_gpus.is_empty() {
            let cordoned = self.telemetry.cordoned();
            let list: Vec<String> = vfio_gpus
                .iter()
                .map(|g| match cordoned.get(&g.uuid) {
                    Some(r) => format!("GPU {} ({r})", g.index),
                    None => format!("GPU {}", g.index),
                })
                .collect();
            return Err(EngineError::InsufficientResources(format!(
                "no GPU bound to vfio-pci can take a VM: {} {} cordoned; ask an admin to look at it (`gpuvisor gpu uncordon` once it is healthy)",
                list.join(", "),
                if list.len() == 1 { "is" } else { "are" }
            )));
        }
        let gpus: Vec<&GpuDevice> = host_gpus
            .into_iter()
            .filter(|g| self.gpu_use(g) == GpuUse::Containers)
            .collect();
        let refusal = crate::placement::PlacementError::PassthroughGpus {
            wanted,
            model: req.gpu_model.clone().unwrap_or_else(|| "any".into()),
            free: 0,
            total: 0,
            for_containers: gpus.len() as u32,
        };
        let mut msg = refusal.to_string();
        if self.node.backend() == BackendKind::Simulated {
            msg.push_str(" (this host's GPUs are simulated: an admin simulates some bound to vfio-pci with `serve --simulate-gpus 1xH100-80GB:vfio`)");
        }
        Err(EngineError::InsufficientResources(msg))
    }
}

/// Who may be placed on a GPU ([`Engine::gpu_use`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GpuUse {
    /// On the host driver (`nvidia`): containers.
    Containers,
    /// On vfio-pci: VMs, whole, by passthrough.
    Vms,
    /// On another driver or none: neither.
    Unusable,
}

/// Host refusals are the caller's to fix (invalid state); write failures are internal.
fn vfio_error(e: VfioError) -> EngineError {
    match e {
        VfioError::BadAddress(_) => invalid(e.to_string()),
        VfioError::NoDevice(_) => EngineError::NotFound(e.to_string()),
        VfioError::NoIommuGroup { .. }
        | VfioError::SharedGroup { .. }
        | VfioError::BadGroupEntry { .. }
        | VfioError::NoVfioDriver => EngineError::InvalidState(e.to_string()),
        VfioError::Write { .. }
        | VfioError::NotBound { .. }
        | VfioError::GroupUnreadable { .. } => EngineError::Node(e.into()),
    }
}

/// MIG refusals are the caller's to fix; driver failures are the host's.
fn mig_error(e: MigError) -> EngineError {
    match e {
        MigError::NoGpu(_) | MigError::NoInstance { .. } => EngineError::NotFound(e.to_string()),
        MigError::NoProfile { .. } => invalid(e.to_string()),
        MigError::NotEnabled(_) => EngineError::InvalidState(e.to_string()),
        MigError::NoCapacity { .. } => EngineError::InsufficientResources(e.to_string()),
        // A driver that lacks MIG control is this host's capability (422); NVML failing
        // is a fault on the host (500), not a reason to tell the client it asked wrongly.
        MigError::MissingSymbol(_) => EngineError::Unavailable(e.to_string()),
        MigError::Nvml(_) => EngineError::Internal(e.to_string()),
    }
}
