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
            "test -f /etc/gpuvisor/limiter.conf && test -f /run/gpuvisor/limiter.limits && test -f /run/gpuvisor/limiter.usage"
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
