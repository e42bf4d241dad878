//! The limiter over the fake driver, in real processes: `tests/c/limtest.c` runs under
//! `LD_PRELOAD=libgpuvisor_limiter.so` with the double installed as `libcuda.so.1` and
//! `libnvidia-ml.so.1`, and this harness plays the daemon (creates the region, writes the config,
//! publishes utilisation samples, kills processes). Each limited process runs in a private mount
//! namespace with its instance's config at the one path the library reads (`ns::confine`).
//!
//! Needs `cc` (gcc). Both shared objects are built here with a nested `cargo build --offline`
//! into a separate target directory (`<target>/limiter-tests`), so it never waits on the outer
//! build's lock and never runs a stale `.so`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

mod ns;

use gpuvisor_limiter::config::Config;
use gpuvisor_limiter::shm::{DeviceLimit, Priority, Region, RegionSpec, FULL_SHARE_BP};

const MIB: u64 = 1 << 20;

struct Harness {
    _dir: tempfile::TempDir,
    limiter: PathBuf,
    libdir: PathBuf,
    bin: PathBuf,
}

fn target_profile_dir() -> PathBuf {
    // <target>/<profile>/deps/interpose-<hash>
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Builds both shared objects into `<target>/limiter-tests`. `cargo test` compiles this crate's
/// library for the test as an rlib and does not refresh `target/<profile>/libgpuvisor_limiter.so`,
/// so the tests build the cdylib themselves rather than trust a possibly stale one.
fn build_libs(target_root: &Path) -> (PathBuf, PathBuf) {
    let dir = target_root.join("limiter-tests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--offline", "-p", "gpuvisor-fakecuda"])
        .args(["-p", "gpuvisor-limiter", "--lib"])
        .env("CARGO_TARGET_DIR", &dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo to build the fake libcuda");
    assert!(
        status.success(),
        "building the limiter and the fake libcuda failed"
    );
    let libs = (
        dir.join("debug/libgpuvisor_limiter.so"),
        dir.join("debug/libcuda.so"),
    );
    for so in [&libs.0, &libs.1] {
        assert!(so.exists(), "{} missing after build", so.display());
    }
    libs
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let profile = target_profile_dir();
        let (limiter, fake) = build_libs(profile.parent().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let libdir = dir.path().join("lib");
        std::fs::create_dir(&libdir).unwrap();
        for name in ["libcuda.so", "libcuda.so.1", "libnvidia-ml.so.1"] {
            std::os::unix::fs::symlink(&fake, libdir.join(name)).unwrap();
        }
        let bin = dir.path().join("limtest");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/limtest.c");
        let out = Command::new("cc")
            .args(["-O1", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&bin)
            .arg(&src)
            .arg(format!("-L{}", libdir.display()))
            .args(["-lcuda", "-ldl"])
            .output()
            .expect("running cc");
        assert!(
            out.status.success(),
            "compiling limtest.c failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Harness {
            _dir: dir,
            limiter,
            libdir,
            bin,
        }
    })
}

/// The rate test measures wall-clock behaviour on a 2-core CI machine: it runs alone (write
/// lock); the other tests of this file run alongside each other (read lock).
static LOAD: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    LOAD.read().unwrap_or_else(|e| e.into_inner())
}

fn alone() -> RwLockWriteGuard<'static, ()> {
    LOAD.write().unwrap_or_else(|e| e.into_inner())
}

/// One instance: its region and config, as the daemon would make them.
struct Instance {
    _dir: tempfile::TempDir,
    region: Region,
    config: PathBuf,
    env: Vec<(String, String)>,
}

impl Instance {
    fn new(quota: u64, share_bp: u32, priority: Priority, context_bytes: u64) -> Instance {
        let limit = DeviceLimit {
            quota_bytes: quota,
            share_bp,
        };
        Instance::with_devices(vec![limit], priority, context_bytes)
    }

    fn with_devices(devices: Vec<DeviceLimit>, priority: Priority, context_bytes: u64) -> Instance {
        let dir = tempfile::tempdir().unwrap();
        let limits = dir.path().join("limiter.limits");
        let usage = dir.path().join("limiter.usage");
        let region = Region::create(&limits, &usage, &RegionSpec { devices, priority }).unwrap();
        let config = dir.path().join("limiter.conf");
        Config {
            limits,
            usage,
            context_bytes,
        }
        .write(&config)
        .unwrap();
        Instance {
            _dir: dir,
            region,
            config,
            env: Vec::new(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let h = harness();
        let mut c = Command::new(&h.bin);
        c.args(args)
            .env("LD_LIBRARY_PATH", &h.libdir)
            .env("LD_PRELOAD", &h.limiter);
        ns::confine(&mut c, self.config.parent().unwrap());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "limtest {args:?} failed ({}):\n{}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    fn used(&self) -> u64 {
        self.region.usage(0).unwrap().used_bytes
    }

    fn launches(&self) -> u64 {
        self.region.usage(0).unwrap().launches
    }
}

#[test]
fn quota_is_exact_at_the_boundary_and_frees_give_it_back() {
    let _load = shared();
    let i = Instance::new(64 * MIB, FULL_SHARE_BP, Priority::High, 0);
    i.run(&["boundary", &(64 * MIB).to_string()]);
    assert_eq!(i.used(), 0);
    assert!(i.region.processes().is_empty(), "slot not released at exit");
}

#[test]
fn every_allocation_and_launch_path_is_counted_on_every_route() {
    let _load = shared();
    let i = Instance::new(256 * MIB, FULL_SHARE_BP, Priority::High, 0);
    for route in ["dlsym", "gpa11", "gpa12", "gpa13", "gpa12ptds", "gpa13ptds"] {
        let before = i.launches();
        let out = i.run(&["paths", route, "10"]);
        assert!(out.contains("OK"), "{out}");
        assert_eq!(
            i.launches() - before,
            40,
            "{route}: kernel, Ex, cooperative and graph launches must all pass the gate"
        );
        assert_eq!(i.used(), 0, "{route}");
    }
}

/// `cuMemCreate` memory stays charged while it is mapped, even once its handle is released (the
/// driver frees it at whichever of release and last unmap comes last): releasing right after
/// `cuMemMap` was a way around the quota.
#[test]
fn a_released_handle_stays_charged_while_mapped() {
    let _load = shared();
    let i = Instance::new(64 * MIB, FULL_SHARE_BP, Priority::High, 0);
    for route in ["dlsym", "gpa12", "gpa13"] {
        let out = i.run(&["vmm", route]);
        assert!(out.contains("OK"), "{out}");
        assert_eq!(i.used(), 0, "{route}");
    }
}

/// `cuMemRetainAllocationHandle` takes a reference of its own: releasing it (or the first one)
/// while another reference still holds the allocation gives nothing back; the last release or
/// unmap does, once.
#[test]
fn a_retained_allocation_handle_keeps_the_charge() {
    let _load = shared();
    let i = Instance::new(64 * MIB, FULL_SHARE_BP, Priority::High, 0);
    for route in ["dlsym", "gpa11", "gpa12", "gpa13"] {
        let out = i.run(&["vmmretain", route]);
        assert!(out.contains("OK"), "{out}");
        assert_eq!(i.used(), 0, "{route}");
    }
}

/// The context footprint goes back when the driver frees the context (destroy of a created
/// context, last release or reset of the primary one), is charged again by the next one, and is
/// never given back twice; what is still charged at exit goes back with the slot.
#[test]
fn the_context_footprint_is_given_back_with_the_context() {
    let _load = shared();
    let i = Instance::new(64 * MIB, FULL_SHARE_BP, Priority::High, MIB);
    for route in ["link", "dlsym", "gpa11", "gpa12", "gpa13"] {
        let out = i.run(&["ctxlife", route, &MIB.to_string()]);
        assert!(out.contains("OK"), "{out}");
        assert_eq!(i.used(), 0, "{route}");
        assert!(i.region.processes().is_empty(), "{route}");
    }
}

/// CUDA graphs by stream capture (PyTorch `torch.cuda.graph`): a launch into a capturing stream
/// records a node and runs nothing, so the gate neither counts nor holds it (a throttled capture
/// of a large graph would otherwise sleep for seconds); each replay counts once. Outside a
/// capture the launch path never asks the driver about capture.
#[test]
fn launches_into_a_capturing_stream_are_not_gated() {
    let _load = shared();
    let i = Instance::new(MIB, FULL_SHARE_BP, Priority::High, 0);
    for route in [
        "link",
        "dlsym",
        "gpa11",
        "gpa12",
        "gpa13",
        "gpa12ptds",
        "gpa13ptds",
    ] {
        let before = i.launches();
        let out = i.run(&["capture", route, "5", "3"]);
        assert!(out.contains("OK"), "{out}");
        assert_eq!(
            i.launches() - before,
            5 + 3 + 5,
            "{route}: 5 launches, 3 replays and 5 launches after must count; 15 captured must not"
        );
    }
}

/// The legacy launch API (`cuLaunch`, `cuLaunchGrid`, `cuLaunchGridAsync`, and the multi-device
/// cooperative launch) is counted on every route an application can reach it by; the host
/// function entry is not a launch.
#[test]
fn legacy_launch_paths_are_counted_on_every_route() {
    let _load = shared();
    let i = Instance::new(MIB, FULL_SHARE_BP, Priority::High, 0);
    let routes = [
        "link",
        "dlsym",
        "gpa11",
        "gpa12",
        "gpa13",
        "gpa12ptds",
        "gpa13ptds",
    ];
    let counted: Vec<(&str, u64)> = routes
        .iter()
        .map(|route| {
            let before = i.launches();
            let out = i.run(&["legacy", route, "10"]);
            assert!(out.contains("OK"), "{out}");
            (*route, i.launches() - before)
        })
        .collect();
    let want: Vec<(&str, u64)> = routes.iter().map(|r| (*r, 40)).collect();
    assert_eq!(
        counted, want,
        "10 each of cuLaunch, cuLaunchGrid, cuLaunchGridAsync and \
         cuLaunchCooperativeKernelMultiDevice must pass the gate, cuLaunchHostFunc never"
    );
}

const BURST: Duration = Duration::from_millis(2);

/// Puts the instance's controller at a known spacing through `path` (the first launch takes
/// one sample, the next launch after a second sample sets the spacing), then times `n` launches.
/// Returns (elapsed, spacing, launches the gate saw).
fn gated(path: &str, n: u32) -> (Duration, Duration, u64) {
    let i = Instance::new(MIB, 2500, Priority::High, 0);
    i.region.publish_sample(0, 10_000, 0).unwrap();
    let mut c = i
        .cmd(&["gate", path, &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "READY", "{path}");
    std::thread::sleep(Duration::from_millis(20));
    // Full utilisation at a 25 % share: the next gated launch sets the spacing to twice the
    // time since the first one.
    i.region.publish_sample(0, 10_000, 0).unwrap();
    c.stdin.take().unwrap().write_all(b"\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(c.wait().unwrap().success(), "gate {path} failed: {line}");
    let ns: u64 = line
        .trim()
        .strip_prefix("ELAPSED ")
        .unwrap_or_else(|| panic!("unexpected output {line:?}"))
        .parse()
        .unwrap();
    let usage = i.region.usage(0).unwrap();
    (
        Duration::from_nanos(ns),
        Duration::from_nanos(usage.interval_ns),
        usage.launches,
    )
}

/// Each legacy path is held to the instance's schedule exactly like `cuLaunchKernel`: once the
/// controller sets a spacing, `n` launches take at least `n - 1` spacings (less the burst
/// allowance). Lower bounds only, so a loaded machine cannot make this flaky.
#[test]
fn legacy_launch_paths_are_throttled_like_cu_launch_kernel() {
    let _load = shared();
    const N: u32 = 4;
    for path in ["kernel", "launch", "grid", "gridasync", "multi"] {
        let (elapsed, spacing, launches) = gated(path, N);
        assert_eq!(launches, u64::from(N) + 1, "{path}: launches the gate saw");
        assert!(
            spacing >= Duration::from_millis(40),
            "{path}: the controller never throttled (spacing {spacing:?})"
        );
        let floor = spacing * (N - 1) - BURST;
        assert!(
            elapsed >= floor,
            "{path}: {N} launches took {elapsed:?}, the gate allows no less than {floor:?}"
        );
    }
    // A host function is no kernel: the gate never sees it, so nothing is ever throttled.
    let (_, spacing, launches) = gated("hostfunc", N);
    assert_eq!((launches, spacing), (0, Duration::ZERO), "cuLaunchHostFunc");
}

/// With two devices: a multi-device launch passes the gate of each stream's device (through
/// `cuStreamGetDevice`, and on drivers before 12.8 through the stream's context, leaving the
/// caller's current context as it was); legacy launches count on the current context's device.
#[test]
fn multi_device_launches_are_gated_per_stream_device() {
    let _load = shared();
    let limit = DeviceLimit {
        quota_bytes: MIB,
        share_bp: FULL_SHARE_BP,
    };
    for driver in ["12080", "12040"] {
        let mut i = Instance::with_devices(vec![limit, limit], Priority::High, 0);
        i.env = vec![
            ("FAKECUDA_DEVICES".into(), "2".into()),
            ("FAKECUDA_DRIVER_VERSION".into(), driver.into()),
        ];
        let out = i.run(&["multidev", "5", "7"]);
        let l0 = i.region.usage(0).unwrap().launches;
        let l1 = i.region.usage(1).unwrap().launches;
        assert_eq!((l0, l1), (5, 5 + 3 * 7), "driver {driver}: {out}");
        let via_ctx = !out.contains("getctx=0");
        assert_eq!(via_ctx, driver == "12040", "driver {driver}: {out}");
    }
}

#[test]
fn cuda_2x_abis_with_32_bit_pointers_are_counted() {
    let _load = shared();
    let i = Instance::new(64 * MIB, FULL_SHARE_BP, Priority::High, 0);
    i.run(&["v1"]);
    assert_eq!(i.used(), 0);
}

#[test]
fn eight_processes_share_one_quota_exactly() {
    let _load = shared();
    const CHUNK: u64 = 4096;
    const N: u64 = 2000;
    let i = Instance::new(N * CHUNK, FULL_SHARE_BP, Priority::High, 0);
    let mut children: Vec<_> = (0..8)
        .map(|_| {
            i.cmd(&["race", &CHUNK.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut total = 0;
    for c in &mut children {
        let mut line = String::new();
        BufReader::new(c.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let n: u64 = line
            .trim()
            .strip_prefix("GOT ")
            .unwrap_or_else(|| panic!("unexpected output {line:?}"))
            .parse()
            .unwrap();
        total += n;
    }
    assert_eq!(total, N, "the eight processes together got {total} chunks");
    assert_eq!(i.used(), N * CHUNK);
    assert_eq!(i.region.processes().len(), 8);
    for mut c in children {
        drop(c.stdin.take());
        assert!(c.wait().unwrap().success());
    }
    assert_eq!(i.used(), 0);
}

fn spawn_holder(i: &Instance, bytes: u64) -> std::process::Child {
    let mut c = i
        .cmd(&["hold", &bytes.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "HELD");
    c
}

#[test]
fn a_sigkilled_process_usage_is_reclaimed_by_the_next_process() {
    let _load = shared();
    let q = 64 * MIB;
    let i = Instance::new(q, FULL_SHARE_BP, Priority::High, 0);
    let mut c = spawn_holder(&i, 40 * MIB);
    assert_eq!(i.used(), 40 * MIB);
    c.kill().unwrap(); // SIGKILL: no destructor runs
    c.wait().unwrap();
    assert_eq!(i.used(), 40 * MIB, "nothing ran at kill time");
    // The next process attaching reclaims the dead one's usage and sees the whole quota.
    i.run(&["boundary", &q.to_string()]);
    assert_eq!(i.used(), 0);
}

#[test]
fn the_daemon_can_reclaim_a_sigkilled_process() {
    let _load = shared();
    let i = Instance::new(64 * MIB, FULL_SHARE_BP, Priority::High, 0);
    let mut c = spawn_holder(&i, 10 * MIB);
    assert_eq!(
        i.region.reclaim_dead(),
        0,
        "a live process is never reclaimed"
    );
    c.kill().unwrap();
    c.wait().unwrap();
    assert_eq!(i.region.reclaim_dead(), 10 * MIB);
    assert_eq!(i.used(), 0);
    assert!(i.region.processes().is_empty());
}

/// A free after the library's exit handler (an `atexit` handler of the application registered
/// earlier, a static destructor) must not give the same bytes back twice: with a peer holding
/// memory, that under-counted the instance (and with nothing held, wrapped the counter so every
/// allocation of every process was refused).
#[test]
fn a_free_after_exit_is_not_given_back_twice() {
    let _load = shared();
    let i = Instance::new(64 * MIB, FULL_SHARE_BP, Priority::High, 0);
    let mut peer = spawn_holder(&i, 10 * MIB);
    i.run(&["latefree", &(5 * MIB).to_string()]);
    let used = i.used();
    peer.kill().unwrap();
    peer.wait().unwrap();
    assert_eq!(used, 10 * MIB, "the peer's 10 MiB must still be counted");
    i.region.reclaim_dead();
    assert_eq!(i.used(), 0);
}

#[test]
fn a_forked_child_gets_its_own_slot() {
    let _load = shared();
    let i = Instance::new(64 * MIB, FULL_SHARE_BP, Priority::High, 0);
    i.run(&["fork"]);
    // The child _exit()ed holding 500 bytes (no destructors): reclaimable, never stale.
    assert_eq!(i.region.reclaim_dead(), 500);
    assert_eq!(i.used(), 0);
}

#[test]
fn nvml_reports_the_quota() {
    let _load = shared();
    let q = 32 * MIB;
    let i = Instance::new(q, FULL_SHARE_BP, Priority::High, 0);
    i.run(&["nvml", &q.to_string()]);
}

#[test]
fn the_context_footprint_is_charged_once_per_process() {
    let _load = shared();
    let i = Instance::new(64 * MIB, FULL_SHARE_BP, Priority::High, MIB);
    i.run(&["ctx", &MIB.to_string()]);
    assert_eq!(i.used(), 0);
}

/// No configuration at the one path the library reads: every allocation is refused, the driver
/// is never asked, and the process is told why once on stderr.
#[test]
fn without_config_every_allocation_is_refused() {
    let _load = shared();
    let h = harness();
    let empty = tempfile::tempdir().unwrap();
    // Linear allocations, and cuMemCreate (whose device is checked before the quota).
    for mode in ["grab", "grabvmm"] {
        let mut c = Command::new(&h.bin);
        c.args([mode, &MIB.to_string()])
            .env("LD_LIBRARY_PATH", &h.libdir)
            .env("LD_PRELOAD", &h.limiter);
        ns::confine(&mut c, empty.path());
        let out = c.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{mode}: allocated without a config: {stdout}{stderr}"
        );
        assert!(stdout.contains("REFUSED 2"), "{mode}: {stdout}{stderr}");
        assert_eq!(
            stderr.matches("gpuvisor limiter:").count(),
            1,
            "one message on stderr: {stderr}"
        );
        assert!(stderr.contains("/etc/gpuvisor/limiter.conf"), "{stderr}");
    }
}

/// An unreadable region (the config names files that are not there) is fail-closed as well.
#[test]
fn an_unusable_region_refuses_every_allocation() {
    let _load = shared();
    let i = Instance::new(64 * MIB, FULL_SHARE_BP, Priority::High, 0);
    std::fs::remove_file(i.config.with_file_name("limiter.usage")).unwrap();
    let out = i.cmd(&["grab", &MIB.to_string()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("REFUSED 2"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot map"));
}

/// `GPUVISOR_LIMITER_CONFIG` (which used to name another config file) neither redirects nor
/// disables the library: pointed at a missing file, the quota still holds.
#[test]
fn the_environment_cannot_redirect_the_config() {
    let _load = shared();
    let q = 16 * MIB;
    let i = Instance::new(q, FULL_SHARE_BP, Priority::High, 0);
    let out = i
        .cmd(&["boundary", &q.to_string()])
        .env("GPUVISOR_LIMITER_CONFIG", "/nonexistent/limiter.conf")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `LD_PRELOAD` libraries come before `/etc/ld.so.preload`'s in the global scope: with the
/// driver preloaded ahead of the limiter, the program's calls would never reach a hook, so the
/// limiter stops the process before `main` (and says why). A library of the user's that defines
/// no driver entry point is fine.
#[test]
fn a_driver_preloaded_ahead_of_the_limiter_stops_the_process() {
    let _load = shared();
    let h = harness();
    let q = 16 * MIB;
    let i = Instance::new(q, FULL_SHARE_BP, Priority::High, 0);
    let out = i
        .cmd(&["grab", &(2 * q).to_string()])
        .env(
            "LD_PRELOAD",
            format!(
                "{} {}",
                h.libdir.join("libcuda.so.1").display(),
                h.limiter.display()
            ),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "{stderr}");
    assert!(out.stdout.is_empty(), "main ran");
    assert!(stderr.contains("ahead of the GPU limiter"), "{stderr}");
    let libm = Path::new("/lib/x86_64-linux-gnu/libm.so.6");
    if libm.exists() {
        i.cmd(&["over", &q.to_string()])
            .env(
                "LD_PRELOAD",
                format!("{} {}", libm.display(), h.limiter.display()),
            )
            .status()
            .unwrap()
            .success()
            .then_some(())
            .expect("a user preload of libm broke the limiter");
    }
}

/// Plays the daemon: publishes the instance's utilisation from the double's busy time.
fn sampler(i: &Instance, busy: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let (limits, usage) = i.config_region();
    let region = Region::open(&limits, &usage).unwrap();
    std::thread::spawn(move || {
        let read = || u64::from_le_bytes(std::fs::read(&busy).unwrap()[..8].try_into().unwrap());
        let mut last = (Instant::now(), read());
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            let now = (Instant::now(), read());
            let dt = now.0.duration_since(last.0).as_nanos() as f64;
            let util = ((now.1 - last.1) as f64 / dt * 10_000.0).min(10_000.0) as u32;
            region.publish_sample(0, util, 0).unwrap();
            last = now;
        }
    })
}

impl Instance {
    fn config_region(&self) -> (PathBuf, PathBuf) {
        let c = Config::parse(&std::fs::read_to_string(&self.config).unwrap()).unwrap();
        (c.limits, c.usage)
    }
}

fn rate(i: &Instance, secs: f64) -> f64 {
    let out = i.run(&["rate", &secs.to_string()]);
    out.trim().strip_prefix("RATE ").unwrap().parse().unwrap()
}

#[test]
fn a_throttled_instance_launch_rate_follows_its_share() {
    let _load = alone();
    let dir = tempfile::tempdir().unwrap();
    let busy = dir.path().join("busy");
    std::fs::File::create(&busy)
        .unwrap()
        .write_all(&[0u8; 8])
        .unwrap();
    let fake_env = |i: &mut Instance| {
        i.env = vec![
            ("FAKECUDA_LAUNCH_NS".into(), "1000000".into()),
            ("FAKECUDA_BUSY_FILE".into(), busy.display().to_string()),
        ];
    };
    let mut full = Instance::new(MIB, FULL_SHARE_BP, Priority::High, 0);
    fake_env(&mut full);

    for share in [2500u32, 5000] {
        // Measured next to each throttled run, so both see the same machine load.
        let unthrottled = rate(&full, 2.0);
        assert!(unthrottled > 100.0, "unthrottled rate {unthrottled}");
        let mut i = Instance::new(MIB, share, Priority::High, 0);
        fake_env(&mut i);
        let stop = Arc::new(AtomicBool::new(false));
        let s = sampler(&i, busy.clone(), stop.clone());
        let r = rate(&i, 6.0);
        stop.store(true, Ordering::Relaxed);
        s.join().unwrap();
        let fraction = r / unthrottled;
        let want = f64::from(share) / 10_000.0;
        eprintln!("share {want:.2}: {r:.0} launches/s of {unthrottled:.0} = {fraction:.3}");
        // Behaviour, not performance: the rate must follow the share, with room for a loaded
        // CI machine's timer jitter.
        assert!(
            (fraction - want).abs() < 0.1,
            "share {want}: got {fraction:.3} of the unthrottled rate"
        );
        assert!(i.region.usage(0).unwrap().interval_ns > 0);
    }
}

/// Builds `tests/c/rtldnext.c` three ways (see the file) into one directory.
fn rtldnext_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/rtldnext.c");
        let d = dir.path();
        let cc = |args: &[&str]| {
            let out = Command::new("cc")
                .args(["-O1", "-Wall", "-Wextra", "-Werror"])
                .arg(&src)
                .args(args)
                .current_dir(d)
                .output()
                .expect("running cc");
            assert!(
                out.status.success(),
                "compiling rtldnext.c {args:?} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        cc(&["-DGV_BASE", "-shared", "-fPIC", "-o", "libgvnextbase.so"]);
        cc(&[
            "-DGV_WRAP",
            "-shared",
            "-fPIC",
            "-o",
            "libgvnextwrap.so",
            "-L.",
            // Needed although no symbol of it is referenced (only found through dlsym).
            "-Wl,--no-as-needed",
            "-lgvnextbase",
            "-ldl",
        ]);
        cc(&["-o", "rtldnext", "-ldl"]);
        dir
    })
    .path()
}

/// `dlsym(RTLD_NEXT, …)` and `dlsym(RTLD_DEFAULT, …)` through the limiter's `dlsym` behave as if
/// the caller had called libc's: a wrapper loaded after the limiter (preloaded after it, or
/// `dlopen`ed) reaches the next definition instead of itself (endless recursion at start-up),
/// and a library loaded `RTLD_LOCAL` still finds its own dependencies by `RTLD_DEFAULT`.
#[test]
fn dlsym_rtld_next_searches_after_the_real_caller() {
    let _load = shared();
    let h = harness();
    let dir = rtldnext_dir();
    let wrap = dir.join("libgvnextwrap.so");
    let i = Instance::new(MIB, FULL_SHARE_BP, Priority::High, 0);
    for (mode, preload) in [
        (
            "preload",
            format!("{} {}", h.limiter.display(), wrap.display()),
        ),
        ("dlopen", h.limiter.display().to_string()),
    ] {
        let mut c = Command::new(dir.join("rtldnext"));
        c.arg(mode)
            .env(
                "LD_LIBRARY_PATH",
                format!("{}:{}", dir.display(), h.libdir.display()),
            )
            .env("LD_PRELOAD", preload);
        ns::confine(&mut c, i.config.parent().unwrap());
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "rtldnext {mode} ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The cdylib exports `dlsym` (the trampoline) under its own name, and not the trampoline's
/// internal name.
#[test]
fn the_library_exports_dlsym() {
    let h = harness();
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&h.limiter)
        .output()
        .expect("running nm");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let syms: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _addr = f.next()?;
            Some((f.next()?, f.next()?))
        })
        .collect();
    assert!(
        syms.iter().any(|(t, n)| *t == "T" && *n == "dlsym"),
        "dlsym not exported:\n{text}"
    );
    for name in [
        "cuMemRetainAllocationHandle",
        "cuCtxDestroy_v2",
        "cuDevicePrimaryCtxReset_v2",
    ] {
        assert!(
            syms.iter().any(|(t, n)| *t == "T" && *n == name),
            "{name} not exported"
        );
    }
    assert!(!syms.iter().any(|(_, n)| *n == "gvh_dlsym"), "{text}");
}
