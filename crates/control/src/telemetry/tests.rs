#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use gpuvisor_node::telemetry::XidEvent;

fn meta(i: u32) -> GpuMeta {
    GpuMeta {
        uuid: format!("GPU-{i}"),
        index: i,
        model: "H100-80GB".into(),
        model_name: "NVIDIA H100 80GB HBM3".into(),
        pci_address: format!("0000:{:02x}:00.0", 0x1b + i),
    }
}

fn reading(i: u32, temp: f64) -> GpuReading {
    GpuReading {
        uuid: format!("GPU-{i}"),
        index: i,
        util: Some(50.0),
        mem_used: Some(2 << 30),
        mem_total: 80 << 30,
        temp_c: Some(temp),
        power_w: Some(350.5),
        sm_clock_mhz: Some(1980),
        mem_clock_mhz: Some(2619),
        throttle_reasons: Some(0),
        pcie_tx_kbs: Some(1000),
        pcie_rx_kbs: Some(3000),
        ecc_corrected: Some(0),
        ecc_uncorrected: Some(0),
        xids: vec![],
        lost: false,
        simulated: true,
    }
}

fn inst(id: &str, cpu_ns: u64, rx: u64) -> InstanceReading {
    InstanceReading {
        id: id.into(),
        cpu_ns: Some(cpu_ns),
        mem_bytes: Some(4096),
        disk_used: Some(1 << 20),
        disk_total: Some(1 << 30),
        net_rx_bytes: Some(rx),
        net_tx_bytes: Some(0),
        ..Default::default()
    }
}

#[test]
fn renders_dcgm_golden_lines() {
    let t = Telemetry::new("host1", vec![meta(0)]);
    let tenants = BTreeMap::from([("abc".to_string(), "acme".to_string())]);
    t.ingest(
        1_000,
        HostSample {
            gpus: vec![reading(0, 40.0)],
            instances: vec![inst("abc", 0, 0)],
            xids: vec![],
        },
        &tenants,
    );
    t.ingest(
        2_000,
        HostSample {
            gpus: vec![reading(0, 41.0)],
            instances: vec![inst("abc", 500_000_000, 2048)],
            xids: vec![],
        },
        &tenants,
    );
    let text = t.render(Format::Text004);
    let l = r#"{gpu="0",UUID="GPU-0",pci_bus_id="0000:1b:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="host1",simulated="true"}"#;
    for line in [
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge".to_string(),
        format!("DCGM_FI_DEV_GPU_UTIL{l} 50"),
        format!("DCGM_FI_DEV_FB_USED{l} 2048"),
        format!("DCGM_FI_DEV_FB_FREE{l} 79872"),
        format!("DCGM_FI_DEV_GPU_TEMP{l} 41"),
        format!("DCGM_FI_DEV_POWER_USAGE{l} 350.5"),
        format!("DCGM_FI_DEV_SM_CLOCK{l} 1980"),
        format!("DCGM_FI_DEV_MEM_CLOCK{l} 2619"),
        format!("DCGM_FI_DEV_XID_ERRORS{l} 0"),
        format!("DCGM_FI_DEV_PCIE_TX_THROUGHPUT{l} 1000"),
        format!("DCGM_FI_DEV_PCIE_RX_THROUGHPUT{l} 3000"),
        "# TYPE DCGM_FI_DEV_PCIE_TX_THROUGHPUT counter".to_string(),
        format!("gpuvisor_gpu_cordoned{l} 0"),
        r#"gpuvisor_instance_cpu_percent{instance="abc",tenant="acme",Hostname="host1"} 50"#
            .to_string(),
        r#"gpuvisor_instance_memory_bytes{instance="abc",tenant="acme",Hostname="host1"} 4096"#
            .to_string(),
        r#"gpuvisor_instance_network_receive_bytes_total{instance="abc",tenant="acme",Hostname="host1"} 2048"#
            .to_string(),
        "# TYPE gpuvisor_instance_network_receive_bytes_total counter".to_string(),
    ] {
        assert!(text.lines().any(|x| x == line), "missing {line:?} in\n{text}");
    }
    assert!(!text.contains("# EOF"));
    let om = t.render(Format::OpenMetrics);
    assert!(om.ends_with("# EOF\n"));
    assert!(om.contains("# TYPE gpuvisor_instance_network_receive_bytes counter\n"));
    assert!(om.contains("# TYPE DCGM_FI_DEV_PCIE_TX_THROUGHPUT unknown\n"));

    // A stopped instance is no longer exported, but its history stays queryable.
    t.ingest(
        3_000,
        HostSample {
            gpus: vec![reading(0, 41.0)],
            ..Default::default()
        },
        &tenants,
    );
    assert!(!t.render(Format::Text004).contains("instance=\"abc\""));
    let (_, s) = t.instance_history("abc", 0, 1000);
    assert_eq!(s[1].metric, "memory_bytes");
    assert_eq!(s[1].points.len(), 2);
}

#[test]
fn thermal_alarm_with_hysteresis() {
    let t = Telemetry::new("h", vec![meta(0)]);
    let go = |at, temp| {
        t.ingest(
            at,
            HostSample {
                gpus: vec![reading(0, temp)],
                ..Default::default()
            },
            &BTreeMap::new(),
        )
    };
    assert!(go(1000, 80.0).is_empty());
    let a = go(2000, 86.0);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].kind, "thermal");
    assert!(go(3000, 90.0).is_empty(), "one alarm while hot");
    assert!(go(4000, 82.0).is_empty(), "within the hysteresis");
    assert_eq!(go(5000, 70.0)[0].kind, "thermal_cleared");
    assert!(!t.is_cordoned("GPU-0"), "heat alone does not cordon");
    t.configure(TelemetryConfig {
        thermal_ceiling_c: 60.0,
        ..Default::default()
    });
    assert_eq!(go(6000, 70.0)[0].kind, "thermal");
}

#[test]
fn fatal_xids_cordon_and_others_do_not() {
    let t = Telemetry::new("h", vec![meta(0), meta(1)]);
    let mut r0 = reading(0, 40.0);
    r0.xids = vec![13];
    let a = t.ingest(
        1000,
        HostSample {
            gpus: vec![r0],
            xids: vec![XidEvent {
                pci_address: "0000:1c:00".into(),
                xid: 79,
                detail: "pid=1, GPU has fallen off the bus.".into(),
            }],
            ..Default::default()
        },
        &BTreeMap::new(),
    );
    assert_eq!(a.len(), 2);
    assert!(!a[0].cordoned && a[0].message.contains("XID 13"));
    assert!(a[1].cordoned && a[1].gpu == "GPU-1");
    assert!(a[1].message.contains("fallen off the bus"));
    assert!(!t.is_cordoned("GPU-0"));
    assert!(t.is_cordoned("GPU-1"));
    let stats = t.gpu_stats();
    assert_eq!(stats[1].last_xid, Some(79));
    assert!(stats[1].cordoned.as_deref().unwrap().contains("XID 79"));
    let text = t.render(Format::Text004);
    assert!(text.contains("gpuvisor_gpu_xid_errors_total{gpu=\"0\""));

    let mut lost = reading(0, 40.0);
    lost.lost = true;
    let a = t.ingest(
        2000,
        HostSample {
            gpus: vec![lost.clone()],
            ..Default::default()
        },
        &BTreeMap::new(),
    );
    assert_eq!(a[0].kind, "gpu_lost");
    assert!(t.is_cordoned("GPU-0"));
    let a = t.ingest(
        3000,
        HostSample {
            gpus: vec![lost],
            ..Default::default()
        },
        &BTreeMap::new(),
    );
    assert!(a.is_empty(), "cordoned once");
}

#[test]
fn instance_history_is_bounded_by_count() {
    let t = Telemetry::new("h", vec![]);
    t.configure(TelemetryConfig {
        max_instances: 3,
        ..Default::default()
    });
    for s in 0..10i64 {
        t.ingest(
            1000 * (s + 1),
            HostSample {
                instances: vec![inst(&format!("i{s}"), 0, 0)],
                ..Default::default()
            },
            &BTreeMap::new(),
        );
    }
    assert_eq!(t.state().instances.len(), 3);
    assert!(t.state().instances.contains_key("i9"));
}

#[test]
fn parses_since_and_durations() {
    assert_eq!(parse_duration_ms("10m"), Some(600_000));
    assert_eq!(parse_duration_ms("7d"), Some(604_800_000));
    assert_eq!(parse_duration_ms("5x"), None);
    assert_eq!(parse_since("1h", 10_000_000), Some(6_400_000));
    assert_eq!(parse_since("1234", 0), Some(1234));
}
