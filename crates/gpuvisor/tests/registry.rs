//! Image pulls from a real OCI registry (Debian's `docker-registry`), started by each test on a
//! loopback port, with images the test builds as OCI layouts and pushes with `skopeo`: layers
//! gzip/zstd/plain, whiteouts, Docker v2 schema 2 and OCI manifests, a two-platform manifest
//! list, a wrong digest, a connection cut mid-layer (resumed with HTTP Range), a daemon killed
//! mid-pull (resumed at start), concurrent pulls of one layer (one download), TLS with a
//! self-signed CA, basic auth and per-tenant credentials, image visibility, and `image import`
//! of a local file (streamed upload).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{serial, Daemon};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---- prerequisites ----------------------------------------------------------------------------

/// Whether the host tools are here; in CI (`CI=true`) a missing one fails the test.
fn prerequisites() -> bool {
    let missing: Vec<&str> = ["docker-registry", "skopeo", "htpasswd", "openssl", "zstd"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "registry tests need {} (scripts/install-deps installs them)",
        missing.join(", ")
    );
    common::prerequisite_missing(&msg);
    false
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sha(bytes: &[u8]) -> String {
    let h = Sha256::digest(bytes);
    format!(
        "sha256:{}",
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

// ---- a registry -------------------------------------------------------------------------------

struct Registry {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    auth: Option<(String, String)>,
}

impl Registry {
    fn start(tls: bool, auth: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("gvreg")
            .tempdir_in("/var/tmp")
            .unwrap();
        let mut r = Registry {
            port: free_port(),
            dir,
            child: None,
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
        };
        let d = r.dir.path();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n",
            d.join("storage").display(),
            r.port
        );
        if tls {
            // A CA and a server certificate for 127.0.0.1 signed by it.
            let sh = format!(
                "set -e; cd {d}; \
                 openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=gvtest-ca -keyout ca.key -out ca.pem 2>/dev/null; \
                 openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout srv.key -out srv.csr 2>/dev/null; \
                 printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext; \
                 openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out srv.pem 2>/dev/null",
                d = d.display()
            );
            assert!(Command::new("sh")
                .args(["-c", &sh])
                .status()
                .unwrap()
                .success());
            cfg.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                d.join("srv.pem").display(),
                d.join("srv.key").display()
            ));
        }
        if let Some((u, p)) = &r.auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .unwrap();
            assert!(out.status.success());
            std::fs::write(d.join("htpasswd"), out.stdout).unwrap();
            cfg.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: gvtest\n    path: {}\n",
                d.join("htpasswd").display()
            ));
        }
        std::fs::write(d.join("config.yml"), cfg).unwrap();
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "registry did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Pushes the image tagged `tag` in the OCI layout `layout` to `repo:tag`.
    fn push(&self, layout: &Path, tag: &str, repo: &str, extra: &[&str]) {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        // Layers as built (uncompressed stays uncompressed), unless a format change is asked.
        if !extra.contains(&"--format") {
            cmd.arg("--preserve-digests");
        }
        if let Some((u, p)) = &self.auth {
            cmd.args(["--dest-creds", &format!("{u}:{p}")]);
        }
        cmd.args(extra)
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.host()));
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "skopeo push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The digest of the manifest the registry serves for `reference` (skopeo may rewrite the
    /// manifest it pushes, so it is asked, not computed).
    fn digest(&self, reference: &str) -> String {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "inspect",
            "--tls-verify=false",
            "--format",
            "{{.Digest}}",
        ]);
        if let Some((u, p)) = &self.auth {
            cmd.args(["--creds", &format!("{u}:{p}")]);
        }
        let out = cmd.arg(format!("docker://{reference}")).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The file the registry serves for a blob.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let h = hex(digest);
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&h[..2])
            .join(h)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- OCI layouts built here ------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Comp {
    Plain,
    Gzip,
    Zstd,
}

/// Tar entries: (path, content) files, `None` = directory; a name `.wh.x` is a whiteout.
fn tar_of(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match data {
            Some(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(d.len() as u64);
                h.set_cksum();
                b.append(&h, *d).unwrap();
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// A tar of a directory tree (symlinks kept as symlinks).
fn tar_dir(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}

fn compress(tar: &[u8], comp: Comp) -> Vec<u8> {
    match comp {
        Comp::Plain => tar.to_vec(),
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Comp::Zstd => {
            let mut c = Command::new("zstd")
                .args(["-q", "-c", "-3"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = c.stdin.take().unwrap();
            let data = tar.to_vec();
            let w = std::thread::spawn(move || stdin.write_all(&data).unwrap());
            let out = c.wait_with_output().unwrap();
            w.join().unwrap();
            assert!(out.status.success());
            out.stdout
        }
    }
}

struct Layout {
    dir: PathBuf,
    refs: Vec<Value>,
}

/// An image written into a layout: its manifest descriptor and layer facts.
#[derive(Clone)]
struct Built {
    manifest: String,
    manifest_size: usize,
    /// (blob digest, diff id) per layer.
    layers: Vec<(String, String)>,
}

impl Layout {
    fn new(dir: PathBuf) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir,
            refs: Vec::new(),
        }
    }

    fn blob(&self, bytes: &[u8]) -> String {
        let d = sha(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(hex(&d)), bytes).unwrap();
        d
    }

    /// Writes an image (config + layers + manifest) and returns it; not yet tagged.
    fn image(&self, layers: &[(Vec<u8>, Comp)], arch: &str, cmd: &[&str]) -> Built {
        let mut descs = Vec::new();
        let mut facts = Vec::new();
        for (tar, comp) in layers {
            let blob = compress(tar, *comp);
            let digest = self.blob(&blob);
            let media = match comp {
                Comp::Plain => "application/vnd.oci.image.layer.v1.tar",
                Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
                Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            };
            descs.push(json!({"mediaType": media, "digest": digest, "size": blob.len()}));
            facts.push((digest, sha(tar)));
        }
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin:/usr/bin", "FROM_IMAGE=yes"]},
            "rootfs": {"type": "layers", "diff_ids": facts.iter().map(|f| f.1.clone()).collect::<Vec<_>>()},
        });
        let config = serde_json::to_vec(&config).unwrap();
        let cd = self.blob(&config);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
            "layers": descs,
        });
        let manifest = serde_json::to_vec(&manifest).unwrap();
        Built {
            manifest: self.blob(&manifest),
            manifest_size: manifest.len(),
            layers: facts,
        }
    }

    fn tag(&mut self, b: &Built, tag: &str) {
        self.refs.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": b.manifest, "size": b.manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
        self.write_index();
    }

    /// Tags an image index of `images` (each with its architecture).
    fn tag_list(&mut self, images: &[(&Built, &str)], tag: &str) {
        let manifests: Vec<Value> = images
            .iter()
            .map(|(b, arch)| {
                json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": b.manifest, "size": b.manifest_size,
                    "platform": {"os": "linux", "architecture": arch},
                })
            })
            .collect();
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .unwrap();
        let d = self.blob(&index);
        self.refs.push(json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": d, "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
        self.write_index();
    }

    fn write_index(&self) {
        let index = json!({"schemaVersion": 2, "manifests": self.refs});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Random bytes (incompressible), from a small xorshift: no extra crate.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---- daemon helpers ---------------------------------------------------------------------------

/// A daemon with its own network prefix and pool, so these tests share no bridge or chain
/// with other suites running on the host at the same time.
fn daemon(extra: &[&str]) -> Daemon {
    daemon_on("rg", "10.91.0.0", extra)
}

fn daemon_on(prefix: &str, pool: &str, extra: &[&str]) -> Daemon {
    let mut a = vec!["--net-prefix", prefix, "--net-pool", pool];
    a.extend(extra);
    Daemon::start(&a)
}

/// `gpuvisor image pull` as `key`: (success, stdout json or Null, stderr).
fn pull(d: &Daemon, key: &str, args: &[&str]) -> (bool, Value, String) {
    let mut a = vec!["-o", "json", "image", "pull"];
    a.extend(args);
    let out = d.cli_as(key, &a);
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn pull_ok(d: &Daemon, key: &str, args: &[&str]) -> (Value, String) {
    let (ok, v, err) = pull(d, key, args);
    assert!(
        ok,
        "pull {args:?} failed: {err}\n--- daemon log ---\n{}",
        d.log()
    );
    (v, err)
}

/// Tenant `name` and a user key of it.
fn tenant(d: &Daemon, name: &str) -> String {
    d.json(&["tenant", "create", name]);
    d.json(&["key", "create", "--tenant", name])["secret"]
        .as_str()
        .unwrap()
        .to_string()
}

/// One raw HTTP/1.0 request to the daemon: (status, json body).
fn api(d: &Daemon, key: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = common::connect(d.port);
    s.tcp()
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: x\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let buf = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Files left in the daemon's pull and staging areas.
fn leftovers(d: &Daemon) -> Vec<String> {
    let mut out = Vec::new();
    for sub in [
        "images/pull/partial",
        "images/pull/done",
        "images/pull/run",
        "images/pull/blobs/sha256",
        "images/tmp",
    ] {
        if let Ok(entries) = std::fs::read_dir(d.data().join(sub)) {
            out.extend(
                entries.map(|e| format!("{sub}/{}", e.unwrap().file_name().to_string_lossy())),
            );
        }
    }
    out
}

/// The partial download of blob `digest` (named `<source key>-<hex>`), if there is one.
fn partial_of(d: &Daemon, digest: &str) -> Option<PathBuf> {
    let suffix = format!("-{}", hex(digest));
    std::fs::read_dir(d.data().join("images/pull/partial"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(&suffix))
}

fn layer_dir(d: &Daemon, diff_id: &str) -> PathBuf {
    d.data()
        .join("images/layers")
        .join(diff_id.replace(':', "-"))
}

fn layer_count(d: &Daemon) -> usize {
    std::fs::read_dir(d.data().join("images/layers"))
        .unwrap()
        .count()
}

/// Waits (bounded) for `cond`; the bound only stops a hung test.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- the tests --------------------------------------------------------------------------------

/// Plain HTTP registry without auth: multi-layer OCI image with a whiteout and a zstd layer;
/// a Docker v2 schema 2 image sharing a layer (not downloaded again, not unpacked again); a
/// manifest list (the host's platform is chosen); a wrong digest (refused, nothing left);
/// `instance create --image REF` pulling on first use and running; tenant visibility and
/// publishing.
#[test]
fn pulls_from_a_plain_http_registry() {
    if !prerequisites() {
        return;
    }
    let _s = serial();
    let reg = Registry::start(false, None);
    let host = reg.host();
    let d = daemon(&["--insecure-registry", &host]);
    let layouts = tempfile::TempDir::new().unwrap();
    let mut lay = Layout::new(layouts.path().join("oci"));

    // Three layers: gzip, plain with a whiteout of a lower file, zstd.
    let l1 = tar_of(&[
        ("etc/", None),
        ("etc/hello", Some(b"hello from layer 1\n")),
        ("gone", Some(b"whited out above\n")),
    ]);
    let l2 = tar_of(&[(".wh.gone", Some(b"")), ("etc/two", Some(b"layer 2\n"))]);
    let l3 = tar_of(&[("etc/zstd", Some(b"from a zstd layer\n"))]);
    let multi = lay.image(
        &[
            (l1.clone(), Comp::Gzip),
            (l2, Comp::Plain),
            (l3, Comp::Zstd),
        ],
        host_arch(),
        &["/bin/sh"],
    );
    lay.tag(&multi, "v1");
    reg.push(&lay.dir, "v1", "test/multi", &[]);

    let reference = format!("{host}/test/multi:v1");
    let (img, _) = pull_ok(&d, &d.key, &[&reference]);
    assert_eq!(img["name"], reference.as_str(), "{img}");
    assert_eq!(img["digest"], multi.manifest.as_str(), "{img}");
    assert_eq!(img["digest"], reg.digest(&reference).as_str(), "{img}");
    let layers: Vec<&str> = img["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let diff: Vec<&str> = multi.layers.iter().map(|l| l.1.as_str()).collect();
    assert_eq!(layers, diff);
    assert_eq!(
        std::fs::read_to_string(layer_dir(&d, &multi.layers[0].1).join("etc/hello")).unwrap(),
        "hello from layer 1\n"
    );
    // The whiteout became an overlayfs whiteout (a 0/0 character device).
    let wh = std::fs::symlink_metadata(layer_dir(&d, &multi.layers[1].1).join("gone")).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0, "{wh:?}");
    assert_eq!(
        std::fs::read_to_string(layer_dir(&d, &multi.layers[2].1).join("etc/zstd")).unwrap(),
        "from a zstd layer\n"
    );
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));

    // Docker v2 schema 2, sharing the gzip layer: downloaded and unpacked once.
    let l4 = tar_of(&[("etc/four", Some(b"four\n"))]);
    let v2 = lay.image(
        &[(l1, Comp::Gzip), (l4, Comp::Gzip)],
        host_arch(),
        &["/bin/sh"],
    );
    lay.tag(&v2, "v2");
    reg.push(&lay.dir, "v2", "test/docker", &["--format", "v2s2"]);
    let before = layer_count(&d);
    let (img2, err) = pull_ok(
        &d,
        &d.key,
        &[&format!("{host}/test/docker:v2"), "--name", "dockerish"],
    );
    assert_eq!(img2["name"], "dockerish");
    assert_eq!(
        layer_count(&d),
        before + 1,
        "only the new layer is unpacked"
    );
    assert!(
        err.contains("already here"),
        "the shared layer was downloaded again: {err}"
    );

    // A manifest list with two platforms: the host's is pulled.
    let other = if host_arch() == "amd64" {
        "arm64"
    } else {
        "amd64"
    };
    let mine = lay.image(
        &[(
            tar_of(&[("platform", Some(host_arch().as_bytes()))]),
            Comp::Gzip,
        )],
        host_arch(),
        &["/bin/sh"],
    );
    let theirs = lay.image(
        &[(tar_of(&[("platform", Some(other.as_bytes()))]), Comp::Gzip)],
        other,
        &["/bin/sh"],
    );
    lay.tag_list(&[(&theirs, other), (&mine, host_arch())], "multiarch");
    reg.push(&lay.dir, "multiarch", "test/list", &["--all"]);
    let (img3, _) = pull_ok(
        &d,
        &d.key,
        &[&format!("{host}/test/list:multiarch"), "--name", "listed"],
    );
    // `--all` pushes the index and its manifests as they are.
    assert_eq!(img3["digest"], mine.manifest.as_str(), "{img3}");
    assert_eq!(
        std::fs::read_to_string(layer_dir(&d, &mine.layers[0].1).join("platform")).unwrap(),
        host_arch()
    );
    assert!(!layer_dir(&d, &theirs.layers[0].1).exists());

    // A blob whose content does not match its digest: refused, nothing left behind.
    let bad = lay.image(
        &[(tar_of(&[("bad", Some(b"original content\n"))]), Comp::Gzip)],
        host_arch(),
        &["/bin/sh"],
    );
    lay.tag(&bad, "bad");
    reg.push(&lay.dir, "bad", "test/bad", &[]);
    let served = reg.blob_file(&bad.layers[0].0);
    let len = std::fs::metadata(&served).unwrap().len() as usize;
    std::fs::write(&served, noise(len, 7)).unwrap();
    let (ok, _, err) = pull(
        &d,
        &d.key,
        &[&format!("{host}/test/bad:bad"), "--name", "bad"],
    );
    assert!(!ok);
    assert!(err.contains("digest mismatch"), "{err}");
    assert!(!layer_dir(&d, &bad.layers[0].1).exists());
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));
    let names: Vec<String> = d
        .json(&["image", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!names.contains(&"bad".to_string()), "{names:?}");

    // A tenant pulls on first use with `instance create --image REF`; the image is its own.
    let rootfs = common::busybox_rootfs();
    let bb = lay.image(
        &[
            (tar_dir(&rootfs), Comp::Gzip),
            (
                tar_of(&[("marker", Some(b"pulled and running\n"))]),
                Comp::Zstd,
            ),
        ],
        host_arch(),
        &["sleep", "1000000"],
    );
    lay.tag(&bb, "1");
    reg.push(&lay.dir, "1", "test/busybox", &[]);
    let alice = tenant(&d, "alice");
    let bob = tenant(&d, "bob");
    let bbref = format!("{host}/test/busybox:1");
    let mut args = vec![
        "-o", "json", "instance", "create", "--image", &bbref, "--wait",
    ];
    args.extend(common::SMALL);
    let out = d.cli_as(&alice, &args);
    assert!(
        out.status.success(),
        "create from a reference: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let inst: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inst["state"], "running", "{inst}");
    let id = inst["id"].as_str().unwrap();
    let got = d.cli_as(&alice, &["instance", "exec", id, "--", "cat", "/marker"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout), "pulled and running\n");
    // A second create finds the image: no second pull.
    let mut again = args.clone();
    again.extend(["--name", "second"]);
    let out = d.cli_as(&alice, &again);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("pulled"));

    // Bob sees neither the image nor can start from it; alice sees hers and the public ones.
    let bobs = d.json_as(&bob, &["image", "list"]);
    assert!(!bobs.to_string().contains("test/busybox"), "{bobs}");
    let alices = d.json_as(&alice, &["image", "list"]);
    assert!(alices.to_string().contains("test/busybox"), "{alices}");
    let out = d.cli_as(&bob, &["image", "rm", &bbref]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.cli_as(&bob, &["image", "publish", &bbref]);
    assert!(!out.status.success());
    // Publishing (admin) makes it everyone's.
    let p = d.json(&["image", "publish", &bbref]);
    assert!(p.get("tenant").is_none(), "{p}");
    assert!(d
        .json_as(&bob, &["image", "list"])
        .to_string()
        .contains("test/busybox"));
    d.terminate_all();
}

/// TLS with a self-signed CA and basic auth: anonymous pulls are refused with a clear message,
/// a tenant's login is used for that tenant's pulls only and never shown or stored in clear.
#[test]
fn pulls_over_tls_with_per_tenant_credentials() {
    if !prerequisites() {
        return;
    }
    let _s = serial();
    let reg = Registry::start(true, Some(("pusher", "s3cret-Passw0rd")));
    let host = reg.host();
    let ca = reg.ca();
    // Tenants reach a registry on a loopback address only when the operator names it.
    let d = daemon(&[
        "--registry-ca",
        ca.to_str().unwrap(),
        "--tenant-registry",
        &host,
    ]);
    let layouts = tempfile::TempDir::new().unwrap();
    let mut lay = Layout::new(layouts.path().join("oci"));
    let img = lay.image(
        &[(tar_of(&[("secret", Some(b"private\n"))]), Comp::Gzip)],
        host_arch(),
        &["/bin/sh"],
    );
    lay.tag(&img, "v1");
    reg.push(&lay.dir, "v1", "team/private", &[]);
    let reference = format!("{host}/team/private:v1");
    let alice = tenant(&d, "alice");
    let bob = tenant(&d, "bob");

    // No login: refused, and the message says what to do.
    let (ok, _, err) = pull(&d, &alice, &[&reference]);
    assert!(!ok);
    assert!(
        err.contains("refused access") && err.contains("registry login"),
        "{err}"
    );
    // A wrong password: the same.
    let out = d.registry_login(&alice, &host, "pusher", "wrong");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, _, err) = pull(&d, &alice, &[&reference]);
    assert!(!ok && err.contains("refused access"), "{err}");
    // The right one.
    let out = d.registry_login(&alice, &host, "pusher", "s3cret-Passw0rd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (v, _) = pull_ok(&d, &alice, &[&reference]);
    assert_eq!(v["digest"], reg.digest(&reference).as_str());
    // Bob has no login: alice's is not his.
    let (ok, _, err) = pull(&d, &bob, &[&reference, "--name", "bobs"]);
    assert!(
        !ok && err.contains("refused access"),
        "bob used alice's login: {err}"
    );
    assert!(d
        .json_as(&bob, &["registry", "list"])
        .as_array()
        .unwrap()
        .is_empty());

    // Hosts and usernames only, never the password: not in answers, logs or the store file.
    let list = d.json_as(&alice, &["registry", "list"]);
    assert_eq!(list[0]["host"], host.as_str());
    assert_eq!(list[0]["username"], "pusher");
    assert!(!list.to_string().contains("s3cret"), "{list}");
    assert!(!d.log().contains("s3cret"), "password in the daemon log");
    for f in std::fs::read_dir(d.data()).unwrap() {
        let p = f.unwrap().path();
        if p.is_file() {
            let bytes = std::fs::read(&p).unwrap();
            assert!(
                !bytes.windows(15).any(|w| w == b"s3cret-Passw0rd"),
                "password in clear in {}",
                p.display()
            );
        }
    }
    let key = d.data().join("keys/registry.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Logout forgets it.
    d.json_as(&alice, &["registry", "logout", &host]);
    let (ok, _, _) = pull(&d, &alice, &[&reference, "--name", "again"]);
    assert!(!ok);
}

/// What the operator decides: TLS is verified (no CA given: refused), plain HTTP only for
/// `--insecure-registry` hosts, tenants may be denied pulls; image uploads are bounded.
#[test]
fn pull_policy_and_uploads() {
    if !prerequisites() {
        return;
    }
    let _s = serial();
    let tls = Registry::start(true, None);
    let plain = Registry::start(false, None);
    let d = daemon(&["--tenant-pull", "deny", "--max-upload", "64KiB"]);
    // Tenants limited to one registry: another host is refused before any connection.
    let only = daemon_on(
        "rh",
        "10.93.0.0",
        // Entries are normalised (case, scheme, trailing slash).
        &["--tenant-registry", "HTTPS://Registry.Example.com/"],
    );
    let t2 = tenant(&only, "t2");
    let (ok, _, err) = pull(&only, &t2, &[&format!("{}/a/b:v1", plain.host())]);
    assert!(!ok && err.contains("registry.tenant_hosts"), "{err}");
    let (ok, _, err) = pull(&only, &t2, &["registry.example.com/a/b:v1"]);
    assert!(!ok && !err.contains("registry.tenant_hosts"), "{err}");
    // A reference-like name must be the reference pulled: nothing can pass for another image.
    for name in [
        "docker.io/library/ubuntu:22.04",
        "ubuntu:22.04",
        "x@sha256:00",
    ] {
        let (ok, _, err) = pull(
            &only,
            &only.key,
            &[&format!("{}/a/b:v1", plain.host()), "--name", name],
        );
        assert!(
            !ok && err.contains("looks like an image reference"),
            "{name}: {err}"
        );
    }
    drop(only);
    let layouts = tempfile::TempDir::new().unwrap();
    let mut lay = Layout::new(layouts.path().join("oci"));
    let img = lay.image(
        &[(tar_of(&[("f", Some(b"x\n"))]), Comp::Gzip)],
        host_arch(),
        &["/bin/sh"],
    );
    lay.tag(&img, "v1");
    tls.push(&lay.dir, "v1", "a/b", &[]);
    plain.push(&lay.dir, "v1", "a/b", &[]);

    let t = tenant(&d, "t");
    let (ok, _, err) = pull(&d, &t, &[&format!("{}/a/b:v1", plain.host())]);
    assert!(!ok && err.contains("reserved to admins"), "{err}");
    let (ok, _, err) = pull(&d, &d.key, &[&format!("{}/a/b:v1", tls.host())]);
    assert!(
        !ok && err.to_ascii_lowercase().contains("certificate"),
        "{err}"
    );
    let (ok, _, err) = pull(&d, &d.key, &[&format!("{}/a/b:v1", plain.host())]);
    assert!(!ok, "plain HTTP without --insecure-registry: {err}");

    // An upload over the cap is refused before it is read.
    let tarball = layouts.path().join("img.tar");
    std::fs::write(&tarball, noise(1 << 20, 3)).unwrap();
    let out = d.cli(&[
        "image",
        "import",
        tarball.to_str().unwrap(),
        "--name",
        "big",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("limits.max_upload"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));
}

/// `image import ./x.tar` streams a local file to the daemon.
#[test]
fn import_uploads_a_local_archive() {
    if !prerequisites() {
        return;
    }
    let _s = serial();
    let d = daemon(&[]);
    let t = tempfile::TempDir::new().unwrap();
    let mut lay = Layout::new(t.path().join("oci"));
    let img = lay.image(
        &[(tar_of(&[("up", Some(b"uploaded\n"))]), Comp::Zstd)],
        host_arch(),
        &["/bin/sh"],
    );
    lay.tag(&img, "v1");
    // The daemon runs in another directory: a relative path only works as an upload.
    let tarball = t.path().join("img.tar");
    std::fs::write(&tarball, tar_dir(&lay.dir)).unwrap();
    let out = d
        .command_as(
            &d.key,
            [
                "-o", "json", "image", "import", "img.tar", "--name", "uploaded",
            ],
        )
        .current_dir(t.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["digest"], img.manifest.as_str());
    assert!(layer_dir(&d, &img.layers[0].1).join("up").is_file());
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));
    // Tenants may not upload.
    let tk = tenant(&d, "t");
    let out = d.cli_as(
        &tk,
        &["image", "import", tarball.to_str().unwrap(), "--name", "t"],
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- a proxy that cuts or holds a blob download ------------------------------------------------

#[derive(Default)]
struct ProxyState {
    /// Digest whose downloads are watched.
    watch: Mutex<String>,
    /// Cut the connection after this many body bytes of the watched blob (once).
    cut_after: AtomicU64,
    /// Hold (stop forwarding) after this many bytes of the watched blob, until released.
    hold_after: AtomicU64,
    released: AtomicBool,
    /// GET requests for the watched blob, and their Range headers.
    gets: AtomicUsize,
    ranges: Mutex<Vec<String>>,
}

struct Proxy {
    port: u16,
    state: Arc<ProxyState>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let state = Arc::new(ProxyState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let st = st.clone();
                std::thread::spawn(move || proxy_conn(c, upstream, st));
            }
        });
        Proxy { port, state }
    }

    fn watch(&self, digest: &str) {
        *self.state.watch.lock().unwrap() = digest.to_string();
        self.state.gets.store(0, Ordering::SeqCst);
        self.state.ranges.lock().unwrap().clear();
    }
}

fn proxy_conn(client: TcpStream, upstream: u16, st: Arc<ProxyState>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let watching = Arc::new(AtomicBool::new(false));
    let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (st2, w2) = (st.clone(), watching.clone());
    // Client → server: look at request heads.
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            let n = match c_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let watch = st2.watch.lock().unwrap().clone();
            if !watch.is_empty()
                && text.starts_with("GET ")
                && text.lines().next().unwrap_or("").contains(&watch)
            {
                st2.gets.fetch_add(1, Ordering::SeqCst);
                w2.store(true, Ordering::SeqCst);
                if let Some(r) = text
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("range:"))
                {
                    st2.ranges.lock().unwrap().push(r.to_string());
                }
            } else if text.starts_with("GET ") || text.starts_with("HEAD ") {
                w2.store(false, Ordering::SeqCst);
            }
            if s_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_out.shutdown(std::net::Shutdown::Write);
    });
    // Server → client: count the watched blob's bytes; cut or hold.
    let (mut s_in, mut c_out) = (server, client);
    let mut sent = 0u64;
    let mut buf = [0u8; 16384];
    loop {
        let n = match s_in.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if watching.load(Ordering::SeqCst) {
            sent += n as u64;
            let cut = st.cut_after.load(Ordering::SeqCst);
            if cut > 0 && sent > cut {
                st.cut_after.store(0, Ordering::SeqCst);
                let _ = c_out.write_all(&buf[..n / 2]);
                let _ = c_out.shutdown(std::net::Shutdown::Both);
                let _ = s_in.shutdown(std::net::Shutdown::Both);
                return;
            }
            let hold = st.hold_after.load(Ordering::SeqCst);
            if hold > 0 && sent > hold {
                while !st.released.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                st.hold_after.store(0, Ordering::SeqCst);
            }
        }
        if c_out.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = c_out.shutdown(std::net::Shutdown::Both);
}

/// A connection cut mid-layer (the registry "dies"): a clear error, the partial download kept,
/// and the retry resumes it with a Range request. A daemon killed mid-pull resumes the job at
/// start. Two pulls of one layer at once download it once.
#[test]
fn interrupted_pulls_resume() {
    if !prerequisites() {
        return;
    }
    let _s = serial();
    let reg = Registry::start(false, None);
    let proxy = Proxy::start(reg.port);
    let host = format!("127.0.0.1:{}", proxy.port);
    let mut d = daemon(&["--insecure-registry", &host]);
    let layouts = tempfile::TempDir::new().unwrap();
    let mut lay = Layout::new(layouts.path().join("oci"));
    let big = |seed: u64| tar_of(&[("big.bin", Some(&noise(24 << 20, seed)))]);

    // 1. The connection is cut after 6 MiB of a 24 MiB layer.
    let one = lay.image(&[(big(1), Comp::Plain)], host_arch(), &["/bin/sh"]);
    lay.tag(&one, "one");
    reg.push(&lay.dir, "one", "big/one", &[]);
    proxy.watch(&one.layers[0].0);
    proxy.state.cut_after.store(6 << 20, Ordering::SeqCst);
    let reference = format!("{host}/big/one:one");
    let (ok, _, err) = pull(&d, &d.key, &[&reference]);
    assert!(!ok);
    assert!(
        err.contains("lost the connection") || err.contains("ended early"),
        "{err}"
    );
    let partial = partial_of(&d, &one.layers[0].0).expect("the partial download was not kept");
    let kept = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    assert!(kept > 0, "the partial download was not kept");
    // The kept bytes are damaged (a disk error, an older daemon): the resumed download does
    // not verify, and the pull starts that blob again from byte 0 instead of failing.
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&partial)
            .unwrap();
        f.write_all(&[0xa5; 4096]).unwrap();
    }
    let gets_before = proxy.state.gets.load(Ordering::SeqCst);
    let (v, _) = pull_ok(&d, &d.key, &[&reference]);
    assert_eq!(
        proxy.state.gets.load(Ordering::SeqCst),
        gets_before + 2,
        "expected a resumed GET, then one from the start"
    );
    assert_eq!(
        v["digest"],
        reg.digest(&format!("{}/big/one:one", reg.host())).as_str()
    );
    let ranges = proxy.state.ranges.lock().unwrap().clone();
    assert!(
        ranges.iter().any(|r| r.contains(&format!("bytes={kept}-"))),
        "the retry did not resume from {kept}: {ranges:?}"
    );
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));

    // 2. The daemon is killed while a layer downloads; at start it resumes the job.
    let two = lay.image(&[(big(2), Comp::Plain)], host_arch(), &["/bin/sh"]);
    lay.tag(&two, "two");
    reg.push(&lay.dir, "two", "big/two", &[]);
    proxy.watch(&two.layers[0].0);
    proxy.state.released.store(false, Ordering::SeqCst);
    proxy.state.hold_after.store(4 << 20, Ordering::SeqCst);
    let body = json!({"reference": format!("{host}/big/two:two")}).to_string();
    let (st, job) = api(&d, &d.key, "POST", "/v1/images/pulls", &body);
    assert_eq!(st, 200, "{job}");
    wait_for("a partial download", || {
        partial_of(&d, &two.layers[0].0)
            .and_then(|p| std::fs::metadata(p).ok())
            .is_some_and(|m| m.len() >= 2 << 20)
    });
    d.kill9();
    proxy.state.released.store(true, Ordering::SeqCst);
    d.restart();
    let id = job["id"].as_str().unwrap().to_string();
    wait_for("the resumed pull", || {
        let (_, j) = api(&d, &d.key, "GET", &format!("/v1/images/pulls/{id}"), "");
        assert_ne!(j["state"], "failed", "{j}\n{}", d.log());
        j["state"] == "done"
    });
    let ranges = proxy.state.ranges.lock().unwrap().clone();
    assert!(
        ranges.iter().any(|r| !r.contains("bytes=0-")),
        "not resumed: {ranges:?}"
    );
    assert!(d.json(&["image", "list"]).to_string().contains("big/two"));

    // 3. Two pulls of one layer at once: one download; the second waits for it.
    let three = lay.image(&[(big(3), Comp::Gzip)], host_arch(), &["/bin/sh"]);
    lay.tag(&three, "three");
    reg.push(&lay.dir, "three", "big/three", &[]);
    proxy.watch(&three.layers[0].0);
    proxy.state.released.store(false, Ordering::SeqCst);
    proxy.state.hold_after.store(1 << 20, Ordering::SeqCst);
    let r3 = format!("{host}/big/three:three");
    let (_, a) = api(
        &d,
        &d.key,
        "POST",
        "/v1/images/pulls",
        &json!({"reference": r3, "name": "copy-a"}).to_string(),
    );
    let (_, b) = api(
        &d,
        &d.key,
        "POST",
        "/v1/images/pulls",
        &json!({"reference": r3, "name": "copy-b"}).to_string(),
    );
    let (ia, ib) = (
        a["id"].as_str().unwrap().to_string(),
        b["id"].as_str().unwrap().to_string(),
    );
    wait_for("both pulls to reach the layer", || {
        let (_, jb) = api(&d, &d.key, "GET", &format!("/v1/images/pulls/{ib}"), "");
        !jb["layers"]
            .as_array()
            .map(|l| l.is_empty())
            .unwrap_or(true)
            && proxy.state.gets.load(Ordering::SeqCst) >= 1
    });
    proxy.state.released.store(true, Ordering::SeqCst);
    for id in [&ia, &ib] {
        wait_for("the concurrent pulls", || {
            let (_, j) = api(&d, &d.key, "GET", &format!("/v1/images/pulls/{id}"), "");
            assert_ne!(j["state"], "failed", "{j}");
            j["state"] == "done"
        });
    }
    assert_eq!(
        proxy.state.gets.load(Ordering::SeqCst),
        1,
        "the layer was downloaded twice"
    );
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));
}

/// Pulls are bounded: a small gzip layer that unpacks past `registry.max_image_size` (a
/// decompression bomb) is refused with nothing left behind, and a tenant runs at most
/// `registry.tenant_max_pulls` pulls at a time.
#[test]
fn pulls_are_bounded() {
    if !prerequisites() {
        return;
    }
    let _s = serial();
    let reg = Registry::start(false, None);
    let proxy = Proxy::start(reg.port);
    let host = format!("127.0.0.1:{}", proxy.port);
    let d = daemon(&[
        "--insecure-registry",
        &host,
        "--max-image-size",
        "6MiB",
        "--tenant-max-pulls",
        "1",
    ]);
    let layouts = tempfile::TempDir::new().unwrap();
    let mut lay = Layout::new(layouts.path().join("oci"));

    // 16 MiB of zeros, a few KiB compressed.
    let zeros = vec![0u8; 16 << 20];
    let bomb = lay.image(
        &[(tar_of(&[("zeros", Some(&zeros))]), Comp::Gzip)],
        host_arch(),
        &["/bin/sh"],
    );
    lay.tag(&bomb, "bomb");
    reg.push(&lay.dir, "bomb", "t/bomb", &[]);
    let (ok, _, err) = pull(&d, &d.key, &[&format!("{host}/t/bomb:bomb")]);
    assert!(!ok, "a layer unpacking past max_image_size was accepted");
    assert!(err.contains("max_image_size"), "{err}");
    assert!(!layer_dir(&d, &bomb.layers[0].1).exists());
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));

    // One pull of tenant t held mid-layer; its second pull is refused, an admin's is not
    // counted against t.
    let t = tenant(&d, "t");
    let held = lay.image(
        &[(tar_of(&[("n", Some(&noise(4 << 20, 7)))]), Comp::Plain)],
        host_arch(),
        &["/bin/sh"],
    );
    lay.tag(&held, "held");
    reg.push(&lay.dir, "held", "t/held", &[]);
    proxy.watch(&held.layers[0].0);
    proxy.state.released.store(false, Ordering::SeqCst);
    proxy.state.hold_after.store(1 << 20, Ordering::SeqCst);
    let body = json!({"reference": format!("{host}/t/held:held")}).to_string();
    let (st, job) = api(&d, &t, "POST", "/v1/images/pulls", &body);
    assert_eq!(st, 200, "{job}");
    wait_for("the held download", || {
        proxy.state.gets.load(Ordering::SeqCst) >= 1
    });
    let other = json!({"reference": format!("{host}/t/bomb:bomb"), "name": "second"}).to_string();
    let (st, refused) = api(&d, &t, "POST", "/v1/images/pulls", &other);
    assert_eq!(
        refused["error"]["code"], "resource_exhausted",
        "{st} {refused}"
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("tenant_max_pulls"),
        "{refused}"
    );
    proxy.state.released.store(true, Ordering::SeqCst);
    let id = job["id"].as_str().unwrap().to_string();
    wait_for("the held pull", || {
        let (_, j) = api(&d, &t, "GET", &format!("/v1/images/pulls/{id}"), "");
        assert_ne!(j["state"], "failed", "{j}");
        j["state"] == "done"
    });
}

// ---- a hostile registry ------------------------------------------------------------------------

/// A registry that serves the given paths (GET), answers 200 to every HEAD, and 404 to other
/// GETs; counts the GETs of each path.
struct Hostile {
    port: u16,
    gets: Arc<Mutex<Vec<String>>>,
}

impl Hostile {
    fn start(files: Vec<(String, &'static str, Vec<u8>)>) -> Hostile {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let gets = Arc::new(Mutex::new(Vec::new()));
        let g = gets.clone();
        let files = Arc::new(files);
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let (g, files) = (g.clone(), files.clone());
                std::thread::spawn(move || {
                    let mut r = std::io::BufReader::new(c.try_clone().unwrap());
                    let mut line = String::new();
                    use std::io::BufRead;
                    if r.read_line(&mut line).is_err() {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or("").to_string();
                    let path = parts.next().unwrap_or("").to_string();
                    let found = files.iter().find(|f| f.0 == path);
                    let (status, ctype, body): (&str, &str, &[u8]) = match (&*method, found) {
                        ("GET", Some(f)) => ("200 OK", f.1, &f.2),
                        ("HEAD", _) => ("200 OK", "application/octet-stream", b""),
                        _ => ("404 Not Found", "application/json", b"{\"errors\":[]}"),
                    };
                    if method == "GET" {
                        g.lock().unwrap().push(path.clone());
                    }
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        if method == "HEAD" { 1 << 20 } else { body.len() }
                    );
                    let _ = c.write_all(head.as_bytes());
                    if method == "GET" {
                        let _ = c.write_all(body);
                    }
                });
            }
        });
        Hostile { port, gets }
    }
}

/// A layer another tenant pulled privately is not given to a tenant whose registry merely
/// names its digest (and answers 200 to a HEAD): the blob must be downloaded from that
/// registry and verified. The tenant that owns the layer reuses it without a download.
#[test]
fn private_layers_are_not_shared_by_digest() {
    if !prerequisites() {
        return;
    }
    let _s = serial();
    let reg = Registry::start(false, None);
    let host = reg.host();
    let layouts = tempfile::TempDir::new().unwrap();
    let mut lay = Layout::new(layouts.path().join("oci"));
    let img = lay.image(
        &[(
            tar_of(&[("secret", Some(b"alice's private data\n"))]),
            Comp::Gzip,
        )],
        host_arch(),
        &["/bin/sh"],
    );
    lay.tag(&img, "v1");
    reg.push(&lay.dir, "v1", "alice/private", &[]);
    let (blob, diff) = img.layers[0].clone();
    let blob_size = std::fs::metadata(lay.dir.join("blobs/sha256").join(hex(&blob)))
        .unwrap()
        .len();

    // The hostile registry's image: a config naming alice's diff id, a manifest naming her
    // layer blob, which it does not have.
    let config = serde_json::to_vec(&json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff]},
    }))
    .unwrap();
    let cd = sha(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob, "size": blob_size}],
    }))
    .unwrap();
    let evil = Hostile::start(vec![
        (
            "/v2/x/manifests/1".into(),
            "application/vnd.oci.image.manifest.v1+json",
            manifest,
        ),
        (
            format!("/v2/x/blobs/{cd}"),
            "application/octet-stream",
            config,
        ),
    ]);
    let evil_host = format!("127.0.0.1:{}", evil.port);
    let d = daemon(&[
        "--insecure-registry",
        &host,
        "--insecure-registry",
        &evil_host,
    ]);
    let alice = tenant(&d, "alice");
    let bob = tenant(&d, "bob");
    pull_ok(&d, &alice, &[&format!("{host}/alice/private:v1")]);
    assert!(layer_dir(&d, &diff).is_dir());

    let evil_ref = format!("{evil_host}/x:1");
    let (ok, _, err) = pull(&d, &bob, &[&evil_ref]);
    assert!(
        !ok,
        "bob obtained alice's private layer through a registry that lacks it"
    );
    assert!(err.contains("not found"), "{err}");
    assert!(
        evil.gets
            .lock()
            .unwrap()
            .iter()
            .any(|p| p == &format!("/v2/x/blobs/{blob}")),
        "the layer was not asked of bob's registry: {:?}",
        evil.gets.lock().unwrap()
    );
    let list = d.cli_as(&bob, &["-o", "json", "image", "list"]);
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&evil_ref),
        "bob has the image"
    );

    // Alice holds the layer: her pull of the same manifest uses it without a download.
    let before = evil.gets.lock().unwrap().len();
    pull_ok(&d, &alice, &[&evil_ref]);
    let after: Vec<String> = evil.gets.lock().unwrap()[before..].to_vec();
    assert!(
        !after.iter().any(|p| p.contains(&hex(&blob).to_string())),
        "{after:?}"
    );
}

/// A tenant with a running pull is not deleted by a plain `tenant rm`; `--cascade` stops the
/// pull, and no image of the deleted tenant is recorded when its download would have ended.
#[test]
fn pulls_end_with_their_tenant() {
    if !prerequisites() {
        return;
    }
    let _s = serial();
    let reg = Registry::start(false, None);
    let proxy = Proxy::start(reg.port);
    let host = format!("127.0.0.1:{}", proxy.port);
    let d = daemon(&["--insecure-registry", &host]);
    let layouts = tempfile::TempDir::new().unwrap();
    let mut lay = Layout::new(layouts.path().join("oci"));
    let held = lay.image(
        &[(tar_of(&[("n", Some(&noise(4 << 20, 11)))]), Comp::Plain)],
        host_arch(),
        &["/bin/sh"],
    );
    lay.tag(&held, "held");
    reg.push(&lay.dir, "held", "gone/held", &[]);
    let t = tenant(&d, "leaver");
    proxy.watch(&held.layers[0].0);
    proxy.state.released.store(false, Ordering::SeqCst);
    proxy.state.hold_after.store(1 << 20, Ordering::SeqCst);
    let body = json!({"reference": format!("{host}/gone/held:held")}).to_string();
    let (st, job) = api(&d, &t, "POST", "/v1/images/pulls", &body);
    assert_eq!(st, 200, "{job}");
    wait_for("the held download", || {
        proxy.state.gets.load(Ordering::SeqCst) >= 1
    });
    let out = d.cli(&["tenant", "rm", "leaver"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("running pull"),
        "a tenant with a running pull was deleted: {err}"
    );
    let out = d.cli(&["tenant", "rm", "--cascade", "--wait", "leaver"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    proxy.state.released.store(true, Ordering::SeqCst);
    // The cancelled pull's job says so; nothing is recorded for the deleted tenant.
    let id = job["id"].as_str().unwrap().to_string();
    let mut last = Value::Null;
    wait_for("the pull to end", || {
        last = api(&d, &d.key, "GET", &format!("/v1/images/pulls/{id}"), "").1;
        last["state"] != "running"
    });
    assert_eq!(last["state"], "failed", "{last}");
    let images = d.json(&["image", "list"]);
    assert!(
        !images.to_string().contains("gone/held"),
        "an image of the deleted tenant: {images}"
    );
}

/// gc does not take layers from a running pull: while a pull that reuses image A's layer is
/// held mid-download, `image rm A` (which runs gc) keeps that layer, and the pull completes.
#[test]
fn gc_keeps_the_layers_of_running_pulls() {
    if !prerequisites() {
        return;
    }
    let _s = serial();
    let reg = Registry::start(false, None);
    let proxy = Proxy::start(reg.port);
    let host = format!("127.0.0.1:{}", proxy.port);
    let d = daemon(&["--insecure-registry", &host]);
    let layouts = tempfile::TempDir::new().unwrap();
    let mut lay = Layout::new(layouts.path().join("oci"));
    let shared = tar_of(&[("shared", Some(b"in both images\n"))]);
    let a = lay.image(&[(shared.clone(), Comp::Gzip)], host_arch(), &["/bin/sh"]);
    lay.tag(&a, "a");
    reg.push(&lay.dir, "a", "gc/a", &[]);
    let b = lay.image(
        &[
            (shared, Comp::Gzip),
            (tar_of(&[("n", Some(&noise(4 << 20, 13)))]), Comp::Plain),
        ],
        host_arch(),
        &["/bin/sh"],
    );
    lay.tag(&b, "b");
    reg.push(&lay.dir, "b", "gc/b", &[]);
    let ref_a = format!("{host}/gc/a:a");
    pull_ok(&d, &d.key, &[&ref_a]);
    let shared_layer = layer_dir(&d, &a.layers[0].1);
    assert!(shared_layer.is_dir());

    proxy.watch(&b.layers[1].0);
    proxy.state.released.store(false, Ordering::SeqCst);
    proxy.state.hold_after.store(1 << 20, Ordering::SeqCst);
    let body = json!({"reference": format!("{host}/gc/b:b")}).to_string();
    let (st, job) = api(&d, &d.key, "POST", "/v1/images/pulls", &body);
    assert_eq!(st, 200, "{job}");
    wait_for("the held download", || {
        proxy.state.gets.load(Ordering::SeqCst) >= 1
    });
    let out = d.cli(&["image", "rm", &ref_a]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        shared_layer.is_dir(),
        "gc removed a layer the running pull uses"
    );
    proxy.state.released.store(true, Ordering::SeqCst);
    let id = job["id"].as_str().unwrap().to_string();
    let mut last = Value::Null;
    wait_for("the pull to end", || {
        last = api(&d, &d.key, "GET", &format!("/v1/images/pulls/{id}"), "").1;
        last["state"] != "running"
    });
    assert_eq!(last["state"], "done", "{last}");
    assert!(shared_layer.is_dir());
}

/// A pull that outlasts `registry.pull_timeout` fails with a clear error and keeps its
/// partial download for a retry.
#[test]
fn a_pull_has_a_deadline() {
    if !prerequisites() {
        return;
    }
    let _s = serial();
    let reg = Registry::start(false, None);
    let proxy = Proxy::start(reg.port);
    let host = format!("127.0.0.1:{}", proxy.port);
    let d = daemon(&["--insecure-registry", &host, "--pull-timeout", "3s"]);
    let layouts = tempfile::TempDir::new().unwrap();
    let mut lay = Layout::new(layouts.path().join("oci"));
    let slow = lay.image(
        &[(tar_of(&[("n", Some(&noise(4 << 20, 17)))]), Comp::Plain)],
        host_arch(),
        &["/bin/sh"],
    );
    lay.tag(&slow, "slow");
    reg.push(&lay.dir, "slow", "d/slow", &[]);
    proxy.watch(&slow.layers[0].0);
    proxy.state.released.store(false, Ordering::SeqCst);
    proxy.state.hold_after.store(1 << 20, Ordering::SeqCst);
    let (ok, _, err) = pull(&d, &d.key, &[&format!("{host}/d/slow:slow")]);
    proxy.state.released.store(true, Ordering::SeqCst);
    assert!(!ok, "a held pull did not end");
    assert!(err.contains("registry.pull_timeout"), "{err}");
    assert!(
        partial_of(&d, &slow.layers[0].0).is_some(),
        "the partial was not kept"
    );
}

/// Descriptor `urls` (foreign layers) are never fetched: a manifest pointing a layer at an
/// internal address gets the layer from its registry or fails.
#[test]
fn foreign_layer_urls_are_not_fetched() {
    if !prerequisites() {
        return;
    }
    let _s = serial();
    let inner = Hostile::start(vec![(
        "/x".into(),
        "application/octet-stream",
        b"internal".to_vec(),
    )]);
    let blob = sha(b"internal");
    let config = serde_json::to_vec(&json!({
        "architecture": host_arch(),
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [blob]},
    }))
    .unwrap();
    let cd = sha(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{
            "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "digest": blob,
            "size": 8,
            "urls": [format!("http://127.0.0.1:{}/x", inner.port)],
        }],
    }))
    .unwrap();
    let evil = Hostile::start(vec![
        (
            "/v2/f/manifests/1".into(),
            "application/vnd.oci.image.manifest.v1+json",
            manifest,
        ),
        (
            format!("/v2/f/blobs/{cd}"),
            "application/octet-stream",
            config,
        ),
    ]);
    let evil_host = format!("127.0.0.1:{}", evil.port);
    let d = daemon(&["--insecure-registry", &evil_host]);
    let (ok, _, err) = pull(&d, &d.key, &[&format!("{evil_host}/f:1")]);
    assert!(!ok && err.contains("not found"), "{err}");
    assert!(
        inner.gets.lock().unwrap().is_empty(),
        "a descriptor url was fetched"
    );
}
