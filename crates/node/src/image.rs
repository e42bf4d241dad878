//! Content-addressed image store. CONTRACT (to be implemented).

use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("{path}: {why}")]
    BadSource { path: PathBuf, why: String },
    #[error("io on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What an import produced; the control layer records it under a name.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedImage {
    /// `sha256:<hex>` of the manifest (OCI/docker) or of the single layer (rootfs dir).
    pub digest: String,
    /// Layer digests (`sha256:<hex>` of the uncompressed tar, i.e. the diff id), bottom first.
    pub layers: Vec<String>,
    /// Unpacked size of all layers, bytes.
    pub size: u64,
    /// Config `Entrypoint` + `Cmd`, if any.
    pub command: Vec<String>,
    /// Config `Env`.
    pub env: Vec<String>,
}

pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// Opens (creating if needed) a store rooted at `<data>/images`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        Ok(Self { root: root.into() })
    }

    pub fn import(&self, _src: &Path) -> Result<ImportedImage, ImageError> {
        Err(ImageError::BadSource {
            path: self.root.clone(),
            why: "not implemented yet".into(),
        })
    }

    /// The directory a layer is unpacked into (read-only lower dir for overlayfs).
    pub fn layer_dir(&self, digest: &str) -> PathBuf {
        self.root.join("layers").join(digest.replace(':', "-"))
    }

    /// Removes unpacked layers that no image in `keep` references.
    pub fn gc(&self, _keep: &[String]) -> Result<u64, ImageError> {
        Ok(0)
    }
}
