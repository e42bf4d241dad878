//! Attacks on the fractional-GPU limiter from inside a real fractional instance (over the fake
//! `libcuda.so.1`: CI has no GPU): switch it off or redirect it through the environment, raise
//! its own quota by writing the shared region, get around it with `LD_PRELOAD` or
//! `LD_LIBRARY_PATH`, and allocate past it (a bypass no user-space interposer can stop, which
//! the daemon must catch from outside). Each checks the quota with `limtest` (see
//! `crates/limiter/tests/c/limtest.c`): `grab N` exits 0 only if the driver gave N bytes,
//! `over Q` exits 0 only if the instance still sees total Q and one byte more is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "limiter_rootfs.rs"]
mod rootfs;

use crate::common::{serial, Daemon};
use crate::probe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const QUOTA: u64 = 64 << 20;
const LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu";

struct Fraction {
    d: Daemon,
    id: String,
    _rootfs: tempfile::TempDir,
}

/// A daemon with one simulated GPU and one instance with a 0.25 fraction and a 64 MiB quota,
/// running `sleep` over the CUDA rootfs.
fn fraction() -> Fraction {
    let (limiter, fake) = rootfs::build_libs();
    let r = rootfs::cuda_rootfs(&fake, &limiter);
    let d = Daemon::start_with_gpus("1xA100-80GB", &["--limiter-lib", limiter.to_str().unwrap()]);
    d.json(&[
        "image",
        "import",
        r.path().join("rootfs").to_str().unwrap(),
        "--name",
        "busybox",
    ]);
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
    // Control: the limiter is there and holds the quota.
    probe::allowed(&d, &id, "the quota holds", &format!("limtest over {QUOTA}"));
    Fraction { d, id, _rootfs: r }
}

/// `GPUVISOR_LIMITER_CONFIG` pointed at a missing file used to mean "no limits".
#[test]
fn limiter_config_env_cannot_disable_the_limiter() {
    let _s = serial();
    let f = fraction();
    probe::refused(
        &f.d,
        &f.id,
        "allocating twice the quota with GPUVISOR_LIMITER_CONFIG=/nonexistent",
        &format!(
            "export GPUVISOR_LIMITER_CONFIG=/nonexistent/limiter.conf; limtest grab {}",
            2 * QUOTA
        ),
    );
    // Nor can it point the library at a config of the tenant's making.
    probe::refused(
        &f.d,
        &f.id,
        "allocating twice the quota through a config written in /tmp",
        &format!(
            "printf 'limits=/tmp/l\\nusage=/tmp/u\\n' > /tmp/c.conf; \
             GPUVISOR_LIMITER_CONFIG=/tmp/c.conf limtest grab {}",
            2 * QUOTA
        ),
    );
}

/// Root inside the instance writes a huge quota and a full share over the quota and share
/// fields of every limiter file it can see (the layout-1 region had them at offsets 64 and
/// 128, the limits file has them at 64 and 72): the limits are the daemon's, read-only.
#[test]
fn writing_the_limiter_region_does_not_raise_the_quota() {
    let _s = serial();
    let f = fraction();
    let p = probe::run(
        &f.d,
        &f.id,
        "for file in /etc/gpuvisor/* /run/gpuvisor/*; do \
           for off in 64 72 128; do \
             printf '\\377\\377\\377\\377\\377\\377\\377\\017' \
               | dd of=$file bs=1 seek=$off conv=notrunc 2>/dev/null && echo \"wrote $file@$off\"; \
           done; \
         done; true",
    );
    assert!(
        !p.out.contains("limiter.limits@"),
        "the limits file was writable: {}",
        p.out
    );
    // The instance still sees its quota as the total, and nothing beyond it is given; whatever
    // those writes did to the usage file (they may make it refuse more, never less).
    probe::allowed(
        &f.d,
        &f.id,
        "the quota is unchanged after rewriting the region",
        &format!("limtest over {QUOTA}"),
    );
    probe::refused(
        &f.d,
        &f.id,
        "allocating twice the quota after rewriting the region",
        &format!("limtest grab {}", 2 * QUOTA),
    );
    probe::refused(
        &f.d,
        &f.id,
        "remounting the limits file read-write",
        "mount -o remount,rw /etc/gpuvisor/limiter.limits",
    );
}

/// Read-only binds can still be moved aside with their parent directory (Linux refuses to
/// rename a mount point, not a directory that contains one): root renames the directories that
/// hold the config, limits, library and preload, puts forged ones in their place, or removes
/// the preload. Every ancestor is a mount point, so each step is refused and the quota holds.
#[test]
fn moving_the_limiter_files_aside_does_not_replace_them() {
    let _s = serial();
    let f = fraction();
    // The probes must have something to act on: the files are where the limiter reads them.
    probe::allowed(
        &f.d,
        &f.id,
        "the limiter's files are in place",
        "test -s /etc/gpuvisor/limiter.conf && test -s /etc/gpuvisor/limiter.limits && \
         test -s /etc/gpuvisor/libgpuvisor_limiter.so && test -s /etc/ld.so.preload",
    );
    for (what, cmd) in [
        ("renaming /etc", "mv /etc /etc.o"),
        ("renaming /etc/gpuvisor", "mv /etc/gpuvisor /etc/g.o"),
        (
            "renaming the config",
            "mv /etc/gpuvisor/limiter.conf /tmp/c",
        ),
        (
            "renaming the limits",
            "mv /etc/gpuvisor/limiter.limits /tmp/l",
        ),
        ("removing the preload", "rm /etc/ld.so.preload"),
        ("renaming the preload", "mv /etc/ld.so.preload /etc/p.o"),
        (
            "replacing the library",
            "cp /bin/busybox /etc/gpuvisor/libgpuvisor_limiter.so",
        ),
        ("a file beside the config", "touch /etc/gpuvisor/x"),
    ] {
        probe::refused(&f.d, &f.id, what, cmd);
    }
    // Whatever moved, new processes still get the limiter and its quota.
    probe::allowed(
        &f.d,
        &f.id,
        "the quota is unchanged after the attempts",
        &format!("limtest over {QUOTA}"),
    );
    probe::refused(
        &f.d,
        &f.id,
        "allocating twice the quota after the attempts",
        &format!("limtest grab {}", 2 * QUOTA),
    );
}

/// The user's `LD_PRELOAD` stays theirs: a library of their own keeps the limiter (the quota
/// holds), and preloading the driver itself, ahead of the limiter, does not get past it.
#[test]
fn ld_preload_does_not_remove_or_bypass_the_limiter() {
    let _s = serial();
    let f = fraction();
    probe::allowed(
        &f.d,
        &f.id,
        "the quota holds with a user LD_PRELOAD",
        &format!("LD_PRELOAD={LIB_DIR}/libm.so.6 limtest over {QUOTA}"),
    );
    probe::refused(
        &f.d,
        &f.id,
        "allocating twice the quota with the driver preloaded ahead of the limiter",
        &format!(
            "LD_PRELOAD={LIB_DIR}/libcuda.so.1 limtest grab {}",
            2 * QUOTA
        ),
    );
    probe::refused(
        &f.d,
        &f.id,
        "allocating twice the quota with an empty LD_PRELOAD",
        &format!("LD_PRELOAD= limtest grab {}", 2 * QUOTA),
    );
}

/// The user's `LD_LIBRARY_PATH` stays theirs: a directory of their own with a copy of the
/// driver (and a decoy named like the limiter) does not get past it.
#[test]
fn ld_library_path_does_not_remove_or_bypass_the_limiter() {
    let _s = serial();
    let f = fraction();
    let setup = format!(
        "mkdir -p /tmp/evil && cp {LIB_DIR}/libcuda.so.1 /tmp/evil/libcuda.so.1 \
         && cp {LIB_DIR}/libcuda.so.1 /tmp/evil/libgpuvisor_limiter.so"
    );
    probe::allowed(&f.d, &f.id, "setting up /tmp/evil", &setup);
    probe::allowed(
        &f.d,
        &f.id,
        "the quota holds with LD_LIBRARY_PATH=/tmp/evil",
        &format!("LD_LIBRARY_PATH=/tmp/evil limtest over {QUOTA}"),
    );
    probe::refused(
        &f.d,
        &f.id,
        "allocating twice the quota with LD_LIBRARY_PATH=/tmp/evil",
        &format!("LD_LIBRARY_PATH=/tmp/evil limtest grab {}", 2 * QUOTA),
    );
}

/// The init pid of an instance, from its bundle.
fn init_pid(d: &Daemon, id: &str) -> u32 {
    std::fs::read_to_string(d.data().join("bundles").join(id).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
}

fn procs_file(d: &Daemon) -> PathBuf {
    d.data().join("dev/nvidia0.procs")
}

/// A process that allocates past the limiter (a static binary, `dlmopen`, raw ioctls: the
/// driver counts its memory, the library never sees it) is caught from outside: the simulated
/// driver's per-process table (what NVML's running-process lists report on a GPU host) shows
/// the instance over its quota, and the daemon kills the process and records an event. A
/// process within its quota is left alone.
#[test]
fn vram_allocated_around_the_limiter_is_caught_and_killed() {
    let _s = serial();
    let f = fraction();
    let pid = init_pid(&f.d, &f.id);
    // Within the quota (and its per-process allowance for the driver's context): nothing.
    std::fs::write(procs_file(&f.d), format!("{pid} mem={}\n", QUOTA / 2)).unwrap();
    let quiet_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < quiet_until {
        assert!(alive(pid), "a process within its quota was killed");
        std::thread::sleep(Duration::from_millis(100));
    }
    // 8 GiB on a 64 MiB quota.
    std::fs::write(procs_file(&f.d), format!("{pid} mem={}\n", 8u64 << 30)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "an instance 8 GiB over its quota was not stopped: {}",
            f.d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = f.d.json(&["instance", "events", &f.id]);
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "gpu_over_quota"
                && e["message"].as_str().unwrap().contains("killed")),
        "{events}"
    );
    let _ = std::fs::remove_file(procs_file(&f.d));
}

/// The outside check allows each process some VRAM beyond the quota for its driver context.
/// A tenant must not multiply that allowance by starting many processes that each stay just
/// under it: past `MAX_SLACK_PROCESSES` (8) processes no more is allowed, and 12 processes of
/// 600 MiB on a 64 MiB quota are caught.
#[test]
fn many_processes_do_not_multiply_the_vram_allowance() {
    let _s = serial();
    let f = fraction();
    probe::allowed(
        &f.d,
        &f.id,
        "starting 12 holders",
        "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do setsid sleep 100000 </dev/null >/dev/null 2>&1 & done",
    );
    let pids = crate::common::instance_pids(&f.id);
    assert!(pids.len() >= 13, "the holders did not start: {pids:?}");
    let table: String = pids
        .iter()
        .map(|p| format!("{p} mem={}\n", 600u64 << 20))
        .collect();
    std::fs::write(procs_file(&f.d), table).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "13 processes of 600 MiB each on a 64 MiB quota were not stopped: {}",
            f.d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(procs_file(&f.d));
}
