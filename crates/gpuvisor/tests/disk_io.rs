//! Disk I/O limits (`--disk-iops`, `--disk-bandwidth`) measured with fio inside a real
//! container: the rate fio gets is within 10 % of each limit, a live change (`instance scale`)
//! moves it, and taking the limit away lets fio run far above it (so the limit, not the
//! machine, is what held it). The container's disk and a volume are each limited.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{serial, Daemon};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

const NET: [&str; 4] = ["--net-prefix", "gdio", "--net-pool", "10.94.0.0/16"];

/// The busybox rootfs with Debian's fio and its libraries (scripts/make-fio-rootfs), once.
fn fio_rootfs() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("gv-fio-rootfs-{}", std::process::id()));
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-fio-rootfs");
        let st = Command::new(script).arg(&dir).status().unwrap();
        assert!(
            st.success(),
            "make-fio-rootfs failed (is fio installed? scripts/install-deps installs it)"
        );
        dir
    })
    .clone()
}

/// One fio job inside the instance for `secs` seconds, direct I/O (no page cache) on `file`:
/// its IOPS and bytes per second for the direction of `rw`.
fn fio(d: &Daemon, id: &str, file: &str, rw: &str, bs: &str, secs: u32) -> (f64, f64) {
    let cmd = format!(
        "fio --name=m --filename={file} --size=16M --rw={rw} --bs={bs} --direct=1 \
         --ioengine=psync --thread --time_based --runtime={secs} --ramp_time=1 \
         --output-format=json"
    );
    let (code, out, err) = d.exec(id, &cmd);
    assert_eq!(code, 0, "fio {rw} failed: {err}\n{out}");
    let v: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &v["jobs"][0];
    let side = if rw.contains("read") { "read" } else { "write" };
    (
        job[side]["iops"].as_f64().unwrap(),
        job[side]["bw_bytes"].as_f64().unwrap(),
    )
}

fn within(what: &str, got: f64, limit: f64) {
    eprintln!("{what}: {got:.1} against a limit of {limit}");
    assert!(
        (got - limit).abs() <= limit * 0.10,
        "{what}: {got:.1}, not within 10 % of the limit {limit}"
    );
}

#[test]
fn fio_inside_a_container_runs_at_its_disk_limits() {
    let _g = serial();
    let d = Daemon::start(&NET);
    let root = fio_rootfs();
    d.json(&["image", "import", root.to_str().unwrap(), "--name", "fio"]);
    d.json(&["volume", "create", "data", "--size", "256MiB"]);
    let made = d.json(&[
        "instance",
        "create",
        "--image",
        "fio",
        "--wait",
        "--memory",
        "256MiB",
        "--volume",
        "data:/data",
        "--disk-iops",
        "read=200",
        "--disk-bandwidth",
        "write=8MiB",
        "--",
        "sleep",
        "1000000",
    ]);
    assert_eq!(made["state"], "running", "{made}");
    let id = made["id"].as_str().unwrap().to_string();
    let got = d.json(&["instance", "get", &id]);
    assert_eq!(
        got["disk_io"],
        serde_json::json!({"read_iops": 200, "write_bps": 8 << 20}),
        "{got}"
    );
    let shown = d.cli(&["-o", "table", "instance", "get", &id]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("read 200 IOPS; write 8MiB/s"),
        "instance get does not show the limits: {shown}"
    );

    // The files first, written out (`sync`: a direct read of a range with dirty pages flushes
    // them first, from the reader's cgroup, at the write limit: 2 s for each file here).
    let (c, _, err) = d.exec(
        &id,
        "dd if=/dev/zero of=/root/f bs=1M count=16 && dd if=/dev/zero of=/data/f bs=1M count=16 && sync",
    );
    assert_eq!(c, 0, "{err}");

    within(
        "random 4k reads, container disk (IOPS)",
        fio(&d, &id, "/root/f", "randread", "4k", 5).0,
        200.0,
    );
    within(
        "random 4k reads, volume (IOPS)",
        fio(&d, &id, "/data/f", "randread", "4k", 5).0,
        200.0,
    );
    within(
        "sequential 1M writes, container disk (MiB/s)",
        fio(&d, &id, "/root/f", "write", "1M", 5).1 / f64::from(1 << 20),
        8.0,
    );

    // Live: a new read limit, the write limit taken away.
    d.json(&[
        "instance",
        "scale",
        &id,
        "--disk-iops",
        "read=400",
        "--disk-bandwidth",
        "write=0",
    ]);
    let got = d.json(&["instance", "get", &id]);
    assert_eq!(
        got["disk_io"],
        serde_json::json!({"read_iops": 400}),
        "{got}"
    );
    within(
        "random 4k reads after the change (IOPS)",
        fio(&d, &id, "/root/f", "randread", "4k", 5).0,
        400.0,
    );
    let free_write = fio(&d, &id, "/root/f", "write", "1M", 3).1 / f64::from(1 << 20);
    eprintln!("sequential 1M writes without a limit: {free_write:.1} MiB/s");
    assert!(
        free_write > 16.0,
        "writes stayed near the old limit once it was taken away: {free_write:.1} MiB/s"
    );
    // No limit at all: the machine's own rate, far above the limits above (else they proved
    // nothing).
    d.json(&["instance", "scale", &id, "--disk-iops", "0"]);
    let free_read = fio(&d, &id, "/root/f", "randread", "4k", 3).0;
    eprintln!("random 4k reads without a limit: {free_read:.0} IOPS");
    assert!(
        free_read > 1200.0,
        "reads without a limit ran at {free_read:.0} IOPS: too slow here to show the limits"
    );
    assert!(
        d.json(&["instance", "get", &id])["disk_io"].is_null(),
        "limits left after all were taken away"
    );

    // Bad values are refused with a clear error, and nothing changes.
    let out = d.cli(&["instance", "scale", &id, "--disk-iops", "read=3"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("disk read IOPS 3"), "{err}");
    let out = d.cli(&[
        "instance",
        "scale",
        &id,
        "--disk-bandwidth",
        "sideways=1MiB",
    ]);
    assert!(!out.status.success());

    // Stopped: stored, applied at the next start.
    d.json(&["instance", "stop", &id, "--wait"]);
    d.json(&["instance", "scale", &id, "--disk-iops", "read=300"]);
    d.json(&["instance", "start", &id, "--wait"]);
    within(
        "random 4k reads after a stop, a change and a start (IOPS)",
        fio(&d, &id, "/root/f", "randread", "4k", 5).0,
        300.0,
    );
    d.terminate_all();
    std::fs::remove_dir_all(root).unwrap();
}
