//! Real instances, checked from the inside: namespaces, cgroup limits, CPU pinning, GPU device
//! nodes, seccomp, disks, volumes, tenants and their networks. Runs as root (CI does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{serial, Daemon};

#[test]
fn instance_sees_only_itself_and_its_gpu() {
    let _s = serial();
    let d = Daemon::start(&[]);
    d.import_busybox();
    let id = d.create(&[
        "--name",
        "iso",
        "--gpus",
        "1",
        "--gpu-model",
        "H100-80GB",
        "--vcpus",
        "1",
        "--memory",
        "128MiB",
        "--container-disk",
        "256MiB",
        "--",
        "sleep",
        "1000000",
    ]);
    let inst = d.json(&["instance", "get", &id]);
    let gpu_index = inst["gpus"][0]["index"].as_u64().unwrap();
    assert_eq!(gpu_index, 2, "the H100 is GPU 2");
    let cpus = inst["cpus"].as_array().unwrap();
    assert_eq!(cpus.len(), 1);

    // Hostname and PID namespace: only its own processes.
    let (rc, out, _) = d.exec(&id, "hostname; ls /proc | grep -E '^[0-9]+$' | wc -l");
    assert_eq!(rc, 0);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("iso"));
    let nprocs: u32 = lines.next().unwrap().trim().parse().unwrap();
    assert!(
        nprocs <= 5,
        "sees {nprocs} processes: not its own PID namespace"
    );

    // Pinned CPUs.
    let (_, out, _) = d.exec(&id, "grep Cpus_allowed_list /proc/self/status");
    assert_eq!(
        out.split_whitespace().last().unwrap(),
        cpus[0].to_string(),
        "{out}"
    );

    // GPU device nodes: its own GPU and the control devices, no other GPU.
    let (_, out, _) = d.exec(&id, "ls /dev | grep nvidia | sort | tr '\\n' ' '");
    assert_eq!(
        out.trim(),
        "nvidia-uvm nvidia-uvm-tools nvidia2 nvidiactl",
        "{out}"
    );
    let (_, env, _) = d.exec(&id, "env");
    let uuid = inst["gpus"][0]["uuid"].as_str().unwrap();
    assert!(
        env.contains(&format!("NVIDIA_VISIBLE_DEVICES={uuid}")),
        "{env}"
    );
    assert!(
        env.contains(&format!("CUDA_VISIBLE_DEVICES={uuid}")),
        "{env}"
    );
    assert!(env.contains(&format!("GPUVISOR_INSTANCE_ID={id}")), "{env}");
    assert!(env.contains("GPUVISOR_GPU_COUNT=1"), "{env}");

    // Devices cgroup: a GPU that is not ours cannot be created and opened.
    let (rc, _, _) = d.exec(&id, "mknod /tmp/other c 195 0 && cat /tmp/other");
    assert_ne!(rc, 0, "opening another GPU's device must fail");

    // Seccomp, no_new_privs, capabilities.
    let (_, status, _) = d.exec(&id, "cat /proc/self/status");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let capeff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    let caps = u64::from_str_radix(capeff.split_whitespace().last().unwrap(), 16).unwrap();
    assert_eq!(caps & (1 << 21), 0, "CAP_SYS_ADMIN must be dropped");
    let (rc, _, err) = d.exec(&id, "unshare -U true");
    assert_ne!(rc, 0, "unshare must be refused: {err}");
    let (rc, _, _) = d.exec(&id, "mkdir -p /mnt/x && mount -t tmpfs none /mnt/x");
    assert_ne!(rc, 0, "mount must be refused");
    let (rc, out, _) = d.exec(&id, "kprobe");
    assert_ne!(rc, 0, "keyctl must be refused: {out}");
    assert!(out.contains("Operation not permitted"), "{out}");

    // Masked and read-only /proc paths.
    for masked in [
        "/proc/keys",
        "/proc/timer_list",
        "/proc/kcore",
        "/proc/sched_debug",
    ] {
        let on_host = std::fs::read(masked).map(|b| b.len()).unwrap_or(0);
        if on_host > 0 {
            let (_, out, _) = d.exec(&id, &format!("head -c 64 {masked} | wc -c"));
            assert_eq!(out.trim(), "0", "{masked} must be masked");
        }
    }
    let (rc, _, _) = d.exec(&id, "echo 1 > /proc/sys/vm/drop_caches");
    assert_ne!(rc, 0, "/proc/sys must be read-only");
}

#[test]
fn memory_limit_oom_kills_only_the_offender() {
    let _s = serial();
    let d = Daemon::start(&[]);
    d.import_busybox();
    let a = d.create(&[
        "--vcpus",
        "1",
        "--memory",
        "64MiB",
        "--container-disk",
        "128MiB",
        "--",
        "sleep",
        "1000000",
    ]);
    let b = d.create(&[
        "--vcpus",
        "1",
        "--memory",
        "64MiB",
        "--container-disk",
        "128MiB",
        "--",
        "sleep",
        "1000000",
    ]);
    // dd allocates a 256 MiB buffer: four times the limit.
    let (rc, _, err) = d.exec(&a, "dd if=/dev/zero of=/dev/null bs=256M count=1");
    assert_eq!(
        rc, 137,
        "the hog must be SIGKILLed by the OOM killer: {err}"
    );
    for id in [&a, &b] {
        assert_eq!(d.json(&["instance", "get", id])["state"], "running");
        assert_eq!(d.exec(id, "echo alive").1.trim(), "alive");
    }
    let health = d.cli(&["instance", "list"]);
    assert!(health.status.success(), "daemon must keep serving");
    let cg = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/gpuvisor/{a}/memory.limit_in_bytes"
    ))
    .unwrap();
    assert_eq!(cg.trim(), (64u64 << 20).to_string());
}

#[test]
fn volume_survives_and_container_disk_does_not() {
    let _s = serial();
    let d = Daemon::start(&[]);
    d.import_busybox();
    let id = d.create(&[
        "--vcpus",
        "1",
        "--memory",
        "64MiB",
        "--container-disk",
        "100MiB",
        "--volume",
        "work:/workspace:64MiB",
        "--",
        "sleep",
        "1000000",
    ]);
    // The container disk is exactly the requested size.
    let (_, out, _) = d.exec(&id, "df -k / | tail -1");
    let total_kib: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        total_kib <= 100 * 1024 && total_kib > 80 * 1024,
        "root fs is {total_kib} KiB"
    );
    assert_eq!(
        std::fs::metadata(d.data().join(format!("disks/{id}.img")))
            .unwrap()
            .len(),
        100 << 20
    );
    assert_eq!(
        d.exec(&id, "echo keep > /workspace/k && echo lose > /root/l")
            .0,
        0
    );
    d.json(&["instance", "stop", &id, "--wait"]);
    d.json(&["instance", "start", &id, "--wait"]);
    assert_eq!(d.exec(&id, "cat /workspace/k").1.trim(), "keep");
    assert_ne!(
        d.exec(&id, "cat /root/l").0,
        0,
        "container disk must be wiped on stop"
    );
    // Volume in use: cannot be removed, cannot be mounted twice.
    assert_eq!(d.cli(&["volume", "rm", "work"]).status.code(), Some(5));
    let twice = d.cli(&[
        "instance",
        "create",
        "--image",
        "busybox",
        "--volume",
        "work:/w",
        "--memory",
        "64MiB",
        "--container-disk",
        "64MiB",
        "--",
        "true",
    ]);
    assert_eq!(
        twice.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&twice.stderr)
    );
    d.json(&["instance", "terminate", &id, "--wait"]);
    let id2 = d.create(&[
        "--vcpus",
        "1",
        "--memory",
        "64MiB",
        "--container-disk",
        "64MiB",
        "--volume",
        "work:/data",
        "--",
        "sleep",
        "1000000",
    ]);
    assert_eq!(d.exec(&id2, "cat /data/k").1.trim(), "keep");
    d.json(&["instance", "terminate", &id2, "--wait"]);
    assert!(
        d.leaks(&[id.clone(), id2.clone()]).is_empty(),
        "{:?}",
        d.leaks(&[id, id2])
    );
    let vols = d.json(&["volume", "list"]);
    assert_eq!(vols[0]["name"], "work");
    d.json(&["volume", "rm", "work"]);
    assert!(d.json(&["volume", "list"]).as_array().unwrap().is_empty());
}

#[test]
fn tenants_cannot_see_or_reach_each_other() {
    let _s = serial();
    let d = Daemon::start(&[]);
    d.import_busybox();
    d.json(&["tenant", "create", "alpha"]);
    d.json(&["tenant", "create", "beta"]);
    let ka = d.json(&["key", "create", "--tenant", "alpha"])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let kb = d.json(&["key", "create", "--tenant", "beta"])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let serve = [
        "--vcpus",
        "1",
        "--memory",
        "64MiB",
        "--container-disk",
        "64MiB",
        "--",
        "sh",
        "-c",
        "while true; do echo hi | nc -l -p 8080; done",
    ];
    let a1 = d.create_as(&ka, &serve);
    let a2 = d.create_as(&ka, &serve);
    let b1 = d.create_as(&kb, &serve);

    // API: beta sees nothing of alpha's; 404, not 403.
    let got = d.cli_as(&kb, &["instance", "get", &a1]);
    assert_eq!(
        got.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(String::from_utf8_lossy(&got.stderr).contains("not_found"));
    assert_eq!(
        d.cli_as(&kb, &["instance", "terminate", &a1]).status.code(),
        Some(3)
    );
    let listed = d.json_as(&kb, &["instance", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], b1.as_str());
    // Non-admin keys cannot manage tenants.
    assert_eq!(
        d.cli_as(&kb, &["tenant", "create", "gamma"]).status.code(),
        Some(4)
    );

    // Network: same tenant reaches, other tenant does not.
    let ip = |id: &str| {
        d.json(&["instance", "get", id])["ip"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (ip_a1, ip_b1) = (ip(&a1), ip(&b1));
    let out = d.cli_as(
        &ka,
        &[
            "instance", "exec", &a2, "--", "nc", "-w", "2", &ip_a1, "8080",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hi",
        "same tenant must connect"
    );
    // The other tenant's probes must be seen to run: `exec` failing (or `nc` missing) would
    // also produce no "hi".
    let cross = |key: &str, from: &str, to_ip: &str, what: &str| {
        let script = format!(
            "command -v nc >/dev/null 2>&1 || exit 97; r=$(nc -w 2 {to_ip} 8080 </dev/null); \
             echo \"probe-ran: $r\""
        );
        let out = d.cli_as(key, &["instance", "exec", from, "--", "sh", "-c", &script]);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success() && stdout.contains("probe-ran:"),
            "the {what} probe did not run ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!stdout.contains("probe-ran: hi"), "{what}: {stdout}");
    };
    cross(&kb, &b1, &ip_a1, "beta reached alpha");
    cross(&ka, &a1, &ip_b1, "alpha reached beta");

    // A revoked key is refused.
    let keys = d.json(&["key", "list"]);
    let kb_id = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["tenant"] == "beta")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.json(&["key", "revoke", &kb_id]);
    assert_eq!(d.cli_as(&kb, &["instance", "list"]).status.code(), Some(4));
    assert_eq!(
        d.cli_as("gv_not_a_key", &["instance", "list"])
            .status
            .code(),
        Some(4)
    );
    assert_eq!(d.cli_as("", &["instance", "list"]).status.code(), Some(4));
    // The admin still terminates beta's instance (Drop terminates all).
}
