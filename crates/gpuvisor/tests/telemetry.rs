//! Telemetry end to end: a daemon with simulated GPUs and a running instance; `/metrics` in the
//! DCGM exporter's names, per-instance series with real cgroup and disk values, the history
//! API, `gpu top`, and alarms (thermal, XID) with cordoning that placement honours. Faults are
//! injected into simulated GPUs through `<data>/dev/nvidia<i>.fault`. Runs as root (CI does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{http_get as get, serial, Daemon};
use std::time::{Duration, Instant};

const TOKEN: &str = "scrape-token-0123456789";

/// The value of the first sample of `name` whose labels contain `label`.
fn value(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

fn wait_for(what: &str, d: &Daemon, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!(
        "timed out waiting for {what}\n--- daemon log ---\n{}",
        d.log()
    );
}

#[test]
fn metrics_history_alarms_and_cordoning() {
    let _s = serial();
    // Not the default network prefix: the instance's veth is named after it, and its counters
    // must still be found.
    let mut d = Daemon::start(&[
        "--metrics-token",
        TOKEN,
        "--thermal-ceiling",
        "80",
        "--net-prefix",
        "gtm",
        "--net-pool",
        "10.92.0.0/16",
    ]);
    d.import_busybox();
    let id = d.create(&[
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
        "sh",
        "-c",
        "head -c 20000000 /dev/zero > /data.bin; sleep 1000000",
    ]);
    let bearer = format!("Bearer {TOKEN}");
    let admin = format!("Bearer {}", d.key);

    // Who may scrape.
    assert_eq!(get(d.port, "/metrics", &[]).0, 401);
    assert_eq!(
        get(d.port, "/metrics", &[("Authorization", "Bearer nope")]).0,
        401
    );
    assert_eq!(get(d.port, "/metrics", &[("Authorization", &admin)]).0, 200);

    let inst = format!("instance=\"{id}\"");
    let mut text = String::new();
    wait_for("instance series with memory and disk use", &d, || {
        let (st, ctype, body) = get(d.port, "/metrics", &[("Authorization", &bearer)]);
        assert_eq!(st, 200);
        assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
        text = body;
        value(&text, "gpuvisor_instance_memory_bytes", &inst).is_some_and(|v| v > 0.0)
            && value(&text, "gpuvisor_instance_disk_used_bytes", &inst).is_some_and(|v| v > 15e6)
            && value(&text, "gpuvisor_instance_cpu_percent", &inst).is_some()
            && value(
                &text,
                "gpuvisor_instance_network_transmit_bytes_total",
                &inst,
            )
            .is_some()
            && value(
                &text,
                "gpuvisor_instance_network_receive_bytes_total",
                &inst,
            )
            .is_some()
    });
    // DCGM series for every GPU; the H100 (GPU 2) runs the whole-GPU instance.
    for g in 0..3 {
        let l = format!("gpu=\"{g}\"");
        for name in [
            "DCGM_FI_DEV_GPU_UTIL",
            "DCGM_FI_DEV_FB_USED",
            "DCGM_FI_DEV_FB_FREE",
            "DCGM_FI_DEV_GPU_TEMP",
            "DCGM_FI_DEV_POWER_USAGE",
            "DCGM_FI_DEV_SM_CLOCK",
            "DCGM_FI_DEV_MEM_CLOCK",
            "DCGM_FI_DEV_XID_ERRORS",
            "DCGM_FI_DEV_PCIE_TX_THROUGHPUT",
        ] {
            assert!(
                value(&text, name, &l).is_some(),
                "no {name} for {l}:\n{text}"
            );
        }
    }
    assert!(
        text.contains("modelName=\"NVIDIA H100 80GB HBM3\""),
        "{text}"
    );
    assert!(text.contains("simulated=\"true\""));
    assert_eq!(
        value(&text, "DCGM_FI_DEV_GPU_UTIL", "gpu=\"2\""),
        Some(100.0)
    );
    assert_eq!(value(&text, "DCGM_FI_DEV_GPU_UTIL", "gpu=\"0\""), Some(0.0));
    assert!(
        value(&text, "DCGM_FI_DEV_GPU_TEMP", "gpu=\"2\"")
            > value(&text, "DCGM_FI_DEV_GPU_TEMP", "gpu=\"0\"")
    );
    assert!(text.contains(&format!("{inst},tenant=\"admin\"")), "{text}");
    let (_, ctype, om) = get(
        d.port,
        "/metrics",
        &[
            ("Authorization", &bearer),
            ("Accept", "application/openmetrics-text; version=1.0.0"),
        ],
    );
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(om.ends_with("# EOF\n"));

    // History through the API and the CLI.
    let h = d.json(&["instance", "metrics", &id, "--since", "5m"]);
    let series = h["series"].as_array().unwrap();
    let mem = series
        .iter()
        .find(|s| s["metric"] == "memory_bytes")
        .unwrap();
    assert!(!mem["points"].as_array().unwrap().is_empty(), "{h}");
    assert_eq!(h["step_s"], 1);
    let g = d.json(&["gpu", "metrics", "2", "--since", "1m", "--step", "10s"]);
    assert_eq!(g["step_s"], 10);
    let util = g["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["metric"] == "util_percent")
        .unwrap();
    assert!(!util["points"].as_array().unwrap().is_empty(), "{g}");
    let top = d.json(&["gpu", "top", "-n", "1"]);
    assert_eq!(top.as_array().unwrap().len(), 3);
    assert_eq!(top[2]["instances"], 1);
    let table = d.cli(&["gpu", "top", "-n", "1"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("simulated"));

    // Alarms: heat on GPU 0 (no cordon), a fatal XID on GPU 2 (cordon).
    let dev = d.data().join("dev");
    std::fs::write(dev.join("nvidia0.fault"), "temp=95\n").unwrap();
    std::fs::write(dev.join("nvidia2.fault"), "xid=79\n").unwrap();
    wait_for("alarms", &d, || {
        let top = d.json(&["gpu", "top", "-n", "1"]);
        top[0]["alarms"][0] == "thermal" && top[2]["cordoned"].is_string()
    });
    let top = d.json(&["gpu", "top", "-n", "1"]);
    assert!(top[0]["cordoned"].is_null());
    assert_eq!(top[2]["last_xid"], 79);
    let events = d.json(&["instance", "events", &id]);
    assert!(
        events.as_array().unwrap().iter().any(|e| e["kind"] == "xid"
            && e["message"]
                .as_str()
                .unwrap()
                .contains("fallen off the bus")),
        "{events}"
    );
    let (_, _, text) = get(d.port, "/metrics", &[("Authorization", &bearer)]);
    assert_eq!(
        value(&text, "gpuvisor_gpu_cordoned", "gpu=\"2\""),
        Some(1.0)
    );
    assert_eq!(
        value(&text, "DCGM_FI_DEV_XID_ERRORS", "gpu=\"2\""),
        Some(79.0)
    );
    assert_eq!(
        value(&text, "gpuvisor_gpu_thermal_alarm", "gpu=\"0\""),
        Some(1.0)
    );

    // The cordoned H100 takes no new instance; the A100s still do.
    let out = d.cli(&[
        "instance",
        "create",
        "--image",
        "busybox",
        "--gpus",
        "1",
        "--gpu-model",
        "H100-80GB",
        "--",
        "sleep",
        "1000",
    ]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(dev.join("nvidia0.fault")).unwrap();
    let other = d.create(&["--gpus", "1", "--memory", "64MiB", "--", "sleep", "1000000"]);
    let o = d.json(&["instance", "get", &other]);
    assert_ne!(o["gpus"][0]["index"], 2);

    // The cordon is persisted: it survives a restart until an operator lifts it. The first
    // instance holds the H100: free it, so only the cordon stands in the way below.
    d.json(&["instance", "terminate", &id, "--wait"]);
    std::fs::remove_file(dev.join("nvidia2.fault")).unwrap();
    d.restart();
    let gpus = d.json(&["gpu", "list"]);
    assert!(
        gpus[2]["cordoned"].as_str().unwrap().contains("XID 79"),
        "{gpus}"
    );
    let h100 = [
        "instance",
        "create",
        "--image",
        "busybox",
        "--gpus",
        "1",
        "--gpu-model",
        "H100-80GB",
        "--memory",
        "64MiB",
        "--",
        "sleep",
        "1000000",
    ];
    assert_eq!(d.cli(&h100).status.code(), Some(6));
    // Tenants may not lift it; the admin may, once; then the H100 takes work again.
    d.json(&["tenant", "create", "t1"]);
    let tkey = d.json(&["key", "create", "--tenant", "t1"])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        d.cli_as(&tkey, &["gpu", "uncordon", "2"]).status.code(),
        Some(4)
    );
    let g = d.json(&["gpu", "uncordon", "2"]);
    assert!(g["cordoned"].is_null(), "{g}");
    assert_eq!(d.cli(&["gpu", "uncordon", "2"]).status.code(), Some(5));
    // A manual cordon (maintenance) with a reason, shown in `gpu list`, and persisted too.
    let g = d.json(&["gpu", "cordon", "2", "--reason", "fan swap"]);
    assert_eq!(g["cordoned"], "operator: fan swap");
    d.restart();
    assert_eq!(d.cli(&h100).status.code(), Some(6));
    let table = d.cli(&["gpu", "list"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("cordoned: operator: fan swap"));
    d.json(&["gpu", "uncordon", "2"]);
    let mut a = h100.to_vec();
    a.insert(4, "--wait");
    let v = d.json(&a);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["gpus"][0]["index"], 2, "{v}");
    d.terminate_all();
}
