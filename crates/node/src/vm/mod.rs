//! Micro-VM instances: QEMU processes driven over QMP ([`qmp`]), their command line, cgroup
//! and vCPU pinning ([`qemu`]), and [`runtime::VmRuntime`], the [`crate::runtime::Runtime`] that
//! runs an instance as a VM. Templates and overlays (`template`), cloud-init seeds (`seed`) and
//! GPU passthrough (`passthrough`) are their own files.
//!
//! Host objects of a VM carry the instance id like a container's: cgroup `gpuvisor/<id>`, tap
//! `<P>t<id>`, `<data>/vm/run/<id>/` (QMP, guest agent, console and VNC sockets, pid file,
//! QEMU's stderr, the cloud-init seed) and `<data>/vm/disks/<id>.qcow2` (the root overlay).

pub mod migrate;
pub mod passthrough;
pub mod qcow2;
pub mod qemu;
pub mod qmp;
pub mod remote;
pub mod resize;
pub mod runtime;
pub mod seed;
pub mod snapshot;
pub mod template;

use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("QMP on {socket}: {source}")]
    Qmp {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP command {command} failed: {message}")]
    QmpCommand { command: String, message: String },
    #[error("the guest agent of instance {id}: {why}")]
    Agent { id: String, why: String },
    #[error("QEMU for instance {id} did not start: {why}")]
    Start { id: String, why: String },
    /// What the caller asked cannot be done to this VM as it is (a resize beyond its room, a
    /// memory snapshot of a resized VM, a snapshot of another kind): the caller's to change.
    #[error("instance {id}: {why}")]
    Refused { id: String, why: String },
    #[error("instance {id} cannot migrate: {why}")]
    Migrate { id: String, why: String },
    #[error("the post-copy migration failed after the guest switched over; the guest is lost and the instance ends: {why}")]
    PostcopyLost { why: String },
    #[error("the live migration of instance {id} did not complete: {why}")]
    SwitchIncomplete { id: String, why: String },
    /// A migration that failed before the destination ran left the source's guest paused,
    /// and resuming it failed too.
    #[error("the live migration of instance {id} failed and its guest could not be resumed: {why}; it stays paused in its QEMU (stop and start the instance)")]
    NotResumed { id: String, why: String },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tap {name}: {why}")]
    Tap { name: String, why: String },
    #[error("no kernel for the VM: {0}")]
    NoKernel(String),
    #[error(transparent)]
    Template(#[from] template::TemplateError),
    #[error("io on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    /// A migration of `id` failed (`failed`) and resuming its paused source failed too
    /// (`resuming`).
    pub fn not_resumed(
        id: &str,
        failed: impl std::fmt::Display,
        resuming: impl std::fmt::Display,
    ) -> Self {
        VmError::NotResumed {
            id: id.to_string(),
            why: format!("{failed}; resuming it: {resuming}"),
        }
    }
}

pub(crate) fn vio(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> VmError {
    let path = path.into();
    move |source| VmError::Io { path, source }
}

/// Writes one of a VM's small JSON files in its run dir (`boot.json`, `size.json`).
pub(crate) fn write_json<T: serde::Serialize>(
    path: &std::path::Path,
    v: &T,
) -> Result<(), VmError> {
    let text = serde_json::to_vec(v).map_err(|e| {
        vio(path)(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e.to_string(),
        ))
    })?;
    std::fs::write(path, text).map_err(vio(path))
}

/// Reads one of them back.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> Result<T, VmError> {
    let text = std::fs::read(path).map_err(vio(path))?;
    serde_json::from_slice(&text).map_err(|e| {
        vio(path)(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e.to_string(),
        ))
    })
}

/// How guests run: hardware virtualisation, or QEMU's emulator with the reason KVM is not used.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "accel", rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg { reason: String },
}

impl Accel {
    /// The `-accel` value.
    pub fn as_arg(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg { .. } => "tcg",
        }
    }

    /// `kvm`, or `tcg (reason)`: what `host check` and `instance get` show.
    pub fn describe(&self) -> String {
        match self {
            Accel::Kvm => "kvm".into(),
            Accel::Tcg { reason } => format!("tcg ({reason})"),
        }
    }
}

/// The daemon's VM settings.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The kernel and initrd for images without their own `/boot`.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// KVM or TCG, as probed at daemon start ([`qemu::probe_accel`]).
    pub accel: Accel,
}

/// The QEMU binary on `PATH`, if any (`serve --vm-qemu`, or `GPUVISOR_QEMU`, names another).
pub fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}
