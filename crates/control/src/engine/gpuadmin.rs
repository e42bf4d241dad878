//! Host preparation commands on GPUs: hand a GPU to vfio-pci for passthrough and give it back.
//!
//! Why in the engine and not a local CLI tool: only the engine knows whether an instance uses the
//! GPU, and unbinding the driver under a running container kills its CUDA context. The sysfs
//! work is the node layer's (`gpuvisor_node::vfio`); this file adds the rules: admin only, refused
//! while any live instance (running or stopped, which keep their reservation) holds the GPU, and
//! never on simulated GPUs.

use super::{Engine, Principal};
use crate::error::{invalid, EngineError, Result};
use gpuvisor_node::gpu::{BackendKind, GpuDevice};
use gpuvisor_node::vfio::{self, VfioError};
use gpuvisor_wire as wire;

impl Engine {
    /// Binds a GPU (by UUID, index or PCI address) and its companion functions to vfio-pci.
    pub async fn bind_vfio(&self, who: &Principal, gpu: &str) -> Result<wire::Gpu> {
        self.vfio_op(who, gpu, true).await
    }

    /// Gives a GPU back to the host driver (clears the override, unbinds vfio-pci, probes).
    pub async fn release_gpu(&self, who: &Principal, gpu: &str) -> Result<wire::Gpu> {
        self.vfio_op(who, gpu, false).await
    }

    async fn vfio_op(&self, who: &Principal, gpu: &str, bind: bool) -> Result<wire::Gpu> {
        let verb = if bind { "bind-vfio" } else { "release" };
        who.require_admin(&format!("gpu {verb}"))?;
        let dev = self.gpu_by_ref(gpu)?;
        if self.node.backend() == BackendKind::Simulated {
            return Err(EngineError::InvalidState(format!(
                "GPU {} is simulated: it cannot be bound to vfio-pci",
                dev.uuid
            )));
        }
        let users: Vec<String> = self
            .store
            .live_instances(None)
            .await?
            .into_iter()
            .filter(|i| i.gpus.iter().any(|b| b.uuid == dev.uuid))
            .map(|i| i.id)
            .collect();
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
        let done = tokio::task::spawn_blocking(move || {
            if bind {
                vfio::bind_vfio(&root, &pci)
            } else {
                vfio::release(&root, &pci)
            }
        })
        .await
        .map_err(|e| EngineError::Internal(format!("{verb} task: {e}")))?
        .map_err(vfio_error)?;
        tracing::info!(
            gpu = %dev.uuid,
            pci = %done.pci,
            functions = ?done.functions,
            driver = ?done.driver,
            unchanged = done.unchanged,
            "gpu {verb}"
        );
        self.list_gpus(who)
            .await?
            .into_iter()
            .find(|g| g.uuid == dev.uuid)
            .ok_or_else(|| EngineError::NotFound(format!("GPU {gpu} is not recorded")))
    }

    /// A GPU of this host by UUID, index or PCI address.
    fn gpu_by_ref(&self, gpu: &str) -> Result<GpuDevice> {
        let g = gpu.trim();
        if g.is_empty() {
            return Err(invalid("give a GPU UUID, index or PCI address"));
        }
        let pci = gpuvisor_node::gpu::normalise_pci_address(g);
        self.node
            .gpus
            .iter()
            .find(|d| {
                d.uuid.eq_ignore_ascii_case(g)
                    || d.index.to_string() == g
                    || pci.as_deref() == Some(d.pci_address.as_str())
            })
            .cloned()
            .ok_or_else(|| {
                EngineError::NotFound(format!(
                    "no GPU {g:?} on this host (see `gpuvisor gpu list`)"
                ))
            })
    }

    /// True when the GPU is bound to vfio-pci now (read from sysfs, so binds made outside
    /// gpuvisor count too).
    pub(crate) fn is_passthrough(&self, g: &GpuDevice) -> bool {
        self.node.backend() != BackendKind::Simulated
            && vfio::current_driver(&self.node.cfg.root, &g.pci_address).as_deref()
                == Some(vfio::VFIO_DRIVER)
    }

    /// Sets the live driver and passthrough readiness of a listed GPU from sysfs.
    pub(crate) fn fill_driver(&self, gpu: &mut wire::Gpu) {
        if self.node.backend() == BackendKind::Simulated {
            return;
        }
        gpu.driver = vfio::current_driver(&self.node.cfg.root, &gpu.pci_address);
        gpu.passthrough_ready = gpu.driver.as_deref() == Some(vfio::VFIO_DRIVER);
    }
}

/// Host refusals are the caller's to fix (invalid state); write failures are internal.
fn vfio_error(e: VfioError) -> EngineError {
    match e {
        VfioError::BadAddress(_) => invalid(e.to_string()),
        VfioError::NoDevice(_) => EngineError::NotFound(e.to_string()),
        VfioError::NoIommuGroup { .. }
        | VfioError::SharedGroup { .. }
        | VfioError::NoVfioDriver => EngineError::InvalidState(e.to_string()),
        VfioError::Write { .. } | VfioError::NotBound { .. } => EngineError::Node(e.into()),
    }
}
