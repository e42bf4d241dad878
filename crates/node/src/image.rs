//! Content-addressed image store: imports OCI images, `docker save` archives and plain rootfs
//! directories, and unpacks each layer once into a directory overlayfs can use as a lower dir.
//!
//! Why: containers are started from an overlay of read-only layers plus a per-instance upper
//! dir. Images share layers (base OS, CUDA runtime), so layers are stored by content and
//! unpacked once, whatever image or source format brought them.
//!
//! Layout under the store root (`<data>/images`):
//! - `layers/sha256-<hex>/`: one unpacked layer, named by its diff id (sha256 of the
//!   *uncompressed* tar). Read-only after creation; shared by all images.
//! - `blobs/sha256/<hex>`: the manifest and config JSON of each imported image (layer blobs
//!   are not kept: the unpacked dir is the layer). [`ImageStore::config`] reads them back.
//! - `tmp/`: work area. Layers are unpacked into `tmp/` and renamed into `layers/` with
//!   `RENAME_NOREPLACE` after `syncfs`, so a crash never leaves a half layer under `layers/`;
//!   leftovers in `tmp/` are removed by [`ImageStore::gc`].
//! - `blobmap/<hex>`: for each layer blob we verified, the diff id it decompresses to. A
//!   registry pull ([`crate::registry`]) uses it to skip downloading a layer that is already
//!   unpacked (after the registry confirms it serves that blob to the puller).
//! - `pull/`: registry downloads: `partial/<hex>` (kept across restarts, resumed with HTTP
//!   Range) and `blobs/sha256/<hex>` (complete and verified; the import reads them like an OCI
//!   layout and they are removed once no pull is running).
//! - `lock`: `flock`ed shared by imports and exclusively by gc, so gc never removes the work
//!   files of a running import (in this process or another one).
//!
//! Key decisions:
//! - **Kind is detected by content**, never by name: a directory with `oci-layout` (or
//!   `index.json` + `blobs/`) is an OCI layout; a directory whose `manifest.json` parses as a
//!   docker-save manifest is an extracted `docker save`; any other directory is a rootfs. A
//!   regular file must be a tar (optionally gzip-compressed) holding an OCI layout (preferred,
//!   docker >= 25 writes both) or a docker-save `manifest.json`. Layer compression is detected
//!   by magic bytes (gzip, zstd or none; zstd archives as a whole are refused).
//! - **Everything is verified**: manifest, config and layer blobs against their descriptor
//!   digests (and sizes), and every layer's uncompressed stream against the config's
//!   `rootfs.diff_ids`. A layer that already exists is not unpacked again, but its blob is still
//!   decompressed and hashed: otherwise anyone who knows a layer digest could claim it in a
//!   forged config and read another tenant's layer.
//! - **Index selection**: from an index (top-level `index.json` or a nested image index) we take
//!   the first manifest for linux on the host architecture whose blob is present, else the
//!   first present manifest that is not a buildx attestation.
//! - **Image digest**: the digest of the selected manifest. A legacy `docker save` has no
//!   manifest blob, so we synthesise a canonical OCI manifest (config + layer blobs as found)
//!   and use its digest; it is stored like any other manifest.
//! - **Rootfs directories** become one layer whose digest is the sha256 of a deterministic tar
//!   stream of the directory: entries sorted by name bytes, GNU headers with numeric uid/gid,
//!   mode (setuid included), whole-second mtime, no user/group names, hard links as link
//!   entries, xattrs as PAX `SCHILY.xattr` records (except `trusted.overlay.*`), sockets
//!   skipped. That stream is exactly what gets unpacked, so the digest is a real diff id. The
//!   directory is read twice (hash first, then unpack only if the layer is new); a change
//!   between the two passes is reported as a digest mismatch. The digest is stable for a given
//!   tar writer; a different writer only costs one extra unpack. Like any layer, names starting
//!   with `.wh.` are read as whiteouts, and live mounts under the directory are walked into
//!   (pass a quiescent directory, not a running root).
//! - **Unpacking** is our own loop over `tar` entries (the `tar` crate's unpacker writes device
//!   nodes as regular files and silently skips `..` entries): `..` and absolute paths are
//!   refused, as is any entry whose parent path goes through a symlink or non-directory, and
//!   hard links must point to a file already in the layer. Ownership is numeric, chown happens
//!   before chmod (so setuid/setgid survive) and before xattrs (chown drops file capabilities).
//!   OCI whiteouts become overlayfs whiteouts: `.wh.<name>` a 0/0 character device `<name>`,
//!   `.wh..wh..opq` the xattr `trusted.overlay.opaque=y` on its directory. `trusted.overlay.*`
//!   xattrs carried in the archive are dropped: only we write overlay metadata.
//! - **Repeated layers**: when an image lists the same layer twice, [`ImportedImage::layers`]
//!   keeps only the topmost occurrence (equivalent, since the upper copy covers the lower one,
//!   and overlayfs refuses the same lower dir twice).

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fmt::Display;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::stat::{Mode, SFlag};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
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
    /// A layer the image lists more than once appears once, at its topmost position.
    pub layers: Vec<String>,
    /// Unpacked size of all layers, bytes (apparent size of regular files, each inode once).
    pub size: u64,
    /// Config `Entrypoint` + `Cmd`, if any.
    pub command: Vec<String>,
    /// Config `Env`.
    pub env: Vec<String>,
}

/// The parts of an image config the runtime needs, read back from the store.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ImageConfig {
    /// `Entrypoint` + `Cmd`.
    pub command: Vec<String>,
    pub env: Vec<String>,
    /// `WorkingDir`, if set.
    pub working_dir: Option<String>,
    /// `User` (`uid`, `uid:gid` or a name), if set.
    pub user: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

/// Largest JSON document (index, manifest, config) we read into memory.
const MAX_JSON: u64 = 16 << 20;
/// How deep image indexes may nest before we call the source broken.
const MAX_INDEX_DEPTH: usize = 8;

const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";

impl ImageStore {
    /// Opens (creating if needed) a store rooted at `<data>/images`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let store = Self { root: root.into() };
        // Layers hold whatever images bring (setuid files, device nodes): no other host user may
        // reach them.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&store.root)
            .map_err(io_at(&store.root))?;
        let mode = fs::metadata(&store.root)
            .map_err(io_at(&store.root))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            fs::set_permissions(&store.root, fs::Permissions::from_mode(mode & 0o700))
                .map_err(io_at(&store.root))?;
        }
        for dir in [
            store.root.join("blobs").join("sha256"),
            store.root.join("layers"),
            store.root.join("tmp"),
            store.root.join("blobmap"),
            store.root.join("pull").join("partial"),
            store.root.join("pull").join("blobs").join("sha256"),
        ] {
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        Ok(store)
    }

    /// Imports an OCI layout (directory or tar), a `docker save` archive or a rootfs directory;
    /// see the module docs for how the kind is detected. Layers already in the store are reused.
    pub fn import(&self, src: &Path) -> Result<ImportedImage, ImageError> {
        let _lock = self.lock(FlockArg::LockShared)?;
        let meta = fs::metadata(src).map_err(|e| bad(src, format!("cannot read source: {e}")))?;
        if meta.is_dir() {
            let source = Source::Dir(src.to_path_buf());
            if src.join("oci-layout").exists()
                || (src.join("index.json").is_file() && src.join("blobs").is_dir())
            {
                return self.import_oci(&source, src);
            }
            if let Ok(bytes) = source.read_json(src, "manifest.json") {
                if serde_json::from_slice::<Vec<DockerEntry>>(&bytes).is_ok_and(|m| !m.is_empty()) {
                    return self.import_docker(&source, src);
                }
            }
            return self.import_rootfs(src);
        }
        if !meta.is_file() {
            return Err(bad(src, "neither a directory nor a regular file"));
        }
        let mut staged = None;
        let tar_path = match sniff(src)? {
            Magic::Tar => src.to_path_buf(),
            Magic::Gzip => {
                let tmp = self.stage_gunzip(src)?;
                if sniff(&tmp.path)? != Magic::Tar {
                    return Err(bad(src, "gzip data is not a tar archive"));
                }
                let path = tmp.path.clone();
                staged = Some(tmp);
                path
            }
            Magic::Zstd => return Err(bad(src, "zstd-compressed archives are not supported")),
            Magic::Other => {
                return Err(bad(
                    src,
                    "not a directory or a tar archive (OCI layout, docker save)",
                ))
            }
        };
        let source = Source::Tar(TarIndex::build(src, &tar_path)?);
        let result = if source.exists("index.json") || source.exists("oci-layout") {
            self.import_oci(&source, src)
        } else if source.exists("manifest.json") {
            self.import_docker(&source, src)
        } else {
            Err(bad(
                src,
                "tar archive is neither an OCI layout (no index.json) nor a docker save (no manifest.json)",
            ))
        };
        drop(staged);
        result
    }

    /// The directory a layer is unpacked into (read-only lower dir for overlayfs).
    pub fn layer_dir(&self, digest: &str) -> PathBuf {
        self.root.join("layers").join(digest.replace(':', "-"))
    }

    /// The store's root directory (`<data>/images`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The diff id a blob was verified to unpack to, if its layer was imported before.
    pub fn known_blob(&self, blob: &str) -> Option<String> {
        let hex = parse_digest(blob).ok()?;
        let diff = fs::read_to_string(self.root.join("blobmap").join(hex)).ok()?;
        let diff = diff.trim().to_string();
        parse_digest(&diff).ok()?;
        Some(diff)
    }

    /// Best effort: a missing entry only costs a download later.
    fn remember_blob(&self, blob: &str, diff_id: &str) {
        let Ok(hex) = parse_digest(blob) else {
            return;
        };
        let path = self.root.join("blobmap").join(hex);
        if path.is_file() {
            return;
        }
        if let Err(e) = fs::write(&path, diff_id) {
            tracing::debug!(path = %path.display(), "cannot record blob: {e}");
        }
    }

    /// Imports an image fetched from a registry: `manifest` (already verified against
    /// `digest`) and the config and layer blobs under `dir/blobs/sha256/` (an OCI layout
    /// without `index.json`). Layer blobs in `known` may be absent: they must then be layers
    /// this store verified before ([`ImageStore::known_blob`]). Every present blob is verified
    /// and unpacked exactly like an OCI layout import. Messages name `shown` (the reference),
    /// not our download directory.
    pub fn import_fetched(
        &self,
        dir: &Path,
        shown: &Path,
        digest: &str,
        manifest: &[u8],
        known: &HashSet<String>,
        max_unpacked: u64,
    ) -> Result<ImportedImage, ImageError> {
        let _lock = self.lock(FlockArg::LockShared)?;
        if sha256_digest(manifest) != digest {
            return Err(bad(
                shown,
                format!("manifest digest mismatch: expected {digest}"),
            ));
        }
        let doc: ManifestDoc = serde_json::from_slice(manifest)
            .map_err(|e| bad(shown, format!("manifest {digest}: {e}")))?;
        let source = Source::Dir(dir.to_path_buf());
        self.import_manifest(
            &source,
            shown,
            digest,
            manifest,
            doc,
            known,
            Some(max_unpacked),
        )
    }

    /// Starts staging an uploaded archive (`image import` of a client's local file) in `tmp/`;
    /// [`Upload::finish`] imports it. The shared lock is held from the first byte so a gc
    /// cannot remove the staged file.
    pub fn begin_upload(&self) -> Result<Upload, ImageError> {
        let lock = self.lock(FlockArg::LockShared)?;
        let tmp = TmpPath {
            path: self.tmp_path("upload")?,
            keep: false,
        };
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp.path)
            .map_err(io_at(&tmp.path))?;
        Ok(Upload {
            store: self.clone(),
            tmp,
            file,
            written: 0,
            _lock: lock,
        })
    }

    /// The stored config of an image imported from an OCI layout or `docker save`, by image
    /// (manifest) digest. `None` when the store holds no manifest under that digest (rootfs
    /// images have none).
    pub fn config(&self, image: &str) -> Result<Option<ImageConfig>, ImageError> {
        let Some(manifest) = self.read_store_blob(image)? else {
            return Ok(None);
        };
        let manifest: ManifestDoc = serde_json::from_slice(&manifest).map_err(|e| {
            bad(
                &self.blob_path_unchecked(image),
                format!("bad manifest: {e}"),
            )
        })?;
        let Some(config) = manifest.config else {
            return Ok(None);
        };
        let Some(bytes) = self.read_store_blob(&config.digest)? else {
            return Ok(None);
        };
        let doc: ConfigDoc = serde_json::from_slice(&bytes).map_err(|e| {
            bad(
                &self.blob_path_unchecked(&config.digest),
                format!("bad config: {e}"),
            )
        })?;
        let c = doc.config.unwrap_or_default();
        Ok(Some(ImageConfig {
            command: c.command(),
            working_dir: c.working_dir.filter(|w| !w.is_empty()),
            user: c.user.filter(|u| !u.is_empty()),
            env: c.env.unwrap_or_default(),
        }))
    }

    /// Removes unpacked layers that no image in `keep` references.
    ///
    /// `keep` holds layer digests and/or image digests; an image digest keeps its manifest and
    /// config blobs and every layer its config lists. Everything else under `layers/` and
    /// `blobs/`, and all leftovers in `tmp/`, is removed. Layers are first renamed into `tmp/`
    /// so a crash mid-removal never leaves a half layer under `layers/`. Returns the bytes freed
    /// (apparent size of the removed regular files). Waits for running imports; the caller must
    /// still make sure an image it just imported is in `keep` (import + record before gc).
    pub fn gc(&self, keep: &[String]) -> Result<u64, ImageError> {
        let _lock = self.lock(FlockArg::LockExclusive)?;
        let mut keep_layers: HashSet<String> = keep.iter().cloned().collect();
        let mut keep_blobs: HashSet<String> = keep.iter().cloned().collect();
        for digest in keep {
            let Ok(Some(bytes)) = self.read_store_blob(digest) else {
                continue;
            };
            let Ok(ManifestDoc {
                config: Some(config),
                ..
            }) = serde_json::from_slice::<ManifestDoc>(&bytes)
            else {
                continue;
            };
            keep_blobs.insert(config.digest.clone());
            if let Ok(Some(cfg)) = self.read_store_blob(&config.digest) {
                if let Ok(doc) = serde_json::from_slice::<ConfigDoc>(&cfg) {
                    keep_layers.extend(doc.rootfs.map(|r| r.diff_ids).unwrap_or_default());
                }
            }
        }

        let mut freed = 0u64;
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_at(&tmp))? {
            let path = entry.map_err(io_at(&tmp))?.path();
            freed += tree_size(&path).unwrap_or(0);
            remove_any(&path).map_err(io_at(&path))?;
        }
        let layers = self.root.join("layers");
        for entry in fs::read_dir(&layers).map_err(io_at(&layers))? {
            let entry = entry.map_err(io_at(&layers))?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_prefix("sha256-")) else {
                tracing::warn!(path = %entry.path().display(), "unknown entry in layer store left alone");
                continue;
            };
            if keep_layers.contains(&format!("sha256:{hex}")) {
                continue;
            }
            let path = entry.path();
            freed += tree_size(&path).map_err(io_at(&path))?;
            let trash = self.tmp_path("gc")?;
            fs::rename(&path, &trash).map_err(io_at(&path))?;
            fs::remove_dir_all(&trash).map_err(io_at(&trash))?;
            tracing::debug!(layer = %hex, "removed unused layer");
        }
        // Registry downloads abandoned for a day (a resumed pull keeps writing its file).
        let partial = self.root.join("pull").join("partial");
        if let Ok(entries) = fs::read_dir(&partial) {
            let day = std::time::Duration::from_secs(86_400);
            for entry in entries.flatten() {
                let path = entry.path();
                let stale = fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > day));
                if stale {
                    freed += tree_size(&path).unwrap_or(0);
                    remove_any(&path).map_err(io_at(&path))?;
                }
            }
        }
        let blobmap = self.root.join("blobmap");
        for entry in fs::read_dir(&blobmap).map_err(io_at(&blobmap))? {
            let path = entry.map_err(io_at(&blobmap))?.path();
            let diff = fs::read_to_string(&path).unwrap_or_default();
            if !self.layer_dir(diff.trim()).is_dir() || !keep_layers.contains(diff.trim()) {
                remove_any(&path).map_err(io_at(&path))?;
            }
        }
        let blobs = self.root.join("blobs").join("sha256");
        for entry in fs::read_dir(&blobs).map_err(io_at(&blobs))? {
            let entry = entry.map_err(io_at(&blobs))?;
            let name = entry.file_name();
            if keep_blobs.contains(&format!("sha256:{}", name.to_string_lossy())) {
                continue;
            }
            let path = entry.path();
            freed += tree_size(&path).unwrap_or(0);
            remove_any(&path).map_err(io_at(&path))?;
        }
        Ok(freed)
    }

    // ---- sources -------------------------------------------------------------------------

    fn import_oci(&self, source: &Source, src: &Path) -> Result<ImportedImage, ImageError> {
        if !source.exists("index.json") {
            return Err(bad(src, "missing index.json (not an OCI image layout)"));
        }
        let index: ManifestDoc = serde_json::from_slice(&source.read_json(src, "index.json")?)
            .map_err(|e| bad(src, format!("index.json: {e}")))?;
        let mut desc = select_manifest(&index.manifests, source, src, "index.json")?;
        for _ in 0..MAX_INDEX_DEPTH {
            let bytes = read_verified_json(source, src, &desc)?;
            let doc: ManifestDoc = serde_json::from_slice(&bytes)
                .map_err(|e| bad(src, format!("manifest {}: {e}", desc.digest)))?;
            let is_index = matches!(
                doc.media_type.as_deref(),
                Some(MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST)
            ) || (doc.config.is_none() && !doc.manifests.is_empty());
            if is_index {
                desc = select_manifest(&doc.manifests, source, src, &desc.digest)?;
                continue;
            }
            return self.import_manifest(
                source,
                src,
                &desc.digest,
                &bytes,
                doc,
                &HashSet::new(),
                None,
            );
        }
        Err(bad(src, "image indexes nest too deep"))
    }

    #[allow(clippy::too_many_arguments)]
    fn import_manifest(
        &self,
        source: &Source,
        src: &Path,
        digest: &str,
        manifest_bytes: &[u8],
        manifest: ManifestDoc,
        known: &HashSet<String>,
        max_unpacked: Option<u64>,
    ) -> Result<ImportedImage, ImageError> {
        // What the layers may still unpack to (a registry pull's bound on the whole image).
        let mut budget = max_unpacked;
        let Some(config_desc) = manifest.config else {
            return Err(bad(
                src,
                format!("manifest {digest} is not an image manifest (no config; schema 1 is not supported)"),
            ));
        };
        let config_bytes = read_verified_json(source, src, &config_desc)?;
        let config: ConfigDoc = serde_json::from_slice(&config_bytes)
            .map_err(|e| bad(src, format!("config {}: {e}", config_desc.digest)))?;
        let diff_ids = config_diff_ids(&config, manifest.layers.len(), src)?;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for (i, desc) in manifest.layers.iter().enumerate() {
            let name =
                blob_name(&desc.digest).map_err(|why| bad(src, format!("layer {i}: {why}")))?;
            let ctx = Ctx {
                src,
                what: format!("layer {i} ({name})"),
            };
            if known.contains(&desc.digest) && !source.exists(&name) {
                // A registry pull skipped the download: the blob was verified to unpack to this
                // diff id before, and the registry serves it to this puller.
                let diff = diff_ids.get(i).map(String::as_str);
                match (diff, self.known_blob(&desc.digest)) {
                    (Some(want), Some(have)) if want == have && self.layer_dir(want).is_dir() => {
                        layers.push(have);
                        continue;
                    }
                    _ => return Err(ctx.bad("blob was not downloaded and is not a known layer")),
                }
            }
            let reader = source.open(src, &name)?;
            let out = self.import_layer(
                &ctx,
                reader,
                Expect {
                    blob: Some(&desc.digest),
                    blob_size: desc.size,
                    diff_id: diff_ids.get(i).map(String::as_str),
                    max_unpacked: budget,
                },
            )?;
            if let Some(b) = &mut budget {
                *b = b.saturating_sub(out.unpacked);
            }
            layers.push(out.diff_id);
        }
        self.write_blob(manifest_bytes)?;
        self.write_blob(&config_bytes)?;
        self.finish_image(digest.to_string(), layers, &config)
    }

    fn import_docker(&self, source: &Source, src: &Path) -> Result<ImportedImage, ImageError> {
        let entries: Vec<DockerEntry> =
            serde_json::from_slice(&source.read_json(src, "manifest.json")?)
                .map_err(|e| bad(src, format!("manifest.json: {e}")))?;
        let Some(entry) = entries.first() else {
            return Err(bad(src, "manifest.json lists no image"));
        };
        if entries.len() > 1 {
            tracing::warn!(src = %src.display(), count = entries.len(), "docker save holds several images; importing the first");
        }
        let config_bytes = source.read_json(src, &entry.config)?;
        let config_digest = sha256_digest(&config_bytes);
        if let Some(expected) = digest_from_name(&entry.config) {
            if expected != config_digest {
                return Err(bad(
                    src,
                    format!(
                        "{}: digest mismatch: content is {config_digest}",
                        entry.config
                    ),
                ));
            }
        }
        let config: ConfigDoc = serde_json::from_slice(&config_bytes)
            .map_err(|e| bad(src, format!("{}: {e}", entry.config)))?;
        let diff_ids = config_diff_ids(&config, entry.layers.len(), src)?;
        let mut layers = Vec::with_capacity(entry.layers.len());
        let mut descs = Vec::with_capacity(entry.layers.len());
        for (i, name) in entry.layers.iter().enumerate() {
            let ctx = Ctx {
                src,
                what: format!("layer {i} ({name})"),
            };
            let expected_blob = digest_from_name(name);
            let reader = source.open(src, name)?;
            let out = self.import_layer(
                &ctx,
                reader,
                Expect {
                    blob: expected_blob.as_deref(),
                    blob_size: None,
                    diff_id: diff_ids.get(i).map(String::as_str),
                    max_unpacked: None,
                },
            )?;
            descs.push(DescOut {
                media_type: if out.gzip {
                    MEDIA_LAYER_GZIP
                } else {
                    MEDIA_LAYER_TAR
                },
                digest: out.blob_digest,
                size: out.blob_size,
            });
            layers.push(out.diff_id);
        }
        let manifest = ManifestOut {
            schema_version: 2,
            media_type: MEDIA_OCI_MANIFEST,
            config: DescOut {
                media_type: MEDIA_OCI_CONFIG,
                digest: config_digest,
                size: config_bytes.len() as u64,
            },
            layers: descs,
        };
        let manifest_bytes = serde_json::to_vec(&manifest)
            .map_err(|e| bad(src, format!("cannot encode manifest: {e}")))?;
        let digest = self.write_blob(&manifest_bytes)?;
        self.write_blob(&config_bytes)?;
        self.finish_image(digest, layers, &config)
    }

    fn import_rootfs(&self, src: &Path) -> Result<ImportedImage, ImageError> {
        // A symlink to the rootfs is fine; symlinks inside it are archived as symlinks.
        let canonical =
            fs::canonicalize(src).map_err(|e| bad(src, format!("cannot read rootfs: {e}")))?;
        let dir = canonical.as_path();
        // Pass 1: hash only, so an existing layer is not copied again.
        let mut hasher = HashWriter::default();
        write_rootfs_tar(dir, &mut hasher)
            .map_err(|e| bad(dir, format!("cannot read rootfs: {e}")))?;
        let digest = hasher.digest();
        if !self.layer_dir(&digest).is_dir() {
            // Pass 2: stream the same tar through a bounded channel (not a pipe: no SIGPIPE
            // whatever the binary's signal setup) into the common layer path.
            let (tx, rx) = std::sync::mpsc::sync_channel(4);
            let ctx = Ctx {
                src: dir,
                what: "rootfs".into(),
            };
            let (unpacked, written) = std::thread::scope(|s| {
                let producer = s.spawn(move || {
                    write_rootfs_tar(
                        dir,
                        ChanWriter {
                            tx,
                            buf: Vec::new(),
                        },
                    )
                });
                let unpacked = self.import_layer(
                    &ctx,
                    Box::new(ChanReader {
                        rx,
                        chunk: Vec::new(),
                        pos: 0,
                    }),
                    Expect {
                        blob: None,
                        blob_size: None,
                        diff_id: Some(&digest),
                        max_unpacked: None,
                    },
                );
                (unpacked, producer.join())
            });
            match written {
                Err(_) => return Err(bad(dir, "rootfs reader panicked")),
                Ok(Err(e)) if e.kind() != io::ErrorKind::BrokenPipe || unpacked.is_ok() => {
                    return Err(bad(dir, format!("cannot read rootfs: {e}")));
                }
                Ok(_) => {}
            }
            unpacked?;
        }
        self.finish_image(digest.clone(), vec![digest], &ConfigDoc::default())
    }

    /// Decompresses a gzip-compressed source archive into `tmp/` so its members can be read
    /// by offset.
    fn stage_gunzip(&self, src: &Path) -> Result<TmpPath, ImageError> {
        let tmp = TmpPath {
            path: self.tmp_path("src")?,
            keep: false,
        };
        let input = File::open(src).map_err(|e| bad(src, format!("cannot open: {e}")))?;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp.path)
            .map_err(io_at(&tmp.path))?;
        let mut dec = MultiGzDecoder::new(BufReader::new(input));
        copy_split(
            &mut dec,
            &mut out,
            |e| bad(src, format!("bad gzip data: {e}")),
            &tmp.path,
        )?;
        Ok(tmp)
    }

    // ---- layers --------------------------------------------------------------------------

    /// Streams one layer blob: verifies the blob digest and the diff id, and unpacks it into
    /// `layers/` unless a layer with the expected diff id is already there.
    fn import_layer(
        &self,
        ctx: &Ctx,
        reader: Box<dyn Read + '_>,
        expect: Expect,
    ) -> Result<LayerOut, ImageError> {
        let mut raw = HashReader::new(reader);
        let mut magic = Vec::with_capacity(4);
        (&mut raw)
            .take(4)
            .read_to_end(&mut magic)
            .map_err(|e| ctx.bad(format!("cannot read: {e}")))?;
        let zstd = magic == ZSTD_MAGIC;
        let gzip = magic.starts_with(&[0x1f, 0x8b]);
        let head = io::Cursor::new(magic).chain(&mut raw);
        let decoded = if gzip {
            Decoded::Gzip(Box::new(MultiGzDecoder::new(head)))
        } else if zstd {
            Decoded::Zstd(Box::new(ZstdFrames::new(head)))
        } else {
            Decoded::Plain(head)
        };
        let mut diff = HashReader::new(Capped {
            inner: decoded,
            left: expect.max_unpacked,
        });
        let present = expect.diff_id.is_some_and(|d| self.layer_dir(d).is_dir());
        let tmp = if present {
            io::copy(&mut diff, &mut io::sink())
                .map_err(|e| ctx.bad(format!("cannot read: {e}")))?;
            None
        } else {
            let tmp = TmpPath {
                path: self.tmp_path("layer")?,
                keep: false,
            };
            fs::create_dir(&tmp.path).map_err(io_at(&tmp.path))?;
            fs::set_permissions(&tmp.path, fs::Permissions::from_mode(0o755))
                .map_err(io_at(&tmp.path))?;
            unpack(&mut diff, &tmp.path, ctx)?;
            // The tar end marker may be followed by padding; the digest covers all of it.
            io::copy(&mut diff, &mut io::sink())
                .map_err(|e| ctx.bad(format!("cannot read: {e}")))?;
            Some(tmp)
        };
        let (diff_id, unpacked) = diff.finish();
        io::copy(&mut raw, &mut io::sink()).map_err(|e| ctx.bad(format!("cannot read: {e}")))?;
        let (blob_digest, blob_size) = raw.finish();

        if let Some(expected) = expect.blob {
            if expected != blob_digest {
                return Err(ctx.bad(format!(
                    "blob digest mismatch: expected {expected}, content is {blob_digest}"
                )));
            }
        }
        if let Some(expected) = expect.blob_size {
            if expected != blob_size {
                return Err(ctx.bad(format!(
                    "blob size mismatch: expected {expected}, content is {blob_size} bytes"
                )));
            }
        }
        if let Some(expected) = expect.diff_id {
            if expected != diff_id {
                return Err(ctx.bad(format!(
                    "diff id mismatch: config says {expected}, uncompressed content is {diff_id}"
                )));
            }
        }
        if let Some(tmp) = tmp {
            self.commit_layer(tmp, &diff_id)?;
        } else {
            tracing::debug!(layer = %diff_id, "layer already present");
        }
        self.remember_blob(&blob_digest, &diff_id);
        Ok(LayerOut {
            diff_id,
            unpacked,
            blob_digest,
            blob_size,
            gzip,
        })
    }

    /// Makes an unpacked layer durable, then moves it into place atomically. If another import
    /// won the race, its copy is kept and ours discarded.
    fn commit_layer(&self, mut tmp: TmpPath, diff_id: &str) -> Result<(), ImageError> {
        let dst = self.layer_dir(diff_id);
        let dir = File::open(&tmp.path).map_err(io_at(&tmp.path))?;
        nix::unistd::syncfs(&dir).map_err(|e| ImageError::Io {
            path: tmp.path.clone(),
            source: e.into(),
        })?;
        drop(dir);
        let renamed = nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &tmp.path,
            nix::fcntl::AT_FDCWD,
            &dst,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        );
        match renamed {
            Ok(()) => tmp.keep = true,
            Err(Errno::EEXIST | Errno::ENOTEMPTY) => {
                tracing::debug!(layer = %diff_id, "layer unpacked concurrently; keeping the other copy");
            }
            Err(Errno::EINVAL | Errno::ENOSYS) => {
                // Filesystem without RENAME_NOREPLACE: plain rename fails on a non-empty
                // target, and replacing an empty one is harmless.
                if !dst.exists() {
                    fs::rename(&tmp.path, &dst).map_err(io_at(&dst))?;
                    tmp.keep = true;
                }
            }
            Err(e) => {
                return Err(ImageError::Io {
                    path: dst,
                    source: e.into(),
                })
            }
        }
        let layers = self.root.join("layers");
        File::open(&layers)
            .and_then(|d| d.sync_all())
            .map_err(io_at(&layers))?;
        Ok(())
    }

    fn finish_image(
        &self,
        digest: String,
        layers: Vec<String>,
        config: &ConfigDoc,
    ) -> Result<ImportedImage, ImageError> {
        let mut seen = HashSet::new();
        let mut unique: Vec<String> = layers
            .into_iter()
            .rev()
            .filter(|l| seen.insert(l.clone()))
            .collect();
        unique.reverse();
        let mut size = 0;
        for layer in &unique {
            let dir = self.layer_dir(layer);
            size += tree_size(&dir).map_err(io_at(&dir))?;
        }
        let c = config.config.clone().unwrap_or_default();
        Ok(ImportedImage {
            digest,
            layers: unique,
            size,
            command: c.command(),
            env: c.env.unwrap_or_default(),
        })
    }

    // ---- store plumbing ------------------------------------------------------------------

    fn lock(&self, arg: FlockArg) -> Result<Flock<File>, ImageError> {
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_at(&path))?;
        Flock::lock(file, arg).map_err(|(_, e)| ImageError::Io {
            path,
            source: e.into(),
        })
    }

    fn tmp_path(&self, prefix: &str) -> Result<PathBuf, ImageError> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).map_err(|e| ImageError::Io {
            path: self.root.join("tmp"),
            source: io::Error::other(e.to_string()),
        })?;
        Ok(self
            .root
            .join("tmp")
            .join(format!("{prefix}-{}", hex(&bytes))))
    }

    fn blob_path_unchecked(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.root.join("blobs").join("sha256").join(hex)
    }

    fn read_store_blob(&self, digest: &str) -> Result<Option<Vec<u8>>, ImageError> {
        if parse_digest(digest).is_err() {
            return Ok(None);
        }
        let path = self.blob_path_unchecked(digest);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::Io { path, source: e }),
        }
    }

    fn write_blob(&self, bytes: &[u8]) -> Result<String, ImageError> {
        let digest = sha256_digest(bytes);
        let path = self.blob_path_unchecked(&digest);
        if path.is_file() {
            return Ok(digest);
        }
        let tmp = TmpPath {
            path: self.tmp_path("blob")?,
            keep: false,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp.path)
            .map_err(io_at(&tmp.path))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(io_at(&tmp.path))?;
        fs::rename(&tmp.path, &path).map_err(io_at(&path))?;
        Ok(digest)
    }
}

/// An archive being uploaded into the store's `tmp/`; removed when dropped.
pub struct Upload {
    store: ImageStore,
    tmp: TmpPath,
    file: File,
    written: u64,
    _lock: Flock<File>,
}

impl Upload {
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        self.file.write_all(bytes).map_err(io_at(&self.tmp.path))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Imports the uploaded archive (a tar or gzip tar: OCI layout or docker save); the staged
    /// file is removed whatever the outcome.
    pub fn finish(self) -> Result<ImportedImage, ImageError> {
        self.file.sync_all().map_err(io_at(&self.tmp.path))?;
        if fs::metadata(&self.tmp.path)
            .map_err(io_at(&self.tmp.path))?
            .len()
            == 0
        {
            return Err(bad(Path::new("upload"), "the uploaded archive is empty"));
        }
        let out = self.store.import(&self.tmp.path);
        // Name the upload, not our staging file, in messages.
        out.map_err(|e| match e {
            ImageError::BadSource { why, .. } => ImageError::BadSource {
                path: PathBuf::from("upload"),
                why,
            },
            other => other,
        })
    }
}

// ---- source access ---------------------------------------------------------------------------

/// Where the members of an OCI layout or docker save live: a directory, or an uncompressed tar
/// indexed by member name so each blob is read in place (by offset) without extracting.
enum Source {
    Dir(PathBuf),
    Tar(TarIndex),
}

struct TarIndex {
    file: PathBuf,
    members: HashMap<String, Member>,
}

enum Member {
    Data {
        offset: u64,
        size: u64,
    },
    /// Target relative to the link's directory.
    Symlink(String),
    /// Target relative to the archive root.
    Hardlink(String),
}

impl TarIndex {
    fn build(src: &Path, tar_path: &Path) -> Result<Self, ImageError> {
        let file = File::open(tar_path).map_err(|e| bad(src, format!("cannot open: {e}")))?;
        let mut archive = tar::Archive::new(BufReader::new(file));
        let mut members = HashMap::new();
        let entries = archive
            .entries_with_seek()
            .map_err(|e| bad(src, format!("corrupt tar archive: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| bad(src, format!("corrupt tar archive: {e}")))?;
            let Ok(name) = std::str::from_utf8(&entry.path_bytes()).map(str::to_string) else {
                continue;
            };
            let Some(name) = norm_join("", &name) else {
                continue;
            };
            let kind = entry.header().entry_type();
            let link = || {
                entry
                    .link_name_bytes()
                    .and_then(|b| String::from_utf8(b.into_owned()).ok())
            };
            let member = match kind {
                tar::EntryType::Regular | tar::EntryType::Continuous => Member::Data {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                },
                tar::EntryType::Symlink => match link() {
                    Some(t) => Member::Symlink(t),
                    None => continue,
                },
                tar::EntryType::Link => match link() {
                    Some(t) => Member::Hardlink(t),
                    None => continue,
                },
                _ => continue,
            };
            members.insert(name, member);
        }
        Ok(Self {
            file: tar_path.to_path_buf(),
            members,
        })
    }

    /// Offset and size of a member's data, following links inside the archive.
    fn lookup(&self, name: &str) -> Option<(u64, u64)> {
        let mut cur = norm_join("", name)?;
        for _ in 0..16 {
            match self.members.get(&cur)? {
                Member::Data { offset, size } => return Some((*offset, *size)),
                Member::Hardlink(target) => cur = norm_join("", target)?,
                Member::Symlink(target) => {
                    if target.starts_with('/') {
                        return None;
                    }
                    let parent = cur.rsplit_once('/').map_or("", |(p, _)| p).to_string();
                    cur = norm_join(&parent, target)?;
                }
            }
        }
        None
    }
}

impl Source {
    fn exists(&self, name: &str) -> bool {
        match self {
            Source::Dir(root) => safe_rel(name).is_some_and(|rel| root.join(rel).is_file()),
            Source::Tar(index) => index.lookup(name).is_some(),
        }
    }

    fn open(&self, src: &Path, name: &str) -> Result<Box<dyn Read + '_>, ImageError> {
        match self {
            Source::Dir(root) => {
                let rel = safe_rel(name)
                    .ok_or_else(|| bad(src, format!("{name}: path escapes the source")))?;
                let path = root.join(rel);
                let file = File::open(&path).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => bad(src, format!("{name}: missing")),
                    _ => bad(src, format!("{name}: cannot open: {e}")),
                })?;
                if !file.metadata().is_ok_and(|m| m.is_file()) {
                    return Err(bad(src, format!("{name}: not a regular file")));
                }
                Ok(Box::new(BufReader::with_capacity(1 << 16, file)))
            }
            Source::Tar(index) => {
                let (offset, size) = index
                    .lookup(name)
                    .ok_or_else(|| bad(src, format!("{name}: missing from archive")))?;
                let mut file =
                    File::open(&index.file).map_err(|e| bad(src, format!("cannot open: {e}")))?;
                file.seek(SeekFrom::Start(offset))
                    .map_err(|e| bad(src, format!("cannot read: {e}")))?;
                Ok(Box::new(BufReader::with_capacity(1 << 16, file.take(size))))
            }
        }
    }

    fn read_json(&self, src: &Path, name: &str) -> Result<Vec<u8>, ImageError> {
        let mut bytes = Vec::new();
        self.open(src, name)?
            .take(MAX_JSON + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(src, format!("{name}: cannot read: {e}")))?;
        if bytes.len() as u64 > MAX_JSON {
            return Err(bad(src, format!("{name}: larger than {MAX_JSON} bytes")));
        }
        Ok(bytes)
    }
}

#[derive(PartialEq, Debug)]
enum Magic {
    Tar,
    Gzip,
    Zstd,
    Other,
}

fn sniff(path: &Path) -> Result<Magic, ImageError> {
    let file = File::open(path).map_err(|e| bad(path, format!("cannot open: {e}")))?;
    let mut head = Vec::with_capacity(512);
    file.take(512)
        .read_to_end(&mut head)
        .map_err(|e| bad(path, format!("cannot read: {e}")))?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Magic::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Magic::Zstd
    } else if head.len() == 512 && &head[257..262] == b"ustar" {
        Magic::Tar
    } else {
        Magic::Other
    })
}

/// Reads a JSON blob named by a descriptor and checks its digest and size.
fn read_verified_json(
    source: &Source,
    src: &Path,
    desc: &Descriptor,
) -> Result<Vec<u8>, ImageError> {
    let name = blob_name(&desc.digest).map_err(|why| bad(src, why))?;
    let bytes = source.read_json(src, &name)?;
    let actual = sha256_digest(&bytes);
    if actual != desc.digest {
        return Err(bad(
            src,
            format!("{name}: digest mismatch: content is {actual}"),
        ));
    }
    if desc.size.is_some_and(|s| s != bytes.len() as u64) {
        return Err(bad(
            src,
            format!(
                "{name}: size mismatch: descriptor says {:?}, content is {} bytes",
                desc.size,
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// Picks the manifest to import from an index: linux on the host architecture, else the first
/// non-attestation manifest, among those whose blob the source holds.
fn select_manifest(
    descs: &[Descriptor],
    source: &Source,
    src: &Path,
    what: &str,
) -> Result<Descriptor, ImageError> {
    if descs.is_empty() {
        return Err(bad(src, format!("{what} lists no manifests")));
    }
    let present: Vec<&Descriptor> = descs
        .iter()
        .filter(|d| blob_name(&d.digest).is_ok_and(|n| source.exists(&n)))
        .collect();
    let arch = host_arch();
    let host = present.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == arch)
    });
    let usable = present.iter().find(|d| {
        let attestation = d
            .annotations
            .get("vnd.docker.reference.type")
            .is_some_and(|t| t == "attestation-manifest")
            || d.platform
                .as_ref()
                .is_some_and(|p| p.architecture == "unknown");
        !attestation
    });
    match host.or(usable).or(present.first()) {
        Some(d) => Ok((*d).clone()),
        None => Err(bad(
            src,
            format!("{what}: none of the listed manifests is in the source"),
        )),
    }
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

fn config_diff_ids(
    config: &ConfigDoc,
    layers: usize,
    src: &Path,
) -> Result<Vec<String>, ImageError> {
    let diff_ids = config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    if diff_ids.is_empty() {
        return Ok(diff_ids);
    }
    if diff_ids.len() != layers {
        return Err(bad(
            src,
            format!(
                "config lists {} diff ids for {layers} layers",
                diff_ids.len()
            ),
        ));
    }
    for d in &diff_ids {
        parse_digest(d).map_err(|why| bad(src, format!("config diff id: {why}")))?;
    }
    Ok(diff_ids)
}

// ---- unpacking -------------------------------------------------------------------------------

struct Ctx<'a> {
    src: &'a Path,
    what: String,
}

impl Ctx<'_> {
    fn bad(&self, why: impl Display) -> ImageError {
        ImageError::BadSource {
            path: self.src.to_path_buf(),
            why: format!("{}: {why}", self.what),
        }
    }
}

struct Expect<'a> {
    blob: Option<&'a str>,
    blob_size: Option<u64>,
    diff_id: Option<&'a str>,
    /// Most uncompressed bytes this layer may have (a pull's remaining image budget).
    max_unpacked: Option<u64>,
}

/// A reader that fails once more than `left` bytes came through (decompression bombs).
struct Capped<R> {
    inner: R,
    left: Option<u64>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(left) = self.left else {
            return self.inner.read(buf);
        };
        let want = buf
            .len()
            .min(usize::try_from(left.saturating_add(1)).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the layers unpack to more than this daemon accepts for one image (registry.max_image_size)",
            ));
        }
        self.left = Some(left - n as u64);
        Ok(n)
    }
}

struct LayerOut {
    diff_id: String,
    /// Uncompressed bytes.
    unpacked: u64,
    blob_digest: String,
    blob_size: u64,
    gzip: bool,
}

/// Metadata of one tar entry, in the form we apply it.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn unpack<R: Read>(reader: R, root: &Path, ctx: &Ctx) -> Result<(), ImageError> {
    let mut archive = tar::Archive::new(reader);
    let mut unpacker = Unpacker {
        root,
        ctx,
        dir_times: Vec::new(),
    };
    let entries = archive
        .entries()
        .map_err(|e| ctx.bad(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ctx.bad(format!("corrupt tar: {e}")))?;
        unpacker.entry(&mut entry)?;
    }
    // Directory mtimes last: creating entries inside a directory changes its mtime.
    for (path, mtime) in &unpacker.dir_times {
        set_mtime(path, *mtime).map_err(io_at(path))?;
    }
    Ok(())
}

struct Unpacker<'a> {
    root: &'a Path,
    ctx: &'a Ctx<'a>,
    dir_times: Vec<(PathBuf, i64)>,
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let kind = e.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let raw = e.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let bad = |why: &dyn Display| self.ctx.bad(format!("entry {shown:?}: {why}"));
        let rel = clean_rel(&raw).map_err(|why| bad(&why))?;
        let meta = entry_meta(e).map_err(|why| bad(&why))?;
        let is_dir =
            kind.is_dir() || (matches!(kind, tar::EntryType::Regular) && raw.ends_with(b"/"));

        let Some(name) = rel.file_name().map(|n| n.as_bytes().to_vec()) else {
            // The layer root itself ("./").
            if !is_dir {
                return Err(bad(&"the layer root must be a directory"));
            }
            self.apply_meta(self.root, &meta, false)?;
            self.dir_times.push((self.root.to_path_buf(), meta.mtime));
            return Ok(());
        };
        let parent = self.make_dirs(rel.parent().unwrap_or(Path::new("")), &shown)?;
        if name.starts_with(WHITEOUT_PREFIX) {
            return self.whiteout(&parent, &name, &meta, &shown);
        }
        let full = parent.join(OsStr::from_bytes(&name));

        if is_dir {
            remove_existing(&full, true)?;
            match fs::create_dir(&full) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(io_at(&full)(err)),
            }
            self.apply_meta(&full, &meta, false)?;
            self.dir_times.push((full, meta.mtime));
            return Ok(());
        }
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                remove_existing(&full, false)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&full)
                    .map_err(io_at(&full))?;
                copy_split(
                    e,
                    &mut file,
                    |err| bad(&format!("cannot read: {err}")),
                    &full,
                )?;
                drop(file);
                self.apply_meta(&full, &meta, false)?;
                set_mtime(&full, meta.mtime).map_err(io_at(&full))?;
            }
            tar::EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| bad(&"symlink without a target"))?;
                remove_existing(&full, false)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &full)
                    .map_err(io_at(&full))?;
                self.apply_meta(&full, &meta, true)?;
                set_mtime(&full, meta.mtime).map_err(io_at(&full))?;
            }
            tar::EntryType::Link => {
                let target = e
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .ok_or_else(|| bad(&"hard link without a target"))?;
                let target_rel =
                    clean_rel(&target).map_err(|why| bad(&format!("link target: {why}")))?;
                let target_full = self.existing_file(&target_rel).map_err(|why| {
                    bad(&format!(
                        "link target {:?}: {why}",
                        String::from_utf8_lossy(&target)
                    ))
                })?;
                if target_full == full {
                    return Ok(());
                }
                remove_existing(&full, false)?;
                fs::hard_link(&target_full, &full).map_err(io_at(&full))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let (sflag, dev) = match kind {
                    tar::EntryType::Fifo => (SFlag::S_IFIFO, 0),
                    _ => {
                        let h = e.header();
                        let major = h.device_major().ok().flatten().unwrap_or(0);
                        let minor = h.device_minor().ok().flatten().unwrap_or(0);
                        let sflag = if kind == tar::EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        (
                            sflag,
                            nix::sys::stat::makedev(u64::from(major), u64::from(minor)),
                        )
                    }
                };
                remove_existing(&full, false)?;
                nix::sys::stat::mknod(&full, sflag, Mode::from_bits_truncate(0o600), dev).map_err(
                    |err| ImageError::Io {
                        path: full.clone(),
                        source: err.into(),
                    },
                )?;
                self.apply_meta(&full, &meta, false)?;
                set_mtime(&full, meta.mtime).map_err(io_at(&full))?;
            }
            other => return Err(bad(&format!("unsupported entry type {other:?}"))),
        }
        Ok(())
    }

    /// OCI whiteouts in overlayfs form.
    fn whiteout(
        &self,
        dir: &Path,
        name: &[u8],
        meta: &Meta,
        shown: &str,
    ) -> Result<(), ImageError> {
        if name == WHITEOUT_OPAQUE {
            return set_xattr(dir, OPAQUE_XATTR, b"y").map_err(io_at(dir));
        }
        if name.starts_with(WHITEOUT_META_PREFIX) {
            // aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): nothing to do for overlayfs.
            return Ok(());
        }
        let hidden = &name[WHITEOUT_PREFIX.len()..];
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(self.ctx.bad(format!("entry {shown:?}: invalid whiteout")));
        }
        let full = dir.join(OsStr::from_bytes(hidden));
        remove_existing(&full, false)?;
        nix::sys::stat::mknod(&full, SFlag::S_IFCHR, Mode::empty(), 0).map_err(|err| {
            ImageError::Io {
                path: full.clone(),
                source: err.into(),
            }
        })?;
        std::os::unix::fs::lchown(&full, Some(meta.uid), Some(meta.gid)).map_err(io_at(&full))?;
        set_mtime(&full, meta.mtime).map_err(io_at(&full))
    }

    /// Creates the directories of `rel` under the root as needed (0755, root-owned until an
    /// entry for them sets their metadata); refuses to go through anything but a directory.
    fn make_dirs(&self, rel: &Path, shown: &str) -> Result<PathBuf, ImageError> {
        let mut cur = self.root.to_path_buf();
        for comp in rel.components() {
            cur.push(comp);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(self.ctx.bad(format!(
                        "entry {shown:?}: parent {} is not a directory (symlinks in entry paths are not followed)",
                        comp.as_os_str().to_string_lossy()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&cur).map_err(io_at(&cur))?;
                    fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                        .map_err(io_at(&cur))?;
                }
                Err(e) => return Err(io_at(&cur)(e)),
            }
        }
        Ok(cur)
    }

    /// The path of a non-directory already unpacked in this layer, reached through real
    /// directories only.
    fn existing_file(&self, rel: &Path) -> Result<PathBuf, String> {
        let mut cur = self.root.to_path_buf();
        let count = rel.components().count();
        if count == 0 {
            return Err("empty".into());
        }
        for (i, comp) in rel.components().enumerate() {
            cur.push(comp);
            let m = fs::symlink_metadata(&cur).map_err(|_| "not in the layer".to_string())?;
            let last = i + 1 == count;
            if last && m.is_dir() {
                return Err("is a directory".into());
            }
            if !last && !m.is_dir() {
                return Err("path goes through a non-directory".into());
            }
        }
        Ok(cur)
    }

    /// Ownership, then mode (chown clears setuid), then xattrs (chown clears capabilities).
    fn apply_meta(&self, path: &Path, meta: &Meta, symlink: bool) -> Result<(), ImageError> {
        std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid)).map_err(io_at(path))?;
        if !symlink {
            fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))
                .map_err(io_at(path))?;
        }
        for (name, value) in &meta.xattrs {
            if symlink && name.starts_with(b"user.") {
                continue; // the kernel refuses user.* xattrs on symlinks
            }
            match set_xattr(path, name, value) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    tracing::warn!(path = %path.display(), xattr = %String::from_utf8_lossy(name), "filesystem does not support this xattr; dropped");
                }
                Err(e) => return Err(io_at(path)(e)),
            }
        }
        Ok(())
    }
}

fn entry_meta<R: Read>(e: &mut tar::Entry<'_, R>) -> Result<Meta, String> {
    let h = e.header();
    let mode = h.mode().map_err(|e| format!("bad mode: {e}"))? & 0o7777;
    let uid = h.uid().map_err(|e| format!("bad uid: {e}"))?;
    let gid = h.gid().map_err(|e| format!("bad gid: {e}"))?;
    let uid = u32::try_from(uid).map_err(|_| format!("uid {uid} too large"))?;
    let gid = u32::try_from(gid).map_err(|_| format!("gid {gid} too large"))?;
    let mut mtime = h
        .mtime()
        .ok()
        .and_then(|m| i64::try_from(m).ok())
        .unwrap_or(0);
    let mut xattrs = Vec::new();
    if let Some(exts) = e
        .pax_extensions()
        .map_err(|e| format!("bad pax header: {e}"))?
    {
        for ext in exts {
            let ext = ext.map_err(|e| format!("bad pax header: {e}"))?;
            let key = ext.key_bytes();
            if key == b"mtime" {
                let value = String::from_utf8_lossy(ext.value_bytes()).into_owned();
                if let Some(secs) = value.split('.').next().and_then(|s| s.parse::<i64>().ok()) {
                    mtime = secs;
                }
            } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                if !name.starts_with(OVERLAY_XATTR_PREFIX) {
                    xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
    })
}

/// An entry path as a relative path below the layer root; refuses absolute paths and `..`.
fn clean_rel(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    let mut out = PathBuf::new();
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path escapes the layer (`..`)".into()),
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    Ok(out)
}

/// Removes whatever is at `path` (not following symlinks), except a directory when
/// `keep_dir` (a repeated directory entry merges).
fn remove_existing(path: &Path, keep_dir: bool) -> Result<(), ImageError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            if keep_dir {
                Ok(())
            } else {
                fs::remove_dir_all(path).map_err(io_at(path))
            }
        }
        Ok(_) => fs::remove_file(path).map_err(io_at(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(path)(e)),
    }
}

/// Copies a stream, telling read errors (the source's fault) from write errors (ours).
/// Runs of zeros are skipped, not written: the file gets holes there. A GNU sparse tar entry
/// (a few KiB of archive for a file of terabytes) is read back as its full size with zeros in
/// the holes; writing those would fill the disk with bytes the unpack cap (which counts the
/// archive's bytes) never saw. Only bytes that came from the archive take space.
fn copy_split(
    reader: &mut dyn Read,
    out: &mut File,
    read_err: impl Fn(io::Error) -> ImageError,
    out_path: &Path,
) -> Result<(), ImageError> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 16];
    let mut pos: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        if buf[..n].iter().any(|&b| b != 0) {
            out.write_all_at(&buf[..n], pos).map_err(io_at(out_path))?;
        }
        pos += n as u64;
    }
    // A trailing hole: the file still has its full length.
    out.set_len(pos).map_err(io_at(out_path))
}

fn set_mtime(path: &Path, secs: i64) -> io::Result<()> {
    #[allow(clippy::unnecessary_cast)] // time_t is i64 on the 64-bit targets we build for
    let ts = nix::sys::time::TimeSpec::new(secs as libc::time_t, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

fn set_xattr(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())?;
    let name = CString::new(name)?;
    // SAFETY: `path` and `name` are NUL-terminated and live across the call; `value` is valid
    // for reads of `value.len()` bytes; lsetxattr does not keep any pointer.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The xattrs of `path` (not following symlinks), sorted by name, without overlay metadata.
fn list_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `cpath` is NUL-terminated; a null buffer of size 0 only asks for the length.
    let len = unsafe { libc::llistxattr(cpath.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Ok(Vec::new()),
            _ => Err(err),
        };
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    let mut names = vec![0u8; len as usize];
    // SAFETY: `names` is valid for writes of `names.len()` bytes; `cpath` is NUL-terminated.
    let len = unsafe { libc::llistxattr(cpath.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    names.truncate(len as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(OVERLAY_XATTR_PREFIX) {
            continue;
        }
        let cname = CString::new(name)?;
        // SAFETY: both strings are NUL-terminated; a null buffer of size 0 asks for the length.
        let size =
            unsafe { libc::lgetxattr(cpath.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut value = vec![0u8; size as usize];
        // SAFETY: `value` is valid for writes of `value.len()` bytes; strings NUL-terminated.
        let size = unsafe {
            libc::lgetxattr(
                cpath.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        value.truncate(size as usize);
        out.push((name.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

// ---- rootfs directories ------------------------------------------------------------------------

/// Writes the deterministic tar stream of a rootfs directory (see the module docs).
fn write_rootfs_tar<W: Write>(dir: &Path, out: W) -> io::Result<()> {
    let mut builder = tar::Builder::new(out);
    let root = fs::symlink_metadata(dir)?;
    if !root.is_dir() {
        return Err(io::Error::other("not a directory"));
    }
    let mut header = base_header(&root);
    header.set_entry_type(tar::EntryType::Directory);
    append_xattrs(&mut builder, dir)?;
    builder.append_data(&mut header, "./", io::empty())?;
    let mut links = HashMap::new();
    walk_rootfs(&mut builder, dir, Path::new(""), &mut links)?;
    let mut out = builder.into_inner()?;
    out.flush()
}

fn walk_rootfs<W: Write>(
    builder: &mut tar::Builder<W>,
    abs: &Path,
    rel: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    let mut names = fs::read_dir(abs)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<Vec<OsString>>>()?;
    names.sort();
    for name in names {
        let a = abs.join(&name);
        let r = rel.join(&name);
        let m = fs::symlink_metadata(&a)?;
        let ft = m.file_type();
        if ft.is_socket() {
            tracing::debug!(path = %a.display(), "socket skipped in rootfs import");
            continue;
        }
        let mut header = base_header(&m);
        if ft.is_file() && m.nlink() > 1 {
            if let Some(first) = links.get(&(m.dev(), m.ino())) {
                header.set_entry_type(tar::EntryType::Link);
                builder.append_link(&mut header, &r, first)?;
                continue;
            }
            links.insert((m.dev(), m.ino()), r.clone());
        }
        append_xattrs(builder, &a)?;
        if ft.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            builder.append_data(&mut header, &r, io::empty())?;
            walk_rootfs(builder, &a, &r, links)?;
        } else if ft.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(m.len());
            let file = File::open(&a)?;
            builder.append_data(
                &mut header,
                &r,
                Exact {
                    inner: file,
                    left: m.len(),
                },
            )?;
        } else if ft.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            let target = fs::read_link(&a)?;
            builder.append_link(&mut header, &r, target)?;
        } else {
            let kind = if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            };
            header.set_entry_type(kind);
            if kind != tar::EntryType::Fifo {
                let major = u32::try_from(nix::sys::stat::major(m.rdev()))
                    .map_err(|_| io::Error::other("device major too large"))?;
                let minor = u32::try_from(nix::sys::stat::minor(m.rdev()))
                    .map_err(|_| io::Error::other("device minor too large"))?;
                header.set_device_major(major)?;
                header.set_device_minor(minor)?;
            }
            builder.append_data(&mut header, &r, io::empty())?;
        }
    }
    Ok(())
}

fn base_header(m: &fs::Metadata) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_mode(m.mode() & 0o7777);
    header.set_uid(u64::from(m.uid()));
    header.set_gid(u64::from(m.gid()));
    header.set_mtime(u64::try_from(m.mtime()).unwrap_or(0));
    header.set_size(0);
    header
}

/// Emits a PAX header carrying the xattrs of `path` for the entry that follows, if any.
fn append_xattrs<W: Write>(builder: &mut tar::Builder<W>, path: &Path) -> io::Result<()> {
    let xattrs = list_xattrs(path)?;
    if xattrs.is_empty() {
        return Ok(());
    }
    let mut data = Vec::new();
    for (name, value) in &xattrs {
        let mut key = b"SCHILY.xattr.".to_vec();
        key.extend_from_slice(name);
        data.extend_from_slice(&pax_record(&key, value));
    }
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::XHeader);
    header.set_path("././@PaxHeader")?;
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_mtime(0);
    header.set_cksum();
    builder.append(&header, data.as_slice())
}

/// One PAX record, `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut out = format!("{len} ").into_bytes();
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

/// Reads exactly `left` bytes: a file that shrinks while we archive it is an error, not a
/// corrupt archive.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let max = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while reading",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

// ---- hashing and small helpers ---------------------------------------------------------------

struct HashReader<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> HashReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    fn finish(self) -> (String, u64) {
        (format!("sha256:{}", hex(&self.hasher.finalize())), self.len)
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

#[derive(Default)]
struct HashWriter {
    hasher: Sha256,
}

impl HashWriter {
    fn digest(self) -> String {
        format!("sha256:{}", hex(&self.hasher.finalize()))
    }
}

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Decoded<R: Read> {
    Plain(R),
    Gzip(Box<MultiGzDecoder<R>>),
    Zstd(Box<ZstdFrames<R>>),
}

impl<R: Read> Read for Decoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoded::Plain(r) => r.read(buf),
            Decoded::Gzip(r) => r.read(buf),
            Decoded::Zstd(r) => r.read(buf),
        }
    }
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// A zstd stream of one or more frames (zstd writers may emit several, like multi-member
/// gzip), decoded by `ruzstd` (pure Rust: no C library to build).
struct ZstdFrames<R: Read> {
    /// The decoder of the current frame; `None` between frames.
    frame: Option<
        ruzstd::decoding::StreamingDecoder<io::BufReader<R>, ruzstd::decoding::FrameDecoder>,
    >,
    /// The source between frames.
    source: Option<io::BufReader<R>>,
}

impl<R: Read> ZstdFrames<R> {
    fn new(inner: R) -> Self {
        Self {
            frame: None,
            source: Some(io::BufReader::with_capacity(1 << 16, inner)),
        }
    }
}

impl<R: Read> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use io::BufRead;
        loop {
            if let Some(frame) = &mut self.frame {
                let n = frame
                    .read(buf)
                    .map_err(|e| io::Error::new(e.kind(), format!("zstd: {e}")))?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
                let done = self.frame.take().map(|f| f.into_inner());
                self.source = done;
                continue;
            }
            let Some(mut source) = self.source.take() else {
                return Ok(0);
            };
            if source.fill_buf()?.is_empty() {
                return Ok(0);
            }
            let frame = ruzstd::decoding::StreamingDecoder::new(source)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}")))?;
            self.frame = Some(frame);
        }
    }
}

const CHUNK: usize = 1 << 16;

/// The writing half of an in-process byte stream between two threads.
struct ChanWriter {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChanWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "reader went away"))
    }
}

impl Write for ChanWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// The reading half; end of stream when the writer is dropped.
struct ChanReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChanReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A path in `tmp/` removed on drop unless `keep` is set.
struct TmpPath {
    path: PathBuf,
    keep: bool,
}

impl Drop for TmpPath {
    fn drop(&mut self) {
        if !self.keep {
            let _ = remove_any(&self.path);
        }
    }
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Apparent size of the regular files under `path`, each inode counted once.
fn tree_size(path: &Path) -> io::Result<u64> {
    let mut total = 0;
    let mut seen = HashSet::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = fs::symlink_metadata(&p)?;
        if m.is_dir() {
            for entry in fs::read_dir(&p)? {
                stack.push(entry?.path());
            }
        } else if m.is_file() && (m.nlink() == 1 || seen.insert((m.dev(), m.ino()))) {
            total += m.len();
        }
    }
    Ok(total)
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// The hex part of a `sha256:<64 lower-case hex>` digest.
fn parse_digest(digest: &str) -> Result<&str, String> {
    let Some((alg, hex)) = digest.split_once(':') else {
        return Err(format!("bad digest {digest:?}"));
    };
    if alg != "sha256" {
        return Err(format!("unsupported digest algorithm {alg:?}"));
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!("bad digest {digest:?}"));
    }
    Ok(hex)
}

/// The member name of a blob in an OCI layout.
fn blob_name(digest: &str) -> Result<String, String> {
    Ok(format!("blobs/sha256/{}", parse_digest(digest)?))
}

/// The digest a docker-save member name promises: `blobs/sha256/<hex>` (docker >= 25) or
/// `<hex>.json` (legacy config).
fn digest_from_name(name: &str) -> Option<String> {
    let name = norm_join("", name)?;
    let hex = name
        .strip_prefix("blobs/sha256/")
        .or_else(|| name.strip_suffix(".json").filter(|h| !h.contains('/')))?;
    let digest = format!("sha256:{hex}");
    parse_digest(&digest).ok()?;
    Some(digest)
}

/// Joins `rel` to `base` (both `/`-separated, relative), resolving `.` and `..`; `None` when
/// the result would leave the root or `rel` is absolute.
fn norm_join(base: &str, rel: &str) -> Option<String> {
    if rel.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = base
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    for p in rel.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// A member name as a relative path that stays inside the source directory.
fn safe_rel(name: &str) -> Option<PathBuf> {
    if name.starts_with('/') || name.split('/').any(|p| p == "..") {
        return None;
    }
    let rel = norm_join("", name)?;
    (!rel.is_empty()).then(|| PathBuf::from(rel))
}

fn bad(path: &Path, why: impl Into<String>) -> ImageError {
    ImageError::BadSource {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---- JSON documents --------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    #[allow(dead_code)]
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

/// An image manifest or an image index (both parse; which one it is decides the path).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigDoc {
    #[serde(default)]
    config: Option<ContainerConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

impl ContainerConfig {
    fn command(&self) -> Vec<String> {
        let mut command = self.entrypoint.clone().unwrap_or_default();
        command.extend(self.cmd.clone().unwrap_or_default());
        command
    }
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

/// The canonical OCI manifest synthesised for a legacy `docker save`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ManifestOut {
    schema_version: u32,
    media_type: &'static str,
    config: DescOut,
    layers: Vec<DescOut>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DescOut {
    media_type: &'static str,
    digest: String,
    size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;

    const MTIME: u64 = 1_600_000_000;

    /// Builds a layer tar with explicit metadata.
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Self {
            Layer(tar::Builder::new(Vec::new()))
        }

        fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(gid);
            h.set_mtime(MTIME);
            h.set_size(0);
            h
        }

        fn dir(self, path: &str, mode: u32) -> Self {
            self.dir_owned(path, mode, 0, 0)
        }

        fn dir_owned(mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Self {
            let mut h = Self::header(tar::EntryType::Directory, mode, uid, gid);
            self.0.append_data(&mut h, path, io::empty()).unwrap();
            self
        }

        fn file(mut self, path: &str, data: &[u8], mode: u32) -> Self {
            let mut h = Self::header(tar::EntryType::Regular, mode, 0, 0);
            h.set_size(data.len() as u64);
            self.0.append_data(&mut h, path, data).unwrap();
            self
        }

        fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
            let mut h = Self::header(kind, 0o777, 0, 0);
            self.0.append_link(&mut h, path, target).unwrap();
            self
        }

        fn chardev(mut self, path: &str, major: u32, minor: u32) -> Self {
            let mut h = Self::header(tar::EntryType::Char, 0o666, 0, 0);
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
            self.0.append_data(&mut h, path, io::empty()).unwrap();
            self
        }

        /// An entry whose name (and link name) bypass the tar crate's path checks.
        fn raw(mut self, kind: tar::EntryType, name: &[u8], link: &[u8]) -> Self {
            let mut h = Self::header(kind, 0o644, 0, 0);
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
            gnu.linkname[..link.len()].copy_from_slice(link);
            h.set_cksum();
            self.0.append(&h, io::empty()).unwrap();
            self
        }

        fn build(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn layer1() -> Vec<u8> {
        Layer::new()
            .dir("etc", 0o755)
            .file("etc/passwd", b"root:x:0:0\n", 0o644)
            .dir("bin", 0o755)
            .file("bin/sh", b"#!sh", 0o755)
            .file("bin/su", b"su", 0o4755)
            .link(tar::EntryType::Symlink, "bin/bash", "sh")
            .link(tar::EntryType::Link, "bin/sh2", "bin/sh")
            .dir("dev", 0o755)
            .chardev("dev/null", 1, 3)
            .dir("data", 0o755)
            .file("data/old.txt", b"old", 0o644)
            .dir_owned("home/user", 0o700, 1000, 1000)
            .build()
    }

    fn layer2() -> Vec<u8> {
        Layer::new()
            .file("etc/.wh.passwd", b"", 0o644)
            .dir("data", 0o755)
            .file("data/.wh..wh..opq", b"", 0o644)
            .file("data/new.txt", b"new", 0o644)
            .build()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn put_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
        let digest = sha256_digest(bytes);
        let dir = layout.join("blobs").join("sha256");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(parse_digest(&digest).unwrap()), bytes).unwrap();
        (digest, bytes.len())
    }

    struct Built {
        manifest: String,
        manifest_size: usize,
        diff_ids: Vec<String>,
    }

    /// Writes layers (gzip), config and manifest blobs into an OCI layout; no index.
    fn make_image(
        layout: &Path,
        layers: &[Vec<u8>],
        cmd: &[&str],
        diff_ids: Option<Vec<String>>,
    ) -> Built {
        let real: Vec<String> = layers.iter().map(|l| sha256_digest(l)).collect();
        let mut descs = Vec::new();
        for l in layers {
            let (digest, size) = put_blob(layout, &gzip(l));
            descs.push(json!({"mediaType": MEDIA_LAYER_GZIP, "digest": digest, "size": size}));
        }
        let config = json!({
            "architecture": host_arch(),
            "os": "linux",
            "config": {
                "Entrypoint": ["/bin/sh"],
                "Cmd": cmd,
                "Env": ["PATH=/bin", "A=b"],
                "WorkingDir": "/work",
                "User": "1000",
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids.unwrap_or_else(|| real.clone())},
        });
        let (config_digest, config_size) = put_blob(layout, &serde_json::to_vec(&config).unwrap());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": config_size},
            "layers": descs,
        });
        let (manifest, manifest_size) = put_blob(layout, &serde_json::to_vec(&manifest).unwrap());
        Built {
            manifest,
            manifest_size,
            diff_ids: real,
        }
    }

    fn write_index(layout: &Path, manifests: serde_json::Value) {
        fs::create_dir_all(layout).unwrap();
        fs::write(
            layout.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let index =
            json!({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": manifests});
        fs::write(
            layout.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }

    /// A one-image OCI layout; returns what was built.
    fn oci_layout(layout: &Path, layers: &[Vec<u8>], diff_ids: Option<Vec<String>>) -> Built {
        let built = make_image(layout, layers, &["-c", "echo hi"], diff_ids);
        write_index(
            layout,
            json!([{"mediaType": MEDIA_OCI_MANIFEST, "digest": built.manifest, "size": built.manifest_size}]),
        );
        built
    }

    fn tar_dir(dir: &Path) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        b.follow_symlinks(false);
        b.append_dir_all(".", dir).unwrap();
        b.into_inner().unwrap()
    }

    fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let p = CString::new(path.as_os_str().as_bytes()).unwrap();
        let n = CString::new(name).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: both strings are NUL-terminated; `buf` is valid for writes of its length.
        let len =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        (len >= 0).then(|| buf[..len as usize].to_vec())
    }

    fn store(t: &TempDir) -> ImageStore {
        ImageStore::open(t.path().join("store")).unwrap()
    }

    fn is_empty_dir(path: &Path) -> bool {
        fs::read_dir(path).unwrap().next().is_none()
    }

    fn bad_source(err: ImageError) -> String {
        match err {
            ImageError::BadSource { why, .. } => why,
            other => panic!("expected BadSource, got {other}"),
        }
    }

    #[test]
    fn open_creates_layout() {
        let t = TempDir::new().unwrap();
        let s = store(&t);
        for d in ["blobs/sha256", "layers", "tmp"] {
            assert!(s.root.join(d).is_dir(), "{d}");
        }
        assert_eq!(
            s.layer_dir("sha256:ab"),
            t.path().join("store/layers/sha256-ab")
        );
    }

    #[test]
    fn oci_layout_dir_unpacks_with_overlay_whiteouts() {
        let t = TempDir::new().unwrap();
        let s = store(&t);
        let src = t.path().join("oci");
        let built = oci_layout(&src, &[layer1(), layer2()], None);
        let img = s.import(&src).unwrap();
        assert_eq!(img.digest, built.manifest);
        assert_eq!(img.layers, built.diff_ids);
        assert_eq!(img.command, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(img.env, ["PATH=/bin", "A=b"]);
        assert_eq!(img.size, 11 + 4 + 2 + 3 + 3);

        let l1 = s.layer_dir(&img.layers[0]);
        let su = fs::metadata(l1.join("bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o4755, "setuid kept");
        assert_eq!(fs::read_link(l1.join("bin/bash")).unwrap(), Path::new("sh"));
        assert_eq!(
            fs::metadata(l1.join("bin/sh2")).unwrap().ino(),
            fs::metadata(l1.join("bin/sh")).unwrap().ino()
        );
        let null = fs::metadata(l1.join("dev/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
        assert_eq!(null.mode() & 0o777, 0o666);
        let home = fs::metadata(l1.join("home/user")).unwrap();
        assert_eq!(
            (home.uid(), home.gid(), home.mode() & 0o7777),
            (1000, 1000, 0o700)
        );
        assert_eq!(fs::metadata(l1.join("home")).unwrap().mode() & 0o777, 0o755);
        assert_eq!(
            fs::metadata(l1.join("etc/passwd")).unwrap().mtime(),
            MTIME as i64
        );
        assert_eq!(fs::metadata(l1.join("etc")).unwrap().mtime(), MTIME as i64);

        let l2 = s.layer_dir(&img.layers[1]);
        let wh = fs::symlink_metadata(l2.join("etc/passwd")).unwrap();
        assert!(wh.file_type().is_char_device());
        assert_eq!(wh.rdev(), 0);
        assert!(!l2.join("etc/.wh.passwd").exists());
        assert!(!l2.join("data/.wh..wh..opq").exists());
        assert_eq!(
            get_xattr(&l2.join("data"), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(fs::read(l2.join("data/new.txt")).unwrap(), b"new");
        assert!(is_empty_dir(&s.root.join("tmp")));

        let config = s.config(&img.digest).unwrap().unwrap();
        assert_eq!(config.working_dir.as_deref(), Some("/work"));
        assert_eq!(config.user.as_deref(), Some("1000"));
        assert_eq!(config.command, img.command);

        // The kernel agrees: mount the two layers and look.
        let mnt = TempDir::new().unwrap();
        let opts = format!("lowerdir={}:{}", l2.display(), l1.display());
        if let Err(e) = nix::mount::mount(
            Some("overlay"),
            mnt.path(),
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(opts.as_str()),
        ) {
            crate::testfx::prerequisite_missing(&format!("an overlay mount ({e})"));
            return;
        }
        let seen = (
            mnt.path().join("etc/passwd").exists(),
            mnt.path().join("data/old.txt").exists(),
            mnt.path().join("data/new.txt").exists(),
            mnt.path().join("bin/su").exists(),
        );
        nix::mount::umount(mnt.path()).unwrap();
        assert_eq!(seen, (false, false, true, true));
    }

    #[test]
    fn oci_tarball_with_nested_index_picks_host_platform() {
        let t = TempDir::new().unwrap();
        let s = store(&t);
        let layout = t.path().join("oci");
        let host = make_image(&layout, &[layer1(), layer2()], &["host"], None);
        let other = make_image(&layout, &[layer1()], &["other"], None);
        let foreign = if host_arch() == "riscv64" {
            "s390x"
        } else {
            "riscv64"
        };
        let index = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_INDEX,
            "manifests": [
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": other.manifest, "size": other.manifest_size,
                 "platform": {"os": "linux", "architecture": foreign}},
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": host.manifest, "size": host.manifest_size,
                 "platform": {"os": "linux", "architecture": host_arch()}},
            ],
        });
        let index_bytes = serde_json::to_vec(&index).unwrap();
        let (index_digest, index_size) = put_blob(&layout, &index_bytes);
        write_index(
            &layout,
            json!([{"mediaType": MEDIA_OCI_INDEX, "digest": index_digest, "size": index_size}]),
        );
        let tarball = t.path().join("image.tar");
        fs::write(&tarball, tar_dir(&layout)).unwrap();
        let img = s.import(&tarball).unwrap();
        assert_eq!(img.digest, host.manifest);
        assert_eq!(img.layers, host.diff_ids);
        assert_eq!(img.command, ["/bin/sh", "host"]);
        let l2 = s.layer_dir(&img.layers[1]);
        assert!(fs::symlink_metadata(l2.join("etc/passwd"))
            .unwrap()
            .file_type()
            .is_char_device());

        // Same archive, gzip-compressed and with a misleading name.
        let gz = t.path().join("image.json");
        fs::write(&gz, gzip(&tar_dir(&layout))).unwrap();
        assert_eq!(s.import(&gz).unwrap(), img);
        assert!(is_empty_dir(&s.root.join("tmp")));
    }

    #[test]
    fn docker_save_tarball_imports_and_shares_layers() {
        let t = TempDir::new().unwrap();
        let s = store(&t);
        let oci = t.path().join("oci");
        let built = oci_layout(&oci, &[layer1(), layer2()], None);
        let from_oci = s.import(&oci).unwrap();
        let ino = fs::metadata(s.layer_dir(&from_oci.layers[0]))
            .unwrap()
            .ino();

        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["X=1"], "WorkingDir": "/srv"},
            "rootfs": {"type": "layers", "diff_ids": built.diff_ids},
        });
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config_name = format!(
            "{}.json",
            parse_digest(&sha256_digest(&config_bytes)).unwrap()
        );
        let manifest = json!([{
            "Config": config_name,
            "RepoTags": ["demo:latest"],
            "Layers": ["aaaa/layer.tar", "bbbb/layer.tar"],
        }]);
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = Layer::header(tar::EntryType::Regular, 0o644, 0, 0);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        };
        add("real/layer.tar", &layer1());
        add("bbbb/layer.tar", &gzip(&layer2())); // gzip although named .tar
        add(&config_name, &config_bytes);
        add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
        let mut h = Layer::header(tar::EntryType::Symlink, 0o777, 0, 0);
        b.append_link(&mut h, "aaaa/layer.tar", "../real/layer.tar")
            .unwrap();
        let tarball = t.path().join("save.tar");
        fs::write(&tarball, b.into_inner().unwrap()).unwrap();

        let img = s.import(&tarball).unwrap();
        assert_eq!(img.layers, built.diff_ids);
        assert_eq!(img.command, ["/bin/sh"]);
        assert_eq!(img.env, ["X=1"]);
        assert_eq!(img.size, from_oci.size);
        assert_ne!(img.digest, from_oci.digest);
        let stored = fs::read(s.blob_path_unchecked(&img.digest)).unwrap();
        assert_eq!(sha256_digest(&stored), img.digest);
        let manifest: ManifestDoc = serde_json::from_slice(&stored).unwrap();
        assert_eq!(manifest.layers.len(), 2);
        assert_eq!(manifest.layers[1].digest, sha256_digest(&gzip(&layer2())));
        assert_eq!(
            s.config(&img.digest)
                .unwrap()
                .unwrap()
                .working_dir
                .as_deref(),
            Some("/srv")
        );
        assert_eq!(
            fs::metadata(s.layer_dir(&img.layers[0])).unwrap().ino(),
            ino,
            "layer shared, not unpacked again"
        );
        // Importing the same archive again gives the same synthesised digest.
        assert_eq!(s.import(&tarball).unwrap().digest, img.digest);
    }

    #[test]
    fn rootfs_dir_becomes_one_deterministic_layer() {
        let t = TempDir::new().unwrap();
        let s = store(&t);
        let root = t.path().join("rootfs");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("run")).unwrap();
        fs::create_dir_all(root.join("dev")).unwrap();
        fs::write(root.join("bin/tool"), b"tool").unwrap();
        fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o4750)).unwrap();
        fs::write(root.join("etc/conf"), b"conf").unwrap();
        std::os::unix::fs::chown(root.join("etc/conf"), Some(1234), Some(5678)).unwrap();
        fs::hard_link(root.join("etc/conf"), root.join("etc/conf2")).unwrap();
        symlink("bin/tool", root.join("link")).unwrap();
        nix::sys::stat::mknod(
            &root.join("run/fifo"),
            SFlag::S_IFIFO,
            Mode::from_bits_truncate(0o644),
            0,
        )
        .unwrap();
        nix::sys::stat::mknod(
            &root.join("dev/zero"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 5),
        )
        .unwrap();
        let xattr_ok = set_xattr(&root.join("etc/conf"), b"user.gpuvisor", b"yes").is_ok();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o751)).unwrap();

        let img = s.import(&root).unwrap();
        assert_eq!(img.layers, std::slice::from_ref(&img.digest));
        assert!(img.command.is_empty() && img.env.is_empty());
        assert_eq!(img.size, 8);
        assert_eq!(s.config(&img.digest).unwrap(), None);
        let l = s.layer_dir(&img.digest);
        assert_eq!(fs::metadata(&l).unwrap().mode() & 0o7777, 0o751);
        assert_eq!(
            fs::metadata(l.join("bin/tool")).unwrap().mode() & 0o7777,
            0o4750
        );
        let conf = fs::metadata(l.join("etc/conf")).unwrap();
        assert_eq!((conf.uid(), conf.gid()), (1234, 5678));
        assert_eq!(conf.ino(), fs::metadata(l.join("etc/conf2")).unwrap().ino());
        assert_eq!(
            fs::read_link(l.join("link")).unwrap(),
            Path::new("bin/tool")
        );
        assert!(fs::metadata(l.join("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert_eq!(
            fs::metadata(l.join("dev/zero")).unwrap().rdev(),
            nix::sys::stat::makedev(1, 5)
        );
        if xattr_ok {
            assert_eq!(
                get_xattr(&l.join("etc/conf"), "user.gpuvisor").as_deref(),
                Some(&b"yes"[..])
            );
        }
        assert_eq!(
            fs::metadata(root.join("bin/tool")).unwrap().mtime(),
            fs::metadata(l.join("bin/tool")).unwrap().mtime()
        );

        let ino = fs::metadata(&l).unwrap().ino();
        let again = s.import(&root).unwrap();
        assert_eq!(again, img);
        assert_eq!(fs::metadata(&l).unwrap().ino(), ino, "not unpacked again");
        assert!(is_empty_dir(&s.root.join("tmp")));

        fs::write(root.join("etc/conf"), b"changed").unwrap();
        let changed = s.import(&root).unwrap();
        assert_ne!(changed.digest, img.digest);
    }

    #[test]
    fn reimport_reuses_unpacked_layers() {
        let t = TempDir::new().unwrap();
        let s = store(&t);
        let src = t.path().join("oci");
        oci_layout(&src, &[layer1(), layer2()], None);
        let first = s.import(&src).unwrap();
        let stamp = |d: &str| {
            let m = fs::metadata(s.layer_dir(d)).unwrap();
            (m.ino(), m.mtime(), m.mtime_nsec(), m.ctime_nsec())
        };
        let before: Vec<_> = first.layers.iter().map(|l| stamp(l)).collect();
        assert_eq!(s.import(&src).unwrap(), first);
        let tarball = t.path().join("oci.tar");
        fs::write(&tarball, tar_dir(&src)).unwrap();
        assert_eq!(s.import(&tarball).unwrap(), first);
        let after: Vec<_> = first.layers.iter().map(|l| stamp(l)).collect();
        assert_eq!(before, after);
        assert_eq!(fs::read_dir(s.root.join("layers")).unwrap().count(), 2);
    }

    #[test]
    fn repeated_layer_keeps_topmost_occurrence() {
        let t = TempDir::new().unwrap();
        let s = store(&t);
        let src = t.path().join("oci");
        let built = oci_layout(&src, &[layer1(), layer2(), layer1()], None);
        let img = s.import(&src).unwrap();
        assert_eq!(
            img.layers,
            [built.diff_ids[1].clone(), built.diff_ids[0].clone()]
        );
    }

    #[test]
    fn digest_mismatches_are_refused() {
        let t = TempDir::new().unwrap();
        let s = store(&t);

        // A layer blob whose content does not match its descriptor.
        let src = t.path().join("corrupt");
        let built = oci_layout(&src, &[layer1(), layer2()], None);
        let blob = src
            .join("blobs/sha256")
            .join(parse_digest(&sha256_digest(&gzip(&layer2()))).unwrap());
        fs::write(&blob, gzip(&Layer::new().file("x", b"evil", 0o644).build())).unwrap();
        let why = bad_source(s.import(&src).unwrap_err());
        assert!(why.contains("blob digest mismatch"), "{why}");
        assert!(!s.layer_dir(&built.diff_ids[1]).exists());
        assert!(is_empty_dir(&s.root.join("tmp")));

        // A config whose diff ids lie about the uncompressed content.
        let src = t.path().join("liar");
        let wrong = sha256_digest(b"something else");
        let built = oci_layout(&src, &[layer2()], Some(vec![wrong]));
        let why = bad_source(s.import(&src).unwrap_err());
        assert!(why.contains("diff id mismatch"), "{why}");
        assert!(!s.layer_dir(&built.diff_ids[0]).exists());
        assert!(is_empty_dir(&s.root.join("tmp")));

        // A tampered config blob.
        let src = t.path().join("tampered");
        oci_layout(&src, &[layer2()], None);
        let manifest_desc: serde_json::Value =
            serde_json::from_slice(&fs::read(src.join("index.json")).unwrap()).unwrap();
        let manifest_digest = manifest_desc["manifests"][0]["digest"].as_str().unwrap();
        let manifest: ManifestDoc = serde_json::from_slice(
            &fs::read(
                src.join("blobs/sha256")
                    .join(parse_digest(manifest_digest).unwrap()),
            )
            .unwrap(),
        )
        .unwrap();
        let config_digest = manifest.config.unwrap().digest;
        let config_path = src
            .join("blobs/sha256")
            .join(parse_digest(&config_digest).unwrap());
        let mut bytes = fs::read(&config_path).unwrap();
        bytes.push(b' ');
        fs::write(&config_path, bytes).unwrap();
        let why = bad_source(s.import(&src).unwrap_err());
        assert!(why.contains("digest mismatch"), "{why}");
    }

    #[test]
    fn escaping_entries_are_refused() {
        let t = TempDir::new().unwrap();
        let s = store(&t);
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let outside_str = outside.to_str().unwrap().to_string();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "dotdot",
                Layer::new()
                    .raw(tar::EntryType::Regular, b"a/../../evil", b"")
                    .build(),
            ),
            (
                "absolute",
                Layer::new()
                    .raw(tar::EntryType::Regular, b"/abs", b"")
                    .build(),
            ),
            (
                "through symlink",
                Layer::new()
                    .link(tar::EntryType::Symlink, "lnk", &outside_str)
                    .file("lnk/pwned", b"x", 0o644)
                    .build(),
            ),
            (
                "hardlink dotdot",
                Layer::new()
                    .raw(tar::EntryType::Link, b"h", b"../../outside/x")
                    .build(),
            ),
            (
                "hardlink absolute",
                Layer::new()
                    .raw(tar::EntryType::Link, b"h", b"/etc/passwd")
                    .build(),
            ),
            (
                "whiteout through symlink",
                Layer::new()
                    .link(tar::EntryType::Symlink, "lnk", &outside_str)
                    .file("lnk/.wh.victim", b"", 0o644)
                    .build(),
            ),
        ];
        for (what, layer) in cases {
            let src = t.path().join(what.replace(' ', "-"));
            let built = oci_layout(&src, &[layer], None);
            let why = bad_source(s.import(&src).unwrap_err());
            assert!(why.contains("entry"), "{what}: {why}");
            assert!(!s.layer_dir(&built.diff_ids[0]).exists(), "{what}");
        }
        assert!(is_empty_dir(&outside));
        assert!(!t.path().join("evil").exists());
        assert!(is_empty_dir(&s.root.join("layers")));
        assert!(is_empty_dir(&s.root.join("tmp")));
    }

    /// A symlink in one layer and an entry "through" it in the next: each layer is unpacked
    /// into its own directory, so the second layer makes a real directory (which hides the link
    /// in the overlay, as in Docker) and nothing is written where the link points.
    #[test]
    fn entry_through_a_lower_layers_symlink_stays_in_its_layer() {
        let t = TempDir::new().unwrap();
        let s = store(&t);
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let l1 = Layer::new()
            .link(tar::EntryType::Symlink, "a", outside.to_str().unwrap())
            .build();
        let l2 = Layer::new().file("a/x", b"x", 0o644).build();
        let src = t.path().join("src");
        oci_layout(&src, &[l1, l2], None);
        let img = s.import(&src).unwrap();
        assert!(is_empty_dir(&outside));
        let top = s.layer_dir(&img.layers[1]);
        assert!(fs::symlink_metadata(top.join("a")).unwrap().is_dir());
        assert_eq!(fs::read(top.join("a/x")).unwrap(), b"x");
        let bottom = s.layer_dir(&img.layers[0]);
        assert!(fs::symlink_metadata(bottom.join("a")).unwrap().is_symlink());
    }

    /// The store's root is private: layers hold setuid files and device nodes as images bring
    /// them, and no other host user may reach those.
    #[test]
    fn store_is_private() {
        let t = TempDir::new().unwrap();
        let root = t.path().join("images");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let _s = ImageStore::open(&root).unwrap();
        assert_eq!(fs::metadata(&root).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn unknown_sources_are_refused() {
        let t = TempDir::new().unwrap();
        let s = store(&t);
        let why = bad_source(s.import(&t.path().join("nope")).unwrap_err());
        assert!(why.contains("cannot read source"), "{why}");

        let junk = t.path().join("junk.tar");
        fs::write(&junk, b"definitely not a tar archive").unwrap();
        let why = bad_source(s.import(&junk).unwrap_err());
        assert!(why.contains("not a directory or a tar archive"), "{why}");

        let no_index = t.path().join("no-index");
        fs::create_dir(&no_index).unwrap();
        fs::write(no_index.join("oci-layout"), b"{}").unwrap();
        let why = bad_source(s.import(&no_index).unwrap_err());
        assert!(why.contains("missing index.json"), "{why}");

        let other_tar = t.path().join("other.tar");
        fs::write(
            &other_tar,
            Layer::new().file("hello.txt", b"hi", 0o644).build(),
        )
        .unwrap();
        let why = bad_source(s.import(&other_tar).unwrap_err());
        assert!(why.contains("neither an OCI layout"), "{why}");

        let zstd = t.path().join("oci-zstd");
        let built = oci_layout(&zstd, &[layer2()], None);
        let manifest: serde_json::Value = serde_json::from_slice(
            &fs::read(
                zstd.join("blobs/sha256")
                    .join(parse_digest(&built.manifest).unwrap()),
            )
            .unwrap(),
        )
        .unwrap();
        let layer_blob = manifest["layers"][0]["digest"].as_str().unwrap();
        fs::write(
            zstd.join("blobs/sha256")
                .join(parse_digest(layer_blob).unwrap()),
            [0x28, 0xb5, 0x2f, 0xfd, 0, 0],
        )
        .unwrap();
        let why = bad_source(s.import(&zstd).unwrap_err());
        assert!(why.contains("zstd"), "{why}");
    }

    #[test]
    fn gc_removes_what_is_not_kept() {
        let t = TempDir::new().unwrap();
        let s = store(&t);
        let src = t.path().join("oci");
        oci_layout(&src, &[layer1(), layer2()], None);
        let oci = s.import(&src).unwrap();
        let root = t.path().join("rootfs");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("file"), b"0123456789").unwrap();
        let rootfs = s.import(&root).unwrap();
        fs::write(s.root.join("tmp").join("layer-stale"), b"left by a crash").unwrap();

        assert_eq!(
            s.gc(&[oci.digest.clone(), rootfs.digest.clone()]).unwrap(),
            15
        );
        assert!(s.layer_dir(&rootfs.digest).is_dir());

        // An image digest keeps its layers and blobs.
        assert_eq!(s.gc(std::slice::from_ref(&oci.digest)).unwrap(), 10);
        assert!(!s.layer_dir(&rootfs.digest).exists());
        for l in &oci.layers {
            assert!(s.layer_dir(l).is_dir());
        }
        assert!(s.config(&oci.digest).unwrap().is_some());

        // Layer digests alone keep layers but not the image's blobs.
        let freed = s.gc(&oci.layers).unwrap();
        assert!(freed > 0);
        assert!(s.config(&oci.digest).unwrap().is_none());
        assert!(s.layer_dir(&oci.layers[0]).is_dir());

        assert_eq!(s.gc(&[]).unwrap(), oci.size);
        assert!(is_empty_dir(&s.root.join("layers")));
        assert!(is_empty_dir(&s.root.join("blobs/sha256")));
        assert!(is_empty_dir(&s.root.join("tmp")));
    }

    #[test]
    fn pax_records_count_their_own_length() {
        assert_eq!(pax_record(b"k", b"v"), b"6 k=v\n");
        let r = pax_record(b"SCHILY.xattr.user.x", &[b'a'; 90]);
        let len: usize = std::str::from_utf8(&r[..r.iter().position(|b| *b == b' ').unwrap()])
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, r.len());
    }
}

#[cfg(test)]
mod sparse_tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::process::Command;

    /// Review 10: a GNU sparse entry (a few KiB of tar for a huge file) must not be written out
    /// as its full size of zeros: holes stay holes.
    #[test]
    fn a_sparse_tar_entry_unpacks_sparse() {
        let t = tempfile::TempDir::new().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        let size: u64 = 1 << 30;
        let f = File::create(src.join("f")).unwrap();
        f.set_len(size).unwrap();
        // A little data in the middle: the file is not all hole.
        f.write_all_at(b"data", 1 << 20).unwrap();
        drop(f);
        let tar_path = t.path().join("x.tar");
        let out = Command::new("tar")
            .arg("-cSf")
            .arg(&tar_path)
            .arg("-C")
            .arg(&src)
            .arg("f")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let layer = fs::read(&tar_path).unwrap();
        assert!(layer.len() < 1 << 20, "tar -S made {} bytes", layer.len());
        let s = ImageStore::open(t.path().join("store")).unwrap();
        let oci = t.path().join("oci");
        let digest = sha256_digest(&layer);
        let blobs = oci.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let put = |bytes: &[u8]| {
            let d = sha256_digest(bytes);
            fs::write(blobs.join(parse_digest(&d).unwrap()), bytes).unwrap();
            (d, bytes.len())
        };
        let (ld, ls) = put(&layer);
        let config = serde_json::json!({
            "architecture": host_arch(), "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [digest]},
        });
        let (cd, cs) = put(&serde_json::to_vec(&config).unwrap());
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": cd, "size": cs},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}],
        });
        let (md, ms) = put(&serde_json::to_vec(&manifest).unwrap());
        fs::write(oci.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX,
            "manifests": [{"mediaType": MEDIA_OCI_MANIFEST, "digest": md, "size": ms}]});
        fs::write(oci.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        let img = s.import(&oci).unwrap();
        let unpacked = s.layer_dir(&img.layers[0]).join("f");
        let m = fs::metadata(&unpacked).unwrap();
        assert_eq!(m.len(), size);
        let mut buf = [0u8; 4];
        File::open(&unpacked)
            .unwrap()
            .read_exact_at(&mut buf, 1 << 20)
            .unwrap();
        assert_eq!(&buf, b"data");
        assert!(
            m.blocks() * 512 < 16 << 20,
            "a {size}-byte sparse file took {} bytes on disk",
            m.blocks() * 512
        );
    }
}
