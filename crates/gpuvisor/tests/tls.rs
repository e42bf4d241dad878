//! The API over TLS, as clients and attackers meet it: TLS 1.3 only by default, the daemon's
//! own CA (kept across restarts, its fingerprint in the log), the CLI refusing a certificate
//! it cannot check, an operator's certificate reloaded on change and on SIGHUP without a
//! restart (a bad file keeps the old one), plain HTTP only when asked and only on loopback,
//! TLS handshakes that never finish cut off, and the admin key only in its 0600 file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{serial, Daemon, BIN};
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::Digest;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config trusting the PEM `ca`, offering only `versions`.
fn client(
    ca: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A finished handshake with the daemon on `port` as `name`, or the error that ended it.
fn handshake(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn =
        rustls::ClientConnection::new(config, ServerName::try_from(name.to_string()).unwrap())
            .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
    }
    Ok(s)
}

/// The leaf certificate the daemon serves now.
fn served_leaf(port: u16, ca: &Path) -> CertificateDer<'static> {
    let s = handshake(port, client(ca, &[&rustls::version::TLS13]), "127.0.0.1").unwrap();
    s.conn.peer_certificates().unwrap()[0].clone().into_owned()
}

fn get(mut s: impl Read + Write, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn fingerprint(pem: &Path) -> String {
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_file(pem).unwrap();
    let parts: Vec<String> = sha2::Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    format!("SHA256:{}", parts.join(":"))
}

fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for: {what}");
}

#[test]
fn tls_by_default_with_the_daemons_own_ca() {
    let _s = serial();
    let mut d = Daemon::start(&[]);
    let ca = d.ca();
    assert!(ca.is_file(), "no CA written at {}", ca.display());
    // The CLI (which the harness points at the CA) works over TLS.
    let gpus = d.json(&["gpu", "list"]);
    assert_eq!(gpus.as_array().unwrap().len(), 3, "{gpus}");

    // TLS 1.3, for every name the certificate was made for.
    for name in ["127.0.0.1", "localhost"] {
        let s = handshake(d.port, client(&ca, &[&rustls::version::TLS13]), name)
            .unwrap_or_else(|e| panic!("TLS 1.3 as {name}: {e}"));
        assert_eq!(
            s.conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert!(get(s, "/v1/health").starts_with("HTTP/1.0 200"));
    }
    // A name it was not made for does not verify.
    let e = handshake(
        d.port,
        client(&ca, &[&rustls::version::TLS13]),
        "evil.example",
    )
    .unwrap_err();
    assert!(e.contains("certificate"), "{e}");
    // TLS 1.2 is refused unless configured.
    let e = handshake(d.port, client(&ca, &[&rustls::version::TLS12]), "127.0.0.1").unwrap_err();
    assert!(
        e.to_lowercase().contains("protocol"),
        "TLS 1.2 was not refused by version: {e}"
    );
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = get(
        TcpStream::connect(("127.0.0.1", d.port)).unwrap(),
        "/v1/health",
    );
    assert!(
        !plain.contains("HTTP/1."),
        "plain HTTP was answered: {plain:?}"
    );

    // The CLI refuses a daemon it cannot check, and says what to do.
    let out = d
        .command_as(&d.key, ["gpu", "list"])
        .env("GPUVISOR_CA", "system")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the CLI trusted an unknown CA");
    assert!(err.contains("--ca") && err.contains("certificate"), "{err}");
    // Another daemon's CA does not do either.
    let other = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(
        other.path().join("ca.pem"),
        p.self_signed(&key).unwrap().pem(),
    )
    .unwrap();
    let out = d
        .command_as(&d.key, ["gpu", "list"])
        .env("GPUVISOR_CA", other.path().join("ca.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the CLI trusted another CA's daemon");

    // The log names the CA's fingerprint and never the admin key; the key file is 0600.
    let fp = fingerprint(&ca);
    assert!(d.log().contains(&fp), "fingerprint {fp} not in the log");
    assert!(
        !d.log().contains(&d.key),
        "the admin key is in the daemon's output"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.data().join("admin.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A restart keeps the CA: clients that trust it go on working.
    let leaf = served_leaf(d.port, &ca);
    d.restart();
    assert_eq!(fingerprint(&ca), fp, "the CA changed across a restart");
    assert_eq!(
        served_leaf(d.port, &ca),
        leaf,
        "the certificate changed across a restart"
    );
    d.json(&["gpu", "list"]);
}

#[test]
fn tls12_only_when_configured_and_forward_secret() {
    let _s = serial();
    let d = Daemon::start(&["--tls-min-version", "1.2"]);
    let s = handshake(
        d.port,
        client(&d.ca(), &[&rustls::version::TLS12]),
        "127.0.0.1",
    )
    .unwrap();
    assert_eq!(
        s.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let suite = format!("{:?}", s.conn.negotiated_cipher_suite().unwrap().suite());
    assert!(
        suite.contains("ECDHE"),
        "a suite without forward secrecy: {suite}"
    );
    assert!(get(s, "/v1/health").starts_with("HTTP/1.0 200"));
}

/// An operator's CA and a leaf for 127.0.0.1 signed by it: (ca pem, [(cert pem, key pem)]).
struct OperatorPki {
    ca_key: rcgen::KeyPair,
    ca_params: rcgen::CertificateParams,
}

impl OperatorPki {
    fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "operator CA");
        Self { ca_key, ca_params }
    }

    fn ca_pem(&self) -> String {
        self.ca_params.self_signed(&self.ca_key).unwrap().pem()
    }

    /// Writes the CA to `dir`/ca.pem; (ca.pem, cert.pem, key.pem) paths in `dir`.
    fn files(&self, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        let (ca, cert, key) = (
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem"),
        );
        std::fs::write(&ca, self.ca_pem()).unwrap();
        (ca, cert, key)
    }

    fn leaf(&self, cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        (
            p.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    }
}

#[test]
fn an_operator_certificate_is_reloaded_when_its_files_change() {
    let _s = serial();
    let (pki, files) = (OperatorPki::new(), tempfile::tempdir().unwrap());
    let (ca, cert, key) = pki.files(files.path());
    let write = |(c, k): (String, String)| {
        // Key first, then the certificate: a poll between the two sees a mismatch, which is
        // refused and retried at the next change.
        std::fs::write(&key, k).unwrap();
        std::fs::write(&cert, c).unwrap();
    };
    write(pki.leaf("one"));
    let d = Daemon::start_trusting(
        "1xA100-80GB",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        Some(&ca),
    );
    assert!(
        !d.data().join("ca.pem").exists(),
        "a CA was made beside an operator's certificate"
    );
    d.json(&["gpu", "list"]);
    let first = served_leaf(d.port, &ca);

    // A new pair on disk is served without a restart.
    write(pki.leaf("two"));
    until("the changed certificate is served", 30, || {
        served_leaf(d.port, &ca) != first
    });
    let second = served_leaf(d.port, &ca);
    d.json(&["gpu", "list"]);

    // A broken file: the daemon keeps the certificate it has, and says so.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    until("the bad file is reported", 30, || {
        d.log().contains("not reloaded")
    });
    assert_eq!(served_leaf(d.port, &ca), second);
    d.json(&["gpu", "list"]);
}

#[test]
fn sighup_reloads_at_once() {
    let _s = serial();
    let (pki, files) = (OperatorPki::new(), tempfile::tempdir().unwrap());
    let (ca, cert, key) = pki.files(files.path());
    let (c, k) = pki.leaf("one");
    std::fs::write(&key, k).unwrap();
    std::fs::write(&cert, c).unwrap();
    // The file poll is made too slow to matter: only the signal can reload.
    let d = Daemon::start_trusting(
        "1xA100-80GB",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-poll-every",
            "1h",
        ],
        Some(&ca),
    );
    let first = served_leaf(d.port, &ca);
    let (c, k) = pki.leaf("two");
    std::fs::write(&key, k).unwrap();
    std::fs::write(&cert, c).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        served_leaf(d.port, &ca),
        first,
        "reloaded without a signal (poll is 1h)"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    until("SIGHUP reloads the certificate", 30, || {
        served_leaf(d.port, &ca) != first
    });
    // The daemon is still the same process.
    assert!(
        d.log().contains("TLS certificate reloaded (SIGHUP)"),
        "{}",
        d.log()
    );
}

#[test]
fn plain_http_only_when_asked_and_only_on_loopback() {
    let _s = serial();
    let d = Daemon::start(&["--insecure-http"]);
    assert!(d.endpoint().starts_with("http://"));
    d.json(&["gpu", "list"]);
    assert!(!d.data().join("ca.pem").exists());
    // Refused before anything starts: a public address, a certificate without its key.
    let data = tempfile::tempdir().unwrap();
    for (args, says) in [
        (
            vec!["--listen", "0.0.0.0:1", "--insecure-http"],
            "--insecure-http-public",
        ),
        (vec!["--tls-cert", "/nonexistent.pem"], "--tls-key"),
        (vec!["--tls-min-version", "1.1"], "1.2"),
        (vec!["--tls-name", "not a name!"], "neither a DNS name"),
    ] {
        let out = Command::new(BIN)
            .args(["serve", "--data-dir"])
            .arg(data.path())
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// Connections that open and never finish a TLS handshake are closed after the header
/// timeout, and give their place back: with two places per address, a third client is served
/// once they are cut off.
#[test]
fn handshakes_that_never_finish_are_cut_off() {
    let _s = serial();
    let d = Daemon::start(&["--header-timeout", "2s", "--max-connections-per-ip", "2"]);
    let silent: Vec<TcpStream> = (0..2)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s
        })
        .collect();
    for mut s in silent {
        let mut b = [0u8; 1];
        let r = s.read(&mut b);
        assert!(
            matches!(r, Ok(0))
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "a silent connection was kept (or answered): {r:?}"
        );
    }
    until(
        "a client is served after the silent ones were cut",
        20,
        || {
            common::try_connect(d.port)
                .is_some_and(|s| get(s, "/v1/health").starts_with("HTTP/1.0 200"))
        },
    );
}

/// A process killed when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A certificate for a public name from a real ACME server: Debian's pebble, its DNS pointed
/// at pebble-challtestsrv (every name is 127.0.0.1), its TLS-ALPN-01 validation pointed at the
/// daemon's API port (the only way it can validate here: its HTTP-01 port has no server). The
/// daemon serves its own CA's certificate until the order completes, then pebble's for that
/// name, and its own for every other name (the local CLI).
#[test]
fn acme_certificate_from_pebble_through_tls_alpn_on_the_api_port() {
    let _s = serial();
    for tool in ["pebble", "pebble-challtestsrv"] {
        if Command::new(tool).arg("-h").output().is_err() {
            common::prerequisite_missing(&format!("{tool} (scripts/install-deps installs it)"));
            return;
        }
    }
    let work = tempfile::tempdir().unwrap();
    let pki = OperatorPki::new();
    let ca = work.path().join("pebble-ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let (cert, key) = pki.leaf("pebble");
    std::fs::write(work.path().join("pebble.pem"), cert).unwrap();
    std::fs::write(work.path().join("pebble.key"), key).unwrap();
    let port = common::free_port();
    let (acme_port, mgmt_port, dns_port, dns_mgmt, http01) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let config = serde_json::json!({"pebble": {
        "listenAddress": format!("127.0.0.1:{acme_port}"),
        "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
        "certificate": work.path().join("pebble.pem"),
        "privateKey": work.path().join("pebble.key"),
        "httpPort": http01,
        "tlsPort": port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false
    }});
    std::fs::write(work.path().join("pebble.json"), config.to_string()).unwrap();
    let log = |name: &str| std::fs::File::create(work.path().join(name)).unwrap();
    let _dns = Proc(
        Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_mgmt}")])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .unwrap(),
    );
    let _pebble = Proc(
        Command::new("pebble")
            .arg("-config")
            .arg(work.path().join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .unwrap(),
    );
    let pebble_log = || {
        [
            "pebble.log",
            "pebble.err",
            "challtestsrv.log",
            "challtestsrv.err",
        ]
        .iter()
        .map(|f| std::fs::read_to_string(work.path().join(f)).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
    };
    until("pebble listens", 30, || {
        TcpStream::connect(("127.0.0.1", acme_port)).is_ok()
            && TcpStream::connect(("127.0.0.1", mgmt_port)).is_ok()
    });
    let d = Daemon::start_on(
        port,
        "1xA100-80GB",
        &[
            "--acme-domain",
            "gpuvisor.test",
            "--acme-directory",
            &format!("https://127.0.0.1:{acme_port}/dir"),
            "--acme-ca",
            ca.to_str().unwrap(),
            "--acme-email",
            "ops@gpuvisor.test",
        ],
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while !d.log().contains("ACME: certificate obtained") {
        assert!(
            Instant::now() < deadline,
            "no ACME certificate in 120 s\n--- daemon ---\n{}\n--- pebble ---\n{}",
            d.log(),
            pebble_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Pebble's root (made at its start), from its management API.
    let mgmt = handshake(
        mgmt_port,
        client(&ca, &[&rustls::version::TLS13, &rustls::version::TLS12]),
        "127.0.0.1",
    )
    .unwrap();
    let answer = get(mgmt, "/roots/0");
    let root_pem = answer
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    assert!(root_pem.contains("BEGIN CERTIFICATE"), "{answer}");
    let root = work.path().join("pebble-root.pem");
    std::fs::write(&root, root_pem).unwrap();
    // The daemon's API, as gpuvisor.test, chains to pebble's root.
    let s = handshake(
        port,
        client(&root, &[&rustls::version::TLS13]),
        "gpuvisor.test",
    )
    .unwrap_or_else(|e| panic!("the ACME certificate does not verify: {e}\n{}", d.log()));
    assert!(get(s, "/v1/health").starts_with("HTTP/1.0 200"));
    // The account and the key are private; the order is not repeated while it is valid.
    use std::os::unix::fs::PermissionsExt;
    for f in ["tls/acme/key.pem", "tls/acme/account.json"] {
        let m = std::fs::metadata(d.data().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, 0o600, "{f}");
    }
    assert_eq!(d.log().matches("ACME: ordering").count(), 1, "{}", d.log());
    // Clients of other names (the local CLI on 127.0.0.1) still get the daemon's own
    // certificate, which its CA verifies.
    d.json(&["gpu", "list"]);
    let local = handshake(
        port,
        client(&d.ca(), &[&rustls::version::TLS13]),
        "127.0.0.1",
    );
    assert!(
        local.is_ok(),
        "the local CLI lost its certificate to the ACME one"
    );
}
