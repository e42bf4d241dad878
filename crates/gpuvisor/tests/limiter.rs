//! Fractional GPUs end to end: the daemon injects the real `libgpuvisor_limiter.so` into an
//! instance through a read-only `/etc/ld.so.preload`, and a CUDA program inside the instance
//! (over the fake `libcuda.so.1`, since CI has no GPU) sees exactly its VRAM quota.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{serial, Daemon};

#[path = "attacks/limiter_rootfs.rs"]
mod limiter_rootfs;
use limiter_rootfs::{build_libs, cuda_rootfs};

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
    assert_eq!(out.trim(), "/etc/gpuvisor/libgpuvisor_limiter.so");
    assert_ne!(
        d.exec(&id, "rm -f /etc/ld.so.preload && echo > /etc/ld.so.preload")
            .0,
        0,
        "preload must be read-only"
    );
    assert_eq!(
        d.exec(
            &id,
            "test -f /etc/gpuvisor/limiter.conf && test -f /etc/gpuvisor/limiter.limits && test -f /run/gpuvisor/limiter.usage"
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

/// Launches through the limiter of instance `id` so far (the usage file's counter of GPU 0).
fn launches(d: &Daemon, id: &str) -> u64 {
    let bytes = std::fs::read(d.data().join("limiter").join(format!("{id}.usage"))).unwrap();
    // Usage layout: 64-byte header, then per GPU `used` (line 1), `tat_ns` and `launches`
    // (line 2): see `shm::tests::offsets_used_by_the_python_gpu_check`.
    u64::from_le_bytes(bytes[136..144].try_into().unwrap())
}

fn init_pid(d: &Daemon, id: &str) -> u32 {
    std::fs::read_to_string(d.data().join("bundles").join(id).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Priorities end to end: a low-priority fraction's kernel launch rate drops while a
/// high-priority instance on the same GPU is busy, and comes back once it is idle. The test
/// plays the GPU: every 100 ms it turns each instance's launch rate into the per-process SM
/// utilisation the simulated driver reports (one fake launch is 1 ms of GPU time), and while
/// the high-priority instance "runs" it reports it at 90 %. The daemon samples those readings,
/// publishes the high-priority load of the GPU to the low-priority instance, and its controller
/// spaces the launches. Rates are compared with each other, never with a clock.
#[test]
fn a_low_priority_fraction_yields_to_a_busy_high_priority_one() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let _s = serial();
    let (limiter, fake) = build_libs();
    let rootfs = cuda_rootfs(&fake, &limiter);
    let d = Daemon::start_with_gpus("1xA100-80GB", &["--limiter-lib", limiter.to_str().unwrap()]);
    d.json(&[
        "image",
        "import",
        rootfs.path().join("rootfs").to_str().unwrap(),
        "--name",
        "busybox",
    ]);
    let common = [
        "--vram",
        "64MiB",
        "--memory",
        "128MiB",
        "--container-disk",
        "128MiB",
    ];
    let mut args = vec!["--gpu-fraction", "0.5", "--priority", "low"];
    args.extend(common);
    args.extend([
        "--env",
        "FAKECUDA_LAUNCH_NS=1000000",
        "--",
        "limtest",
        "rate",
        "100000",
    ]);
    let low = d.create(&args);
    let mut args = vec!["--gpu-fraction", "0.4", "--priority", "high"];
    args.extend(common);
    args.extend(["--", "sleep", "1000000"]);
    let high = d.create(&args);
    let inst = d.json(&["instance", "get", &low]);
    assert_eq!(
        inst["gpu_fraction"]["compute_share_enforced"], true,
        "the simulated backend measures per-process utilisation: {inst}"
    );
    let (low_pid, high_pid) = (init_pid(&d, &low), init_pid(&d, &high));

    // The GPU model.
    let procs = d.data().join("dev/nvidia0.procs");
    let high_busy = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(std::sync::Mutex::new(Vec::<(Instant, u64)>::new()));
    let model = {
        let (d_data, low_id) = (d.data(), low.clone());
        let (high_busy, stop, samples, procs) = (
            high_busy.clone(),
            stop.clone(),
            samples.clone(),
            procs.clone(),
        );
        std::thread::spawn(move || {
            let read = || {
                let b =
                    std::fs::read(d_data.join("limiter").join(format!("{low_id}.usage"))).unwrap();
                u64::from_le_bytes(b[136..144].try_into().unwrap())
            };
            let mut last = (Instant::now(), read());
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let now = (Instant::now(), read());
                let rate = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64();
                let util = (rate / 10.0).clamp(0.0, 100.0) as u32;
                let mut text = format!("{low_pid} sm={util}\n");
                if high_busy.load(Ordering::Relaxed) {
                    text.push_str(&format!("{high_pid} sm=90\n"));
                }
                std::fs::write(&procs, text).unwrap();
                samples.lock().unwrap().push(now);
                last = now;
            }
        })
    };
    // Launch rate over the second half of a phase of `secs`.
    let phase = |secs: u64| -> f64 {
        std::thread::sleep(Duration::from_secs(secs) / 2);
        let a = (Instant::now(), launches(&d, &low));
        std::thread::sleep(Duration::from_secs(secs) / 2);
        let b = (Instant::now(), launches(&d, &low));
        (b.1 - a.1) as f64 / b.0.duration_since(a.0).as_secs_f64()
    };
    let alone = phase(6);
    high_busy.store(true, Ordering::Relaxed);
    let yielding = phase(6);
    high_busy.store(false, Ordering::Relaxed);
    let after = phase(6);
    stop.store(true, Ordering::Relaxed);
    model.join().unwrap();
    eprintln!("low-priority launch rate: alone {alone:.0}/s, high busy {yielding:.0}/s, after {after:.0}/s");
    let usage = d.json(&["instance", "get", &low]);
    assert!(
        alone > 0.0,
        "the low-priority instance never launched: {usage}"
    );
    assert!(
        yielding < 0.6 * alone,
        "did not yield: {alone:.0}/s alone, {yielding:.0}/s next to a busy high-priority instance"
    );
    assert!(
        after > 1.6 * yielding,
        "did not recover: {yielding:.0}/s while yielding, {after:.0}/s after"
    );
}
