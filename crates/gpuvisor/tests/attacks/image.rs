//! Attacks: a hostile image. Images legitimately contain absolute symlinks (`etc -> /etc`,
//! `resolv.conf -> /run/...`); the daemon, which runs as root on the host, must resolve every
//! path it writes or reads in an instance's rootfs *inside* that rootfs, never through such a
//! link to the host. Each test builds an image whose links point at host canary files (under
//! /var/tmp) or at the host's real /etc, starts an instance, and checks that the host files are
//! untouched (content, inode, mtime) and that the instance either works or fails with an error
//! that names the problem.

use crate::common::{busybox_rootfs, serial, Daemon};
use crate::probe;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Host files an attack must leave alone: their content, inode and mtime, taken at creation.
struct Canary {
    dir: PathBuf,
    files: Vec<(PathBuf, Snapshot)>,
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    content: Option<Vec<u8>>,
    ino: u64,
    mtime: (i64, i64),
}

fn snapshot(p: &Path) -> Snapshot {
    let m = std::fs::symlink_metadata(p).ok();
    Snapshot {
        content: std::fs::read(p).ok(),
        ino: m.as_ref().map_or(0, |m| m.ino()),
        mtime: m.as_ref().map_or((0, 0), |m| (m.mtime(), m.mtime_nsec())),
    }
}

impl Canary {
    /// A fresh host directory holding `files` (name, content).
    fn new(tag: &str, files: &[(&str, &str)]) -> Canary {
        let dir = PathBuf::from(format!("/var/tmp/gv-canary-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Canary {
            dir: dir.clone(),
            files: Vec::new(),
        };
        for (name, text) in files {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            c.files.push((p.clone(), snapshot(&p)));
        }
        c
    }

    /// Also watch these existing host files (the real /etc), without owning them.
    fn watch(&mut self, paths: &[&str]) {
        for p in paths {
            let p = PathBuf::from(p);
            self.files.push((p.clone(), snapshot(&p)));
        }
    }

    fn assert_untouched(&self) {
        for (p, before) in &self.files {
            assert_eq!(
                &snapshot(p),
                before,
                "host file {} was changed through the image",
                p.display()
            );
        }
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut expected: Vec<String> = self
            .files
            .iter()
            .filter(|(p, _)| p.starts_with(&self.dir))
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        expected.sort();
        assert_eq!(names, expected, "files appeared in the host canary dir");
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A copy of the busybox rootfs to modify (removed on drop).
struct Rootfs(PathBuf);

impl Rootfs {
    fn new(tag: &str) -> Rootfs {
        let dir = std::env::temp_dir().join(format!("gv-evil-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let st = Command::new("cp")
            .arg("-a")
            .arg(busybox_rootfs())
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success());
        Rootfs(dir)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    /// Replaces `rel` (file or directory) with a symlink to `target`.
    fn link(&self, rel: &str, target: &str) {
        let p = self.path(rel);
        if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            let _ = std::fs::remove_file(&p);
        }
        symlink(target, &p).unwrap();
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sha256_file(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// Writes an OCI image layout at `out`: one uncompressed layer (the tar of `rootfs`) and `cfg`
/// as the image config's `config` (User, WorkingDir, ...).
fn oci_layout(rootfs: &Path, mut cfg: serde_json::Value, out: &Path) {
    cfg["Cmd"] = serde_json::json!(["sleep", "1000000"]);
    let blobs = out.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let layer = out.join("layer.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .args(["--numeric-owner", "-cf"])
        .arg(&layer)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let put = |bytes: &[u8]| -> (String, usize) {
        let tmp = out.join("blob.tmp");
        std::fs::write(&tmp, bytes).unwrap();
        let h = sha256_file(&tmp);
        std::fs::rename(&tmp, blobs.join(&h)).unwrap();
        (format!("sha256:{h}"), bytes.len())
    };
    let layer_hex = sha256_file(&layer);
    let layer_size = std::fs::metadata(&layer).unwrap().len();
    std::fs::rename(&layer, blobs.join(&layer_hex)).unwrap();
    let layer_digest = format!("sha256:{layer_hex}");
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
        }],
    });
    std::fs::write(out.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn import(d: &Daemon, src: &Path, name: &str) {
    d.json(&["image", "import", src.to_str().unwrap(), "--name", name]);
}

/// `instance create --wait` of `image`: Ok(id) when it runs, Err(message) when the create or
/// the instance failed (the message is what the user sees: the CLI's error or the instance's
/// last error).
fn try_create(d: &Daemon, image: &str) -> Result<String, String> {
    let mut args = vec!["-o", "json"];
    args.extend(crate::common::sleeper_create(image, &[]));
    let out = d.cli(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(stderr);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if v["state"] == "running" {
        Ok(v["id"].as_str().unwrap().to_string())
    } else {
        Err(format!("{v}"))
    }
}

const ETC_FILES: &[(&str, &str)] = &[
    ("hostname", "canary-hostname\n"),
    ("hosts", "10.9.9.9 canary-hosts\n"),
    ("resolv.conf", "nameserver 10.9.9.9\n"),
    ("passwd", "root:x:0:0:canary:/root:/bin/sh\n"),
    ("group", "root:x:0:\n"),
];

#[test]
fn etc_symlink_to_host_dir_is_not_written_through() {
    let _s = serial();
    let canary = Canary::new("etcdir", ETC_FILES);
    let r = Rootfs::new("etcdir");
    r.link("etc", canary.dir.to_str().unwrap());
    let d = Daemon::start(&[]);
    import(&d, &r.0, "evil-etcdir");
    let created = try_create(&d, "evil-etcdir");
    canary.assert_untouched();
    match created {
        Ok(id) => {
            // Working is fine as long as the files went into the instance's own tree.
            probe::allowed(&d, &id, "hosts inside", "grep -q localhost /etc/hosts");
        }
        Err(msg) => {
            eprintln!("refused as: {msg}");
            assert!(msg.contains("/etc"), "unclear error: {msg}");
        }
    }
}

#[test]
fn etc_symlink_to_host_etc_is_not_written_through() {
    let _s = serial();
    let mut canary = Canary::new("realetc", &[]);
    canary.watch(&[
        "/etc/hostname",
        "/etc/hosts",
        "/etc/resolv.conf",
        "/etc/passwd",
        "/etc/group",
    ]);
    let r = Rootfs::new("realetc");
    r.link("etc", "/etc");
    let d = Daemon::start(&[]);
    import(&d, &r.0, "evil-realetc");
    let created = try_create(&d, "evil-realetc");
    canary.assert_untouched();
    match created {
        Ok(id) => {
            probe::allowed(&d, &id, "hosts inside", "grep -q localhost /etc/hosts");
        }
        Err(msg) => {
            eprintln!("refused as: {msg}");
            assert!(msg.contains("/etc"), "unclear error: {msg}");
        }
    }
}

#[test]
fn etc_files_symlinked_to_host_files_are_not_written_through() {
    let _s = serial();
    let canary = Canary::new("etcfiles", ETC_FILES);
    let r = Rootfs::new("etcfiles");
    for name in ["hostname", "hosts", "resolv.conf"] {
        r.link(
            &format!("etc/{name}"),
            canary.dir.join(name).to_str().unwrap(),
        );
    }
    let d = Daemon::start(&[]);
    import(&d, &r.0, "evil-etcfiles");
    let id = try_create(&d, "evil-etcfiles").expect("the instance must work");
    // The daemon's files replaced the links inside the instance.
    let p = probe::allowed(
        &d,
        &id,
        "etc files are the instance's own",
        "cat /etc/hostname /etc/hosts; test ! -L /etc/hosts",
    );
    assert!(p.out.contains("localhost"), "{}", p.out);
    assert!(!p.out.contains("canary"), "{}", p.out);
    canary.assert_untouched();
}

#[test]
fn etc_passwd_symlink_to_host_file_is_not_read() {
    let _s = serial();
    let canary = Canary::new(
        "passwd",
        &[
            ("passwd", "gvcanary:x:4242:4242:canary:/:/bin/sh\n"),
            ("group", "gvcanarygrp:x:4343:\n"),
        ],
    );
    let r = Rootfs::new("passwd");
    r.link("etc/passwd", canary.dir.join("passwd").to_str().unwrap());
    r.link("etc/group", canary.dir.join("group").to_str().unwrap());
    let oci = tempfile::Builder::new()
        .prefix("gv-evil-oci")
        .tempdir()
        .unwrap();
    oci_layout(
        &r.0,
        serde_json::json!({"User": "gvcanary:gvcanarygrp"}),
        oci.path(),
    );
    let d = Daemon::start(&[]);
    import(&d, oci.path(), "evil-passwd");
    match try_create(&d, "evil-passwd") {
        Ok(id) => {
            let p = probe::run(&d, &id, "id -u; id -g");
            panic!(
                "the image's user resolved from a host file: instance runs as {}",
                p.out.replace('\n', " ")
            );
        }
        Err(msg) => {
            eprintln!("refused as: {msg}");
            assert!(
                msg.contains("gvcanary") && msg.contains("/etc/passwd"),
                "unclear error: {msg}"
            );
        }
    }
    canary.assert_untouched();
}

/// Control for the test above: absolute links that resolve *inside* the image still work, as
/// they do in the container.
#[test]
fn etc_passwd_absolute_symlink_inside_the_image_resolves_in_the_image() {
    let _s = serial();
    let r = Rootfs::new("passwd-in");
    std::fs::create_dir_all(r.path("usr/lib")).unwrap();
    std::fs::write(
        r.path("usr/lib/gvpasswd"),
        "root:x:0:0:root:/root:/bin/sh\ngvuser:x:3000:3000::/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(r.path("usr/lib/gvgroup"), "root:x:0:\ngvgroup:x:3100:\n").unwrap();
    r.link("etc/passwd", "/usr/lib/gvpasswd");
    r.link("etc/group", "/usr/lib/gvgroup");
    let oci = tempfile::Builder::new()
        .prefix("gv-evil-oci")
        .tempdir()
        .unwrap();
    oci_layout(
        &r.0,
        serde_json::json!({"User": "gvuser:gvgroup"}),
        oci.path(),
    );
    let d = Daemon::start(&[]);
    import(&d, oci.path(), "passwd-in");
    let id = try_create(&d, "passwd-in").expect("the instance must work");
    let p = probe::allowed(&d, &id, "user from the image", "id -u; id -g");
    assert_eq!(
        p.out.split_whitespace().collect::<Vec<_>>(),
        ["3000", "3100"]
    );
}

/// The image's WorkingDir goes through an absolute symlink to a host directory: it is created
/// (by runc, inside the container's root) in the instance, never on the host.
#[test]
fn workdir_symlink_to_host_dir_is_not_created_through() {
    let _s = serial();
    let canary = Canary::new("workdir", &[("keep", "x\n")]);
    let r = Rootfs::new("workdir");
    r.link("work", canary.dir.to_str().unwrap());
    let oci = tempfile::Builder::new()
        .prefix("gv-evil-oci")
        .tempdir()
        .unwrap();
    oci_layout(
        &r.0,
        serde_json::json!({"WorkingDir": "/work/made-by-workdir"}),
        oci.path(),
    );
    let d = Daemon::start(&[]);
    import(&d, oci.path(), "evil-workdir");
    let created = try_create(&d, "evil-workdir");
    canary.assert_untouched();
    match created {
        Ok(id) => {
            let p = probe::allowed(&d, &id, "working dir inside", "pwd");
            assert!(p.out.contains("made-by-workdir"), "{}", p.out);
        }
        Err(msg) => {
            eprintln!("refused as: {msg}");
            assert!(msg.contains("work"), "unclear error: {msg}");
        }
    }
}
