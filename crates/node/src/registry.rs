//! Pulling images from OCI distribution registries, and sealing the credentials used for it.
//!
//! Why here: a pull writes to the host (downloads under `<data>/images/pull`, layers through
//! [`ImageStore`]), so it is node work; the engine decides who may pull what and with whose
//! credentials.
//!
//! Key decisions:
//! - **The registry client is `oci-client`** (reqwest + rustls on ring). One client per pull, so
//!   the tokens it caches for one tenant's credentials are never seen by another tenant's pull.
//! - **Downloads are ours to resume**: a layer blob is streamed to `pull/partial/<hex>` and
//!   continued with an HTTP Range request from the bytes already there, after a lost
//!   connection or a daemon restart. A complete blob is hashed whole and compared with its
//!   descriptor's digest (and size) before it is renamed to `pull/blobs/sha256/<hex>`; a blob
//!   that does not match is deleted, never kept for a resume.
//! - **One download per blob**: pulls in this process take a per-digest lock; the second pull
//!   of a layer waits and then finds the finished blob (or the unpacked layer).
//! - **Layers already unpacked are not downloaded again** when the store verified earlier that
//!   this blob digest unpacks to the diff id the config names, and the registry answers a HEAD
//!   for the blob with the puller's credentials (so a tenant cannot claim a layer it cannot
//!   read from the registry).
//! - **Index resolution**: a manifest list or OCI index is resolved to `linux/<host arch>`;
//!   the chosen manifest's digest is checked against the index entry.
//! - **Credentials at rest** are sealed with ChaCha20-Poly1305 under a 256-bit key in
//!   `<data>/keys/registry.key` (0600, in a 0700 directory, made at first use); the
//!   additional data binds each sealed secret to its tenant and host, so a row copied to
//!   another tenant does not open.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::image::{ImageError, ImageStore, ImportedImage};

#[derive(Debug, Error)]
pub enum RegistryError {
    /// The reference does not parse.
    #[error("{0}")]
    BadReference(String),
    /// The registry refused the credentials (or asks for some).
    #[error("{0}")]
    Unauthorized(String),
    /// No such repository, tag or manifest.
    #[error("{0}")]
    NotFound(String),
    /// Unreachable, cut off, or answering errors.
    #[error("{0}")]
    Unavailable(String),
    /// What the registry served is wrong (digest mismatch, no manifest for this platform, ...).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{path}: {why}")]
    Io { path: PathBuf, why: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |e| RegistryError::Io {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

/// Operator settings for registry access.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Registries (`host[:port]`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Extra CA certificates (PEM) trusted for registry TLS.
    pub ca_file: Option<PathBuf>,
}

/// A username and password for one registry.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// What a pull reports as it goes.
#[derive(Debug, Clone)]
pub enum PullEvent {
    /// The chosen manifest: its digest and its layers (blob digest, compressed size).
    Resolved {
        digest: String,
        layers: Vec<(String, u64)>,
    },
    /// Bytes of layer `index` on disk so far (resumed bytes included).
    Bytes { index: usize, done: u64 },
    /// Layer `index` needs no download: finished by another pull or already unpacked.
    Present { index: usize },
    /// All blobs are here; unpacking.
    Unpacking,
}

/// A parsed image reference, as the registry client understands it.
pub fn parse_reference(reference: &str) -> Result<Reference, RegistryError> {
    reference.parse::<Reference>().map_err(|e| {
        RegistryError::BadReference(format!("{reference:?} is not an image reference: {e}"))
    })
}

/// The registry host a reference names (`docker.io` for short Docker Hub names).
pub fn reference_host(reference: &str) -> Result<String, RegistryError> {
    Ok(parse_reference(reference)?.registry().to_string())
}

const MEDIA_INDEX: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MEDIA_MANIFEST: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
/// Largest manifest or config we accept.
const MAX_JSON: usize = 16 << 20;

/// Pulls images into an [`ImageStore`]; one per daemon.
pub struct Puller {
    root: PathBuf,
    cfg: RegistryConfig,
    /// Per blob digest: held while that blob is being fetched.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pulls running; complete blobs are removed when the last one ends (under this lock, so
    /// a pull starting meanwhile waits for the cleanup instead of losing its blobs to it).
    active: Arc<Mutex<usize>>,
}

struct ActiveGuard {
    active: Arc<Mutex<usize>>,
    blobs: PathBuf,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut n = self.active.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            // The layers are unpacked (or the pulls failed); the compressed copies are not
            // needed any more. Partial downloads stay for a resume.
            if let Ok(entries) = fs::read_dir(&self.blobs) {
                for e in entries.flatten() {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

impl Puller {
    pub fn new(images: &ImageStore, cfg: RegistryConfig) -> Self {
        Self {
            root: images.root().join("pull"),
            cfg,
            inflight: Mutex::new(HashMap::new()),
            active: Arc::new(Mutex::new(0)),
        }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }

    fn client(&self) -> Result<Client, RegistryError> {
        // reqwest is built without a default crypto provider: ours is ring (no aws-lc build; it
        // lacks the post-quantum key exchange, which registries do not need). Installing it
        // twice is harmless (the second call reports the first one).
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut extra = Vec::new();
        if let Some(ca) = &self.cfg.ca_file {
            let data = fs::read(ca).map_err(|e| RegistryError::Io {
                path: ca.clone(),
                why: format!("cannot read the registry CA file: {e}"),
            })?;
            extra.push(oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data,
            });
        }
        let protocol = if self.cfg.insecure.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(self.cfg.insecure.clone())
        };
        Ok(Client::new(ClientConfig {
            protocol,
            extra_root_certificates: extra,
            platform_resolver: None,
            connect_timeout: Some(std::time::Duration::from_secs(15)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            user_agent: concat!("gpuvisor/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        }))
    }

    /// Pulls `reference` into `images` and returns what was imported. `report` sees progress.
    pub async fn pull(
        &self,
        node: &Arc<crate::Node>,
        reference: &str,
        creds: Option<&Credentials>,
        report: &(dyn Fn(PullEvent) + Send + Sync),
    ) -> Result<ImportedImage, RegistryError> {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        let _guard = ActiveGuard {
            active: self.active.clone(),
            blobs: self.root.join("blobs").join("sha256"),
        };
        let r = parse_reference(reference)?;
        let auth = match creds {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let client = self.client()?;
        let host = r.registry().to_string();
        let ctx = Ctx {
            reference,
            host: &host,
        };

        // The manifest, through an index if there is one.
        let mut accept: Vec<&str> = MEDIA_MANIFEST.to_vec();
        accept.extend(MEDIA_INDEX);
        let (bytes, digest) = client
            .pull_manifest_raw(&r, &auth, &accept)
            .await
            .map_err(|e| ctx.err("fetching the manifest", e))?;
        let (manifest, digest) = if is_index(&bytes) {
            let chosen = select_platform(&bytes, reference)?;
            let by_digest = r.clone_with_digest(chosen.clone());
            let (bytes, got) = client
                .pull_manifest_raw(&by_digest, &auth, MEDIA_MANIFEST)
                .await
                .map_err(|e| ctx.err("fetching the platform manifest", e))?;
            let actual = sha256_hex(&bytes);
            if actual != chosen || got != chosen {
                return Err(RegistryError::Invalid(format!(
                    "{reference}: manifest digest mismatch: the index names {chosen}, the registry served {actual}"
                )));
            }
            (bytes, chosen)
        } else {
            (bytes, digest)
        };
        if manifest.len() > MAX_JSON {
            return Err(RegistryError::Invalid(format!(
                "{reference}: manifest larger than {MAX_JSON} bytes"
            )));
        }
        let doc: ManifestDoc = serde_json::from_slice(&manifest).map_err(|e| {
            RegistryError::Invalid(format!("{reference}: bad manifest {digest}: {e}"))
        })?;
        let Some(config) = doc.config else {
            return Err(RegistryError::Invalid(format!(
                "{reference}: manifest {digest} is not an image manifest (schema 1 and artifacts are not supported)"
            )));
        };
        report(PullEvent::Resolved {
            digest: digest.clone(),
            layers: doc
                .layers
                .iter()
                .map(|l| (l.digest.clone(), l.size.max(0) as u64))
                .collect(),
        });

        // The config first (small; it names the diff ids that let us skip known layers).
        let noop = |_: u64| {};
        self.fetch_blob(&client, &r, &ctx, &config, &noop).await?;
        let config_path = self.blob_path(&config.digest)?;
        let config_bytes = fs::read(&config_path).map_err(io_err(&config_path))?;
        let diff_ids: Vec<String> = serde_json::from_slice::<ConfigDoc>(&config_bytes)
            .ok()
            .and_then(|c| c.rootfs)
            .map(|r| r.diff_ids)
            .unwrap_or_default();

        let mut known = HashSet::new();
        let store = &node.images;
        let mut work = Vec::new();
        for (i, layer) in doc.layers.iter().enumerate() {
            let reusable = diff_ids.get(i).is_some_and(|want| {
                store.known_blob(&layer.digest).as_deref() == Some(want.as_str())
                    && store.layer_dir(want).is_dir()
            });
            if reusable
                && client
                    .blob_exists(&r, &layer.digest)
                    .await
                    .map_err(|e| ctx.err("checking a layer", e))?
            {
                known.insert(layer.digest.clone());
                report(PullEvent::Present { index: i });
                continue;
            }
            work.push((i, layer.clone()));
        }
        // Up to three layers at a time.
        let results: Vec<Result<(), RegistryError>> = futures_util::stream::iter(work)
            .map(|(i, layer)| {
                let client = &client;
                let r = &r;
                let ctx = &ctx;
                async move {
                    let progress = move |done: u64| report(PullEvent::Bytes { index: i, done });
                    let fetched = self.fetch_blob(client, r, ctx, &layer, &progress).await?;
                    if !fetched {
                        report(PullEvent::Present { index: i });
                    }
                    Ok(())
                }
            })
            .buffer_unordered(3)
            .collect()
            .await;
        for r in results {
            r?;
        }

        report(PullEvent::Unpacking);
        let node = node.clone();
        let dir = self.root.clone();
        let shown = PathBuf::from(reference);
        tokio::task::spawn_blocking(move || {
            node.images
                .import_fetched(&dir, &shown, &digest, &manifest, &known)
        })
        .await
        .map_err(|e| RegistryError::Unavailable(format!("unpacking task failed: {e}")))?
        .map_err(RegistryError::from)
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, RegistryError> {
        Ok(self.root.join("blobs").join("sha256").join(hex_of(digest)?))
    }

    /// Makes sure the verified blob is in `pull/blobs`; returns whether this call downloaded
    /// (part of) it.
    async fn fetch_blob(
        &self,
        client: &Client,
        r: &Reference,
        ctx: &Ctx<'_>,
        desc: &OciDescriptor,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<bool, RegistryError> {
        let hex = hex_of(&desc.digest)?;
        let lock = {
            let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(desc.digest.clone()).or_default().clone()
        };
        let _held = lock.lock().await;
        let done = self.blob_path(&desc.digest)?;
        if done.is_file() {
            return Ok(false);
        }
        let size = u64::try_from(desc.size).unwrap_or(0);
        let partial = self.root.join("partial").join(&hex);
        let mut have = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if have > size {
            fs::remove_file(&partial).map_err(io_err(&partial))?;
            have = 0;
        }
        if have < size || size == 0 {
            let resp = client
                .pull_blob_stream_partial(r, desc, have, None)
                .await
                .map_err(|e| ctx.err(&format!("fetching blob {}", desc.digest), e))?;
            let (mut stream, append) = match resp {
                oci_client::client::BlobResponse::Full(s) => (s.stream, false),
                oci_client::client::BlobResponse::Partial(s) => (s.stream, have > 0),
            };
            if !append {
                have = 0;
            }
            let mut file = OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .mode(0o600)
                .open(&partial)
                .map_err(io_err(&partial))?;
            progress(have);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    RegistryError::Unavailable(format!(
                        "{}: lost the connection to {} while downloading blob {} ({have} of {size} bytes; kept: pull again to resume): {e}",
                        ctx.reference, ctx.host, desc.digest
                    ))
                })?;
                have += chunk.len() as u64;
                if size > 0 && have > size {
                    drop(file);
                    let _ = fs::remove_file(&partial);
                    return Err(RegistryError::Invalid(format!(
                        "{}: blob {} is larger than its descriptor's {size} bytes: refused",
                        ctx.reference, desc.digest
                    )));
                }
                file.write_all(&chunk).map_err(io_err(&partial))?;
                progress(have);
            }
            file.sync_all().map_err(io_err(&partial))?;
        }
        // Verify the whole file, resumed parts included.
        let path = partial.clone();
        let (digest, len) = tokio::task::spawn_blocking(move || hash_file(&path))
            .await
            .map_err(|e| RegistryError::Unavailable(format!("hashing task failed: {e}")))??;
        if digest != desc.digest || (size > 0 && len != size) {
            let _ = fs::remove_file(&partial);
            if len < size && digest != desc.digest {
                return Err(RegistryError::Unavailable(format!(
                    "{}: the download of blob {} ended early ({len} of {size} bytes): pull again",
                    ctx.reference, desc.digest
                )));
            }
            return Err(RegistryError::Invalid(format!(
                "{}: blob digest mismatch: expected {}, the registry served {digest} ({len} bytes): refused",
                ctx.reference, desc.digest
            )));
        }
        fs::rename(&partial, &done).map_err(io_err(&done))?;
        Ok(true)
    }
}

struct Ctx<'a> {
    reference: &'a str,
    host: &'a str,
}

impl Ctx<'_> {
    /// A registry client error in words a user can act on; never includes credentials.
    fn err(&self, doing: &str, e: OciDistributionError) -> RegistryError {
        let (reference, host) = (self.reference, self.host);
        match &e {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => RegistryError::Unauthorized(
                format!(
                    "{reference}: {host} refused access (401 unauthorized): log in with `gpuvisor registry login {host}` or check the credentials"
                ),
            ),
            OciDistributionError::ImageManifestNotFoundError(_) => {
                RegistryError::NotFound(format!("{reference}: not found on {host}"))
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<String> = envelope
                    .errors
                    .iter()
                    .map(|c| format!("{:?}", c.code))
                    .collect();
                let text = codes.join(", ");
                let msgs: Vec<&str> = envelope.errors.iter().map(|c| c.message.as_str()).collect();
                let upper = text.to_ascii_uppercase();
                if upper.contains("UNAUTHORIZED") || upper.contains("DENIED") {
                    RegistryError::Unauthorized(format!(
                        "{reference}: {host} refused access ({}): log in with `gpuvisor registry login {host}` or check the credentials",
                        msgs.join("; ")
                    ))
                } else if upper.contains("UNKNOWN") {
                    RegistryError::NotFound(format!(
                        "{reference}: not found on {host} ({})",
                        msgs.join("; ")
                    ))
                } else {
                    RegistryError::Unavailable(format!(
                        "{reference}: {doing}: {host} answered {text}: {}",
                        msgs.join("; ")
                    ))
                }
            }
            OciDistributionError::ServerError { code, message, .. } => match code {
                401 | 403 => RegistryError::Unauthorized(format!(
                    "{reference}: {host} refused access ({code}): log in with `gpuvisor registry login {host}` or check the credentials"
                )),
                404 => RegistryError::NotFound(format!("{reference}: not found on {host}")),
                _ => RegistryError::Unavailable(format!(
                    "{reference}: {doing}: {host} answered {code}: {}",
                    message.chars().take(200).collect::<String>()
                )),
            },
            OciDistributionError::RequestError(re) => {
                let mut why = re.to_string();
                let mut src = std::error::Error::source(re);
                while let Some(s) = src {
                    why = format!("{why}: {s}");
                    src = s.source();
                }
                RegistryError::Unavailable(format!("{reference}: {doing}: cannot reach {host}: {why}"))
            }
            OciDistributionError::DigestError(d) => RegistryError::Invalid(format!(
                "{reference}: {doing}: digest mismatch: {d}"
            )),
            other => RegistryError::Unavailable(format!("{reference}: {doing}: {other}")),
        }
    }
}

fn is_index(bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        config: Option<serde_json::Value>,
    }
    serde_json::from_slice::<Probe>(bytes).is_ok_and(|p| {
        p.media_type
            .as_deref()
            .is_some_and(|m| MEDIA_INDEX.contains(&m))
            || (p.config.is_none() && p.manifests.is_some())
    })
}

/// The index entry for `linux/<host arch>`.
fn select_platform(bytes: &[u8], reference: &str) -> Result<String, RegistryError> {
    let index: IndexDoc = serde_json::from_slice(bytes)
        .map_err(|e| RegistryError::Invalid(format!("{reference}: bad image index: {e}")))?;
    let arch = host_arch();
    let found = index.manifests.iter().find(|m| {
        m.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == arch)
    });
    match found {
        Some(m) => {
            hex_of(&m.digest)?;
            Ok(m.digest.clone())
        }
        None => {
            let have: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|m| m.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            Err(RegistryError::NotFound(format!(
                "{reference}: no image for linux/{arch} (the index has: {})",
                if have.is_empty() {
                    "no platforms".to_string()
                } else {
                    have.join(", ")
                }
            )))
        }
    }
}

/// The host's architecture as OCI names it.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn hex_of(digest: &str) -> Result<String, RegistryError> {
    match digest.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(h.to_string())
        }
        _ => Err(RegistryError::Invalid(format!(
            "unsupported or malformed digest {digest:?}"
        ))),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hash_file(path: &Path) -> Result<(String, u64), RegistryError> {
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((format!("sha256:{}", hex(&h.finalize())), len))
}

#[derive(serde::Deserialize)]
struct ManifestDoc {
    #[serde(default)]
    config: Option<OciDescriptor>,
    #[serde(default)]
    layers: Vec<OciDescriptor>,
}

#[derive(serde::Deserialize)]
struct IndexDoc {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(serde::Deserialize)]
struct IndexEntry {
    digest: String,
    #[serde(default)]
    platform: Option<PlatformDoc>,
}

#[derive(serde::Deserialize)]
struct PlatformDoc {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(serde::Deserialize)]
struct ConfigDoc {
    #[serde(default)]
    rootfs: Option<RootFsDoc>,
}

#[derive(serde::Deserialize)]
struct RootFsDoc {
    #[serde(default)]
    diff_ids: Vec<String>,
}

// ---- sealed credentials ----------------------------------------------------------------------

/// Seals and opens secrets with the daemon's credential key.
pub struct Sealer {
    key: ring::aead::LessSafeKey,
}

const SEAL_PREFIX: &str = "v1:";

impl Sealer {
    /// Opens the key in `<data>/keys/registry.key`, making it (0600, in a 0700 directory) at
    /// first use.
    pub fn open(data_dir: &Path) -> Result<Self, RegistryError> {
        let dir = data_dir.join("keys");
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
        let path = dir.join("registry.key");
        let mut key = [0u8; 32];
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                getrandom::fill(&mut key).map_err(|e| RegistryError::Io {
                    path: path.clone(),
                    why: format!("getrandom: {e}"),
                })?;
                f.write_all(&key)
                    .and_then(|()| f.sync_all())
                    .map_err(io_err(&path))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let meta = fs::metadata(&path).map_err(io_err(&path))?;
                if meta.permissions().mode() & 0o077 != 0 {
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                        .map_err(io_err(&path))?;
                }
                let bytes = fs::read(&path).map_err(io_err(&path))?;
                if bytes.len() != key.len() {
                    return Err(RegistryError::Io {
                        path,
                        why: format!("the credential key must be 32 bytes, found {}", bytes.len()),
                    });
                }
                key.copy_from_slice(&bytes);
            }
            Err(e) => return Err(io_err(&path)(e)),
        }
        let unbound =
            ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &key).map_err(|_| {
                RegistryError::Io {
                    path: path.clone(),
                    why: "bad key".into(),
                }
            })?;
        Ok(Self {
            key: ring::aead::LessSafeKey::new(unbound),
        })
    }

    /// `v1:<hex nonce || ciphertext || tag>`, bound to `aad`.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<String, RegistryError> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| RegistryError::Io {
            path: PathBuf::from("keys/registry.key"),
            why: format!("getrandom: {e}"),
        })?;
        let mut data = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(aad),
                &mut data,
            )
            .map_err(|_| RegistryError::Invalid("cannot seal the secret".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!("{SEAL_PREFIX}{}", hex(&out)))
    }

    /// Opens what [`Sealer::seal`] made with the same `aad`.
    pub fn unseal(&self, aad: &[u8], sealed: &str) -> Result<Vec<u8>, RegistryError> {
        let fail = || {
            RegistryError::Invalid("stored credentials do not open with this daemon's key (keys/registry.key changed?): log in again".into())
        };
        let hexed = sealed.strip_prefix(SEAL_PREFIX).ok_or_else(fail)?;
        if hexed.len() % 2 != 0 || hexed.len() < 2 * (12 + 16) {
            return Err(fail());
        }
        let mut bytes = Vec::with_capacity(hexed.len() / 2);
        for i in (0..hexed.len()).step_by(2) {
            bytes.push(u8::from_str_radix(&hexed[i..i + 2], 16).map_err(|_| fail())?);
        }
        let (nonce, rest) = bytes.split_at_mut(12);
        let mut n = [0u8; 12];
        n.copy_from_slice(nonce);
        let plain = self
            .key
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(n),
                ring::aead::Aad::from(aad),
                rest,
            )
            .map_err(|_| fail())?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_their_binding() {
        let t = tempfile::TempDir::new().unwrap();
        let s = Sealer::open(t.path()).unwrap();
        let sealed = s.seal(b"tenant-a\0reg:5000", b"hunter2").unwrap();
        assert!(!sealed.contains("hunter2"));
        assert_eq!(
            s.unseal(b"tenant-a\0reg:5000", &sealed).unwrap(),
            b"hunter2"
        );
        assert!(s.unseal(b"tenant-b\0reg:5000", &sealed).is_err());
        // The key persists: a second open reads the same key.
        let again = Sealer::open(t.path()).unwrap();
        assert_eq!(
            again.unseal(b"tenant-a\0reg:5000", &sealed).unwrap(),
            b"hunter2"
        );
        let mode = fs::metadata(t.path().join("keys/registry.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn platform_selection_picks_the_host_arch() {
        let arch = host_arch();
        let other = if arch == "amd64" { "arm64" } else { "amd64" };
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"digest": a, "size": 1, "platform": {"os": "linux", "architecture": other}},
                {"digest": b, "size": 1, "platform": {"os": "linux", "architecture": arch}},
            ]
        });
        let bytes = serde_json::to_vec(&index).unwrap();
        assert!(is_index(&bytes));
        assert_eq!(select_platform(&bytes, "r").unwrap(), b);
        let only_other = serde_json::json!({"manifests": [
            {"digest": a, "platform": {"os": "linux", "architecture": other}}]});
        let why = select_platform(&serde_json::to_vec(&only_other).unwrap(), "r")
            .unwrap_err()
            .to_string();
        assert!(why.contains(&format!("no image for linux/{arch}")), "{why}");
    }
}
