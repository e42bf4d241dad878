//! Blocking HTTP client of the daemon's REST API, one typed method per route.
//!
//! The CLI is a short-lived process that makes a handful of calls, so it uses blocking `ureq`
//! rather than a runtime. Non-2xx answers are decoded into [`ClientError::Api`] with the stable
//! machine-readable code of [`gpuvisor_wire::ErrorBody`] (the agent is configured with
//! `http_status_as_error(false)` so that the body can be read); a daemon that cannot be reached is
//! [`ClientError::Unreachable`], which the CLI turns into its own exit code and a hint.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use gpuvisor_wire::{
    code, ApiKey, CreateInstance, CreateKey, CreateTenant, CreateVolume, CreatedKey, ErrorBody,
    Event, ExecEnd, ExecRequest, Gpu, Health, Image, ImagePull, ImportImage, Instance, Logs,
    PullImage, RegistryCredential, RegistryLogin, Tenant, TenantPolicy, Volume, API_KEY_HEADER,
    API_PREFIX,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;
use ureq::http::Response;
use ureq::Body;

/// Largest answer the client reads (exec output and logs can be big; a listing never is).
const MAX_BODY: u64 = 1 << 30;

/// How long to try to connect before declaring the daemon unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum ClientError {
    /// The daemon answered with an error.
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error(
        "cannot reach the daemon at {endpoint} ({reason}): start it with `gpuvisor serve` or set \
         GPUVISOR_ENDPOINT / --endpoint"
    )]
    Unreachable { endpoint: String, reason: String },
    #[error("request to {endpoint} failed: {reason}")]
    Transport { endpoint: String, reason: String },
    #[error("unexpected answer from the daemon: {0}")]
    Decode(String),
    #[error("{0}")]
    Unsupported(String),
}

impl ClientError {
    /// The machine-readable code printed after the message; the API's own for API errors.
    pub fn code(&self) -> &str {
        match self {
            ClientError::Api { code, .. } => code,
            ClientError::Unreachable { .. } => "unavailable",
            ClientError::Transport { .. } => "transport",
            ClientError::Decode(_) => "decode",
            ClientError::Unsupported(_) => "unsupported",
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Api { code: c, .. } if c == code::NOT_FOUND)
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// Longest the client waits out the daemon's rate limits (429 with `Retry-After`) before it
/// gives the 429 to its caller.
pub const RATE_LIMIT_PATIENCE: Duration = Duration::from_secs(30);

fn encode<B: Serialize>(body: &B) -> Result<Vec<u8>> {
    serde_json::to_vec(body).map_err(|e| ClientError::Decode(format!("encoding request: {e}")))
}

pub struct Client {
    agent: ureq::Agent,
    /// Endpoint without a trailing slash, e.g. `https://127.0.0.1:7070`.
    endpoint: String,
    api_key: Option<String>,
    /// What an `https://` endpoint's certificate is checked against (`None`: plain HTTP).
    tls: Option<crate::tls::ClientTrust>,
}

impl Client {
    /// A client of `endpoint` (`https://`, or `http://` for a daemon run with
    /// `--insecure-http`); over TLS it trusts `ca` (a PEM file; `system`: the public web's
    /// roots), else the default daemon's CA file when present, else the web roots.
    pub fn new(
        endpoint: &str,
        api_key: Option<String>,
        ca: Option<&std::path::Path>,
    ) -> Result<Self> {
        Self::with_timeout(endpoint, api_key, ca, None)
    }

    /// [`Client::new`] whose every call gives up after `timeout` (a daemon's client of
    /// another daemon: never waits forever).
    pub fn with_timeout(
        endpoint: &str,
        api_key: Option<String>,
        ca: Option<&std::path::Path>,
        timeout: Option<std::time::Duration>,
    ) -> Result<Self> {
        let endpoint = endpoint.trim().trim_end_matches('/').to_string();
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(timeout)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .user_agent(concat!("gpuvisor/", env!("CARGO_PKG_VERSION")));
        let tls = if endpoint.starts_with("https://") {
            let trust = crate::tls::ClientTrust::choose(ca);
            let roots = match &trust {
                crate::tls::ClientTrust::Ca(_) => ureq::tls::RootCerts::Specific(Arc::new(
                    trust
                        .ca_certs()
                        .map_err(|e| ClientError::Unsupported(format!("{e:#}")))?
                        .iter()
                        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                        .collect(),
                )),
                crate::tls::ClientTrust::WebRoots => ureq::tls::RootCerts::WebPki,
            };
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .provider(ureq::tls::TlsProvider::Rustls)
                    .unversioned_rustls_crypto_provider(crate::tls::provider())
                    .root_certs(roots)
                    .build(),
            );
            Some(trust)
        } else if let Some(rest) = endpoint.strip_prefix("http://") {
            // Plain HTTP carries the key in clear: to this host only, unless asked for.
            let host = rest.split('/').next().unwrap_or_default();
            let host = match host.rsplit_once(':') {
                Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => host,
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback && std::env::var_os("GPUVISOR_ALLOW_INSECURE_HTTP").is_none() {
                return Err(ClientError::Unsupported(format!(
                    "endpoint {endpoint}: plain HTTP to another host would send the API key in clear \
                     text; use https:// (the daemon serves TLS by default), or set \
                     GPUVISOR_ALLOW_INSECURE_HTTP=1"
                )));
            }
            None
        } else {
            return Err(ClientError::Unsupported(format!(
                "endpoint {endpoint:?} is not an https:// (or http://) URL (e.g. {})",
                crate::cli::DEFAULT_ENDPOINT
            )));
        };
        Ok(Client {
            agent: config.build().into(),
            endpoint,
            api_key: api_key.filter(|k| !k.is_empty()),
            tls,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{API_PREFIX}{path}", self.endpoint)
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call("GET", path, None)
    }

    fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call("DELETE", path, None)
    }

    fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call("PUT", path, Some(encode(body)?))
    }

    fn patch<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call("PATCH", path, Some(encode(body)?))
    }

    fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: Option<&B>) -> Result<T> {
        let body = body.map(encode).transpose()?;
        self.call("POST", path, Some(body.unwrap_or_default()))
    }

    /// One JSON call. A 429 that says when to come back (`Retry-After`: the daemon's rate
    /// limits) is tried again after that wait, for up to [`RATE_LIMIT_PATIENCE`] in all.
    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let started = std::time::Instant::now();
        loop {
            let url = self.url(path);
            let key = self.api_key.as_deref();
            let with_key = |r: ureq::RequestBuilder<ureq::typestate::WithoutBody>| match key {
                Some(k) => r.header(API_KEY_HEADER, k),
                None => r,
            };
            let with_key_body = |r: ureq::RequestBuilder<ureq::typestate::WithBody>| match key {
                Some(k) => r.header(API_KEY_HEADER, k),
                None => r,
            };
            let sent = match (method, &body) {
                ("GET", _) => with_key(self.agent.get(url)).call(),
                ("DELETE", _) => with_key(self.agent.delete(url)).call(),
                ("PUT", Some(b)) => with_key_body(self.agent.put(url))
                    .content_type("application/json")
                    .send(b.as_slice()),
                ("PATCH", Some(b)) => with_key_body(self.agent.patch(url))
                    .content_type("application/json")
                    .send(b.as_slice()),
                (_, Some(b)) if !b.is_empty() => with_key_body(self.agent.post(url))
                    .content_type("application/json")
                    .send(b.as_slice()),
                _ => with_key_body(self.agent.post(url)).send_empty(),
            };
            let retry_after = sent.as_ref().ok().and_then(|r| {
                (r.status().as_u16() == 429)
                    .then(|| r.headers().get("retry-after"))
                    .flatten()
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
            });
            match retry_after {
                Some(secs)
                    if started.elapsed() + Duration::from_secs(secs) <= RATE_LIMIT_PATIENCE =>
                {
                    std::thread::sleep(Duration::from_secs(secs.max(1)));
                }
                _ => return self.finish(sent),
            }
        }
    }

    fn finish<T: DeserializeOwned>(
        &self,
        sent: std::result::Result<Response<Body>, ureq::Error>,
    ) -> Result<T> {
        let mut resp = sent.map_err(|e| self.transport_error(e))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|e| self.transport_error(e))?;
        if (200..300).contains(&status) {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
        } else {
            Err(api_error(status, &bytes))
        }
    }

    fn transport_error(&self, e: ureq::Error) -> ClientError {
        let endpoint = self.endpoint.clone();
        if is_unreachable(&e) {
            ClientError::Unreachable {
                endpoint,
                reason: e.to_string(),
            }
        } else {
            let mut reason = e.to_string();
            if reason.contains("invalid peer certificate") {
                reason.push_str(
                    " (the daemon's certificate does not chain to a CA this client trusts: give \
                     the daemon's CA with --ca or GPUVISOR_CA, e.g. <data dir>/ca.pem)",
                );
            }
            ClientError::Transport { endpoint, reason }
        }
    }

    pub fn health(&self) -> Result<Health> {
        self.get("/health")
    }

    pub fn list_tenants(&self) -> Result<Vec<Tenant>> {
        self.get("/tenants")
    }

    /// A tenant with its policy and usage.
    pub fn get_tenant(&self, name: &str) -> Result<Tenant> {
        self.get(&format!("/tenants/{}", segment(name)))
    }

    /// Replaces a tenant's policy (admin).
    pub fn set_tenant_policy(&self, name: &str, policy: &TenantPolicy) -> Result<Tenant> {
        self.put(&format!("/tenants/{}/policy", segment(name)), policy)
    }

    /// A tenant admin's own quotas for its tenant (within the admin's).
    pub fn set_tenant_limits(&self, name: &str, limits: &TenantPolicy) -> Result<Tenant> {
        self.put(&format!("/tenants/{}/limits", segment(name)), limits)
    }

    /// Deletes a tenant (admin); with `cascade`, also everything it owns.
    pub fn delete_tenant(&self, name: &str, cascade: bool) -> Result<gpuvisor_wire::TenantRemoval> {
        self.delete(&format!("/tenants/{}?cascade={cascade}", segment(name)))
    }

    pub fn create_tenant(&self, req: &CreateTenant) -> Result<Tenant> {
        self.post("/tenants", Some(req))
    }

    pub fn list_keys(&self) -> Result<Vec<ApiKey>> {
        self.get("/keys")
    }

    pub fn audit(&self, q: &gpuvisor_wire::AuditQuery) -> Result<Vec<gpuvisor_wire::AuditEntry>> {
        let mut params = Vec::new();
        if let Some(v) = &q.since {
            params.push(format!("since={}", segment(v)));
        }
        if let Some(v) = &q.tenant {
            params.push(format!("tenant={}", segment(v)));
        }
        if let Some(v) = q.after {
            params.push(format!("after={v}"));
        }
        if let Some(v) = q.limit {
            params.push(format!("limit={v}"));
        }
        let query = if params.is_empty() {
            String::new()
        } else {
            format!("?{}", params.join("&"))
        };
        self.get(&format!("/audit{query}"))
    }

    pub fn usage(&self, q: &gpuvisor_wire::UsageQuery) -> Result<gpuvisor_wire::UsageReport> {
        let params: Vec<String> = [
            ("tenant", &q.tenant),
            ("from", &q.from),
            ("to", &q.to),
            ("subject", &q.subject),
        ]
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", segment(v))))
        .collect();
        let query = if params.is_empty() {
            String::new()
        } else {
            format!("?{}", params.join("&"))
        };
        self.get(&format!("/usage{query}"))
    }

    pub fn gpu_types(&self) -> Result<Vec<gpuvisor_wire::GpuType>> {
        self.get("/gpu-types")
    }

    pub fn audit_verify(&self) -> Result<gpuvisor_wire::AuditVerification> {
        self.get("/audit/verify")
    }

    pub fn create_key(&self, req: &CreateKey) -> Result<CreatedKey> {
        self.post("/keys", Some(req))
    }

    pub fn revoke_key(&self, id: &str) -> Result<ApiKey> {
        self.delete(&format!("/keys/{}", segment(id)))
    }

    pub fn list_gpus(&self) -> Result<Vec<Gpu>> {
        self.get("/gpus")
    }

    /// Binds a GPU (UUID, index or PCI address) to vfio-pci; answers the GPU as listed after.
    pub fn bind_vfio(&self, gpu: &str) -> Result<Gpu> {
        self.post::<(), _>(&format!("/gpus/{}/bind-vfio", segment(gpu)), None)
    }

    /// Gives a GPU back to the host driver.
    pub fn release_gpu(&self, gpu: &str) -> Result<Gpu> {
        self.post::<(), _>(&format!("/gpus/{}/release", segment(gpu)), None)
    }

    /// Cordons a GPU (no new placements); answers the GPU as listed after.
    pub fn cordon_gpu(&self, gpu: &str, reason: Option<String>) -> Result<Gpu> {
        let body = gpuvisor_wire::CordonGpu { reason };
        self.post(&format!("/gpus/{}/cordon", segment(gpu)), Some(&body))
    }

    /// Lifts a GPU's cordon.
    pub fn uncordon_gpu(&self, gpu: &str) -> Result<Gpu> {
        self.delete(&format!("/gpus/{}/cordon", segment(gpu)))
    }

    pub fn mig_state(&self, gpu: &str) -> Result<gpuvisor_wire::mig::MigState> {
        self.get(&format!("/gpus/{}/mig", segment(gpu)))
    }

    pub fn mig_create(&self, gpu: &str, profile: &str) -> Result<gpuvisor_wire::mig::GpuInstance> {
        let body = gpuvisor_wire::mig::CreateMigInstance {
            profile: profile.to_string(),
        };
        self.post(&format!("/gpus/{}/mig", segment(gpu)), Some(&body))
    }

    pub fn mig_destroy(&self, gpu: &str, gi: u32) -> Result<gpuvisor_wire::mig::GpuInstance> {
        self.delete(&format!("/gpus/{}/mig/{gi}", segment(gpu)))
    }

    pub fn list_images(&self) -> Result<Vec<Image>> {
        self.get("/images")
    }

    pub fn import_image(&self, req: &ImportImage) -> Result<Image> {
        self.post("/images", Some(req))
    }

    /// Removes an image; `tenant` picks among tenants' private images of that name (admin).
    pub fn remove_image(&self, name: &str, tenant: Option<&str>) -> Result<Image> {
        self.delete(&format!("/images/{}{}", segment(name), owner_query(tenant)))
    }

    // ---- registry pulls, uploads, publishing, credentials ----------------------------------

    /// Streams a local archive to the daemon (`POST /images/upload?name=N`).
    pub fn upload_image(&self, name: &str, file: std::fs::File) -> Result<Image> {
        let mut req = self
            .agent
            .post(self.url(&format!("/images/upload?name={}", segment(name))));
        if let Some(key) = &self.api_key {
            req = req.header(API_KEY_HEADER, key);
        }
        if let Ok(m) = file.metadata() {
            req = req.header("content-length", m.len().to_string());
        }
        // A refusal (size, rights, name) comes before a byte is sent.
        req = req.header("expect", "100-continue");
        let sent =
            req.content_type("application/octet-stream")
                .send(ureq::SendBody::from_owned_reader(
                    io::BufReader::with_capacity(1 << 20, file),
                ));
        self.finish(sent)
    }

    pub fn publish_image(&self, name: &str, tenant: Option<&str>) -> Result<Image> {
        self.post::<(), _>(
            &format!("/images/{}/publish{}", segment(name), owner_query(tenant)),
            None,
        )
    }

    pub fn pull_image(&self, req: &PullImage) -> Result<ImagePull> {
        self.post("/images/pulls", Some(req))
    }

    /// A pull job; with `since`, the daemon answers at the next change (or after `wait_ms`).
    pub fn get_pull(&self, id: &str, since: Option<u64>, wait_ms: u64) -> Result<ImagePull> {
        match since {
            Some(v) => self.get(&format!(
                "/images/pulls/{}?since={v}&timeout_ms={wait_ms}",
                segment(id)
            )),
            None => self.get(&format!("/images/pulls/{}", segment(id))),
        }
    }

    pub fn registry_login(&self, req: &RegistryLogin) -> Result<RegistryCredential> {
        self.post("/registries", Some(req))
    }

    pub fn registry_logout(&self, host: &str) -> Result<RegistryCredential> {
        self.delete(&format!("/registries/{}", segment(host)))
    }

    pub fn registry_list(&self) -> Result<Vec<RegistryCredential>> {
        self.get("/registries")
    }

    pub fn list_templates(&self) -> Result<Vec<gpuvisor_wire::Template>> {
        self.get("/templates")
    }

    pub fn get_template(&self, name: &str) -> Result<gpuvisor_wire::Template> {
        self.get(&format!("/templates/{}", segment(name)))
    }

    pub fn create_template(
        &self,
        req: &gpuvisor_wire::CreateTemplate,
    ) -> Result<gpuvisor_wire::Template> {
        self.post("/templates", Some(req))
    }

    pub fn remove_template(&self, name: &str) -> Result<gpuvisor_wire::Template> {
        self.delete(&format!("/templates/{}", segment(name)))
    }

    pub fn list_endpoints(&self) -> Result<Vec<gpuvisor_wire::Endpoint>> {
        self.get("/endpoints")
    }

    pub fn get_endpoint(&self, id: &str) -> Result<gpuvisor_wire::Endpoint> {
        self.get(&format!("/endpoints/{}", segment(id)))
    }

    pub fn create_endpoint(
        &self,
        req: &gpuvisor_wire::CreateEndpoint,
    ) -> Result<gpuvisor_wire::Endpoint> {
        self.post("/endpoints", Some(req))
    }

    pub fn update_endpoint(
        &self,
        id: &str,
        req: &gpuvisor_wire::UpdateEndpoint,
    ) -> Result<gpuvisor_wire::Endpoint> {
        self.patch(&format!("/endpoints/{}", segment(id)), req)
    }

    pub fn remove_endpoint(&self, id: &str) -> Result<gpuvisor_wire::Endpoint> {
        self.delete(&format!("/endpoints/{}", segment(id)))
    }

    pub fn list_volumes(&self) -> Result<Vec<Volume>> {
        self.get("/volumes")
    }

    pub fn create_volume(&self, req: &CreateVolume) -> Result<Volume> {
        self.post("/volumes", Some(req))
    }

    pub fn remove_volume(&self, name: &str) -> Result<Volume> {
        self.delete(&format!("/volumes/{}", segment(name)))
    }

    pub fn list_snapshots(&self) -> Result<Vec<gpuvisor_wire::Snapshot>> {
        self.get("/snapshots")
    }

    /// By id or name.
    pub fn get_snapshot(&self, id_or_name: &str) -> Result<gpuvisor_wire::Snapshot> {
        self.get(&format!("/snapshots/{}", segment(id_or_name)))
    }

    pub fn delete_snapshot(&self, id_or_name: &str) -> Result<gpuvisor_wire::Snapshot> {
        self.delete(&format!("/snapshots/{}", segment(id_or_name)))
    }

    /// Answers once the snapshot is complete.
    pub fn create_snapshot(
        &self,
        instance: &str,
        req: &gpuvisor_wire::CreateSnapshot,
    ) -> Result<gpuvisor_wire::Snapshot> {
        self.post(
            &format!("/instances/{}/snapshots", segment(instance)),
            Some(req),
        )
    }

    pub fn restore_instance(
        &self,
        instance: &str,
        req: &gpuvisor_wire::RestoreInstance,
    ) -> Result<Instance> {
        self.post(
            &format!("/instances/{}/restore", segment(instance)),
            Some(req),
        )
    }

    pub fn migrate_instance(
        &self,
        instance: &str,
        req: &gpuvisor_wire::MigrateInstance,
    ) -> Result<gpuvisor_wire::MigrationReport> {
        self.post(
            &format!("/instances/{}/migrate", segment(instance)),
            Some(req),
        )
    }

    /// Daemon to daemon: offers a running VM to this daemon ([`crate::peer`]).
    pub fn offer_migration(
        &self,
        offer: &gpuvisor_wire::MigrationOffer,
    ) -> Result<gpuvisor_wire::MigrationAccepted> {
        self.post("/migrations", Some(offer))
    }

    pub fn run_migration(&self, id: &str) -> Result<gpuvisor_wire::MigrationStatus> {
        self.post::<(), _>(&format!("/migrations/{}/run", segment(id)), None)
    }

    pub fn drop_migration(&self, id: &str, lost: bool) -> Result<gpuvisor_wire::MigrationStatus> {
        self.delete(&format!("/migrations/{}?lost={lost}", segment(id)))
    }

    pub fn migration_status(&self, id: &str) -> Result<gpuvisor_wire::MigrationStatus> {
        self.get(&format!("/migrations/{}", segment(id)))
    }

    /// The `host:port` of the endpoint and the key: what a raw upgraded connection needs.
    pub fn authority(&self) -> String {
        self.endpoint
            .split_once("://")
            .map_or(self.endpoint.as_str(), |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string()
    }

    pub fn key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }

    pub fn list_instances(&self) -> Result<Vec<Instance>> {
        self.get("/instances")
    }

    pub fn create_instance(&self, req: &CreateInstance) -> Result<Instance> {
        self.post("/instances", Some(req))
    }

    /// By id or name; a terminated instance is still answered (or 404, depending on age).
    pub fn get_instance(&self, id_or_name: &str) -> Result<Instance> {
        self.get(&format!("/instances/{}", segment(id_or_name)))
    }

    /// Long-polls: answers when the instance's `updated_at` is no longer `since`, or after
    /// `timeout` with the unchanged instance.
    pub fn watch_instance(
        &self,
        id: &str,
        since: i64,
        timeout: std::time::Duration,
    ) -> Result<Instance> {
        self.get(&format!(
            "/instances/{}?since={since}&timeout_ms={}",
            segment(id),
            timeout.as_millis()
        ))
    }

    /// Asks for termination; the answer comes before the instance is gone.
    pub fn terminate_instance(&self, id_or_name: &str) -> Result<Instance> {
        self.delete(&format!("/instances/{}", segment(id_or_name)))
    }

    pub fn stop_instance(&self, id: &str) -> Result<Instance> {
        self.post::<(), _>(&format!("/instances/{}/stop", segment(id)), None)
    }

    pub fn create_link(
        &self,
        id: &str,
        req: &gpuvisor_wire::CreateLink,
    ) -> Result<gpuvisor_wire::Link> {
        self.post(&format!("/instances/{}/links", segment(id)), Some(req))
    }

    pub fn scale_instance(&self, id: &str, req: &gpuvisor_wire::ScaleInstance) -> Result<Instance> {
        self.post(&format!("/instances/{}/scale", segment(id)), Some(req))
    }

    pub fn start_instance(&self, id: &str) -> Result<Instance> {
        self.post::<(), _>(&format!("/instances/{}/start", segment(id)), None)
    }

    pub fn logs(&self, id: &str, offset: u64) -> Result<Logs> {
        self.get(&format!("/instances/{}/logs?offset={offset}", segment(id)))
    }

    /// Runs a command in an instance; `on_output(kind, bytes)` gets its output as it arrives
    /// ([`gpuvisor_wire::exec::STDOUT`] or `STDERR`). Answers how it ended.
    pub fn exec(
        &self,
        id: &str,
        req: &ExecRequest,
        mut on_output: impl FnMut(u8, &[u8]) -> io::Result<()>,
    ) -> Result<ExecEnd> {
        use gpuvisor_wire::exec as frame;
        use std::io::Read;
        let mut r = self
            .agent
            .post(self.url(&format!("/instances/{}/exec", segment(id))));
        if let Some(key) = &self.api_key {
            r = r.header(API_KEY_HEADER, key);
        }
        let bytes = serde_json::to_vec(req)
            .map_err(|e| ClientError::Decode(format!("encoding request: {e}")))?;
        let mut resp = r
            .content_type("application/json")
            .send(bytes)
            .map_err(|e| self.transport_error(e))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let body = resp
                .body_mut()
                .with_config()
                .limit(1 << 20)
                .read_to_vec()
                .map_err(|e| self.transport_error(e))?;
            return Err(api_error(status, &body));
        }
        let mut reader = resp.into_body().into_reader();
        let cut = |e: io::Error| ClientError::Transport {
            endpoint: self.endpoint.clone(),
            reason: format!("the exec stream was cut: {e}"),
        };
        let mut payload = Vec::new();
        loop {
            let mut head = [0u8; frame::HEADER];
            reader.read_exact(&mut head).map_err(cut)?;
            let (kind, len) = frame::parse_header(head);
            payload.resize(len, 0);
            reader.read_exact(&mut payload).map_err(cut)?;
            match kind {
                frame::END => {
                    return serde_json::from_slice(&payload)
                        .map_err(|e| ClientError::Decode(format!("exec end: {e}")))
                }
                frame::STDOUT | frame::STDERR => {
                    on_output(kind, &payload).map_err(|e| ClientError::Transport {
                        endpoint: self.endpoint.clone(),
                        reason: format!("writing the command's output: {e}"),
                    })?
                }
                _ => {} // unknown frames are for newer clients
            }
        }
    }

    pub fn events(&self, id: &str) -> Result<Vec<Event>> {
        self.get(&format!("/instances/{}/events", segment(id)))
    }

    /// Metric history of an instance (`since` like `10m`, `step` like `1s`).
    pub fn instance_metrics(
        &self,
        id: &str,
        since: &str,
        step: Option<&str>,
    ) -> Result<gpuvisor_wire::MetricsHistory> {
        self.get(&format!(
            "/instances/{}/metrics?{}",
            segment(id),
            metrics_query(since, step)
        ))
    }

    pub fn gpu_metrics(
        &self,
        id: &str,
        since: &str,
        step: Option<&str>,
    ) -> Result<gpuvisor_wire::MetricsHistory> {
        self.get(&format!(
            "/gpus/{}/metrics?{}",
            segment(id),
            metrics_query(since, step)
        ))
    }

    pub fn gpu_stats(&self) -> Result<Vec<gpuvisor_wire::GpuStats>> {
        self.get("/gpus/stats")
    }

    pub fn gpu_events(
        &self,
        q: &gpuvisor_wire::GpuEventsQuery,
    ) -> Result<Vec<gpuvisor_wire::GpuEvent>> {
        let mut query = Vec::new();
        if let Some(s) = &q.since {
            query.push(format!("since={}", segment(s)));
        }
        if let Some(g) = &q.gpu {
            query.push(format!("gpu={}", segment(g)));
        }
        if let Some(n) = q.limit {
            query.push(format!("limit={n}"));
        }
        self.get(&format!("/gpus/events?{}", query.join("&")))
    }
}

fn metrics_query(since: &str, step: Option<&str>) -> String {
    let mut q = format!("since={}", segment(since));
    if let Some(step) = step {
        q.push_str(&format!("&step={}", segment(step)));
    }
    q
}

/// Decodes a non-2xx answer; a body that is not an [`ErrorBody`] (a proxy, an old daemon) still
/// gives a code derived from the status so that exit codes stay meaningful.
fn api_error(status: u16, body: &[u8]) -> ClientError {
    if let Ok(ErrorBody { error }) = serde_json::from_slice::<ErrorBody>(body) {
        return ClientError::Api {
            status,
            code: error.code,
            message: error.message,
        };
    }
    let code = match status {
        400 | 422 => code::INVALID_ARGUMENT,
        401 => code::UNAUTHORIZED,
        403 => code::FORBIDDEN,
        404 => code::NOT_FOUND,
        409 => code::INVALID_STATE,
        _ => code::INTERNAL,
    };
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let message = if text.is_empty() {
        format!("the daemon answered HTTP {status}")
    } else {
        format!("the daemon answered HTTP {status}: {}", truncate(text, 200))
    };
    ClientError::Api {
        status,
        code: code.to_string(),
        message,
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn is_unreachable(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Io(io) => matches!(
            io.kind(),
            io::ErrorKind::ConnectionRefused
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable
                | io::ErrorKind::AddrNotAvailable
                | io::ErrorKind::NotFound
        ),
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => true,
        ureq::Error::Timeout(t) => matches!(t, ureq::Timeout::Connect | ureq::Timeout::Resolve),
        _ => false,
    }
}

// ---- interactive exec (WebSocket) ----------------------------------------------------------

/// A connected exec session ([`gpuvisor_wire::session`]), blocking; the caller may make its
/// stream non-blocking.
pub type SessionSocket = tungstenite::WebSocket<SessionStream>;

/// The connection under a session: TCP, or TLS over it.
pub enum SessionStream {
    Plain(std::net::TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>),
}

impl SessionStream {
    fn tcp(&self) -> &std::net::TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(t) => &t.sock,
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        self.tcp().set_nonblocking(on)
    }

    pub fn set_write_timeout(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.tcp().set_write_timeout(t)
    }
}

impl std::os::fd::AsFd for SessionStream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.tcp().as_fd()
    }
}

impl std::io::Read for SessionStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(t) => t.read(buf),
        }
    }
}

impl std::io::Write for SessionStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(t) => t.flush(),
        }
    }
}

impl Client {
    /// Opens an interactive exec session: `GET .../exec/ws?request=...` upgraded to a
    /// WebSocket. Errors the daemon answers before the upgrade (not found, not running, too
    /// many execs) come back as [`ClientError::Api`], like every other call.
    pub fn exec_session(
        &self,
        id: &str,
        req: &gpuvisor_wire::ExecSessionRequest,
    ) -> Result<SessionSocket> {
        let json = serde_json::to_string(req)
            .map_err(|e| ClientError::Decode(format!("encoding request: {e}")))?;
        self.session(&format!(
            "{}/{}?{}={}",
            segment(id),
            gpuvisor_wire::session::PATH,
            gpuvisor_wire::session::QUERY,
            segment(&json)
        ))
    }

    /// Attaches to a VM's serial console: `GET .../console/ws` upgraded to a WebSocket (the
    /// exec session protocol).
    pub fn console_session(&self, id: &str) -> Result<SessionSocket> {
        self.session(&format!(
            "{}/{}",
            segment(id),
            gpuvisor_wire::session::CONSOLE_PATH
        ))
    }

    /// Opens the WebSocket at `.../instances/<rest>`.
    fn session(&self, rest: &str) -> Result<SessionSocket> {
        use std::net::ToSocketAddrs;
        let authority = self.authority();
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        let url = format!("{scheme}://{authority}{API_PREFIX}/instances/{rest}");
        let unreachable = |reason: String| ClientError::Unreachable {
            endpoint: self.endpoint.clone(),
            reason,
        };
        let addrs: Vec<_> = authority
            .to_socket_addrs()
            .map_err(|e| unreachable(e.to_string()))?
            .collect();
        let mut last = String::from("no address");
        let mut stream = None;
        for a in addrs {
            match std::net::TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        let stream = stream.ok_or_else(|| unreachable(last))?;
        let _ = stream.set_nodelay(true);
        let uri: tungstenite::http::Uri = url
            .parse()
            .map_err(|e| ClientError::Decode(format!("session url: {e}")))?;
        let stream = match &self.tls {
            None => SessionStream::Plain(stream),
            Some(trust) => {
                let config = trust
                    .client_config()
                    .map_err(|e| ClientError::Unsupported(format!("{e:#}")))?;
                let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| unreachable(format!("{host:?} is no TLS server name: {e}")))?;
                let conn = rustls::ClientConnection::new(config, name)
                    .map_err(|e| unreachable(format!("TLS: {e}")))?;
                SessionStream::Tls(Box::new(rustls::StreamOwned::new(conn, stream)))
            }
        };
        let mut builder = tungstenite::ClientRequestBuilder::new(uri).with_header(
            "user-agent",
            concat!("gpuvisor/", env!("CARGO_PKG_VERSION")),
        );
        if let Some(key) = &self.api_key {
            builder = builder.with_header(API_KEY_HEADER, key.as_str());
        }
        match tungstenite::client::client(builder, stream) {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                let status = resp.status().as_u16();
                Err(api_error(
                    status,
                    resp.body().as_deref().unwrap_or_default(),
                ))
            }
            Err(e) => Err(ClientError::Transport {
                endpoint: self.endpoint.clone(),
                reason: format!("opening the exec session: {e}"),
            }),
        }
    }
}

/// Percent-encodes one path segment (names are user input).
fn owner_query(tenant: Option<&str>) -> String {
    tenant.map_or(String::new(), |t| format!("?tenant={}", segment(t)))
}

fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Serves one canned HTTP answer on a free port and returns the endpoint and the request
    /// text it received.
    fn one_shot(
        status_line: &'static str,
        body: &'static str,
    ) -> (String, std::thread::JoinHandle<String>) {
        answers(vec![(status_line, "", body)])
    }

    /// Serves one canned answer per connection, in order: (status line, extra header lines,
    /// body); returns the endpoint and the last request's text.
    fn answers(
        list: Vec<(&'static str, &'static str, &'static str)>,
    ) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut last = String::new();
            for (status_line, headers, body) in list {
                last = answer(&listener, status_line, headers, body);
            }
            last
        });
        (endpoint, handle)
    }

    fn answer(listener: &TcpListener, status_line: &str, headers: &str, body: &str) -> String {
        {
            let (mut sock, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 8192];
            let mut req = Vec::new();
            loop {
                let n = sock.read(&mut buf).unwrap();
                req.extend_from_slice(&buf[..n]);
                if n == 0 || req.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let resp = format!(
                "{status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}connection: close\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(resp.as_bytes()).unwrap();
            String::from_utf8_lossy(&req).into_owned()
        }
    }

    #[test]
    fn a_rate_limit_answer_is_waited_out_and_tried_again() {
        let limited = r#"{"error":{"code":"resource_exhausted","message":"too many requests"}}"#;
        let ok = r#"{"status":"ok","version":"t","node":"n"}"#;
        let (endpoint, handle) = answers(vec![
            (
                "HTTP/1.1 429 Too Many Requests",
                "retry-after: 1\r\n",
                limited,
            ),
            ("HTTP/1.1 200 OK", "", ok),
        ]);
        let client = Client::new(&endpoint, None, None).unwrap();
        let t0 = std::time::Instant::now();
        let h = client.health().unwrap();
        assert_eq!(h.node, "n");
        assert!(
            t0.elapsed() >= Duration::from_secs(1),
            "did not wait Retry-After"
        );
        handle.join().unwrap();
        // A 429 without Retry-After (a concurrency cap) is the caller's at once.
        let (endpoint, handle) = one_shot("HTTP/1.1 429 Too Many Requests", limited);
        let client = Client::new(&endpoint, None, None).unwrap();
        let e = client.health().unwrap_err();
        assert!(matches!(e, ClientError::Api { status: 429, .. }), "{e:?}");
        handle.join().unwrap();
    }

    #[test]
    fn decodes_error_body_and_sends_key() {
        let (endpoint, server) = one_shot(
            "HTTP/1.1 404 Not Found",
            r#"{"error":{"code":"not_found","message":"instance web not found"}}"#,
        );
        let client = Client::new(&endpoint, Some("sekret".into()), None).unwrap();
        let err = client.get_instance("web").unwrap_err();
        let req = server.join().unwrap();
        assert!(req.starts_with("GET /v1/instances/web "), "{req}");
        assert!(req.to_lowercase().contains("x-api-key: sekret"), "{req}");
        assert!(err.is_not_found());
        assert_eq!(err.code(), "not_found");
        assert_eq!(err.to_string(), "instance web not found");
    }

    #[test]
    fn non_json_error_gets_code_from_status() {
        let (endpoint, server) = one_shot("HTTP/1.1 403 Forbidden", "nope");
        let client = Client::new(&endpoint, None, None).unwrap();
        let err = client.list_gpus().unwrap_err();
        server.join().unwrap();
        assert_eq!(err.code(), "forbidden");
    }

    #[test]
    fn decodes_success() {
        let (endpoint, server) = one_shot(
            "HTTP/1.1 200 OK",
            r#"{"status":"ok","version":"0.1.0","node":"n1"}"#,
        );
        let client = Client::new(&endpoint, None, None).unwrap();
        let health = client.health().unwrap();
        server.join().unwrap();
        assert_eq!(health.node, "n1");
    }

    #[test]
    fn refused_connection_is_unreachable() {
        // Bind then drop to get a port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::new(&format!("http://127.0.0.1:{port}/"), None, None).unwrap();
        let err = client.health().unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
        assert!(err.to_string().contains("gpuvisor serve"));
    }

    #[test]
    fn rejects_endpoints_that_are_no_http_urls_and_unreadable_cas() {
        assert!(matches!(
            Client::new("127.0.0.1:7070", None, None),
            Err(ClientError::Unsupported(_))
        ));
        assert!(matches!(
            Client::new("ftp://h", None, None),
            Err(ClientError::Unsupported(_))
        ));
        let e = Client::new(
            "https://h",
            None,
            Some(std::path::Path::new("/nonexistent/ca.pem")),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        // `system` and plain HTTP need no file.
        Client::new("https://h", None, Some(std::path::Path::new("system"))).unwrap();
        Client::new(
            "http://127.0.0.1:7070",
            None,
            Some(std::path::Path::new("/nonexistent")),
        )
        .unwrap();
        Client::new("http://[::1]:7070/", None, None).unwrap();
        Client::new("http://localhost", None, None).unwrap();
        // Plain HTTP to another host: the key would travel in clear.
        for e in [
            "http://h",
            "http://10.0.0.1:7070",
            "http://[2001:db8::1]:80",
        ] {
            let err = Client::new(e, None, None).err().unwrap().to_string();
            assert!(err.contains("in clear"), "{e}: {err}");
        }
    }

    #[test]
    fn encodes_segments() {
        assert_eq!(segment("web-1"), "web-1");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }
}
