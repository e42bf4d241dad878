//! Pulling images from OCI distribution registries, and sealing the credentials used for it.
//!
//! Why here: a pull writes to the host (downloads under `<data>/images/pull`, layers through
//! [`ImageStore`]), so it is node work; the engine decides who may pull what and with whose
//! credentials.
//!
//! Key decisions:
//! - **The HTTP is ours** (reqwest + rustls on ring; `oci-client` parses references and
//!   descriptors). One client per pull, so a token negotiated with one tenant's credentials is
//!   never seen by another tenant's pull. Every address it connects to is checked by
//!   `NetGuard` (the registry, each redirect hop, the token service; names after
//!   resolution): https to a public address, or what the operator configured. Every body is
//!   read bounded; an error answer's body is never read (status and our words only);
//!   descriptor `urls` are never fetched.
//! - **Downloads are ours to resume**: a layer blob is streamed to `pull/partial/<key>-<hex>`
//!   (`<key>` names the source: registry, repository, user) and continued with an HTTP Range
//!   request after a lost connection or a daemon restart. A complete blob is hashed whole and
//!   compared with its descriptor's digest and size before it is renamed to
//!   `pull/done/<key>-<hex>` and linked into the pull's own `run/<id>/blobs/sha256/`; a blob
//!   that does not match is deleted (a resumed one is downloaded again once from byte 0).
//! - **One download per source and blob**: pulls take a lock per `<key>-<hex>`; the second
//!   pull waits (at most `LOCK_WAIT`, then downloads on its own) and finds the finished blob.
//! - **Layers already unpacked are not downloaded again** when the store verified earlier that
//!   this blob digest unpacks to the diff id the config names, and the caller says the puller
//!   may use that layer already (its own or a public image's): a registry saying it has the
//!   blob proves nothing.
//! - **Bounds**: descriptor sizes > 0; a config at most `MAX_JSON` (16 MiB); the layers' compressed
//!   and unpacked bytes at most `max_image_size`; the whole pull at most `pull_deadline`.
//! - **Index resolution**: a manifest list or OCI index is resolved to `linux/<host arch>`;
//!   the chosen manifest's digest is checked against the index entry.
//! - **Credentials at rest** are sealed with ChaCha20-Poly1305 under a 256-bit key in
//!   `<data>/keys/registry.key` (0600, in a 0700 directory, made at first use); the
//!   additional data binds each sealed secret to its tenant and host, so a row copied to
//!   another tenant does not open.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::net::{IpAddr, SocketAddr};

use futures_util::StreamExt;
use oci_client::manifest::OciDescriptor;
use oci_client::Reference;
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
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Registries (`host[:port]`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Extra CA certificates (PEM) trusted for registry TLS.
    pub ca_file: Option<PathBuf>,
    /// Registries (`host[:port]`) the operator named (`registry.tenant_hosts`): like the
    /// `insecure` ones, they may live on loopback or private addresses. Every other address a
    /// pull connects to (a registry, a redirect, a token service) must be a public one.
    pub trusted: Vec<String>,
    /// Addresses a pull never connects to unless trusted: the daemon's own (listen) addresses.
    pub deny: Vec<IpAddr>,
    /// Most bytes one image may unpack to (all layers together; one layer too).
    pub max_image_size: u64,
    /// Longest a whole pull may take before it fails (its partial downloads stay).
    pub pull_deadline: std::time::Duration,
}

/// Default for [`RegistryConfig::max_image_size`]: 64 GiB.
pub const DEFAULT_MAX_IMAGE_SIZE: u64 = 64 << 30;
/// Default for [`RegistryConfig::pull_deadline`]: 6 hours.
pub const DEFAULT_PULL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            ca_file: None,
            trusted: Vec::new(),
            deny: Vec::new(),
            max_image_size: DEFAULT_MAX_IMAGE_SIZE,
            pull_deadline: DEFAULT_PULL_DEADLINE,
        }
    }
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
    /// The diff ids the image's config names (before any layer is unpacked or reused: the
    /// caller keeps them from the store's gc until the image is recorded).
    Layers { diff_ids: Vec<String> },
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

/// A registry host as configured or named: lowercase, no scheme, no trailing slash, Docker
/// Hub's other names (`index.docker.io`, `registry-1.docker.io`) as `docker.io`.
pub fn normalize_host(host: &str) -> String {
    let h = host.trim().to_ascii_lowercase();
    let h = h
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    match h {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

const MEDIA_INDEX: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MEDIA_MANIFEST: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
/// Largest manifest, index or config we accept.
const MAX_JSON: usize = 16 << 20;
/// Largest token-service answer we read.
const MAX_TOKEN: usize = 64 << 10;
/// Most redirects one request follows.
const MAX_REDIRECTS: usize = 5;

// ---- where a pull may connect --------------------------------------------------------------

/// Whether `entry` (`host` or `host:port`, normalised) names `host` on `port`; an entry
/// without a port names the scheme's default port.
fn entry_matches(entry: &str, host: &str, port: u16, default_port: bool) -> bool {
    if let Some((h, p)) = entry.rsplit_once(':') {
        if let Ok(p) = p.parse::<u16>() {
            if !h.is_empty() && h.starts_with('[') == h.ends_with(']') {
                return h == host && p == port;
            }
        }
    }
    entry == host && default_port
}

fn entry_host(entry: &str) -> &str {
    match entry.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() && h.starts_with('[') == h.ends_with(']') => h,
        _ => entry,
    }
}

/// Whether `ip` is an ordinary public address: not loopback, private, link-local (cloud
/// metadata services live there), shared, reserved, multicast or unspecified.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            if s[..6].iter().all(|&x| x == 0) {
                // ::a.b.c.d (deprecated compatible form), :: and ::1.
                return is_public(IpAddr::V4(std::net::Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ))) && s[6] != 0;
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x0064 && s[1] == 0xff9b)
                || s[0] == 0x2002)
        }
    }
}

/// Checks every destination of a pull: the registry, each redirect, the token service; and,
/// as reqwest's resolver, every address a name resolves to.
#[derive(Clone)]
struct NetGuard {
    /// Entries the operator configured (insecure and trusted), plus the registry of an admin's
    /// pull: reachable at any address.
    trusted: Arc<Vec<String>>,
    insecure: Arc<Vec<String>>,
    deny: Arc<Vec<IpAddr>>,
}

impl NetGuard {
    fn new(cfg: &RegistryConfig, also: Option<&str>) -> Self {
        let insecure: Vec<String> = cfg.insecure.iter().map(|h| normalize_host(h)).collect();
        let mut trusted: Vec<String> = cfg.trusted.iter().map(|h| normalize_host(h)).collect();
        trusted.extend(insecure.iter().cloned());
        trusted.extend(also.map(normalize_host));
        for t in trusted.clone() {
            if t == "docker.io" {
                trusted.push("index.docker.io".into());
                trusted.push("registry-1.docker.io".into());
            }
        }
        Self {
            trusted: Arc::new(trusted),
            insecure: Arc::new(insecure),
            deny: Arc::new(cfg.deny.clone()),
        }
    }

    fn name_trusted(&self, host: &str) -> bool {
        self.trusted.iter().any(|e| entry_host(e) == host)
    }

    fn ip_ok(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        !self.deny.contains(&ip) && is_public(ip)
    }

    /// Whether a request may go to `url`; the reason when not.
    fn check_url(&self, url: &reqwest::Url) -> Result<(), String> {
        let host = url
            .host_str()
            .ok_or_else(|| "an address without a host".to_string())?
            .to_ascii_lowercase();
        let port = url
            .port_or_known_default()
            .ok_or_else(|| format!("{host}: no port"))?;
        let default_port = url.port().is_none();
        let insecure = self
            .insecure
            .iter()
            .any(|e| entry_matches(e, &host, port, default_port));
        match url.scheme() {
            "https" => {}
            "http" if insecure => {}
            other => {
                return Err(format!(
                    "{host}:{port} over {other} (only https, or plain http to a registry.insecure host)"
                ))
            }
        }
        if self
            .trusted
            .iter()
            .any(|e| entry_matches(e, &host, port, default_port))
        {
            return Ok(());
        }
        // A name trusted on one port is not trusted on others (the resolver cannot tell).
        if self.name_trusted(&host) {
            return Err(format!("{host}:{port} (not a configured registry address)"));
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            if !self.ip_ok(ip) {
                return Err(format!(
                    "{host}:{port} (a loopback, private, link-local or internal address)"
                ));
            }
        }
        Ok(())
    }
}

impl reqwest::dns::Resolve for NetGuard {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let me = self.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if me.name_trusted(&host) {
                return Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs);
            }
            let ok: Vec<SocketAddr> = addrs.into_iter().filter(|a| me.ip_ok(a.ip())).collect();
            if ok.is_empty() {
                return Err(format!(
                    "{host} resolves only to loopback, private, link-local or internal addresses: refused (an operator may name it in registry.insecure or registry.tenant_hosts)"
                )
                .into());
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Reads a body of at most `cap` bytes; `Err(None)` when it is larger.
async fn read_capped(
    resp: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, Option<reqwest::Error>> {
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(None);
    }
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(Some)?;
        if out.len() + chunk.len() > cap {
            return Err(None);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// `scheme params` of a WWW-Authenticate header: `Bearer realm="...",service="..."`.
fn parse_challenge(h: &str) -> (String, HashMap<String, String>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(char::is_whitespace).unwrap_or((h, ""));
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_ascii_lowercase();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
            value = value.trim().to_string();
        }
        params.insert(key, value);
    }
    (scheme.to_ascii_lowercase(), params)
}

enum Auth {
    Anonymous,
    Basic,
    Bearer(String),
}

/// One pull's conversation with one registry repository.
struct Reg<'a> {
    http: reqwest::Client,
    guard: NetGuard,
    /// `scheme://host[:port]/v2/<repository>`.
    base: String,
    repo: String,
    creds: Option<&'a Credentials>,
    /// What requests carry; negotiated once, at the first 401.
    auth: tokio::sync::Mutex<(Auth, bool)>,
    reference: &'a str,
    host: &'a str,
    /// Names this source's downloads: a hash of the registry, the repository and the
    /// username (or anonymous), so pulls from elsewhere never share a partial or a finished
    /// blob with it.
    key: String,
}

impl<'a> Reg<'a> {
    fn new(
        cfg: &RegistryConfig,
        r: &Reference,
        reference: &'a str,
        host: &'a str,
        creds: Option<&'a Credentials>,
        trust_registry: bool,
    ) -> Result<Self, RegistryError> {
        let api_host = r.resolve_registry().to_ascii_lowercase();
        let guard = NetGuard::new(cfg, trust_registry.then_some(api_host.as_str()));
        let insecure = cfg.insecure.iter().map(|h| normalize_host(h)).any(|e| {
            e == normalize_host(&api_host) || e == api_host || e == normalize_host(r.registry())
        });
        let scheme = if insecure { "http" } else { "https" };
        // reqwest is built without a default crypto provider: ours is ring (no aws-lc build;
        // it lacks the post-quantum key exchange, which registries do not need). Installing
        // it twice is harmless (the second call reports the first one).
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let policy_guard = guard.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match policy_guard.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(why) => attempt.error(format!("a redirect to {why} is not allowed")),
            }
        });
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .redirect(policy)
            .dns_resolver(Arc::new(guard.clone()))
            .connect_timeout(std::time::Duration::from_secs(15))
            .read_timeout(std::time::Duration::from_secs(60))
            .user_agent(concat!("gpuvisor/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &cfg.ca_file {
            let data = fs::read(ca).map_err(|e| RegistryError::Io {
                path: ca.clone(),
                why: format!("cannot read the registry CA file: {e}"),
            })?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&data).map_err(|e| RegistryError::Io {
                    path: ca.clone(),
                    why: format!("bad registry CA file: {e}"),
                })?;
            b = b.tls_certs_merge(certs);
        }
        let http = b
            .build()
            .map_err(|e| RegistryError::Unavailable(format!("cannot make an HTTP client: {e}")))?;
        Ok(Self {
            http,
            guard,
            base: format!("{scheme}://{api_host}/v2/{}", r.repository()),
            repo: r.repository().to_string(),
            creds,
            auth: tokio::sync::Mutex::new((Auth::Anonymous, false)),
            reference,
            host,
            key: {
                let who = creds.map(|c| c.username.as_str()).unwrap_or("");
                let h = sha256_hex(format!("{api_host}\0{}\0{who}", r.repository()).as_bytes());
                h["sha256:".len().."sha256:".len() + 16].to_string()
            },
        })
    }

    fn unauthorized(&self, why: &str) -> RegistryError {
        let (reference, host) = (self.reference, self.host);
        RegistryError::Unauthorized(format!(
            "{reference}: {host} refused access ({why}): log in with `gpuvisor registry login {host}` or check the credentials"
        ))
    }

    /// A transport error in words; never a response body.
    fn net_err(&self, doing: &str, e: reqwest::Error) -> RegistryError {
        let e = e.without_url();
        let mut why = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            why = format!("{why}: {s}");
            src = s.source();
        }
        RegistryError::Unavailable(format!(
            "{}: {doing}: cannot reach {}: {why}",
            self.reference, self.host
        ))
    }

    /// What a status other than 200/206 means; the body is never read or shown.
    fn status_err(&self, doing: &str, code: u16) -> RegistryError {
        match code {
            401 | 403 => self.unauthorized(&code.to_string()),
            404 => {
                RegistryError::NotFound(format!("{}: not found on {}", self.reference, self.host))
            }
            429 => RegistryError::Unavailable(format!(
                "{}: {doing}: {} answered 429 (too many requests): try again later",
                self.reference, self.host
            )),
            c => RegistryError::Unavailable(format!(
                "{}: {doing}: {} answered HTTP {c}",
                self.reference, self.host
            )),
        }
    }

    /// GET `<base>/<path>`, negotiating credentials at the first 401.
    async fn get(
        &self,
        path: &str,
        accept: &[&str],
        from: u64,
        doing: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = format!("{}/{path}", self.base);
        let parsed = reqwest::Url::parse(&url).map_err(|e| {
            RegistryError::BadReference(format!("{}: bad registry address: {e}", self.reference))
        })?;
        self.guard.check_url(&parsed).map_err(|why| {
            RegistryError::Unavailable(format!(
                "{}: {doing}: connecting to {why} is not allowed",
                self.reference
            ))
        })?;
        for attempt in 0..2 {
            let mut req = self.http.get(parsed.clone());
            if !accept.is_empty() {
                req = req.header(reqwest::header::ACCEPT, accept.join(", "));
            }
            if from > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
            }
            {
                let auth = self.auth.lock().await;
                req = match (&auth.0, self.creds) {
                    (Auth::Basic, Some(c)) => req.basic_auth(&c.username, Some(&c.password)),
                    (Auth::Bearer(t), _) => req.bearer_auth(t),
                    _ => req,
                };
            }
            let resp = req.send().await.map_err(|e| self.net_err(doing, e))?;
            let code = resp.status().as_u16();
            if code == 401 && attempt == 0 {
                let mut auth = self.auth.lock().await;
                if !auth.1 {
                    let challenge = resp
                        .headers()
                        .get(reqwest::header::WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    drop(resp);
                    auth.0 = self.negotiate(challenge.as_deref()).await?;
                    auth.1 = true;
                    continue;
                }
            }
            if code == 200 || code == 206 {
                return Ok(resp);
            }
            return Err(self.status_err(doing, code));
        }
        Err(self.unauthorized("401"))
    }

    /// Answers a 401's challenge: basic credentials, or a token from the realm it names.
    ///
    /// The token service is checked like the registry (https, a public address unless the
    /// operator configured it). The tenant's credentials go to it, as docker sends them, only
    /// over https (or to the registry's own address); the token it answers is sent to the
    /// registry only (reqwest drops it on a redirect to another host).
    async fn negotiate(&self, challenge: Option<&str>) -> Result<Auth, RegistryError> {
        let Some(challenge) = challenge else {
            return Err(self.unauthorized("401"));
        };
        let (scheme, params) = parse_challenge(challenge);
        match scheme.as_str() {
            "basic" if self.creds.is_some() => Ok(Auth::Basic),
            "bearer" => {
                let realm = params.get("realm").map(String::as_str).unwrap_or("");
                let mut url = reqwest::Url::parse(realm).map_err(|_| {
                    RegistryError::Invalid(format!(
                        "{}: {} names a malformed token service address: refused",
                        self.reference, self.host
                    ))
                })?;
                self.guard.check_url(&url).map_err(|why| {
                    RegistryError::Unavailable(format!(
                        "{}: {} names a token service at {why}: not allowed",
                        self.reference, self.host
                    ))
                })?;
                let registry = reqwest::Url::parse(&self.base).ok();
                let same_host = registry.as_ref().is_some_and(|r| {
                    r.host_str() == url.host_str()
                        && r.port_or_known_default() == url.port_or_known_default()
                });
                url.query_pairs_mut()
                    .append_pair("scope", &format!("repository:{}:pull", self.repo));
                if let Some(s) = params.get("service") {
                    url.query_pairs_mut().append_pair("service", s);
                }
                let mut req = self.http.get(url.clone());
                if let Some(c) = self.creds {
                    if url.scheme() == "https" || same_host {
                        req = req.basic_auth(&c.username, Some(&c.password));
                    }
                }
                let doing = "asking the token service";
                let resp = req.send().await.map_err(|e| self.net_err(doing, e))?;
                let code = resp.status().as_u16();
                if code != 200 {
                    return Err(match code {
                        401 | 403 => {
                            self.unauthorized(&format!("the token service answered {code}"))
                        }
                        c => RegistryError::Unavailable(format!(
                            "{}: {doing}: the token service answered HTTP {c}",
                            self.reference
                        )),
                    });
                }
                let body = read_capped(resp, MAX_TOKEN).await.map_err(|e| match e {
                    Some(e) => self.net_err(doing, e),
                    None => RegistryError::Invalid(format!(
                        "{}: the token service answered more than {MAX_TOKEN} bytes: refused",
                        self.reference
                    )),
                })?;
                #[derive(serde::Deserialize)]
                struct Token {
                    #[serde(default)]
                    token: Option<String>,
                    #[serde(default)]
                    access_token: Option<String>,
                }
                let t: Token = serde_json::from_slice(&body).map_err(|_| {
                    RegistryError::Invalid(format!(
                        "{}: the token service answered something that is not a token",
                        self.reference
                    ))
                })?;
                match t.token.filter(|t| !t.is_empty()).or(t.access_token) {
                    Some(t) if !t.is_empty() => Ok(Auth::Bearer(t)),
                    _ => Err(RegistryError::Invalid(format!(
                        "{}: the token service answered no token",
                        self.reference
                    ))),
                }
            }
            _ => Err(self.unauthorized("401")),
        }
    }

    /// A manifest or index, read up to [`MAX_JSON`] bytes.
    async fn manifest(
        &self,
        at: &str,
        accept: &[&str],
        doing: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let resp = self
            .get(&format!("manifests/{at}"), accept, 0, doing)
            .await?;
        read_capped(resp, MAX_JSON).await.map_err(|e| match e {
            Some(e) => self.net_err(doing, e),
            None => RegistryError::Invalid(format!(
                "{}: {doing}: larger than {MAX_JSON} bytes: refused",
                self.reference
            )),
        })
    }
}

/// Pulls images into an [`ImageStore`]; one per daemon.
///
/// Layout under `<images>/pull`: `partial/<key>-<hex>` (downloads in progress, resumable),
/// `done/<key>-<hex>` (verified blobs, shared by the pulls of the same source), and
/// `run/<id>/blobs/sha256/<hex>` (one pull's blobs, hard links into `done/`, read by the
/// import). `<key>` names the source (see `Reg::key`).
pub struct Puller {
    root: PathBuf,
    cfg: RegistryConfig,
    /// Per source and blob: held while that blob is being fetched.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pulls running; finished blobs are removed when the last one ends (under this lock, so
    /// a pull starting meanwhile waits for the cleanup instead of losing its blobs to it).
    active: Arc<Mutex<usize>>,
    /// How long a pull waits for another's download of the same blob (`LOCK_WAIT`).
    lock_wait: std::time::Duration,
}

/// How long a pull waits for another pull's download of the same blob before downloading it
/// on its own (a slow or stalled source cannot hold the others).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

struct ActiveGuard {
    active: Arc<Mutex<usize>>,
    root: PathBuf,
    run: PathBuf,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.run);
        let mut n = self.active.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            // The layers are unpacked (or the pulls failed); the compressed copies are not
            // needed any more. Partial downloads stay for a resume.
            for sub in ["done", "run"] {
                if let Ok(entries) = fs::read_dir(self.root.join(sub)) {
                    for e in entries.flatten() {
                        let _ = fs::remove_file(e.path());
                        let _ = fs::remove_dir_all(e.path());
                    }
                }
            }
            // Blobs of an older daemon's layout.
            let _ = fs::remove_dir_all(self.root.join("blobs"));
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
            lock_wait: LOCK_WAIT,
        }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }

    /// Removes partial downloads not written for `older` while no pull runs (a pull starting
    /// meanwhile waits: the count is held). Returns how many went.
    pub fn sweep_partials(&self, older: std::time::Duration) -> usize {
        let n = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if *n > 0 {
            return 0;
        }
        let mut gone = 0;
        // What a pull that was killed left (nothing runs now).
        let _ = fs::remove_dir_all(self.root.join("run"));
        let _ = fs::remove_dir_all(self.root.join("done"));
        let dir = self.root.join("partial");
        let Ok(entries) = fs::read_dir(&dir) else {
            return 0;
        };
        for e in entries.flatten() {
            let stale = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age >= older);
            if stale && fs::remove_file(e.path()).is_ok() {
                gone += 1;
            }
        }
        drop(n);
        gone
    }

    /// Pulls `reference` into `images` and returns what was imported. `report` sees progress.
    /// `trust_registry` (an admin's pull) lets the named registry be on a private address.
    /// `may_reuse(diff_id)`: whether the puller may use that layer already (its own image's
    /// or a public one's) without downloading it.
    pub async fn pull(
        &self,
        node: &Arc<crate::Node>,
        reference: &str,
        creds: Option<&Credentials>,
        trust_registry: bool,
        may_reuse: &(dyn Fn(&str) -> bool + Send + Sync),
        report: &(dyn Fn(PullEvent) + Send + Sync),
    ) -> Result<ImportedImage, RegistryError> {
        let deadline = self.cfg.pull_deadline;
        match tokio::time::timeout(
            deadline,
            self.pull_inner(node, reference, creds, trust_registry, may_reuse, report),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(RegistryError::Unavailable(format!(
                "{reference}: the pull took longer than {}s (registry.pull_timeout): partial downloads are kept, pull again to resume",
                deadline.as_secs()
            ))),
        }
    }

    async fn pull_inner(
        &self,
        node: &Arc<crate::Node>,
        reference: &str,
        creds: Option<&Credentials>,
        trust_registry: bool,
        may_reuse: &(dyn Fn(&str) -> bool + Send + Sync),
        report: &(dyn Fn(PullEvent) + Send + Sync),
    ) -> Result<ImportedImage, RegistryError> {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        let run = self.root.join("run").join(random_id()?);
        let _guard = ActiveGuard {
            active: self.active.clone(),
            root: self.root.clone(),
            run: run.clone(),
        };
        let blobs = run.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let r = parse_reference(reference)?;
        let host = r.registry().to_string();
        let reg = Reg::new(&self.cfg, &r, reference, &host, creds, trust_registry)?;

        // The manifest, through an index if there is one.
        let mut accept: Vec<&str> = MEDIA_MANIFEST.to_vec();
        accept.extend(MEDIA_INDEX);
        let at = r
            .digest()
            .map(str::to_string)
            .or_else(|| r.tag().map(str::to_string))
            .unwrap_or_else(|| "latest".to_string());
        let bytes = reg.manifest(&at, &accept, "fetching the manifest").await?;
        let digest = sha256_hex(&bytes);
        if let Some(want) = r.digest() {
            if want != digest {
                return Err(RegistryError::Invalid(format!(
                    "{reference}: manifest digest mismatch: asked for {want}, the registry served {digest}"
                )));
            }
        }
        let (manifest, digest) = if is_index(&bytes) {
            let chosen = select_platform(&bytes, reference)?;
            let bytes = reg
                .manifest(&chosen, MEDIA_MANIFEST, "fetching the platform manifest")
                .await?;
            let actual = sha256_hex(&bytes);
            if actual != chosen {
                return Err(RegistryError::Invalid(format!(
                    "{reference}: manifest digest mismatch: the index names {chosen}, the registry served {actual}"
                )));
            }
            (bytes, chosen)
        } else {
            (bytes, digest)
        };
        let doc: ManifestDoc = serde_json::from_slice(&manifest).map_err(|e| {
            RegistryError::Invalid(format!("{reference}: bad manifest {digest}: {e}"))
        })?;
        let Some(config) = doc.config else {
            return Err(RegistryError::Invalid(format!(
                "{reference}: manifest {digest} is not an image manifest (schema 1 and artifacts are not supported)"
            )));
        };
        check_sizes(
            reference,
            &digest,
            &config,
            &doc.layers,
            self.cfg.max_image_size,
        )?;
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
        self.fetch_blob(&reg, &config, &noop, &blobs).await?;
        let config_path = blobs.join(hex_of(&config.digest)?);
        let config_bytes = fs::read(&config_path).map_err(io_err(&config_path))?;
        let diff_ids: Vec<String> = serde_json::from_slice::<ConfigDoc>(&config_bytes)
            .ok()
            .and_then(|c| c.rootfs)
            .map(|r| r.diff_ids)
            .unwrap_or_default();
        report(PullEvent::Layers {
            diff_ids: diff_ids.clone(),
        });

        let mut known = HashSet::new();
        let store = &node.images;
        let mut work = Vec::new();
        for (i, layer) in doc.layers.iter().enumerate() {
            // Not downloaded again only when this store verified that the blob unpacks to
            // the diff id the config names, and the puller may already use that layer (one
            // of its own images or a public one): a registry answering "I have it" proves
            // nothing, so another tenant's private layer is downloaded and verified.
            let reusable = diff_ids.get(i).is_some_and(|want| {
                store.known_blob(&layer.digest).as_deref() == Some(want.as_str())
                    && store.layer_dir(want).is_dir()
                    && may_reuse(want)
            });
            if reusable {
                known.insert(layer.digest.clone());
                report(PullEvent::Present { index: i });
                continue;
            }
            work.push((i, layer.clone()));
        }
        // Up to three layers at a time.
        let results: Vec<Result<(), RegistryError>> = futures_util::stream::iter(work)
            .map(|(i, layer)| {
                let reg = &reg;
                let blobs = &blobs;
                async move {
                    let progress = move |done: u64| report(PullEvent::Bytes { index: i, done });
                    let fetched = self.fetch_blob(reg, &layer, &progress, blobs).await?;
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
        let dir = run.clone();
        let shown = PathBuf::from(reference);
        let max = self.cfg.max_image_size;
        tokio::task::spawn_blocking(move || {
            node.images
                .import_fetched(&dir, &shown, &digest, &manifest, &known, max)
        })
        .await
        .map_err(|e| RegistryError::Unavailable(format!("unpacking task failed: {e}")))?
        .map_err(RegistryError::from)
    }

    /// Puts the verified blob at `<blobs>/<hex>` (a hard link to `done/`); returns whether
    /// this call downloaded (part of) it.
    async fn fetch_blob(
        &self,
        reg: &Reg<'_>,
        desc: &OciDescriptor,
        progress: &(dyn Fn(u64) + Send + Sync),
        blobs: &Path,
    ) -> Result<bool, RegistryError> {
        let hex = hex_of(&desc.digest)?;
        let target = blobs.join(&hex);
        if target.is_file() {
            return Ok(false);
        }
        let size = match u64::try_from(desc.size) {
            Ok(s) if s > 0 => s,
            _ => {
                return Err(RegistryError::Invalid(format!(
                    "{}: blob {} has no size: refused",
                    reg.reference, desc.digest
                )))
            }
        };
        let name = format!("{}-{hex}", reg.key);
        let lock = {
            let mut m = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(name.clone()).or_default().clone()
        };
        let held = tokio::time::timeout(self.lock_wait, lock.lock_owned())
            .await
            .ok();
        let result = self
            .fetch_locked(reg, desc, progress, &name, held.is_some(), size, &target)
            .await;
        drop(held);
        // Forget locks nobody holds or waits for.
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, l| Arc::strong_count(l) > 1);
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_locked(
        &self,
        reg: &Reg<'_>,
        desc: &OciDescriptor,
        progress: &(dyn Fn(u64) + Send + Sync),
        name: &str,
        locked: bool,
        size: u64,
        target: &Path,
    ) -> Result<bool, RegistryError> {
        let done_dir = self.root.join("done");
        let partial_dir = self.root.join("partial");
        for d in [&done_dir, &partial_dir] {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        let done = done_dir.join(name);
        let link = |from: &Path| fs::hard_link(from, target).map_err(io_err(target));
        if locked && done.is_file() {
            link(&done)?;
            return Ok(false);
        }
        // Without the lock (another pull holds it too long): a private file, never resumed.
        let partial = if locked {
            partial_dir.join(name)
        } else {
            partial_dir.join(format!("{name}.{}", random_id()?))
        };
        let outcome = self.download(reg, desc, progress, &partial, size).await;
        if !locked && outcome.is_err() {
            let _ = fs::remove_file(&partial);
        }
        outcome?;
        fs::rename(&partial, &done).map_err(io_err(&done))?;
        link(&done)?;
        Ok(true)
    }

    /// Downloads (resuming what `partial` holds) and verifies; a resumed file that does not
    /// verify is downloaded again once from byte 0.
    async fn download(
        &self,
        reg: &Reg<'_>,
        desc: &OciDescriptor,
        progress: &(dyn Fn(u64) + Send + Sync),
        partial: &Path,
        size: u64,
    ) -> Result<(), RegistryError> {
        for attempt in 0..2 {
            let mut have = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
            if have > size {
                fs::remove_file(partial).map_err(io_err(partial))?;
                have = 0;
            }
            // A complete file is never taken without asking the registry: its last byte is
            // fetched again (and the whole file verified).
            if have == size {
                have = size - 1;
                OpenOptions::new()
                    .write(true)
                    .open(partial)
                    .and_then(|f| f.set_len(have))
                    .map_err(io_err(partial))?;
            }
            let doing = format!("fetching blob {}", desc.digest);
            let resp = reg
                .get(&format!("blobs/{}", desc.digest), &[], have, &doing)
                .await?;
            let append = resp.status().as_u16() == 206 && have > 0;
            if !append {
                have = 0;
            }
            let mut stream = resp.bytes_stream();
            let mut file = OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .mode(0o600)
                .open(partial)
                .map_err(io_err(partial))?;
            progress(have);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    RegistryError::Unavailable(format!(
                        "{}: lost the connection to {} while downloading blob {} ({have} of {size} bytes; kept: pull again to resume): {}",
                        reg.reference, reg.host, desc.digest, e.without_url()
                    ))
                })?;
                have += chunk.len() as u64;
                if have > size {
                    drop(file);
                    let _ = fs::remove_file(partial);
                    return Err(RegistryError::Invalid(format!(
                        "{}: blob {} is larger than its descriptor's {size} bytes: refused",
                        reg.reference, desc.digest
                    )));
                }
                file.write_all(&chunk).map_err(io_err(partial))?;
                progress(have);
            }
            file.sync_all().map_err(io_err(partial))?;
            drop(file);
            // Verify the whole file, resumed parts included.
            let path = partial.to_path_buf();
            let (digest, len) = tokio::task::spawn_blocking(move || hash_file(&path))
                .await
                .map_err(|e| RegistryError::Unavailable(format!("hashing task failed: {e}")))??;
            if digest == desc.digest && len == size {
                return Ok(());
            }
            if len < size {
                return Err(RegistryError::Unavailable(format!(
                    "{}: the download of blob {} ended early ({len} of {size} bytes): pull again",
                    reg.reference, desc.digest
                )));
            }
            let _ = fs::remove_file(partial);
            if append && attempt == 0 {
                tracing::info!(blob = %desc.digest, "a resumed download does not verify; downloading it again from the start");
                continue;
            }
            return Err(RegistryError::Invalid(format!(
                "{}: blob digest mismatch: expected {}, the registry served {digest} ({len} bytes): refused",
                reg.reference, desc.digest
            )));
        }
        Err(RegistryError::Invalid(format!(
            "{}: blob {} does not verify: refused",
            reg.reference, desc.digest
        )))
    }
}

/// 16 random hex digits.
fn random_id() -> Result<String, RegistryError> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| RegistryError::Io {
        path: PathBuf::from("getrandom"),
        why: e.to_string(),
    })?;
    Ok(hex(&b))
}

/// Refuses a manifest whose sizes would let a download grow without bound: a config of no
/// size or over [`MAX_JSON`], a layer of no size, layers adding up to more than `max`.
fn check_sizes(
    reference: &str,
    digest: &str,
    config: &OciDescriptor,
    layers: &[OciDescriptor],
    max: u64,
) -> Result<(), RegistryError> {
    if config.size <= 0 || config.size as u64 > MAX_JSON as u64 {
        return Err(RegistryError::Invalid(format!(
            "{reference}: manifest {digest} gives its config a size of {} bytes (1 to {MAX_JSON} accepted): refused",
            config.size
        )));
    }
    let mut total = 0u64;
    for l in layers {
        if l.size <= 0 {
            return Err(RegistryError::Invalid(format!(
                "{reference}: manifest {digest} gives layer {} a size of {} bytes: refused",
                l.digest, l.size
            )));
        }
        total = total.saturating_add(l.size as u64);
    }
    if total > max {
        return Err(RegistryError::Invalid(format!(
            "{reference}: the layers add up to {total} bytes, more than this daemon accepts for one image ({max} bytes, registry.max_image_size)"
        )));
    }
    Ok(())
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
        let path = data_dir.join("keys").join("registry.key");
        let key =
            crate::keys::key_file(data_dir, "registry.key").map_err(|e| RegistryError::Io {
                path: e.path,
                why: e.why,
            })?;
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

    use std::io::BufRead;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A one-file HTTP server: `answer` gets each request's head and writes the response.
    struct Fake {
        port: u16,
        hits: Arc<AtomicUsize>,
        /// Body bytes `answer` managed to write (for the streaming answers).
        sent: Arc<AtomicUsize>,
    }

    type Answer = dyn Fn(&str, &mut std::net::TcpStream, &AtomicUsize) + Send + Sync;

    fn fake(answer: Arc<Answer>) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicUsize::new(0));
        let (h, s) = (hits.clone(), sent.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let (h, s, answer) = (h.clone(), s.clone(), answer.clone());
                std::thread::spawn(move || {
                    let mut r = std::io::BufReader::new(c.try_clone().unwrap());
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    answer(&head, &mut c, &s);
                });
            }
        });
        Fake { port, hits, sent }
    }

    fn respond(c: &mut std::net::TcpStream, status: &str, headers: &[String], body: &[u8]) {
        let mut out = format!(
            "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for h in headers {
            out.push_str(h);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        let _ = c.write_all(out.as_bytes());
        let _ = c.write_all(body);
    }

    fn reg_for<'a>(
        cfg: &RegistryConfig,
        reference: &'a str,
        host: &'a str,
        creds: Option<&'a Credentials>,
    ) -> Reg<'a> {
        let r = parse_reference(reference).unwrap();
        Reg::new(cfg, &r, reference, host, creds, false).unwrap()
    }

    fn insecure(port: u16) -> RegistryConfig {
        RegistryConfig {
            insecure: vec![format!("127.0.0.1:{port}")],
            ..RegistryConfig::default()
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn manifests_are_read_bounded() {
        // Without a length, streamed for ever (64 MiB here): the client stops at 16 MiB.
        let srv = fake(Arc::new(|_head, c, sent| {
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n");
            let chunk = vec![b' '; 1 << 16];
            for _ in 0..1024 {
                if c.write_all(&chunk).is_err() {
                    return;
                }
                sent.fetch_add(chunk.len(), Ordering::SeqCst);
            }
        }));
        let cfg = insecure(srv.port);
        let reference = format!("127.0.0.1:{}/big:1", srv.port);
        let host = format!("127.0.0.1:{}", srv.port);
        let reg = reg_for(&cfg, &reference, &host, None);
        let err = rt()
            .block_on(reg.manifest("1", MEDIA_MANIFEST, "fetching the manifest"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("larger than"), "{err}");
        std::thread::sleep(std::time::Duration::from_millis(200));
        let sent = srv.sent.load(Ordering::SeqCst);
        assert!(
            sent < 40 << 20,
            "the client read {sent} bytes of a 64 MiB manifest"
        );

        // With a length over the bound: refused before the body.
        let srv = fake(Arc::new(|_head, c, _| {
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\nConnection: close\r\n\r\n",
            );
        }));
        let cfg = insecure(srv.port);
        let reference = format!("127.0.0.1:{}/big:1", srv.port);
        let host = format!("127.0.0.1:{}", srv.port);
        let reg = reg_for(&cfg, &reference, &host, None);
        let err = rt()
            .block_on(reg.manifest("1", MEDIA_MANIFEST, "fetching the manifest"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("larger than"), "{err}");
    }

    fn registry_a(answer: Arc<Answer>) -> (Fake, RegistryConfig, String, String) {
        let a = fake(answer);
        let cfg = insecure(a.port);
        (
            a.clone_handle(),
            cfg,
            format!("127.0.0.1:{}/team/app:1", a.port),
            format!("127.0.0.1:{}", a.port),
        )
    }

    impl Fake {
        fn clone_handle(&self) -> Fake {
            Fake {
                port: self.port,
                hits: self.hits.clone(),
                sent: self.sent.clone(),
            }
        }
    }

    /// Pulls connect only where the operator allows: a redirect or a token service on a
    /// loopback, private or link-local address (another port of a trusted host included) is
    /// refused before any connection.
    #[test]
    fn redirects_and_token_services_are_checked() {
        let inner = fake(Arc::new(|_h, c, _| respond(c, "200 OK", &[], b"{}")));
        let b = inner.port;
        for target in [
            format!("http://127.0.0.1:{b}/v2/x"),
            format!("https://localhost:{b}/v2/x"),
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "https://[::1]/x".to_string(),
            "https://10.1.2.3/x".to_string(),
        ] {
            let t = target.clone();
            let (a, cfg, reference, host) = registry_a(Arc::new(move |_h, c, _| {
                respond(
                    c,
                    "307 Temporary Redirect",
                    &[format!("Location: {t}")],
                    b"",
                )
            }));
            let reg = reg_for(&cfg, &reference, &host, None);
            let err = rt()
                .block_on(reg.manifest("1", MEDIA_MANIFEST, "fetching the manifest"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("not allowed") || err.contains("refused"),
                "{target}: {err}"
            );
            assert_eq!(a.hits.load(Ordering::SeqCst), 1);
        }
        assert_eq!(
            inner.hits.load(Ordering::SeqCst),
            0,
            "a redirect reached the inner server"
        );

        let creds = Credentials {
            username: "alice".into(),
            password: "hunter2".into(),
        };
        for realm in [
            format!("http://127.0.0.1:{b}/token"),
            format!("https://localhost:{b}/token"),
            "http://169.254.169.254/token".to_string(),
        ] {
            let r = realm.clone();
            let (_a, cfg, reference, host) = registry_a(Arc::new(move |_h, c, _| {
                respond(
                    c,
                    "401 Unauthorized",
                    &[format!(
                        "WWW-Authenticate: Bearer realm=\"{r}\",service=\"reg\""
                    )],
                    b"",
                )
            }));
            let reg = reg_for(&cfg, &reference, &host, Some(&creds));
            let err = rt()
                .block_on(reg.manifest("1", MEDIA_MANIFEST, "fetching the manifest"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("not allowed") || err.contains("refused"),
                "{realm}: {err}"
            );
            assert!(!err.contains("hunter2"), "{err}");
        }
        assert_eq!(
            inner.hits.load(Ordering::SeqCst),
            0,
            "a token request reached the inner server"
        );
    }

    /// What a registry answers with an error status is never shown: code and our words only.
    #[test]
    fn error_bodies_are_not_echoed() {
        for status in [
            "500 Internal Server Error",
            "400 Bad Request",
            "401 Unauthorized",
            "404 Not Found",
        ] {
            let (_a, cfg, reference, host) = registry_a(Arc::new(move |_h, c, _| {
                respond(
                    c,
                    status,
                    &["Content-Type: application/json".to_string()],
                    br#"{"errors":[{"code":"UNKNOWN","message":"secret-internal-body"}]}"#,
                )
            }));
            let reg = reg_for(&cfg, &reference, &host, None);
            let err = rt()
                .block_on(reg.manifest("1", MEDIA_MANIFEST, "fetching the manifest"))
                .unwrap_err()
                .to_string();
            assert!(!err.contains("secret-internal-body"), "{status}: {err}");
        }
    }

    #[test]
    fn destinations_follow_the_configuration() {
        let cfg = RegistryConfig {
            insecure: vec!["127.0.0.1:5000".into()],
            trusted: vec!["HTTPS://Reg.Internal:5443/".into()],
            deny: vec!["93.184.216.35".parse().unwrap()],
            ..RegistryConfig::default()
        };
        let g = NetGuard::new(&cfg, None);
        let ok = |u: &str| g.check_url(&reqwest::Url::parse(u).unwrap()).is_ok();
        assert!(ok("http://127.0.0.1:5000/v2/"));
        assert!(ok("https://127.0.0.1:5000/v2/"));
        assert!(!ok("http://127.0.0.1:5001/v2/"));
        assert!(!ok("https://127.0.0.1:5001/v2/"));
        assert!(ok("https://reg.internal:5443/v2/"));
        assert!(
            !ok("http://reg.internal:5443/v2/"),
            "plain http to a host not insecure"
        );
        assert!(
            !ok("https://reg.internal/v2/"),
            "a trusted name on another port"
        );
        assert!(ok("https://registry.example.com/v2/"));
        assert!(!ok("http://registry.example.com/v2/"));
        assert!(!ok("ftp://registry.example.com/"));
        for bad in [
            "https://169.254.169.254/",
            "https://10.0.0.1/",
            "https://172.16.0.1/",
            "https://192.168.1.1/",
            "https://100.64.0.1/",
            "https://0.0.0.0/",
            "https://[::1]/",
            "https://[fd00::1]/",
            "https://[fe80::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:169.254.169.254]/",
        ] {
            assert!(!ok(bad), "{bad}");
        }
        assert!(ok("https://93.184.216.34/"));
        assert!(!ok("https://93.184.216.35/"), "the daemon's own address");
        // An admin's pull trusts its registry.
        let admin = NetGuard::new(&cfg, Some("10.0.0.5:5000"));
        assert!(admin
            .check_url(&reqwest::Url::parse("https://10.0.0.5:5000/v2/").unwrap())
            .is_ok());
        assert!(admin
            .check_url(&reqwest::Url::parse("https://10.0.0.6:5000/v2/").unwrap())
            .is_err());
        assert_eq!(normalize_host("HTTPS://Registry-1.Docker.IO/"), "docker.io");
        assert_eq!(
            normalize_host("http://Reg.Example:5000"),
            "reg.example:5000"
        );
    }

    #[test]
    fn stale_partials_are_swept_when_no_pull_runs() {
        let t = tempfile::TempDir::new().unwrap();
        let store = ImageStore::open(t.path().join("images")).unwrap();
        let p = Puller::new(&store, RegistryConfig::default());
        let dir = t.path().join("images/pull/partial");
        fs::create_dir_all(&dir).unwrap();
        let old = dir.join("old");
        let new = dir.join("new");
        fs::write(&old, b"x").unwrap();
        fs::write(&new, b"x").unwrap();
        let f = fs::File::options().write(true).open(&old).unwrap();
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
            .unwrap();
        drop(f);
        // A pull running: nothing goes.
        *p.active.lock().unwrap() += 1;
        assert_eq!(p.sweep_partials(std::time::Duration::from_secs(3600)), 0);
        *p.active.lock().unwrap() -= 1;
        assert_eq!(p.sweep_partials(std::time::Duration::from_secs(3600)), 1);
        assert!(!old.exists() && new.exists());
    }

    /// A registry serving `blob` at `/v2/r/blobs/<digest>` when `serve` is set (404 otherwise).
    fn blob_registry(blob: Vec<u8>, serve: bool) -> (Fake, String) {
        let digest = sha256_hex(&blob);
        let path = format!("/v2/r/blobs/{digest}");
        let srv = fake(Arc::new(move |head, c, _| {
            if serve && head.contains(&path) {
                respond(c, "200 OK", &[], &blob);
            } else {
                respond(c, "404 Not Found", &[], b"");
            }
        }));
        (srv, digest)
    }

    fn blob_desc(digest: &str, size: usize) -> OciDescriptor {
        OciDescriptor {
            digest: digest.to_string(),
            size: size as i64,
            ..OciDescriptor::default()
        }
    }

    /// A pull waiting for another's download of the same blob gives up after the bound and
    /// downloads it on its own (the other's lock stays held).
    #[test]
    fn a_held_download_lock_does_not_block_other_pulls() {
        let t = tempfile::TempDir::new().unwrap();
        let store = ImageStore::open(t.path().join("images")).unwrap();
        let mut p = Puller::new(&store, RegistryConfig::default());
        p.lock_wait = std::time::Duration::from_millis(200);
        let blob = b"layer bytes".to_vec();
        let (srv, digest) = blob_registry(blob.clone(), true);
        let cfg = insecure(srv.port);
        let reference = format!("127.0.0.1:{}/r:1", srv.port);
        let host = format!("127.0.0.1:{}", srv.port);
        let reg = reg_for(&cfg, &reference, &host, None);
        let name = format!("{}-{}", reg.key, hex_of(&digest).unwrap());
        let lock = p.inflight.lock().unwrap().entry(name).or_default().clone();
        let rt = rt();
        let _held = rt.block_on(lock.lock_owned());
        let blobs = t.path().join("run");
        fs::create_dir_all(&blobs).unwrap();
        let noop = |_: u64| {};
        let fetched = rt
            .block_on(p.fetch_blob(&reg, &blob_desc(&digest, blob.len()), &noop, &blobs))
            .unwrap();
        assert!(fetched);
        assert_eq!(
            fs::read(blobs.join(hex_of(&digest).unwrap())).unwrap(),
            blob
        );
    }

    /// A complete partial file (a crash before the rename) is not taken without the registry:
    /// one that no longer serves the blob fails the pull.
    #[test]
    fn a_complete_partial_still_asks_the_registry() {
        let t = tempfile::TempDir::new().unwrap();
        let store = ImageStore::open(t.path().join("images")).unwrap();
        let p = Puller::new(&store, RegistryConfig::default());
        let blob = b"someone else's layer".to_vec();
        let (srv, digest) = blob_registry(blob.clone(), false);
        let cfg = insecure(srv.port);
        let reference = format!("127.0.0.1:{}/r:1", srv.port);
        let host = format!("127.0.0.1:{}", srv.port);
        let reg = reg_for(&cfg, &reference, &host, None);
        let partial = t.path().join("images/pull/partial");
        fs::create_dir_all(&partial).unwrap();
        fs::write(
            partial.join(format!("{}-{}", reg.key, hex_of(&digest).unwrap())),
            &blob,
        )
        .unwrap();
        let blobs = t.path().join("run");
        fs::create_dir_all(&blobs).unwrap();
        let noop = |_: u64| {};
        let err = rt()
            .block_on(p.fetch_blob(&reg, &blob_desc(&digest, blob.len()), &noop, &blobs))
            .unwrap_err();
        assert!(matches!(err, RegistryError::NotFound(_)), "{err}");
        assert!(!blobs.join(hex_of(&digest).unwrap()).exists());
    }

    #[test]
    fn descriptor_sizes_are_bounded() {
        let d = |size: i64| OciDescriptor {
            digest: format!("sha256:{}", "a".repeat(64)),
            size,
            ..OciDescriptor::default()
        };
        let ok = check_sizes("r", "m", &d(100), &[d(10), d(20)], 30);
        assert!(ok.is_ok());
        for (config, layers, max) in [
            (d(0), vec![d(1)], 100),
            (d(-1), vec![d(1)], 100),
            (d(MAX_JSON as i64 + 1), vec![d(1)], 100),
            (d(10), vec![d(0)], 100),
            (d(10), vec![d(-5)], 100),
            (d(10), vec![d(60), d(41)], 100),
        ] {
            let why = check_sizes("r", "m", &config, &layers, max)
                .unwrap_err()
                .to_string();
            assert!(
                why.contains("refused") || why.contains("max_image_size"),
                "{why}"
            );
        }
    }

    #[test]
    fn token_answers_are_read_bounded() {
        let srv = fake(Arc::new(|head, c, sent| {
            if head.contains("/token") {
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                let chunk = vec![b' '; 1 << 16];
                for _ in 0..256 {
                    if c.write_all(&chunk).is_err() {
                        return;
                    }
                    sent.fetch_add(chunk.len(), Ordering::SeqCst);
                }
                return;
            }
            let port = c.local_addr().unwrap().port();
            respond(c, "401 Unauthorized", &[format!("WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"x\"")], b"");
        }));
        let cfg = insecure(srv.port);
        let reference = format!("127.0.0.1:{}/a:1", srv.port);
        let host = format!("127.0.0.1:{}", srv.port);
        let reg = reg_for(&cfg, &reference, &host, None);
        let err = rt()
            .block_on(reg.manifest("1", MEDIA_MANIFEST, "fetching the manifest"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than"), "{err}");
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(srv.sent.load(Ordering::SeqCst) < 8 << 20);
    }

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
        use std::os::unix::fs::PermissionsExt;
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
