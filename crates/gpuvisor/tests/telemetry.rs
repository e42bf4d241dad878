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

    // The live stream (the console's "now"): a message per sample, the instance's history
    // then its GPU's, each from the newest point sent before; other tenants are refused
    // before the upgrade. It stays open (read by a thread, which answers pings) until the
    // instance is terminated below.
    let gpu_uuid = d.json(&["instance", "get", &id])["gpus"][0]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let stream_url = format!(
        "{}/v1/instances/{id}/metrics/ws?since=5s",
        d.endpoint().replacen("http", "ws", 1)
    );
    #[allow(clippy::result_large_err)] // tungstenite's own error type
    let open_at = |url: &str, key: &str| {
        let b = tungstenite::ClientRequestBuilder::new(url.parse().unwrap())
            .with_header("x-api-key", key.to_string());
        let s = common::connect(d.port);
        s.tcp()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        tungstenite::client::client(b, s)
    };
    #[allow(clippy::result_large_err)]
    let open_stream = |key: &str| open_at(&stream_url, key);
    // Refused with `status` before the upgrade.
    let refused = |url: &str, key: &str, status: u16, what: &str| match open_at(url, key) {
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            assert_eq!(r.status().as_u16(), status, "{what}")
        }
        Ok(_) => panic!("{what}: opened"),
        Err(e) => panic!("{what}: {e}"),
    };
    d.json(&["tenant", "create", "t0"]);
    let t0 = d.json(&["key", "create", "--tenant", "t0"])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    refused(&stream_url, &t0, 404, "another tenant's stream");
    let (mut ws, _) = open_stream(&d.key).expect("the metrics stream");
    let (tx, rx) = std::sync::mpsc::channel::<Result<serde_json::Value, String>>();
    let reader = std::thread::spawn(move || loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                if tx.send(Ok(serde_json::from_str(&t).unwrap())).is_err() {
                    return;
                }
            }
            Ok(tungstenite::Message::Close(f)) => {
                let f = f.map(|f| format!("{} {}", u16::from(f.code), f.reason));
                let _ = tx.send(Err(f.unwrap_or_default()));
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Err(format!("error: {e}")));
                return;
            }
        }
    });
    let newest = |m: &serde_json::Value| {
        m["histories"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|h| h["series"].as_array().unwrap())
            .filter_map(|s| s["points"].as_array().unwrap().last())
            .map(|p| p["t"].as_i64().unwrap())
            .max()
            .unwrap_or(0)
    };
    let points = |m: &serde_json::Value| -> Vec<i64> {
        m["histories"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|h| h["series"].as_array().unwrap())
            .flat_map(|s| s["points"].as_array().unwrap())
            .map(|p| p["t"].as_i64().unwrap())
            .collect()
    };
    let mut seen = Vec::new();
    for n in 0..4 {
        let m = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("no metrics message within 10 s")
            .expect("the stream closed");
        let h = m["histories"].as_array().unwrap();
        assert_eq!(
            (h[0]["kind"].as_str(), h[0]["id"].as_str()),
            (Some("instance"), Some(id.as_str())),
            "{m}"
        );
        assert!(
            h.iter()
                .any(|x| x["kind"] == "gpu" && x["id"] == gpu_uuid.as_str()),
            "no history of the instance's GPU: {m}"
        );
        let ts = points(&m);
        if n == 0 {
            let span = ts.iter().max().unwrap() - ts.iter().min().unwrap();
            assert!(span >= 1000, "the first message lacks the last 5 s: {m}");
        } else {
            // Each later message starts from the newest point sent before (that bucket again),
            // never earlier: nothing is sent twice but the newest point.
            let prev = *seen.last().unwrap();
            assert!(
                ts.iter().all(|t| *t >= prev),
                "a later message reaches back before the newest point sent ({prev}): {m}"
            );
        }
        seen.push(newest(&m));
    }
    assert!(
        seen.windows(2).all(|w| w[1] > w[0]),
        "the stream's messages did not move forward: {seen:?}"
    );
    // A stream's points are at most a minute apart: a coarser step is refused before the
    // upgrade.
    let coarse = stream_url.replace("since=5s", "step=5m");
    refused(&coarse, &d.key, 400, "a stream with a 5 min step");
    // A tenant holds at most 32 streams (this one and 31 more); the 33rd is refused before the
    // upgrade, and a place comes back when a stream closes. Requests refused for want of an
    // upgrade first: they give their place back (else the 31 below would not all open).
    for _ in 0..5 {
        let (status, _, _) = get(
            d.port,
            &format!("/v1/instances/{id}/metrics/ws"),
            &[("x-api-key", &d.key)],
        );
        assert_eq!(status, 400, "a stream asked without an upgrade");
    }
    let mut more: Vec<_> = (0..31)
        .map(|i| {
            open_stream(&d.key)
                .unwrap_or_else(|e| panic!("stream {}: {e}", i + 2))
                .0
        })
        .collect();
    refused(&stream_url, &d.key, 429, "a 33rd stream of one tenant");
    let mut last = more.pop().unwrap();
    last.get_mut()
        .tcp()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    last.close(None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        if let Ok((s, _)) = open_stream(&d.key) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "a closed stream's place never came back"
        );
        let _ = last.read();
        std::thread::sleep(Duration::from_millis(200));
    };
    more.push(again);
    refused(
        &stream_url,
        &d.key,
        429,
        "a 33rd stream after one was replaced",
    );
    drop(more);

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
    // Its metrics stream ends with it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let closed = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(_)) => {}
            Ok(Err(why)) => break why,
            Err(e) => panic!("the metrics stream stayed open after the instance ended: {e}"),
        }
    };
    assert_eq!(closed, "1000 the instance was terminated");
    reader.join().unwrap();
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

    // The GPUs' events, newest first, across the restarts: GPU 2's XID, then the operator's
    // cordon and the two lifts; GPU 0's heat. The admin's only.
    let ev = d.json(&["gpu", "events", "--gpu", "2"]);
    let kinds: Vec<&str> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds[..3], ["uncordoned", "cordoned", "uncordoned"], "{ev}");
    assert!(
        kinds.len() > 3 && kinds[3..].iter().all(|k| *k == "xid"),
        "{ev}"
    );
    assert!(
        ev[1]["message"].as_str().unwrap().contains("fan swap"),
        "{ev}"
    );
    assert!(
        ev[3]["message"]
            .as_str()
            .unwrap()
            .contains("fallen off the bus"),
        "{ev}"
    );
    let uuid2 = gpus[2]["uuid"].as_str().unwrap();
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .all(|e| e["index"] == 2 && e["gpu"] == uuid2),
        "{ev}"
    );
    let all = d.json(&["gpu", "events"]);
    let all = all.as_array().unwrap();
    assert!(
        all.windows(2)
            .all(|w| w[0]["at"].as_i64() >= w[1]["at"].as_i64()),
        "not newest first: {all:?}"
    );
    assert!(
        all.iter().any(|e| e["index"] == 0
            && e["kind"] == "thermal"
            && e["message"].as_str().unwrap().contains("ceiling")),
        "no thermal event of GPU 0: {all:?}"
    );
    assert_eq!(
        d.json(&["gpu", "events", "--limit", "2"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        d.cli_as(&tkey, &["gpu", "events"]).status.code(),
        Some(4),
        "a tenant read the host's GPU events"
    );
    let bad = d.cli(&["gpu", "events", "--since", "yesterday"]);
    assert_ne!(bad.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("since \"yesterday\""));
    d.terminate_all();
}
