//! A CUDA rootfs for limiter tests: busybox, glibc, the fake `libcuda.so.1` (also installed as
//! `libnvidia-ml.so.1`) and the limiter's C test program `limtest`, plus the real
//! `libgpuvisor_limiter.so` the daemon injects. Shared by `tests/limiter.rs` and the attack
//! suite's limiter module.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the limiter and the fake driver (into their own target dir: `cargo test` does not
/// refresh cdylibs) and returns (limiter, fake libcuda).
pub fn build_libs() -> (PathBuf, PathBuf) {
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
pub fn cuda_rootfs(fake: &Path, limiter: &Path) -> tempfile::TempDir {
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
