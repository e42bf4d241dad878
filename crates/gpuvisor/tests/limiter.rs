//! Fractional GPUs end to end: the daemon injects the real `libgpuvisor_limiter.so` into an
//! instance through a read-only `/etc/ld.so.preload`, and a CUDA program inside the instance
//! (over the fake `libcuda.so.1`, since CI has no GPU) sees exactly its VRAM quota.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{serial, Daemon};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the limiter and the fake driver (into their own target dir: `cargo test` does not
/// refresh cdylibs) and returns (limiter, fake libcuda).
fn build_libs() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("target/limiter-tests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--offline",
            "-p",
            "gpuvisor-fakecuda",
            "-p",
            "gpuvisor-limiter",
            "--lib",
        ])
        .env("CARGO_TARGET_DIR", &dir)
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "building the limiter and the fake libcuda failed"
    );
    (
        dir.join("debug/libgpuvisor_limiter.so"),
        dir.join("debug/libcuda.so"),
    )
}

/// Copies a host file into the rootfs at the same path.
fn copy_in(rootfs: &Path, host: &Path) {
    let dest = rootfs.join(host.strip_prefix("/").unwrap());
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(host, &dest).unwrap();
}

/// The shared libraries `ldd` names for `bin`.
fn ldd(bin: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(bin).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .filter(|p| !p.to_string_lossy().contains("libcuda"))
        .collect()
}

/// busybox + glibc + the fake driver + the limiter's C test program.
fn cuda_rootfs(fake: &Path, limiter: &Path) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("gv-cuda-rootfs")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root = dir.path().join("rootfs");
    let st = Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-busybox-rootfs"),
    )
    .arg(&root)
    .stdout(std::process::Stdio::null())
    .status()
    .unwrap();
    assert!(st.success());
    let libdir = root.join("usr/lib/x86_64-linux-gnu");
    std::fs::create_dir_all(&libdir).unwrap();
    for name in ["libcuda.so.1", "libcuda.so", "libnvidia-ml.so.1"] {
        std::fs::copy(fake, libdir.join(name)).unwrap();
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../limiter/tests/c/limtest.c");
    let bin = root.join("bin/limtest");
    let out = Command::new("cc")
        .args(["-O1", "-o"])
        .arg(&bin)
        .arg(&src)
        .arg(format!("-L{}", libdir.display()))
        .args(["-lcuda", "-ldl"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc limtest.c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for lib in ldd(&bin).into_iter().chain(ldd(limiter)) {
        copy_in(&root, &lib);
    }
    dir
}

#[test]
fn fractional_gpu_instance_sees_its_quota_through_the_injected_limiter() {
    let _s = serial();
    let (limiter, fake) = build_libs();
    let rootfs = cuda_rootfs(&fake, &limiter);
    let d = Daemon::start(&["--limiter-lib", limiter.to_str().unwrap()]);
    d.json(&[
        "image",
        "import",
        rootfs.path().join("rootfs").to_str().unwrap(),
        "--name",
        "busybox",
    ]);
    let quota: u64 = 64 << 20;
    let id = d.create(&[
        "--gpu-fraction",
        "0.25",
        "--vram",
        "64MiB",
        "--memory",
        "128MiB",
        "--container-disk",
        "128MiB",
        "--",
        "sleep",
        "1000000",
    ]);

    // The preload, config and region are there, and root inside cannot remove the preload.
    let (rc, out, _) = d.exec(&id, "cat /etc/ld.so.preload");
    assert_eq!(rc, 0);
    assert_eq!(out.trim(), "/usr/lib/gpuvisor/libgpuvisor_limiter.so");
    assert_ne!(
        d.exec(&id, "rm -f /etc/ld.so.preload && echo > /etc/ld.so.preload")
            .0,
        0,
        "preload must be read-only"
    );
    assert_eq!(
        d.exec(
            &id,
            "test -f /etc/gpuvisor/limiter.conf && test -f /run/gpuvisor/limiter.region"
        )
        .0,
        0
    );

    // A CUDA program inside the instance: exactly the quota, no more.
    let (rc, out, err) = d.exec(&id, &format!("limtest boundary {quota}"));
    assert_eq!(rc, 0, "limtest inside the instance: {out}{err}");
    assert!(out.contains("OK boundary"), "{out}");

    // A process holding memory shows in `instance get`; the quota is the one asked for.
    let (rc, out, err) = d.exec(
        &id,
        "limtest hold 16777216 & sleep 1; kill %1 2>/dev/null; true",
    );
    assert_eq!(rc, 0, "{out}{err}");
    let inst = d.json(&["instance", "get", &id]);
    let usage = &inst["gpu_usage"][0];
    assert_eq!(usage["vram_quota"], quota, "{inst}");
    assert_eq!(usage["share_milli"], 250, "{inst}");

    // Teardown removes the region with the instance.
    d.json(&["instance", "terminate", &id, "--wait"]);
    let left: Vec<_> = std::fs::read_dir(d.data().join("limiter"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "limiter files left: {left:?}");
}

#[test]
fn whole_gpu_instance_runs_without_the_limiter() {
    let _s = serial();
    let d = Daemon::start(&[]);
    d.import_busybox();
    let id = d.create(&[
        "--gpus",
        "1",
        "--memory",
        "64MiB",
        "--container-disk",
        "64MiB",
        "--",
        "sleep",
        "1000000",
    ]);
    assert_ne!(
        d.exec(&id, "test -e /etc/ld.so.preload").0,
        0,
        "no preload for a whole GPU"
    );
}
