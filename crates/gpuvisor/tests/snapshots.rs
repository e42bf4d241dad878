//! Snapshots of containers (issue 14, item 1): the container disk (the overlay's upper layer)
//! and the volumes, frozen together and copied; `instance restore` rolls both back, `instance
//! create --from-snapshot` clones the disk; a snapshot another instance starts from cannot be
//! removed; another tenant neither sees nor uses one. (VMs: tests/vm.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{serial, Daemon, SLEEP};
use serde_json::Value;
use std::time::{Duration, Instant};

const NET: [&str; 4] = ["--net-prefix", "gsn", "--net-pool", "10.89.0.0/16"];

fn out_of(d: &Daemon, id: &str, cmd: &str) -> String {
    let (code, out, err) = d.exec(id, cmd);
    assert_eq!(code, 0, "{cmd}: {err}\n{}", d.log());
    out.trim().to_string()
}

fn wait_running(d: &Daemon, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = d.json(&["instance", "get", id]);
        if v["state"] == "running" {
            return v;
        }
        assert!(Instant::now() < deadline, "not running: {v}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn snapshot_dirs(d: &Daemon) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(d.data().join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

#[test]
fn container_snapshots_roll_back_clone_and_stay_with_their_tenant() {
    let _g = serial();
    let d = Daemon::start(&NET);
    d.import_busybox();
    d.json(&["volume", "create", "data", "--size", "64MiB"]);
    let small = [
        "--vcpus",
        "1",
        "--memory",
        "64MiB",
        "--container-disk",
        "64MiB",
    ];
    let mut args: Vec<&str> = small.to_vec();
    args.extend(["--volume", "data:/data"]);
    // PID 1 keeps both filesystems' metadata churning (files made and renamed over), so a copy
    // that is not of one frozen instant shows in fsck; SIGTERM ends it at once.
    args.extend([
        "--",
        "sh",
        "-c",
        "trap 'exit 0' TERM; while :; do date > /root/w; mv /root/w /root/w2; date > /data/w; mv /data/w /data/w2; done",
    ]);
    let id = d.create(&args);
    out_of(
        &d,
        &id,
        "echo one > /root/f && echo v-one > /data/f && sync",
    );

    let s = d.json(&["instance", "snapshot", &id, "first"]);
    assert_eq!(s["state"], "ready", "{s}");
    assert_eq!(s["runtime"], "container", "{s}");
    assert_eq!(s["memory"], false, "{s}");
    assert_eq!(s["consistency"], "filesystem freeze", "{s}");
    assert_eq!(s["volumes"], serde_json::json!(["data"]), "{s}");
    assert!(s["bytes"].as_u64().unwrap() > 0, "{s}");
    let sid = s["id"].as_str().unwrap().to_string();
    let dir = d.data().join("snapshots").join(&sid);
    use std::os::unix::fs::MetadataExt;
    for f in ["disk.img", "vol-data.img", "snapshot.json"] {
        let m = std::fs::metadata(dir.join(f)).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600, "{f}: tenant data is root's only");
    }
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o750);
    // Both copies are of one frozen instant: clean to a full fsck despite the writer.
    for f in ["disk.img", "vol-data.img"] {
        let out = std::process::Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(dir.join(f))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fsck of the snapshot's {f}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The instance was frozen only while it was copied: it writes again.
    out_of(&d, &id, "echo after > /root/g && sync");

    // A container has no running state to save; a name is taken once per tenant; bad names.
    let out = d.cli(&["instance", "snapshot", &id, "mem", "--memory"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not its processes"), "{err}");
    let out = d.cli(&["instance", "snapshot", &id, "first"]);
    assert!(!out.status.success(), "a second snapshot named first");
    let out = d.cli(&["instance", "snapshot", &id, "../x"]);
    assert!(!out.status.success(), "a snapshot named ../x");
    let list = d.json(&["snapshot", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(
        snapshot_dirs(&d),
        vec![sid.clone()],
        "refused snapshots left files"
    );

    // Restore: disk and volume back to the snapshot; files made since are gone.
    out_of(
        &d,
        &id,
        "echo two > /root/f && echo v-two > /data/f && touch /root/new && sync",
    );
    d.json(&["instance", "restore", &id, "first"]);
    wait_running(&d, &id);
    assert_eq!(out_of(&d, &id, "cat /root/f"), "one");
    assert_eq!(out_of(&d, &id, "cat /data/f"), "v-one");
    assert_eq!(
        out_of(&d, &id, "test -e /root/new && echo yes || echo no"),
        "no"
    );
    // The snapshot itself did not change with what the restored instance writes.
    out_of(&d, &id, "echo three > /root/f && sync");

    // Restore is once: a plain stop and start gives the ephemeral disk fresh, the volume kept.
    d.json(&["instance", "stop", &id, "--wait"]);
    d.json(&["instance", "start", &id, "--wait"]);
    assert_eq!(
        out_of(&d, &id, "test -e /root/f && echo yes || echo no"),
        "no"
    );
    assert_eq!(out_of(&d, &id, "cat /data/f"), "v-one");

    // Clone: a new instance whose disk starts from the snapshot, at every start.
    let mut clone_args = vec!["--from-snapshot", "first"];
    clone_args.extend(small);
    clone_args.extend(SLEEP);
    let clone = d.create(&clone_args);
    assert_eq!(out_of(&d, &clone, "cat /root/f"), "one");
    let c = d.json(&["instance", "get", &clone]);
    assert_eq!(
        c["image"],
        d.json(&["instance", "get", &id])["image"],
        "{c}"
    );

    // A snapshot an instance starts from stays.
    let out = d.cli(&["snapshot", "rm", "first"]);
    assert!(!out.status.success(), "removed while the clone uses it");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&clone), "{err}");

    // Another tenant: sees nothing, uses nothing, by name or by id.
    d.json(&["tenant", "create", "mallory"]);
    let mallory = d.json(&["key", "create", "--tenant", "mallory"])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        d.json_as(&mallory, &["snapshot", "list"]),
        serde_json::json!([])
    );
    for probe in ["first", sid.as_str()] {
        let out = d.cli_as(&mallory, &["snapshot", "get", probe]);
        assert_eq!(out.status.code(), Some(3), "mallory got snapshot {probe}");
        let out = d.cli_as(&mallory, &["snapshot", "rm", probe]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "mallory removed snapshot {probe}"
        );
        let mut a = vec![
            "instance",
            "create",
            "--image",
            "busybox",
            "--from-snapshot",
            probe,
        ];
        a.extend(small);
        a.extend(SLEEP);
        let out = d.cli_as(&mallory, &a);
        assert!(!out.status.success(), "mallory cloned snapshot {probe}");
        let out = d.cli_as(&mallory, &["instance", "restore", &id, probe]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "mallory restored alice's instance"
        );
        let out = d.cli_as(&mallory, &["instance", "snapshot", &id, "stolen"]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "mallory snapshotted alice's instance"
        );
    }
    // Mallory's own instance restored from, or cloned from, Alice's snapshot: not found.
    let mut own = vec!["instance", "create", "--image", "busybox", "--wait"];
    own.extend(small);
    own.extend(SLEEP);
    let hers = d.json_as(&mallory, &own)["id"]
        .as_str()
        .unwrap()
        .to_string();
    for probe in ["first", sid.as_str()] {
        let out = d.cli_as(&mallory, &["instance", "restore", &hers, probe]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(
            err.contains("snapshot") && err.contains("not found"),
            "{err}"
        );
        let mut a = vec!["instance", "create", "--from-snapshot", probe];
        a.extend(small);
        a.extend(SLEEP);
        let out = d.cli_as(&mallory, &a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(
            err.contains("snapshot") && err.contains("not found"),
            "{err}"
        );
    }
    d.json_as(&mallory, &["instance", "terminate", &hers, "--wait"]);
    assert_eq!(snapshot_dirs(&d), vec![sid.clone()]);

    // Once the clone is gone the snapshot can go; nothing of it is left.
    d.json(&["instance", "terminate", &clone, "--wait"]);
    d.json(&["snapshot", "rm", "first"]);
    assert!(snapshot_dirs(&d).is_empty(), "{:?}", snapshot_dirs(&d));
    assert_eq!(d.json(&["snapshot", "list"]), serde_json::json!([]));
    d.json(&["instance", "terminate", &id, "--wait"]);
    let leaks = d.leaks(&[id, clone, hers]);
    assert!(leaks.is_empty(), "{leaks:?}");
}
