//! Helpers of the micro-VM tests: the minimal test guest (kernel + initramfs fixture), the real
//! Debian template, a daemon that boots them, and waiting on a guest's console log.
//!
//! tests/vm.rs still has its own copies of `fixture`, `which`, `vm_daemon`, `logs` and
//! `wait_log`; these are the same functions (the timeouts as arguments where a Debian guest needs
//! longer ones), for the files to share.

use super::{prerequisite_missing, Daemon};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts")
}

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// The minimal test guest's dir (`vmlinuz`, `initrd.img`, `image.tar`): `GPUVISOR_VM_FIXTURE`,
/// else built by `scripts/vm-test-fixture` into /var/tmp/gpuvisor-vm-fixture. `None` (skip, or
/// failure under CI) with the reason recorded.
pub fn fixture() -> Option<PathBuf> {
    if which("qemu-system-x86_64").is_none() {
        prerequisite_missing("qemu-system-x86_64 not installed (scripts/install-deps)");
        return None;
    }
    if let Some(d) = std::env::var_os("GPUVISOR_VM_FIXTURE").map(PathBuf::from) {
        if d.join("vmlinuz").is_file() && d.join("initrd.img").is_file() {
            return Some(d);
        }
    }
    let script = scripts().join("vm-test-fixture");
    if script.is_file() {
        let dir = PathBuf::from("/var/tmp/gpuvisor-vm-fixture");
        let st = Command::new(&script).arg(&dir).status();
        if st.is_ok_and(|s| s.success()) && dir.join("vmlinuz").is_file() {
            return Some(dir);
        }
    }
    prerequisite_missing(
        "no VM test fixture (GPUVISOR_VM_FIXTURE, or scripts/vm-test-fixture failed or is missing)",
    );
    None
}

/// The QEMU a Debian 12 host had before `scripts/install-deps` upgraded it (bookworm's 7.2,
/// unpacked by `scripts/qemu-previous` into `/var/tmp/gpuvisor-qemu-previous`): the wrapper to
/// run it (`serve --vm-qemu`). `None` (skip, or failure under CI) with the reason recorded.
pub fn previous_qemu() -> Option<PathBuf> {
    let dir = PathBuf::from("/var/tmp/gpuvisor-qemu-previous");
    let st = Command::new(scripts().join("qemu-previous"))
        .arg(&dir)
        .status();
    let wrapper = dir.join("qemu-system-x86_64");
    if st.is_ok_and(|s| s.success()) && wrapper.is_file() {
        return Some(wrapper);
    }
    prerequisite_missing("no previous QEMU (scripts/qemu-previous failed: apt-get download of bookworm's qemu-system-x86)");
    None
}

/// The Debian 12 cloud-init template (`scripts/make-vm-template`, an OCI image tar): reused
/// from `/var/tmp/gpuvisor-debian-template/<hash>.tar`, where `<hash>` is the hash of the
/// script and of `scripts/oci-pack` (a changed script builds a new one), else built there
/// (about 3 minutes; debootstrap's .debs cached in /var/cache/gpuvisor/debootstrap). Concurrent
/// test runs build it once (a lock file). `GPUVISOR_DEBIAN_TEMPLATE` names a ready tar instead.
/// `None` (skip, or failure under CI) with the reason recorded.
pub fn debian_template() -> Option<PathBuf> {
    if let Some(t) = std::env::var_os("GPUVISOR_DEBIAN_TEMPLATE").map(PathBuf::from) {
        if t.is_file() {
            return Some(t);
        }
        prerequisite_missing(&format!(
            "GPUVISOR_DEBIAN_TEMPLATE {} not found",
            t.display()
        ));
        return None;
    }
    if which("debootstrap").is_none() && !Path::new("/usr/sbin/debootstrap").is_file() {
        prerequisite_missing("debootstrap not installed (scripts/install-deps)");
        return None;
    }
    let mut h = Sha256::new();
    for f in ["make-vm-template", "oci-pack"] {
        h.update(std::fs::read(scripts().join(f)).unwrap());
    }
    let hash: String = h
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = PathBuf::from("/var/tmp/gpuvisor-debian-template");
    std::fs::create_dir_all(&dir).unwrap();
    let tar = dir.join(format!("{hash}.tar"));
    let lock = std::fs::File::create(dir.join(".lock")).unwrap();
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    if tar.is_file() {
        return Some(tar);
    }
    let partial = dir.join(format!("{hash}.tar.partial"));
    let t0 = Instant::now();
    eprintln!(
        "building the Debian template {} (a few minutes)",
        tar.display()
    );
    let out = Command::new(scripts().join("make-vm-template"))
        .arg(&partial)
        .output()
        .unwrap();
    if !out.status.success() {
        let _ = std::fs::remove_file(&partial);
        prerequisite_missing(&format!(
            "scripts/make-vm-template failed ({}; needs deb.debian.org): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        ));
        return None;
    }
    std::fs::rename(&partial, &tar).unwrap();
    // The script's last line says what it built (debootstrap's progress comes before).
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "{} in {:.0} s",
        stdout.trim().lines().last().unwrap_or_default(),
        t0.elapsed().as_secs_f64()
    );
    Some(tar)
}

/// A daemon whose default VM kernel and initrd are the fixture's (images without a /boot boot
/// the minimal guest; an image with its own kernel, the Debian template, boots that), with a
/// stop grace long enough for a guest under TCG on a loaded machine.
pub fn vm_daemon(fx: &Path) -> Daemon {
    let flags = vm_flags(fx);
    Daemon::start(&flags.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The `serve` flags of [`vm_daemon`].
pub fn vm_flags(fx: &Path) -> Vec<String> {
    let (k, i) = (fx.join("vmlinuz"), fx.join("initrd.img"));
    [
        "--stop-grace",
        "60s",
        "--vm-kernel",
        k.to_str().unwrap(),
        "--vm-initrd",
        i.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `instance logs ID`: the guest's serial console.
pub fn logs(d: &Daemon, id: &str) -> String {
    String::from_utf8_lossy(&d.cli(&["instance", "logs", id]).stdout).into_owned()
}

/// Waits up to `timeout` until the instance's log shows `needle` `count` times; returns the
/// log. Fails at once when the instance stops running (the guest will print nothing more).
pub fn wait_log(d: &Daemon, id: &str, needle: &str, count: usize, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut checked = Instant::now();
    loop {
        let l = logs(d, id);
        if l.matches(needle).count() >= count {
            return l;
        }
        if checked.elapsed() > Duration::from_secs(5) {
            checked = Instant::now();
            let v = d.json(&["instance", "get", id]);
            assert_eq!(
                v["state"],
                "running",
                "{id} stopped before {needle:?} x{count} appeared: {v}\n{l}\n--- daemon:\n{}",
                d.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} x{count} never appeared in the log of {id} within {timeout:?}:\n{l}\n--- daemon:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
