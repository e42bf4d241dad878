//! Container disks, persistent volumes, loop devices and overlay mounts. CONTRACT (to be implemented).

use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error(transparent)]
    Cmd(#[from] crate::cmd::CmdError),
    #[error("io on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {target}: {source}")]
    Mount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// Layout of gpuvisor's disks under the data dir.
#[derive(Debug, Clone)]
pub struct Disks {
    pub data_dir: PathBuf,
}

/// A mounted instance root: overlay of image layers over the container disk.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRoot {
    /// The merged overlay (`<data>/instances/<id>/rootfs`), the bundle's rootfs.
    pub rootfs: PathBuf,
}

impl Disks {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self { data_dir: data_dir.into() }
    }

    /// Creates the container disk (ext4 of exactly `size` bytes on a loop device), mounts it,
    /// and mounts the overlay rootfs (lower = `layers`, top first) on it. Idempotent.
    pub fn provision_root(&self, _id: &str, _size: u64, _layers_top_first: &[PathBuf]) -> Result<InstanceRoot, DiskError> {
        Ok(InstanceRoot { rootfs: PathBuf::new() })
    }

    /// Unmounts and deletes everything `provision_root` made; wipes the disk. Idempotent.
    pub fn teardown_root(&self, _id: &str) -> Result<(), DiskError> {
        Ok(())
    }

    pub fn create_volume(&self, _tenant: &str, _name: &str, _size: u64) -> Result<(), DiskError> {
        Ok(())
    }
    pub fn remove_volume(&self, _tenant: &str, _name: &str) -> Result<(), DiskError> {
        Ok(())
    }
    /// Mounts a volume for an instance and returns the host mount point. Idempotent.
    pub fn attach_volume(&self, _id: &str, _tenant: &str, _name: &str) -> Result<PathBuf, DiskError> {
        Ok(PathBuf::new())
    }
    /// Unmounts all of an instance's volumes. Idempotent.
    pub fn detach_volumes(&self, _id: &str) -> Result<(), DiskError> {
        Ok(())
    }

    /// Instance ids that have host objects (mounts, loop devices, disk images, dirs) here.
    pub fn instances_with_objects(&self) -> Result<Vec<String>, DiskError> {
        Ok(vec![])
    }
}

#[allow(dead_code)]
fn _unused(_: &Path) {}
