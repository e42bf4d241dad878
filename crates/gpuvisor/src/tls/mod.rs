//! The API's TLS, both ends.
//!
//! Server: rustls on ring, TLS 1.3 only unless the config allows 1.2 (every suite ring offers
//! is ECDHE: forward secrecy either way), HTTP/1.1 by ALPN. The certificate is the operator's
//! (`[tls] cert`/`key`, PEM) or one this module makes: a private CA kept in
//! `<data>/tls/ca.key` (0600) whose certificate is `<data>/ca.pem` (beside the default admin
//! key file; what the CLI trusts), and a server certificate it signs for the host name, the
//! listen addresses and `[tls] names`, remade when those change or 30 days before it expires.
//! The certificate in use sits behind [`Resolver`]: [`ServerTls::reload`] swaps it without a
//! restart (SIGHUP, a change of the files, renewal); a bad new file keeps the old certificate.
//!
//! With `[tls] acme_domains` the certificate comes from an ACME server instead ([`acme`]),
//! the daemon's own one standing in until it arrives.
//!
//! Client: [`ClientTrust`] — the CA the CLI was given (`--ca`/`GPUVISOR_CA`), the default
//! daemon's `/var/lib/gpuvisor/ca.pem` when present, else the public web roots.

pub mod acme;

use anyhow::{bail, Context};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use sha2::Digest;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The lowest TLS version the daemon accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinVersion {
    #[default]
    Tls13,
    Tls12,
}

impl std::str::FromStr for MinVersion {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "1.3" => Ok(Self::Tls13),
            "1.2" => Ok(Self::Tls12),
            other => bail!("TLS minimum version {other:?}: use 1.3 (default) or 1.2"),
        }
    }
}

/// Where the server certificate comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum CertSource {
    /// The operator's PEM files (chain, key), re-read when they change.
    Files { cert: PathBuf, key: PathBuf },
    /// Made here, signed by the daemon's private CA, for these names and addresses.
    Generated {
        data_dir: PathBuf,
        names: Vec<String>,
        leaf: Leaf,
    },
    /// From an ACME server; `Generated` with `names` until the first one arrives.
    Acme {
        data_dir: PathBuf,
        names: Vec<String>,
        acme: acme::AcmeSettings,
    },
}

/// Which generated certificate: the API's or the instance proxy's (both signed by the one CA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    Api,
    Proxy,
}

impl Leaf {
    fn stem(self) -> &'static str {
        match self {
            Self::Api => "server",
            Self::Proxy => "proxy",
        }
    }
}

/// Days before expiry at which a generated server certificate is remade.
const RENEW_BEFORE_DAYS: i64 = 30;
/// Lifetime of a generated server certificate (the CA: 10 years).
const SERVER_CERT_DAYS: i64 = 397;

/// The one crypto provider of both ends: ring (the registry client's too; no aws-lc build).
/// rustls deprecates it for lacking post-quantum key exchange: X25519 and the NIST curves only.
pub fn provider() -> Arc<CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's default provider (what libraries that build their own rustls
/// config use: the ACME client, the registry client).
pub fn install_default_provider() {
    let _ = Arc::try_unwrap(provider()).map(|p| p.install_default());
}

/// The certificate handshakes use now (replaced whole on reload), and the TLS-ALPN-01
/// challenge certificates of an ACME order in progress, by name.
#[derive(Debug)]
pub struct Resolver {
    current: RwLock<Arc<CertifiedKey>>,
    /// With ACME: the daemon's own certificate and the ACME names. A client asking for one of
    /// those names (SNI) gets `current`, every other one (an address, `localhost`, no SNI: the
    /// local CLI) this one, which its CA file verifies.
    local: Option<(Arc<CertifiedKey>, Vec<String>)>,
    challenges: std::sync::Mutex<std::collections::HashMap<String, Arc<CertifiedKey>>>,
}

impl Resolver {
    fn new(key: CertifiedKey, local: Option<(CertifiedKey, Vec<String>)>) -> Self {
        Self {
            current: RwLock::new(Arc::new(key)),
            local: local.map(|(k, names)| (Arc::new(k), names)),
            challenges: Default::default(),
        }
    }

    fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn add_challenge(&self, name: &str, key: Arc<CertifiedKey>) {
        self.challenges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_ascii_lowercase(), key);
    }

    fn clear_challenges(&self) {
        self.challenges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == acme::ACME_TLS_ALPN));
        if acme {
            // A validation connection: the challenge certificate for the name asked for, or
            // no handshake at all (never the real certificate over acme-tls/1).
            let name = hello.server_name()?.to_ascii_lowercase();
            return self
                .challenges
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .cloned();
        }
        if let Some((local, names)) = &self.local {
            let public = hello
                .server_name()
                .is_some_and(|n| names.iter().any(|d| d.eq_ignore_ascii_case(n)));
            if !public {
                return Some(local.clone());
            }
        }
        Some(self.get())
    }
}

/// The daemon's TLS: the acceptor's config and what reloads it.
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    resolver: Arc<Resolver>,
    source: CertSource,
    /// (path, modified, length, inode) of the files the certificate came from.
    seen: std::sync::Mutex<Vec<FileStamp>>,
    /// SHA-256 of the CA's certificate (generated certificates only), for the log.
    pub ca_fingerprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct FileStamp(PathBuf, Option<std::time::SystemTime>, u64, u64);

fn stamp(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => FileStamp(path.to_path_buf(), m.modified().ok(), m.len(), m.ino()),
        Err(_) => FileStamp(path.to_path_buf(), None, 0, 0),
    }
}

impl ServerTls {
    pub fn new(source: CertSource, min: MinVersion) -> anyhow::Result<Self> {
        let provider = provider();
        let (key, files, ca_fingerprint) = load(&source, &provider)?;
        let local = match &source {
            CertSource::Acme {
                data_dir,
                names,
                acme,
            } => {
                let generated = CertSource::Generated {
                    data_dir: data_dir.clone(),
                    names: names.clone(),
                    leaf: Leaf::Api,
                };
                Some((load(&generated, &provider)?.0, acme.domains.clone()))
            }
            _ => None,
        };
        let resolver = Arc::new(Resolver::new(key, local));
        let versions: &[&rustls::SupportedProtocolVersion] = match min {
            MinVersion::Tls13 => &[&rustls::version::TLS13],
            MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .context("TLS versions")?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        if matches!(source, CertSource::Acme { .. }) {
            config.alpn_protocols.push(acme::ACME_TLS_ALPN.to_vec());
        }
        Ok(Self {
            config: Arc::new(config),
            resolver,
            seen: std::sync::Mutex::new(files.iter().map(|p| stamp(p)).collect()),
            source,
            ca_fingerprint,
        })
    }

    /// Whether the files changed (or a generated certificate is due) since the last load.
    pub fn stale(&self) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.iter().any(|s| stamp(&s.0) != *s) {
            return true;
        }
        match &self.source {
            // Renewal is `run_acme`'s.
            CertSource::Files { .. } | CertSource::Acme { .. } => false,
            CertSource::Generated {
                data_dir,
                names,
                leaf,
            } => !generated_current(&Layout::new(data_dir, *leaf), names),
        }
    }

    /// Loads the certificate again and swaps it in; on any error the old one stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let (key, files, _) = load(&self.source, &provider())?;
        self.resolver.set(key);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) =
            files.iter().map(|p| stamp(p)).collect();
        Ok(())
    }

    /// The leaf certificate served now.
    #[cfg(test)]
    pub fn current_leaf(&self) -> CertificateDer<'static> {
        self.resolver.get().cert[0].clone()
    }

    /// With an ACME source: obtains the certificate when there is none or it is due (checked
    /// hourly; a failed order is retried after 1 minute, doubling up to an hour), forever.
    pub async fn run_acme(self: Arc<Self>) {
        let CertSource::Acme { data_dir, acme, .. } = &self.source else {
            return;
        };
        let files = acme::AcmeFiles::new(data_dir);
        let mut backoff = std::time::Duration::from_secs(60);
        loop {
            if !files.current(acme) {
                tracing::info!(domains = ?acme.domains, directory = %acme.directory, "ACME: ordering a certificate");
                match acme::obtain(acme, &files, &self.resolver).await {
                    Ok(()) => match self.reload() {
                        Ok(()) => {
                            tracing::info!(domains = ?acme.domains, "ACME: certificate obtained and in use");
                            backoff = std::time::Duration::from_secs(60);
                        }
                        Err(e) => {
                            tracing::error!("ACME: the new certificate cannot be used: {e:#}")
                        }
                    },
                    Err(e) => {
                        tracing::error!("{e:#}; retrying in {}s", backoff.as_secs());
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(3600));
                        continue;
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        }
    }

    /// Reloads on SIGHUP and when `stale` (polled every `every`), forever.
    pub async fn watch(self: Arc<Self>, every: std::time::Duration) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => "SIGHUP",
                _ = tick.tick() => {
                    let me = self.clone();
                    if !tokio::task::spawn_blocking(move || me.stale()).await.unwrap_or(false) {
                        continue;
                    }
                    "the certificate files changed"
                }
            };
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.reload()).await {
                Ok(Ok(())) => tracing::info!("TLS certificate reloaded ({why})"),
                Ok(Err(e)) => tracing::error!(
                    "TLS certificate not reloaded ({why}): {e:#}; the previous one stays"
                ),
                Err(e) => tracing::error!("TLS reload: {e}"),
            }
        }
    }
}

/// The certificate, the files it came from, and the CA's fingerprint when generated.
fn load(
    source: &CertSource,
    provider: &CryptoProvider,
) -> anyhow::Result<(CertifiedKey, Vec<PathBuf>, Option<String>)> {
    match source {
        CertSource::Files { cert, key } => {
            let ck = certified_key(cert, key, provider)?;
            // An expired certificate is not swapped in (clients would refuse every handshake).
            let end = not_after(&ck.cert[0])
                .with_context(|| format!("{}: the certificate's validity", cert.display()))?;
            if end <= now_unix() {
                bail!("{}: the certificate expired", cert.display());
            }
            Ok((ck, vec![cert.clone(), key.clone()], None))
        }
        CertSource::Generated {
            data_dir,
            names,
            leaf,
        } => {
            let l = Layout::new(data_dir, *leaf);
            let fp = ensure_generated(&l, names)?;
            let ck = certified_key(&l.server_cert, &l.server_key, provider)?;
            Ok((
                ck,
                vec![l.server_cert.clone(), l.server_key.clone()],
                Some(fp),
            ))
        }
        CertSource::Acme {
            data_dir,
            names,
            acme,
        } => {
            let files = acme::AcmeFiles::new(data_dir);
            if files.current(acme) {
                match certified_key(&files.cert, &files.key, provider) {
                    Ok(ck) => return Ok((ck, vec![files.cert.clone(), files.key.clone()], None)),
                    // Unusable: the daemon's own certificate serves until a new order, which
                    // forgetting it asks for.
                    Err(e) => {
                        tracing::warn!("the ACME certificate cannot be used: {e:#}");
                        files.forget();
                    }
                }
            }
            load(
                &CertSource::Generated {
                    data_dir: data_dir.clone(),
                    names: names.clone(),
                    leaf: Leaf::Api,
                },
                provider,
            )
        }
    }
}

/// The certificates of a PEM chain (at least one).
fn parse_chain(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .context("not a PEM certificate chain")?;
    if chain.is_empty() {
        bail!("no certificate in it");
    }
    Ok(chain)
}

/// A certificate's notAfter, Unix seconds (a small DER walk: TBSCertificate's fifth field,
/// after an optional version).
fn not_after(cert: &[u8]) -> anyhow::Result<i64> {
    /// (tag, contents, rest) of the DER item at the start of `b`.
    fn item(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&l0, mut b) = b.split_first()?;
        let len = if l0 < 0x80 {
            l0 as usize
        } else {
            let n = (l0 & 0x7f) as usize;
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let v = b[..n].iter().fold(0usize, |a, x| (a << 8) | *x as usize);
            b = &b[n..];
            v
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }
    let walk = || -> Option<(u8, Vec<u8>)> {
        let (_, certificate, _) = item(cert)?;
        let (_, tbs, _) = item(certificate)?;
        let (tag, _, mut rest) = item(tbs)?;
        if tag != 0xa0 {
            rest = tbs; // no version: the serial comes first
        }
        let (_, _, rest) = item(rest)?; // serial
        let (_, _, rest) = item(rest)?; // signature algorithm
        let (_, _, rest) = item(rest)?; // issuer
        let (_, validity, _) = item(rest)?;
        let (_, _, after) = item(validity)?; // notBefore
        let (tag, time, _) = item(after)?;
        Some((tag, time.to_vec()))
    };
    let (tag, text) = walk().context("not a DER certificate")?;
    let text = std::str::from_utf8(&text).context("validity time")?;
    let digits = |s: &str| s.parse::<u32>().ok();
    let (year, rest) = match tag {
        0x17 => {
            let yy = digits(text.get(..2).unwrap_or_default()).context("UTCTime")? as i32;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &text[2..])
        }
        0x18 => (
            digits(text.get(..4).unwrap_or_default()).context("GeneralizedTime")? as i32,
            &text[4..],
        ),
        other => bail!("validity time of tag {other:#x}"),
    };
    let f = |i: usize| digits(rest.get(i..i + 2).unwrap_or_default()).context("validity time");
    let month = time::Month::try_from(f(0)? as u8).context("month")?;
    let date = time::Date::from_calendar_date(year, month, f(2)? as u8).context("date")?;
    let t = time::Time::from_hms(f(4)? as u8, f(6)? as u8, f(8)? as u8).context("time")?;
    Ok(time::PrimitiveDateTime::new(date, t)
        .assume_utc()
        .unix_timestamp())
}

fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read the TLS certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate chain", cert.display()))?;
    if chain.is_empty() {
        bail!("{}: no certificate in it", cert.display());
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{}: not a PEM private key", key.display()))?;
    CertifiedKey::from_der(chain, key_der, provider).with_context(|| {
        format!(
            "{} and {} do not go together (or the key type is not supported)",
            cert.display(),
            key.display()
        )
    })
}

/// Files of the generated material.
struct Layout {
    dir: PathBuf,
    ca_cert: PathBuf,
    ca_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    /// JSON: the names the server certificate was made for and when it expires.
    server_meta: PathBuf,
}

impl Layout {
    fn new(data_dir: &Path, leaf: Leaf) -> Self {
        let dir = data_dir.join("tls");
        let stem = leaf.stem();
        Self {
            ca_cert: ca_path(data_dir),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join(format!("{stem}.pem")),
            server_key: dir.join(format!("{stem}.key")),
            server_meta: dir.join(format!("{stem}.json")),
            dir,
        }
    }
}

/// The CA certificate the CLI trusts for a daemon on `data_dir`.
pub fn ca_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ca.pem")
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct ServerMeta {
    names: Vec<String>,
    /// Unix seconds.
    not_after: i64,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Whether the generated server certificate exists, is for `names` and is not due.
fn generated_current(l: &Layout, names: &[String]) -> bool {
    let Ok(text) = std::fs::read(&l.server_meta) else {
        return false;
    };
    let Ok(meta) = serde_json::from_slice::<ServerMeta>(&text) else {
        return false;
    };
    meta.names == names
        && meta.not_after - now_unix() > RENEW_BEFORE_DAYS * 86_400
        && l.server_cert.exists()
        && l.server_key.exists()
        && l.ca_cert.exists()
}

/// Makes what is missing or due: the CA (once), the server certificate. Returns the CA's
/// fingerprint.
fn ensure_generated(l: &Layout, names: &[String]) -> anyhow::Result<String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&l.dir)
        .with_context(|| format!("cannot create {}", l.dir.display()))?;
    std::fs::set_permissions(&l.dir, std::fs::Permissions::from_mode(0o700))?;
    let ca_key = if l.ca_key.exists() && l.ca_cert.exists() {
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(&l.ca_key)?)
            .with_context(|| format!("{}: not a key this daemon made", l.ca_key.display()))?
    } else {
        let key = rcgen::KeyPair::generate().context("cannot make the CA key")?;
        let cert = ca_params(&key)
            .self_signed(&key)
            .context("cannot make the CA certificate")?;
        write_file(&l.ca_key, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&l.ca_cert, cert.pem().as_bytes(), 0o644)?;
        // A new CA: whatever server certificate was there is not signed by it.
        let _ = std::fs::remove_file(&l.server_meta);
        key
    };
    let ca_der = CertificateDer::from_pem_file(&l.ca_cert)
        .with_context(|| format!("{}: not a PEM certificate", l.ca_cert.display()))?;
    if !generated_current(l, names) {
        let issuer = rcgen::Issuer::new(ca_params(&ca_key), &ca_key);
        let key = rcgen::KeyPair::generate().context("cannot make the server key")?;
        let mut params = rcgen::CertificateParams::new(names.to_vec())
            .with_context(|| format!("not valid certificate names: {names:?}"))?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(SERVER_CERT_DAYS);
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &issuer)
            .context("cannot sign the server certificate")?;
        write_file(&l.server_key, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&l.server_cert, cert.pem().as_bytes(), 0o644)?;
        let meta = ServerMeta {
            names: names.to_vec(),
            not_after: params.not_after.unix_timestamp(),
        };
        write_file(&l.server_meta, &serde_json::to_vec(&meta)?, 0o644)?;
    }
    Ok(fingerprint(&ca_der))
}

/// The CA's parameters: the same for a key every time (its name is derived from the key), so a
/// restarted daemon signs as the CA it made before.
fn ca_params(key: &rcgen::KeyPair) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    let id = hex(&sha2::Sha256::digest(key.public_key_raw())[..8]);
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("gpuvisor CA {id}"));
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(3650);
    p
}

/// `SHA256:AB:CD:…` of a certificate.
pub fn fingerprint(der: &[u8]) -> String {
    let d = sha2::Sha256::digest(der);
    let parts: Vec<String> = d.iter().map(|b| format!("{b:02X}")).collect();
    format!("SHA256:{}", parts.join(":"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `bytes` to `path` through a temporary file and a rename (a reader never sees half a
/// file), with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The names a generated certificate is for: `localhost`, the host name, the listen address
/// (every address of the host when it is unspecified, loopback included) and `extra`.
pub fn default_names(listen: IpAddr, hostname: &str, extra: &[String]) -> Vec<String> {
    let mut out: Vec<String> = vec!["localhost".into()];
    let host_ok = !hostname.is_empty()
        && hostname.len() <= 253
        && hostname.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if host_ok && hostname != "localhost" {
        out.push(hostname.to_ascii_lowercase());
    }
    let mut addrs: Vec<IpAddr> = if listen.is_unspecified() {
        let mut v = vec![
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ];
        if let Ok(list) = nix::ifaddrs::getifaddrs() {
            for a in list {
                let Some(sa) = a.address else { continue };
                if let Some(v4) = sa.as_sockaddr_in() {
                    v.push(IpAddr::V4(v4.ip()));
                } else if let Some(v6) = sa.as_sockaddr_in6() {
                    // Link-local addresses need a scope a URL cannot carry well: left out.
                    if v6.ip().segments()[0] & 0xffc0 != 0xfe80 {
                        v.push(IpAddr::V6(v6.ip()));
                    }
                }
            }
        }
        v
    } else {
        vec![listen]
    };
    addrs.sort();
    addrs.dedup();
    out.extend(addrs.iter().map(|a| a.to_string()));
    for e in extra {
        if !out.contains(e) {
            out.push(e.clone());
        }
    }
    out
}

/// What the CLI trusts.
#[derive(Debug, Clone)]
pub enum ClientTrust {
    /// These CA certificates only (`--ca`, `GPUVISOR_CA`, the default daemon's CA file).
    Ca(PathBuf),
    /// The public web's roots (a daemon with a certificate from a public CA).
    WebRoots,
}

/// The default daemon's CA, trusted when no `--ca` is given and it exists.
pub const DEFAULT_CA: &str = "/var/lib/gpuvisor/ca.pem";

impl ClientTrust {
    /// `--ca`/`GPUVISOR_CA` (`system`: the web roots), else [`DEFAULT_CA`] when readable,
    /// else the web roots.
    pub fn choose(ca: Option<&Path>) -> Self {
        match ca {
            Some(p) if p.as_os_str() == "system" => Self::WebRoots,
            Some(p) => Self::Ca(p.to_path_buf()),
            None if Path::new(DEFAULT_CA).is_file() => Self::Ca(DEFAULT_CA.into()),
            None => Self::WebRoots,
        }
    }

    /// The certificates of a `Ca` file.
    pub fn ca_certs(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let Self::Ca(path) = self else {
            return Ok(Vec::new());
        };
        let certs = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("cannot read the CA file {}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: not PEM certificates", path.display()))?;
        if certs.is_empty() {
            bail!("{}: no certificate in it", path.display());
        }
        Ok(certs)
    }

    /// A rustls client config trusting this (the CLI's WebSocket connections).
    pub fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        match self {
            Self::Ca(_) => {
                for c in self.ca_certs()? {
                    roots.add(c).context("a CA certificate rustls refuses")?;
                }
            }
            Self::WebRoots => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ca_signs_a_server_cert_a_client_accepts_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let names = default_names(
            "127.0.0.1".parse().unwrap(),
            "node-1",
            &["api.example".into()],
        );
        assert_eq!(names, ["localhost", "node-1", "127.0.0.1", "api.example"]);
        let src = CertSource::Generated {
            data_dir: dir.path().into(),
            names: names.clone(),
            leaf: Leaf::Api,
        };
        let tls = ServerTls::new(src.clone(), MinVersion::Tls13).unwrap();
        let fp = tls.ca_fingerprint.clone().unwrap();
        let leaf = tls.current_leaf();
        // The CA verifies the leaf for every name.
        let trust = ClientTrust::Ca(ca_path(dir.path()));
        let roots = {
            let mut r = rustls::RootCertStore::empty();
            for c in trust.ca_certs().unwrap() {
                r.add(c).unwrap();
            }
            Arc::new(r)
        };
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .unwrap();
        for n in &names {
            let sn = rustls::pki_types::ServerName::try_from(n.clone()).unwrap();
            rustls::client::danger::ServerCertVerifier::verify_server_cert(
                verifier.as_ref(),
                &leaf,
                &[],
                &sn,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{n}: {e}"));
        }
        let other = rustls::pki_types::ServerName::try_from("evil.example").unwrap();
        assert!(
            rustls::client::danger::ServerCertVerifier::verify_server_cert(
                verifier.as_ref(),
                &leaf,
                &[],
                &other,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .is_err()
        );
        // Private keys are private.
        use std::os::unix::fs::PermissionsExt;
        for f in ["tls/ca.key", "tls/server.key"] {
            let m = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(m & 0o777, 0o600, "{f}");
        }
        // A second start keeps the CA and the certificate; new names remake only the leaf.
        assert!(!tls.stale());
        let again = ServerTls::new(src, MinVersion::Tls13).unwrap();
        assert_eq!(again.ca_fingerprint.as_deref(), Some(fp.as_str()));
        assert_eq!(again.current_leaf(), leaf);
        let moved = ServerTls::new(
            CertSource::Generated {
                data_dir: dir.path().into(),
                names: vec!["localhost".into(), "10.1.2.3".into()],
                leaf: Leaf::Api,
            },
            MinVersion::Tls13,
        )
        .unwrap();
        assert_eq!(moved.ca_fingerprint.as_deref(), Some(fp.as_str()));
        assert_ne!(moved.current_leaf(), leaf);
    }

    #[test]
    fn operator_files_reload_and_a_bad_file_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |cn: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![cn.to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let (c1, k1) = mk("one.example");
        std::fs::write(&cert, &c1).unwrap();
        std::fs::write(&key, &k1).unwrap();
        let tls = ServerTls::new(
            CertSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            MinVersion::Tls12,
        )
        .unwrap();
        let first = tls.current_leaf();
        assert!(!tls.stale());
        // A certificate without its key: refused, the old one stays.
        let (c2, k2) = mk("two.example");
        std::fs::write(&cert, &c2).unwrap();
        assert!(tls.stale());
        let e = tls.reload().unwrap_err();
        assert!(format!("{e:#}").contains("do not go together"), "{e:#}");
        assert_eq!(tls.current_leaf(), first);
        std::fs::write(&key, &k2).unwrap();
        tls.reload().unwrap();
        assert_ne!(tls.current_leaf(), first);
        assert!(!tls.stale());
        // Expired: refused, the old one stays.
        let old = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["old.example".to_string()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let expired = p.self_signed(&old).unwrap();
        let before = tls.current_leaf();
        std::fs::write(&key, old.serialize_pem()).unwrap();
        std::fs::write(&cert, expired.pem()).unwrap();
        let e = tls.reload().unwrap_err();
        assert!(format!("{e:#}").contains("expired"), "{e:#}");
        assert_eq!(tls.current_leaf(), before);
        // Garbage: refused with the file named.
        std::fs::write(&cert, "not pem").unwrap();
        let e = tls.reload().unwrap_err();
        assert!(format!("{e:#}").contains("c.pem"), "{e:#}");
    }

    #[test]
    fn not_after_is_read_from_the_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        for (y, m, d) in [(2031, 7, 9), (2049, 12, 31), (2051, 1, 2)] {
            // rcgen writes UTCTime before 2050 and GeneralizedTime from 2050 on.
            let mut p = rcgen::CertificateParams::new(vec!["a.example".to_string()]).unwrap();
            p.not_after = rcgen::date_time_ymd(y, m, d);
            let cert = p.self_signed(&key).unwrap();
            assert_eq!(
                not_after(cert.der()).unwrap(),
                p.not_after.unix_timestamp(),
                "{y}-{m}-{d}"
            );
        }
        assert!(not_after(b"\x30\x03\x02\x01\x01").is_err());
        assert!(not_after(b"").is_err());
    }

    #[test]
    fn acme_validation_gets_only_a_challenge_certificate() {
        // The resolver's choice by ALPN, through a real handshake in memory.
        let dir = tempfile::tempdir().unwrap();
        let tls = ServerTls::new(
            CertSource::Acme {
                data_dir: dir.path().into(),
                names: vec!["localhost".into()],
                acme: acme::AcmeSettings {
                    directory: "https://acme.invalid/dir".into(),
                    domains: vec!["api.example".into()],
                    email: None,
                    directory_ca: None,
                },
            },
            MinVersion::Tls13,
        )
        .unwrap();
        let handshake = |alpn: &[u8], name: &str| -> Option<Vec<u8>> {
            let mut c = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny))
                .with_no_client_auth();
            c.alpn_protocols = vec![alpn.to_vec()];
            let mut client = rustls::ClientConnection::new(
                Arc::new(c),
                rustls::pki_types::ServerName::try_from(name.to_string()).unwrap(),
            )
            .unwrap();
            let mut server = rustls::ServerConnection::new(tls.config.clone()).unwrap();
            for _ in 0..10 {
                let mut buf = Vec::new();
                client.write_tls(&mut buf).unwrap();
                server.read_tls(&mut buf.as_slice()).unwrap();
                server.process_new_packets().ok()?;
                let mut buf = Vec::new();
                server.write_tls(&mut buf).unwrap();
                client.read_tls(&mut buf.as_slice()).unwrap();
                client.process_new_packets().ok()?;
                if !client.is_handshaking() {
                    return Some(client.peer_certificates()?[0].to_vec());
                }
            }
            None
        };
        let normal = handshake(b"http/1.1", "api.example").unwrap();
        // No order in progress: acme-tls/1 gets no handshake, not the real certificate.
        assert!(handshake(acme::ACME_TLS_ALPN, "api.example").is_none());
        let challenge = acme::challenge_cert("api.example", &[7u8; 32]).unwrap();
        tls.resolver.add_challenge("api.example", challenge.clone());
        let got = handshake(acme::ACME_TLS_ALPN, "api.example").unwrap();
        assert_eq!(got, challenge.cert[0].to_vec());
        assert_ne!(got, normal);
        // Only for the name it was made for; ordinary clients still get the real one.
        assert!(handshake(acme::ACME_TLS_ALPN, "other.example").is_none());
        assert_eq!(handshake(b"http/1.1", "api.example").unwrap(), normal);
        tls.resolver.clear_challenges();
        assert!(handshake(acme::ACME_TLS_ALPN, "api.example").is_none());
    }

    #[derive(Debug)]
    struct AcceptAny;

    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    #[test]
    fn min_version_parses() {
        assert_eq!("1.3".parse::<MinVersion>().unwrap(), MinVersion::Tls13);
        assert_eq!("1.2".parse::<MinVersion>().unwrap(), MinVersion::Tls12);
        assert!("1.1".parse::<MinVersion>().is_err());
    }
}
