//! ACME (RFC 8555) for a public name, with the TLS-ALPN-01 challenge (RFC 8737) answered on
//! the API's own listener: no port 80, no second server. The account and the certificate live
//! in `<data>/tls/acme/` (keys 0600); until the first certificate arrives, and whenever an
//! order fails, the daemon serves the certificate of its own CA. A certificate is renewed 30
//! days before it expires.

use super::{write_file, Resolver, RENEW_BEFORE_DAYS};
use anyhow::{bail, Context};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The ALPN protocol of TLS-ALPN-01 validation connections.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// `[tls] acme_*`: where to get a certificate for which names.
#[derive(Debug, Clone, PartialEq)]
pub struct AcmeSettings {
    /// The ACME server's directory URL (default: Let's Encrypt).
    pub directory: String,
    /// The names (DNS) the certificate is for; they must resolve to this daemon, whose API
    /// port the ACME server connects to (443 for public CAs).
    pub domains: Vec<String>,
    /// Contact address for the account (`mailto:` added).
    pub email: Option<String>,
    /// A PEM root the ACME server's own HTTPS chains to (test CAs such as pebble).
    pub directory_ca: Option<PathBuf>,
}

pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Files under `<data>/tls/acme`.
pub struct AcmeFiles {
    dir: PathBuf,
    pub account: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    meta: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    directory: String,
    domains: Vec<String>,
    /// Unix seconds, from the certificate.
    not_after: i64,
}

impl AcmeFiles {
    pub fn new(data_dir: &Path) -> Self {
        let dir = data_dir.join("tls").join("acme");
        Self {
            account: dir.join("account.json"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            meta: dir.join("cert.json"),
            dir,
        }
    }

    /// Makes [`AcmeFiles::current`] false: the next check orders a new certificate.
    pub fn forget(&self) {
        let _ = std::fs::remove_file(&self.meta);
    }

    /// Whether a certificate from `s`'s server for `s`'s names is on disk and not due.
    pub fn current(&self, s: &AcmeSettings) -> bool {
        let Ok(text) = std::fs::read(&self.meta) else {
            return false;
        };
        let Ok(m) = serde_json::from_slice::<Meta>(&text) else {
            return false;
        };
        m.directory == s.directory
            && m.domains == s.domains
            && m.not_after - super::now_unix() > RENEW_BEFORE_DAYS * 86_400
            && self.cert.exists()
            && self.key.exists()
    }
}

/// Orders a certificate for `s.domains` and writes it to `files`. The challenge certificates
/// are put into `resolver` while the server validates, and taken out whatever happens.
pub async fn obtain(
    s: &AcmeSettings,
    files: &AcmeFiles,
    resolver: &Resolver,
) -> anyhow::Result<()> {
    let result = order(s, files, resolver).await;
    resolver.clear_challenges();
    result
}

async fn order(s: &AcmeSettings, files: &AcmeFiles, resolver: &Resolver) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&files.dir)
        .with_context(|| format!("cannot create {}", files.dir.display()))?;
    let account = account(s, files).await?;
    let ids: Vec<Identifier> = s.domains.iter().cloned().map(Identifier::Dns).collect();
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .context("ACME: new order")?;
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.context("ACME: authorization")?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => bail!("ACME: an authorization is {other:?}"),
        }
        let mut challenge = authz
            .challenge(ChallengeType::TlsAlpn01)
            .context("ACME: the server offers no tls-alpn-01 challenge")?;
        let domain = challenge.identifier().to_string();
        let digest = challenge.key_authorization().digest();
        resolver.add_challenge(&domain, challenge_cert(&domain, digest.as_ref())?);
        challenge
            .set_ready()
            .await
            .context("ACME: challenge ready")?;
    }
    let retry = RetryPolicy::new()
        .initial_delay(std::time::Duration::from_millis(250))
        .timeout(std::time::Duration::from_secs(120));
    let status = order.poll_ready(&retry).await.context("ACME: order")?;
    if status != OrderStatus::Ready {
        bail!("ACME: the order is {status:?} (validation failed: do the names resolve to this host, and does the ACME server reach its API port?)");
    }
    let key_pem = order.finalize().await.context("ACME: finalize")?;
    let chain_pem = order
        .poll_certificate(&retry)
        .await
        .context("ACME: certificate")?;
    // Checked before it replaces anything: parses, goes with its key, has a validity.
    let chain = super::parse_chain(chain_pem.as_bytes()).context("ACME: the certificate")?;
    let not_after = super::not_after(&chain[0]).context("ACME: the certificate's validity")?;
    {
        use rustls::pki_types::pem::PemObject;
        let key_der = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .context("ACME: the key")?;
        rustls::sign::CertifiedKey::from_der(chain, key_der, &super::provider())
            .context("ACME: the certificate does not go with its key")?;
    }
    write_file(&files.key, key_pem.as_bytes(), 0o600)?;
    write_file(&files.cert, chain_pem.as_bytes(), 0o644)?;
    let meta = Meta {
        directory: s.directory.clone(),
        domains: s.domains.clone(),
        not_after,
    };
    write_file(&files.meta, &serde_json::to_vec(&meta)?, 0o644)?;
    Ok(())
}

/// The account: the stored one, else a new one (stored 0600).
async fn account(s: &AcmeSettings, files: &AcmeFiles) -> anyhow::Result<Account> {
    let builder = || match &s.directory_ca {
        Some(ca) => Account::builder_with_root(ca).context("ACME: the directory CA"),
        None => Account::builder().context("ACME: HTTP client"),
    };
    if let Ok(text) = std::fs::read(&files.account) {
        if let Ok(creds) = serde_json::from_slice::<AccountCredentials>(&text) {
            return builder()?
                .from_credentials(creds)
                .await
                .context("ACME: the stored account");
        }
    }
    let contact = s.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, creds) = builder()?
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            s.directory.clone(),
            None,
        )
        .await
        .with_context(|| format!("ACME: cannot create an account at {}", s.directory))?;
    write_file(&files.account, &serde_json::to_vec(&creds)?, 0o600)?;
    Ok(account)
}

/// The TLS-ALPN-01 certificate for `domain`: self-signed, the name as its only SAN, the key
/// authorization's SHA-256 in a critical id-pe-acmeIdentifier extension.
pub(super) fn challenge_cert(
    domain: &str,
    digest: &[u8],
) -> anyhow::Result<Arc<rustls::sign::CertifiedKey>> {
    let key = rcgen::KeyPair::generate()?;
    let mut p = rcgen::CertificateParams::new(vec![domain.to_string()])?;
    p.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = p.self_signed(&key)?;
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| anyhow::anyhow!("challenge key: {e}"))?;
    // Not `CertifiedKey::from_der`: its key check parses the certificate with webpki, which
    // refuses the critical acmeIdentifier extension this certificate exists for.
    let signer = super::provider()
        .key_provider
        .load_private_key(key_der)
        .context("challenge key")?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    )))
}
