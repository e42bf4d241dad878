//! Images: imports and uploads (admin; public), registry pulls (tenants too when the operator
//! allows it; private to the pulling tenant until an admin publishes them), and each tenant's
//! registry credentials.
//!
//! Key decisions:
//! - **Ownership**: an image row has an owner, the tenant id of the tenant that pulled it, or
//!   `""` for a public image. A tenant sees its own images and the public ones, its own first
//!   when both have a name; another tenant's image is `not_found`, like its instances.
//! - **Pulls are jobs**: `start_pull` writes a `running` row in `image_pulls` and answers at
//!   once; a task does the pull and records `done`/`failed`. Progress (layers, bytes) lives in
//!   memory and is read by long polls (`?since=<version>`). A job still `running` at start-up
//!   is resumed by [`Engine::resume_pulls`] (its partial downloads are on disk).
//! - **Credentials** are sealed by the node's [`Sealer`] with the tenant id and host as
//!   additional data, read back only inside that tenant's pull, and never put in an answer,
//!   an error or a log line.

use super::authz::Op;
use super::{now_ms, random_hex, validate, Engine, Principal};
use crate::error::{invalid, EngineError, Result};
use crate::store::{CredentialRow, ImageRow, PullRow};
use gpuvisor_node::registry::{
    Credentials, PullEvent, Puller, RegistryConfig, RegistryError, Sealer,
};
use gpuvisor_wire as wire;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// What the operator decides about registry pulls.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Whether tenants (not only admins) may pull.
    pub tenant_pull: bool,
    /// Registries (`host[:port]`) tenants may pull from; empty: any. The daemon connects from
    /// the host's network, so this keeps tenants from making it probe internal addresses.
    pub tenant_hosts: Vec<String>,
    /// Pull jobs one tenant may run at a time.
    pub tenant_max_pulls: usize,
    pub registry: RegistryConfig,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            tenant_pull: true,
            tenant_hosts: Vec::new(),
            tenant_max_pulls: 4,
            registry: RegistryConfig::default(),
        }
    }
}

/// The engine's registry state.
#[derive(Default)]
pub struct RegistryState {
    settings: RwLock<RegistrySettings>,
    puller: Mutex<Option<Arc<Puller>>>,
    sealer: Mutex<Option<Arc<Sealer>>>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    changed: tokio::sync::watch::Sender<u64>,
}

/// A pull job in memory: its tenant (by id) and what readers see.
struct Job {
    tenant_id: String,
    /// Started by an admin: its registry may be on a private address.
    admin: bool,
    /// Stops the task (the tenant is being deleted).
    abort: Mutex<Option<tokio::task::AbortHandle>>,
    /// The layers (diff ids) the image will have: kept from gc while the job runs.
    layers: Mutex<Vec<String>>,
    view: Mutex<wire::ImagePull>,
}

/// Partial downloads untouched this long, with no pull running, are removed.
const STALE_PARTIAL: Duration = Duration::from_secs(24 * 3600);

/// Finished jobs stay in memory this long (then their row answers, without layer detail).
const KEEP_FINISHED_MS: i64 = 10 * 60 * 1000;

const RUNNING: &str = "running";
const DONE: &str = "done";
const FAILED: &str = "failed";

/// Image names: a plain name (`busybox`) or, for pulled images, a reference-like name
/// (`registry.example.com:5000/team/app:1.2`).
fn image_name(s: &str) -> Result<()> {
    if validate::name("image", s).is_ok() {
        return Ok(());
    }
    let ok = wire::looks_like_reference(s)
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':' | b'@')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "image name {s:?} is invalid: use 1-63 lowercase letters, digits, '-', '_' or '.', or an image reference like host/repo:tag"
        )))
    }
}

/// `docker.io` for Docker Hub's other names; no scheme, no trailing slash.
fn normal_host(host: &str) -> Result<String> {
    let h = gpuvisor_node::registry::normalize_host(host);
    let ok = !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if ok {
        Ok(h)
    } else {
        Err(invalid(format!(
            "registry host {host:?} is invalid: give host[:port], e.g. registry.example.com:5000"
        )))
    }
}

fn pull_error(e: &RegistryError) -> (&'static str, String) {
    let code = match e {
        RegistryError::BadReference(_) | RegistryError::Invalid(_) => wire::code::INVALID_ARGUMENT,
        RegistryError::Unauthorized(_) => wire::code::UNAUTHORIZED,
        RegistryError::NotFound(_) => wire::code::NOT_FOUND,
        RegistryError::Unavailable(_) => wire::code::UNAVAILABLE,
        RegistryError::Image(gpuvisor_node::image::ImageError::BadSource { .. }) => {
            wire::code::INVALID_ARGUMENT
        }
        RegistryError::Image(_) | RegistryError::Io { .. } => wire::code::INTERNAL,
    };
    (code, e.to_string())
}

impl Engine {
    // --- settings ----------------------------------------------------------------------------

    /// Sets the registry policy (from `serve`'s configuration); before the first pull.
    pub fn configure_registry(&self, mut s: RegistrySettings) {
        s.tenant_hosts = s
            .tenant_hosts
            .iter()
            .map(|h| gpuvisor_node::registry::normalize_host(h))
            .collect();
        s.registry.trusted.extend(s.tenant_hosts.iter().cloned());
        *self
            .registry
            .settings
            .write()
            .unwrap_or_else(|p| p.into_inner()) = s;
        *self
            .registry
            .puller
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn puller(&self) -> Arc<Puller> {
        let mut p = self
            .registry
            .puller
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        p.get_or_insert_with(|| {
            let cfg = self
                .registry
                .settings
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .registry
                .clone();
            Arc::new(Puller::new(&self.node.images, cfg))
        })
        .clone()
    }

    /// The credential key, made at first use.
    fn sealer(&self) -> Result<Arc<Sealer>> {
        let mut s = self
            .registry
            .sealer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(s) = &*s {
            return Ok(s.clone());
        }
        let made = Arc::new(
            Sealer::open(&self.node.cfg.data_dir)
                .map_err(|e| EngineError::Internal(format!("credential key: {e}")))?,
        );
        *s = Some(made.clone());
        Ok(made)
    }

    // --- images ------------------------------------------------------------------------------

    fn wire_image(i: ImageRow, names: &BTreeMap<String, String>) -> wire::Image {
        wire::Image {
            tenant: (!i.owner.is_empty())
                .then(|| names.get(&i.owner).cloned().unwrap_or(i.owner.clone())),
            source: (!i.source.is_empty()).then_some(i.source),
            name: i.name,
            digest: i.digest,
            layers: i.layers,
            size: i.size,
            command: i.command,
            env: i.env,
            created_at: i.created_at,
        }
    }

    async fn public_name_free(&self, name: &str) -> Result<()> {
        if self.store.image(name).await?.is_some() {
            return Err(EngineError::AlreadyExists(format!(
                "image {name:?} already exists: remove it first or pick another name"
            )));
        }
        Ok(())
    }

    async fn record_import(
        &self,
        name: &str,
        imported: gpuvisor_node::image::ImportedImage,
    ) -> Result<wire::Image> {
        let row = ImageRow {
            owner: String::new(),
            name: name.to_string(),
            digest: imported.digest,
            layers: imported.layers,
            size: imported.size,
            command: imported.command,
            env: imported.env,
            source: String::new(),
            created_at: now_ms(),
        };
        self.store.insert_image(&row).await.map_err(|e| match e {
            crate::store::StoreError::Conflict(_) => EngineError::AlreadyExists(format!(
                "image {name:?} already exists: remove it first or pick another name"
            )),
            other => other.into(),
        })?;
        Ok(Self::wire_image(row, &BTreeMap::new()))
    }

    fn import_err(e: gpuvisor_node::image::ImageError) -> EngineError {
        match e {
            gpuvisor_node::image::ImageError::BadSource { .. } => invalid(e.to_string()),
            other => EngineError::Node(other.into()),
        }
    }

    /// Imports an image from a path on the daemon's host (admin; the image is public).
    pub async fn import_image(
        &self,
        who: &Principal,
        req: &wire::ImportImage,
    ) -> Result<wire::Image> {
        who.allow(Op::ImportImage)?;
        validate::name("image", &req.name)?;
        let path = std::path::PathBuf::from(&req.path);
        if !path.is_absolute() {
            return Err(invalid(format!(
                "image path {:?} must be absolute on the daemon's host",
                req.path
            )));
        }
        if !path.exists() {
            return Err(invalid(format!(
                "image path {:?} does not exist on the daemon's host",
                req.path
            )));
        }
        self.public_name_free(&req.name).await?;
        let node = self.node.clone();
        let imported = tokio::task::spawn_blocking(move || node.images.import(&path))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(Self::import_err)?;
        self.record_import(&req.name, imported).await
    }

    /// Starts an upload of an archive from the client (`image import ./x.tar`); admin, public.
    pub async fn begin_upload(&self, who: &Principal, name: Option<&str>) -> Result<ImageUpload> {
        who.allow(Op::UploadImage)?;
        let name = name.ok_or_else(|| invalid("give the image name: ?name=NAME"))?;
        validate::name("image", name)?;
        self.public_name_free(name).await?;
        let node = self.node.clone();
        let upload = tokio::task::spawn_blocking(move || node.images.begin_upload())
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(Self::import_err)?;
        Ok(ImageUpload {
            name: name.to_string(),
            upload: Some(upload),
        })
    }

    /// Imports a finished upload.
    pub async fn finish_upload(&self, mut up: ImageUpload) -> Result<wire::Image> {
        let upload = up
            .upload
            .take()
            .ok_or_else(|| EngineError::Internal("upload already finished".into()))?;
        let imported = tokio::task::spawn_blocking(move || upload.finish())
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(Self::import_err)?;
        self.record_import(&up.name, imported).await
    }

    pub async fn list_images(&self, who: &Principal) -> Result<Vec<wire::Image>> {
        who.allow(Op::ListImages)?;
        let rows = if who.is_admin() {
            self.store.images().await?
        } else {
            self.store.images_visible(&who.tenant_id).await?
        };
        let names = self.tenant_names().await?;
        Ok(rows
            .into_iter()
            .map(|r| Self::wire_image(r, &names))
            .collect())
    }

    /// The image `name` as the caller may manage it: a tenant's own (a tenant cannot remove a
    /// public image); for an admin its own, else the public one, else the one private image of
    /// that name (`tenant` picks among several).
    async fn managed_image(
        &self,
        who: &Principal,
        name: &str,
        tenant: Option<&str>,
    ) -> Result<ImageRow> {
        let missing = || EngineError::NotFound(format!("image {name:?} not found"));
        if !who.is_admin() {
            return self
                .store
                .image_of(&who.tenant_id, name)
                .await?
                .ok_or_else(missing);
        }
        if let Some(t) = tenant {
            let t = self
                .store
                .tenant_by_name(t)
                .await?
                .ok_or_else(|| EngineError::NotFound(format!("tenant {t:?} not found")))?;
            return self.store.image_of(&t.id, name).await?.ok_or_else(missing);
        }
        if let Some(own) = self.store.image_visible(&who.tenant_id, name).await? {
            return Ok(own);
        }
        let mut others: Vec<ImageRow> = self
            .store
            .images()
            .await?
            .into_iter()
            .filter(|i| i.name == name)
            .collect();
        match others.len() {
            0 => Err(missing()),
            1 => Ok(others.remove(0)),
            _ => Err(invalid(format!(
                "several tenants have an image named {name:?}: name one with --tenant"
            ))),
        }
    }

    pub async fn remove_image(
        &self,
        who: &Principal,
        name: &str,
        tenant: Option<&str>,
    ) -> Result<wire::Image> {
        who.allow(Op::RemoveImage)?;
        let img = self.managed_image(who, name, tenant).await?;
        // Who uses it: instances of its owner, or (public) of tenants without their own.
        let live = self.store.live_instances(None).await?;
        let mut users = Vec::new();
        for i in live.iter().filter(|i| i.image == name) {
            let theirs = if img.owner.is_empty() {
                self.store.image_of(&i.tenant_id, name).await?.is_none()
            } else {
                i.tenant_id == img.owner
            };
            if theirs {
                users.push(i.id.clone());
            }
        }
        if !users.is_empty() {
            return Err(EngineError::InUse(format!(
                "image {name:?} is used by instances {}: terminate them first",
                users.join(", ")
            )));
        }
        self.store.delete_image_of(&img.owner, name).await?;
        let keep = self.layers_in_use().await?;
        let node = self.node.clone();
        let _ = tokio::task::spawn_blocking(move || node.images.gc(&keep)).await;
        let names = self.tenant_names().await?;
        Ok(Self::wire_image(img, &names))
    }

    /// Makes a tenant's pulled image public (admin).
    pub async fn publish_image(
        &self,
        who: &Principal,
        name: &str,
        tenant: Option<&str>,
    ) -> Result<wire::Image> {
        who.allow(Op::PublishImage)?;
        let img = self.managed_image(who, name, tenant).await?;
        if img.owner.is_empty() {
            return Err(EngineError::InvalidState(format!(
                "image {name:?} is already public"
            )));
        }
        self.public_name_free(name).await?;
        self.store
            .publish_image(&img.owner, name)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::Conflict(_) => EngineError::AlreadyExists(format!(
                    "a public image named {name:?} already exists"
                )),
                other => other.into(),
            })?;
        let row = self
            .store
            .image(name)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("image {name:?} not found")))?;
        Ok(Self::wire_image(row, &BTreeMap::new()))
    }

    // --- credentials -------------------------------------------------------------------------

    fn aad(tenant_id: &str, host: &str) -> Vec<u8> {
        format!("gpuvisor-registry\0{tenant_id}\0{host}").into_bytes()
    }

    /// Stores (or replaces) the caller's tenant's login to a registry; the password is sealed.
    pub async fn registry_login(
        &self,
        who: &Principal,
        req: &wire::RegistryLogin,
    ) -> Result<wire::RegistryCredential> {
        who.allow(Op::RegistryLogin)?;
        let host = normal_host(&req.host)?;
        if req.username.is_empty() || req.username.len() > 255 || req.username.contains(':') {
            return Err(invalid(
                "a registry username of 1-255 characters without ':' is required",
            ));
        }
        if req.password.is_empty() || req.password.len() > 4096 {
            return Err(invalid(
                "a registry password (or token) of 1-4096 bytes is required",
            ));
        }
        let sealer = self.sealer()?;
        let secret = sealer
            .seal(&Self::aad(&who.tenant_id, &host), req.password.as_bytes())
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let row = CredentialRow {
            tenant_id: who.tenant_id.clone(),
            host: host.clone(),
            username: req.username.clone(),
            secret,
            created_at: now_ms(),
        };
        self.store.put_credential(&row).await?;
        Ok(wire::RegistryCredential {
            host,
            username: row.username,
            created_at: row.created_at,
        })
    }

    pub async fn registry_logout(
        &self,
        who: &Principal,
        host: &str,
    ) -> Result<wire::RegistryCredential> {
        who.allow(Op::RegistryLogout)?;
        let host = normal_host(host)?;
        let row = self
            .store
            .credential(&who.tenant_id, &host)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("not logged in to {host}")))?;
        self.store.delete_credential(&who.tenant_id, &host).await?;
        Ok(wire::RegistryCredential {
            host: row.host,
            username: row.username,
            created_at: row.created_at,
        })
    }

    /// The caller's tenant's logins: hosts and usernames only.
    pub async fn registry_list(&self, who: &Principal) -> Result<Vec<wire::RegistryCredential>> {
        who.allow(Op::ListRegistries)?;
        Ok(self
            .store
            .credentials(&who.tenant_id)
            .await?
            .into_iter()
            .map(|c| wire::RegistryCredential {
                host: c.host,
                username: c.username,
                created_at: c.created_at,
            })
            .collect())
    }

    async fn credentials_for(
        &self,
        tenant_id: &str,
        reference: &str,
    ) -> Result<Option<Credentials>> {
        let host = gpuvisor_node::registry::reference_host(reference)
            .map_err(|e| invalid(e.to_string()))?;
        let host = normal_host(&host)?;
        let Some(row) = self.store.credential(tenant_id, &host).await? else {
            return Ok(None);
        };
        let password = self
            .sealer()?
            .unseal(&Self::aad(tenant_id, &host), &row.secret)
            .map_err(|e| EngineError::Internal(format!("a stored registry password: {e}")))?;
        Ok(Some(Credentials {
            username: row.username,
            password: String::from_utf8(password)
                .map_err(|_| EngineError::Internal("stored password is not UTF-8".into()))?,
        }))
    }

    // --- pulls -------------------------------------------------------------------------------

    /// Starts pulling `req.reference` for the caller's tenant; answers the job at once.
    pub async fn start_pull(
        self: &Arc<Self>,
        who: &Principal,
        req: &wire::PullImage,
    ) -> Result<wire::ImagePull> {
        who.allow(Op::StartPull)?;
        let (allowed, hosts, max_pulls) = {
            let s = self
                .registry
                .settings
                .read()
                .unwrap_or_else(|p| p.into_inner());
            (s.tenant_pull, s.tenant_hosts.clone(), s.tenant_max_pulls)
        };
        if !who.is_admin() && !allowed {
            return Err(EngineError::Forbidden(
                "pulling images is reserved to admins on this daemon (registry.tenant_pull = false): ask an admin to pull and publish it".into(),
            ));
        }
        let host = gpuvisor_node::registry::reference_host(&req.reference)
            .map_err(|e| invalid(e.to_string()))?;
        let host = normal_host(&host)?;
        if !who.is_admin() && !hosts.is_empty() && !hosts.contains(&host) {
            return Err(EngineError::Forbidden(format!(
                "tenants may pull from {} only (registry.tenant_hosts), not from {host}",
                hosts.join(", ")
            )));
        }
        // A name that looks like a reference is one: it must be the reference pulled, so
        // `evil.example/x --name docker.io/library/ubuntu:22.04` cannot pass for ubuntu.
        if let Some(n) = &req.name {
            if wire::looks_like_reference(n) && n != &req.reference {
                return Err(invalid(format!(
                    "image name {n:?} looks like an image reference but is not the one pulled ({:?}): give a plain name (like `app`) or none",
                    req.reference
                )));
            }
        }
        let name = req.name.clone().unwrap_or_else(|| req.reference.clone());
        image_name(&name)?;
        let now = now_ms();
        if req.if_missing {
            // Pull on first use: an image of that name counts only if it came from this very
            // reference (a plain name is the caller's or an admin's choice).
            let found = self
                .store
                .image_visible(&who.tenant_id, &name)
                .await?
                .filter(|img| img.source == req.reference || !wire::looks_like_reference(&name));
            if let Some(img) = found {
                let names = self.tenant_names().await?;
                return Ok(wire::ImagePull {
                    id: String::new(),
                    reference: req.reference.clone(),
                    name,
                    tenant: who.tenant.clone(),
                    state: DONE.into(),
                    error: None,
                    code: None,
                    digest: Some(img.digest.clone()),
                    layers: Vec::new(),
                    unpacking: false,
                    image: Some(Self::wire_image(img, &names)),
                    version: 0,
                    created_at: now,
                    updated_at: now,
                });
            }
        }
        // One job per tenant and name at a time: a second `create --image REF` joins it.
        {
            let jobs = self.registry.jobs.lock().unwrap_or_else(|p| p.into_inner());
            let mut running = 0;
            for j in jobs.values().filter(|j| j.tenant_id == who.tenant_id) {
                let v = j.view.lock().unwrap_or_else(|p| p.into_inner());
                if v.state == RUNNING && v.name == name {
                    return Ok(v.clone());
                }
                if v.state == RUNNING {
                    running += 1;
                }
            }
            if running >= max_pulls {
                return Err(EngineError::ResourceExhausted(format!(
                    "{running} pulls of this tenant are running, the most this daemon allows (registry.tenant_max_pulls = {max_pulls}): wait for one to finish"
                )));
            }
        }
        if self.store.image_of(&who.tenant_id, &name).await?.is_some() {
            return Err(EngineError::AlreadyExists(format!(
                "image {name:?} already exists: remove it first or pull with another --name"
            )));
        }
        let row = PullRow {
            id: format!("pull-{}", random_hex(6)?),
            tenant_id: who.tenant_id.clone(),
            reference: req.reference.clone(),
            name,
            state: RUNNING.into(),
            error: None,
            digest: None,
            created_at: now,
            updated_at: now,
        };
        self.store.insert_pull(&row).await?;
        Ok(self.spawn_pull(row, who.tenant.clone(), who.is_admin()))
    }

    fn spawn_pull(self: &Arc<Self>, row: PullRow, tenant: String, admin: bool) -> wire::ImagePull {
        let view = wire::ImagePull {
            id: row.id.clone(),
            reference: row.reference.clone(),
            name: row.name.clone(),
            tenant,
            state: RUNNING.into(),
            error: None,
            code: None,
            digest: None,
            layers: Vec::new(),
            unpacking: false,
            image: None,
            version: 1,
            created_at: row.created_at,
            updated_at: row.updated_at,
        };
        let job = Arc::new(Job {
            tenant_id: row.tenant_id.clone(),
            admin,
            abort: Mutex::new(None),
            layers: Mutex::new(Vec::new()),
            view: Mutex::new(view.clone()),
        });
        {
            let mut jobs = self.registry.jobs.lock().unwrap_or_else(|p| p.into_inner());
            let old = now_ms() - KEEP_FINISHED_MS;
            jobs.retain(|_, j| {
                let v = j.view.lock().unwrap_or_else(|p| p.into_inner());
                v.state == RUNNING || v.updated_at > old
            });
            jobs.insert(row.id.clone(), job.clone());
        }
        let engine = self.clone();
        let task_job = job.clone();
        let task = tokio::spawn(async move { engine.run_pull(row, task_job).await });
        *job.abort.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
        view
    }

    fn bump(&self, job: &Job, f: impl FnOnce(&mut wire::ImagePull)) {
        {
            let mut j = job.view.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut j);
            j.version += 1;
            j.updated_at = now_ms();
        }
        self.registry.changed.send_modify(|v| *v += 1);
    }

    async fn run_pull(self: Arc<Self>, row: PullRow, job: Arc<Job>) {
        tracing::info!(pull = %row.id, reference = %row.reference, "pull started");
        let outcome = self.do_pull(&row, &job).await;
        let at = now_ms();
        match outcome {
            Ok(image) => {
                let digest = image.digest.clone();
                if let Err(e) = self
                    .store
                    .finish_pull(&row.id, DONE, None, Some(&digest), at)
                    .await
                {
                    tracing::warn!(pull = %row.id, "cannot record the pull: {e}");
                }
                tracing::info!(pull = %row.id, %digest, "pull done");
                self.bump(&job, |j| {
                    j.state = DONE.into();
                    j.unpacking = false;
                    j.digest = Some(digest);
                    j.image = Some(image);
                });
            }
            Err((code, msg)) => {
                if let Err(e) = self
                    .store
                    .finish_pull(&row.id, FAILED, Some(&msg), None, at)
                    .await
                {
                    tracing::warn!(pull = %row.id, "cannot record the pull: {e}");
                }
                tracing::info!(pull = %row.id, "pull failed: {msg}");
                self.bump(&job, |j| {
                    j.state = FAILED.into();
                    j.unpacking = false;
                    j.error = Some(msg);
                    j.code = Some(code.to_string());
                });
            }
        }
    }

    async fn do_pull(
        &self,
        row: &PullRow,
        job: &Arc<Job>,
    ) -> std::result::Result<wire::Image, (&'static str, String)> {
        let engine_err = |e: EngineError| (e.code(), e.to_string());
        let creds = self
            .credentials_for(&row.tenant_id, &row.reference)
            .await
            .map_err(engine_err)?;
        let report = |ev: PullEvent| {
            if let PullEvent::Layers { diff_ids } = ev {
                *job.layers.lock().unwrap_or_else(|p| p.into_inner()) = diff_ids;
                return;
            }
            self.bump(job, |j| match ev {
                PullEvent::Layers { .. } => {}
                PullEvent::Resolved { digest, layers } => {
                    j.digest = Some(digest);
                    j.layers = layers
                        .into_iter()
                        .map(|(digest, size)| wire::PullLayer {
                            digest,
                            size,
                            done: 0,
                            state: "waiting".into(),
                        })
                        .collect();
                }
                PullEvent::Bytes { index, done } => {
                    if let Some(l) = j.layers.get_mut(index) {
                        l.done = done;
                        l.state = if done >= l.size && l.size > 0 {
                            "done".into()
                        } else {
                            "downloading".into()
                        };
                    }
                }
                PullEvent::Present { index } => {
                    if let Some(l) = j.layers.get_mut(index) {
                        l.done = l.size;
                        l.state = "present".into();
                    }
                }
                PullEvent::Unpacking => {
                    j.unpacking = true;
                    for l in &mut j.layers {
                        if l.state != "present" {
                            l.state = "done".into();
                            l.done = l.size;
                        }
                    }
                }
            })
        };
        // Layers this pull may take from the store without downloading them: those of the
        // tenant's own images and of public ones (an admin's: any).
        let usable: std::collections::HashSet<String> = self
            .store
            .images()
            .await
            .map_err(|e| engine_err(e.into()))?
            .into_iter()
            .filter(|i| i.owner.is_empty() || i.owner == row.tenant_id)
            .flat_map(|i| i.layers)
            .collect();
        let admin = job.admin;
        let may_reuse = move |diff_id: &str| admin || usable.contains(diff_id);
        let imported = self
            .puller()
            .pull(
                &self.node,
                &row.reference,
                creds.as_ref(),
                job.admin,
                &may_reuse,
                &report,
            )
            .await
            .map_err(|e| pull_error(&e))?;
        let img = ImageRow {
            owner: row.tenant_id.clone(),
            name: row.name.clone(),
            digest: imported.digest,
            layers: imported.layers,
            size: imported.size,
            command: imported.command,
            env: imported.env,
            source: row.reference.clone(),
            created_at: now_ms(),
        };
        // The tenant deleted meanwhile (its deletion also stops this task): no orphan image.
        match self.store.tenant(&row.tenant_id).await {
            Ok(Some(t)) if t.deleting_at.is_none() => {}
            Ok(_) => {
                return Err((
                    wire::code::NOT_FOUND,
                    "the tenant was deleted during the pull: nothing was recorded".into(),
                ))
            }
            Err(e) => return Err(engine_err(e.into())),
        }
        // A daemon killed between recording the image and the job resumes the job: the image
        // it finds is this pull's own.
        if let Ok(Some(same)) = self.store.image_of(&row.tenant_id, &row.name).await {
            if same.digest == img.digest && same.source == img.source {
                let names = self.tenant_names().await.map_err(engine_err)?;
                return Ok(Self::wire_image(same, &names));
            }
        }
        self.store.insert_image(&img).await.map_err(|e| match e {
            crate::store::StoreError::Conflict(_) => (
                wire::code::ALREADY_EXISTS,
                format!(
                    "image {:?} was created while pulling: remove it first or pull with another --name",
                    row.name
                ),
            ),
            other => engine_err(other.into()),
        })?;
        let names = self.tenant_names().await.map_err(engine_err)?;
        Ok(Self::wire_image(img, &names))
    }

    /// A pull job; with `since` (a version), waits up to `timeout` for a newer one.
    pub async fn get_pull(
        &self,
        who: &Principal,
        id: &str,
        since: Option<u64>,
        timeout: Duration,
    ) -> Result<wire::ImagePull> {
        who.allow(Op::GetPull)?;
        let missing = || EngineError::NotFound(format!("pull {id:?} not found"));
        let job = self
            .registry
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        let Some(job) = job else {
            // Finished before a restart: the row has the outcome.
            let row = self.store.pull(id).await?.ok_or_else(missing)?;
            if !who.is_admin() && row.tenant_id != who.tenant_id {
                return Err(missing());
            }
            let names = self.tenant_names().await?;
            let image = match row.state.as_str() {
                DONE => self
                    .store
                    .image_of(&row.tenant_id, &row.name)
                    .await?
                    .map(|i| Self::wire_image(i, &names)),
                _ => None,
            };
            return Ok(wire::ImagePull {
                id: row.id,
                reference: row.reference,
                name: row.name,
                tenant: names.get(&row.tenant_id).cloned().unwrap_or_default(),
                state: row.state,
                code: row
                    .error
                    .as_ref()
                    .map(|_| wire::code::UNAVAILABLE.to_string()),
                error: row.error,
                digest: row.digest,
                layers: Vec::new(),
                unpacking: false,
                image,
                version: 0,
                created_at: row.created_at,
                updated_at: row.updated_at,
            });
        };
        let deadline = tokio::time::Instant::now() + timeout.min(Duration::from_secs(30));
        let mut rx = self.registry.changed.subscribe();
        loop {
            rx.mark_unchanged();
            if !who.is_admin() && job.tenant_id != who.tenant_id {
                return Err(missing());
            }
            let view = job.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if since.is_none_or(|v| v != view.version) || view.state != RUNNING {
                return Ok(view);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Ok(view);
            }
        }
    }

    /// For `tenant rm --cascade`: drops the tenant's private images (refused while one of its
    /// instances still uses one), registry logins and pull jobs, then the layers no image
    /// needs any more. Running pulls of the tenant finish into nothing: their insert fails.
    pub async fn forget_tenant_images(&self, tenant_id: &str) -> Result<u64> {
        self.cancel_tenant_pulls(tenant_id);
        let mine: Vec<String> = self
            .store
            .images()
            .await?
            .into_iter()
            .filter(|i| i.owner == tenant_id)
            .map(|i| i.name)
            .collect();
        if let Some(user) = self
            .store
            .live_instances(Some(tenant_id))
            .await?
            .into_iter()
            .find(|i| mine.contains(&i.image))
        {
            return Err(EngineError::InUse(format!(
                "image {:?} is used by instance {}: terminate it first",
                user.image, user.id
            )));
        }
        let n = self.store.delete_tenant_registry_data(tenant_id).await?;
        if n > 0 {
            let keep = self.layers_in_use().await?;
            let node = self.node.clone();
            let _ = tokio::task::spawn_blocking(move || node.images.gc(&keep)).await;
        }
        Ok(n)
    }

    /// What gc must keep: the layers of every image, and of every pull still running (read
    /// first: a pull that ends meanwhile has recorded its image by the time the images are
    /// read).
    async fn layers_in_use(&self) -> Result<Vec<String>> {
        let mut keep: Vec<String> = {
            let jobs = self.registry.jobs.lock().unwrap_or_else(|p| p.into_inner());
            jobs.values()
                .filter(|j| j.view.lock().unwrap_or_else(|p| p.into_inner()).state == RUNNING)
                .flat_map(|j| j.layers.lock().unwrap_or_else(|p| p.into_inner()).clone())
                .collect()
        };
        keep.extend(
            self.store
                .images()
                .await?
                .into_iter()
                .flat_map(|i| i.layers),
        );
        Ok(keep)
    }

    /// Pull jobs of the tenant still running.
    pub(crate) fn running_pulls(&self, tenant_id: &str) -> usize {
        let jobs = self.registry.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.values()
            .filter(|j| j.tenant_id == tenant_id)
            .filter(|j| j.view.lock().unwrap_or_else(|p| p.into_inner()).state == RUNNING)
            .count()
    }

    /// Stops the tenant's running pulls (its deletion): their tasks end at once, nothing
    /// they fetched is recorded.
    fn cancel_tenant_pulls(&self, tenant_id: &str) {
        let jobs: Vec<Arc<Job>> = self
            .registry
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|j| j.tenant_id == tenant_id)
            .cloned()
            .collect();
        for job in jobs {
            if let Some(h) = job.abort.lock().unwrap_or_else(|p| p.into_inner()).take() {
                h.abort();
            }
            let running = job.view.lock().unwrap_or_else(|p| p.into_inner()).state == RUNNING;
            if running {
                self.bump(&job, |j| {
                    j.state = FAILED.into();
                    j.unpacking = false;
                    j.error = Some("cancelled: the tenant was deleted".into());
                    j.code = Some(wire::code::NOT_FOUND.to_string());
                });
            }
        }
    }

    /// Resumes pull jobs a previous daemon left running (at start-up); forgets finished jobs
    /// older than a day.
    pub async fn resume_pulls(self: &Arc<Self>) -> Result<usize> {
        let _ = self.store.prune_pulls(now_ms() - 86_400_000).await;
        // Partial downloads nobody resumed for a day go (now, before the resumed jobs run,
        // and every hour while no pull runs).
        let puller = self.puller();
        let _ = tokio::task::spawn_blocking(move || puller.sweep_partials(STALE_PARTIAL)).await;
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(engine) = weak.upgrade() else { return };
                let puller = engine.puller();
                drop(engine);
                let _ =
                    tokio::task::spawn_blocking(move || puller.sweep_partials(STALE_PARTIAL)).await;
            }
        });
        let names = self.tenant_names().await?;
        let rows = self.store.pulls_in(RUNNING).await?;
        let n = rows.len();
        for row in rows {
            tracing::info!(pull = %row.id, reference = %row.reference, "resuming an interrupted pull");
            let tenant = names.get(&row.tenant_id).cloned().unwrap_or_default();
            // Whether an admin started it is not stored: a resumed pull is a tenant's.
            self.spawn_pull(row, tenant, false);
        }
        Ok(n)
    }
}

/// An upload in progress: bytes go to the node's staging file; dropped = removed.
pub struct ImageUpload {
    name: String,
    upload: Option<gpuvisor_node::image::Upload>,
}

impl ImageUpload {
    /// Appends a chunk (on a blocking thread: it is a file write); returns the bytes so far.
    /// Chunks are plain byte vectors: the control layer knows no HTTP body type.
    pub async fn write(&mut self, chunk: Vec<u8>) -> Result<u64> {
        let mut upload = self
            .upload
            .take()
            .ok_or_else(|| EngineError::Internal("upload already finished".into()))?;
        let (upload, r) = tokio::task::spawn_blocking(move || {
            let r = upload.write(&chunk);
            (upload, r)
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?;
        let written = upload.written();
        self.upload = Some(upload);
        r.map_err(Engine::import_err)?;
        Ok(written)
    }
}
