//! MIG slices as schedulable devices, end to end: a daemon simulating one A100 in MIG mode and
//! one whole A100. `gpu mig create/destroy` go through the daemon, the new slice shows in
//! `gpu list` and is placed on only when asked for by its model, a container on it gets the
//! parent's node and the slice's capability nodes, destroy is refused while an instance holds
//! the slice, and the layout survives a daemon restart. Runs as root (CI does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{http_get, serial, Daemon};
use serde_json::Value;

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

fn slices(d: &Daemon) -> Vec<Value> {
    d.json(&["gpu", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["mig"].is_object())
        .cloned()
        .collect()
}

#[test]
fn mig_slices_are_schedulable_devices() {
    let _s = serial();
    let mut d = Daemon::start_with_gpus("1xA100-80GB:mig,1xA100-80GB", &[]);
    d.import_busybox();

    // GPU 0 is in MIG mode with no slice yet; GPU 1 is whole.
    let gpus = d.json(&["gpu", "list"]);
    assert_eq!(gpus.as_array().unwrap().len(), 2, "{gpus}");
    assert_eq!(gpus[0]["mig_enabled"], true);
    assert_eq!(gpus[1]["mig_enabled"], false);
    let parent = gpus[0]["uuid"].as_str().unwrap().to_string();

    // Changes need --yes; a tenant may not make them.
    let out = d.cli(&["gpu", "mig", "create", "0", "3g.40gb"]);
    assert_eq!(
        code(&out),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tenant = d.json(&["tenant", "create", "t1"]);
    let key = d.json(&[
        "key",
        "create",
        "--tenant",
        tenant["name"].as_str().unwrap(),
    ]);
    let tkey = key["secret"].as_str().unwrap().to_string();
    let out = d.cli_as(&tkey, &["gpu", "mig", "create", "0", "3g.40gb", "--yes"]);
    assert_eq!(
        code(&out),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An unknown profile is refused by name; a GPU not in MIG mode says how to enable it.
    let out = d.cli(&["gpu", "mig", "create", "0", "5g.99gb", "--yes"]);
    assert_eq!(code(&out), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("5g.99gb"));
    let out = d.cli(&["gpu", "mig", "create", "1", "1g.10gb", "--yes"]);
    assert_eq!(code(&out), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in MIG mode"));

    // Two 3g.40gb instances fill the GPU; a third does not fit.
    let gi = d.json(&["gpu", "mig", "create", "0", "3g.40gb", "--yes"]);
    assert_eq!(gi["profile"], "3g.40gb");
    assert_eq!(gi["compute_instances"].as_array().unwrap().len(), 1);
    let gi2 = d.json(&["gpu", "mig", "create", &parent, "3g.40gb", "--yes"]);
    let out = d.cli(&["gpu", "mig", "create", "0", "3g.40gb", "--yes"]);
    assert_eq!(
        code(&out),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = d.json(&["gpu", "mig", "list", "0"]);
    assert_eq!(state["instances"].as_array().unwrap().len(), 2, "{state}");

    // Both slices are in the inventory at once, as devices of their own.
    let s = slices(&d);
    assert_eq!(s.len(), 2, "{s:?}");
    for sl in &s {
        assert!(sl["uuid"].as_str().unwrap().starts_with("MIG-"), "{sl}");
        assert_eq!(sl["model"], "A100-80GB-3g.40gb");
        assert_eq!(sl["vram"], 40u64 << 30);
        assert_eq!(sl["mig"]["parent_uuid"], parent.as_str());
        assert_eq!(sl["mig"]["slices"], 3);
    }

    // A plain --gpus 1 takes the whole A100, never the MIG-mode GPU or a slice...
    let whole = d.create(&["--gpus", "1", "--memory", "64MiB", "--", "sleep", "1000000"]);
    let w = d.json(&["instance", "get", &whole]);
    assert_eq!(w["gpus"][0]["index"], 1, "{w}");
    let out = d.cli(&[
        "instance", "create", "--image", "busybox", "--gpus", "1", "--", "sleep", "1000",
    ]);
    assert_eq!(
        code(&out),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...a slice is asked for by model, whole, one per instance.
    for bad in [
        vec!["--gpu-fraction", "0.5", "--gpu-model", "A100-80GB-3g.40gb"],
        vec!["--gpus", "2", "--gpu-model", "A100-80GB-3g.40gb"],
    ] {
        let mut a = vec!["instance", "create", "--image", "busybox"];
        a.extend(bad);
        a.extend(["--", "sleep", "1000"]);
        let out = d.cli(&a);
        assert_eq!(
            code(&out),
            Some(5),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let on_slice_args = [
        "--gpus",
        "1",
        "--gpu-model",
        "A100-80GB-3g.40gb",
        "--memory",
        "64MiB",
        "--",
        "sleep",
        "1000000",
    ];
    let on_slice = d.create(&on_slice_args);
    let i = d.json(&["instance", "get", &on_slice]);
    let got = i["gpus"][0]["uuid"].as_str().unwrap().to_string();
    assert!(got.starts_with("MIG-"), "{i}");
    // Inside: the parent's node, exactly two capability nodes, and the slice's UUID.
    let (rc, out, err) = d.exec(
        &on_slice,
        "ls /dev/nvidia0 && ls /dev/nvidia-caps | wc -l && echo $NVIDIA_VISIBLE_DEVICES && ls /dev/nvidia1 2>&1",
    );
    assert_eq!(rc, 1, "{out} {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "/dev/nvidia0", "{out}");
    assert_eq!(lines[1].trim(), "2", "{out}");
    assert_eq!(lines[2], got, "{out}");
    // /metrics shows both slices with dcgm-exporter's MIG labels, this one allocated (the
    // sampler runs each second: wait for it to see the instance).
    let auth = format!("Bearer {}", d.key);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let text = loop {
        let (status, _, text) = http_get(d.port, "/metrics", &[("Authorization", &auth)]);
        assert_eq!(status, 200);
        let mine = text.lines().find(|l| {
            l.starts_with("gpuvisor_mig_slice_allocated{")
                && l.contains(&format!("mig_uuid=\"{got}\""))
        });
        if mine.is_some_and(|l| l.ends_with(" 1")) {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    let slice_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("gpuvisor_mig_slice_fb_total{"))
        .collect();
    assert_eq!(slice_lines.len(), 2, "{text}");
    for l in &slice_lines {
        assert!(
            l.contains("GPU_I_PROFILE=\"3g.40gb\"") && l.contains("gpu=\"0\""),
            "{l}"
        );
        assert!(l.ends_with(" 40960"), "{l}");
    }
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("gpuvisor_mig_slice_allocated{") && l.ends_with(" 0"))
            .count(),
        1,
        "{text}"
    );

    // The slice shows as allocated; the other slice is still free and takes the next one.
    let listed: Vec<Value> = slices(&d);
    let mine = listed.iter().find(|g| g["uuid"] == got.as_str()).unwrap();
    assert_eq!(mine["instances"][0], on_slice.as_str());
    let second = d.create(&on_slice_args);
    let s2 = d.json(&["instance", "get", &second]);
    assert_ne!(s2["gpus"][0]["uuid"], got.as_str());
    d.json(&["instance", "terminate", &second, "--wait"]);

    // Destroy is refused while an instance holds the slice, allowed after.
    let held_gi = listed.iter().find(|g| g["uuid"] == got.as_str()).unwrap()["mig"]["gi"]
        .as_u64()
        .unwrap()
        .to_string();
    let out = d.cli(&["gpu", "mig", "destroy", "0", &held_gi, "--yes"]);
    assert_eq!(
        code(&out),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&on_slice));
    d.json(&["instance", "terminate", &on_slice, "--wait"]);
    d.json(&["gpu", "mig", "destroy", "0", &held_gi, "--yes"]);
    let left = slices(&d);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_ne!(left[0]["uuid"], got.as_str());
    let kept = left[0]["uuid"].as_str().unwrap().to_string();

    // The layout outlives the daemon, with the same UUIDs.
    d.restart();
    let after = slices(&d);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0]["uuid"], kept.as_str());
    let gi2_id = gi2["id"].as_u64().unwrap();
    assert_eq!(after[0]["mig"]["gi"], gi2_id, "{after:?}");

    // A layout change made outside gpuvisor (as `nvidia-smi mig` would) is picked up by the
    // periodic sweep; an instance on a slice that vanished gets an event.
    let on_kept = d.create(&on_slice_args);
    let gpus = d.json(&["gpu", "list"]);
    let layout: Vec<(String, u64, bool)> = gpus
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["mig"].is_null())
        .map(|g| {
            (
                g["uuid"].as_str().unwrap().to_string(),
                g["vram"].as_u64().unwrap(),
                g["mig_enabled"].as_bool().unwrap(),
            )
        })
        .collect();
    let refs: Vec<(&str, u64, bool)> = layout
        .iter()
        .map(|(u, v, m)| (u.as_str(), *v, *m))
        .collect();
    let tool = gpuvisor_node::mig::SimulatedMig::persistent(
        &refs,
        d.data().join("dev").join("mig-state.json"),
    )
    .unwrap();
    gpuvisor_node::mig::destroy(&tool, "0", gi2_id as u32).unwrap();
    gpuvisor_node::mig::create(&tool, "0", "1g.10gb").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(45);
    loop {
        let s = slices(&d);
        if s.len() == 1 && s[0]["model"] == "A100-80GB-1g.10gb" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sweep did not pick up the change: {s:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let events = d.json(&["instance", "events", &on_kept]);
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "gpu_gone"),
        "{events}"
    );
    d.json(&["instance", "terminate", &on_kept, "--wait"]);
    d.json(&["instance", "terminate", &whole, "--wait"]);
    d.terminate_all();
}
