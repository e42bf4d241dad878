//! Telemetry cost: one sampler tick with 8 simulated GPUs and 100 instances (host reads from a
//! fixture tree of cgroup v1 and veth counter files plus two `statvfs` per instance, then
//! ingest into the history) and one `/metrics` render. Prints a table for docs/bench.
//!
//! `cargo bench -p gpuvisor-control --bench telemetry`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use gpuvisor_control::telemetry::prom::Format;
use gpuvisor_control::telemetry::{GpuMeta, Telemetry};
use gpuvisor_node::gpu::{DeviceNode, GpuDevice};
use gpuvisor_node::telemetry::{
    container_usage, instance_reading, simulated_reading, GpuLoad, HostSample,
};
use gpuvisor_node::HostRoot;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const GPUS: u32 = 8;
const INSTANCES: usize = 100;

fn main() {
    let t = tempfile::tempdir().unwrap();
    let root = HostRoot::at(t.path());
    let data = t.path().join("data");
    let ids: Vec<String> = (0..INSTANCES).map(|i| format!("{i:012x}")).collect();
    for id in &ids {
        let w = |p: String, v: &str| {
            let p = root.path(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        };
        w(
            format!("/sys/fs/cgroup/cpuacct/gpuvisor/{id}/cpuacct.usage"),
            "123456789\n",
        );
        w(
            format!("/sys/fs/cgroup/memory/gpuvisor/{id}/memory.usage_in_bytes"),
            "4096000\n",
        );
        w(
            format!("/sys/class/net/gvh{id}/statistics/rx_bytes"),
            "1000\n",
        );
        w(
            format!("/sys/class/net/gvh{id}/statistics/tx_bytes"),
            "2000\n",
        );
        std::fs::create_dir_all(data.join("instances").join(id).join("disk")).unwrap();
        std::fs::create_dir_all(data.join("instances").join(id).join("volumes/v")).unwrap();
    }
    let gpus: Vec<GpuDevice> = (0..GPUS)
        .map(|i| GpuDevice {
            uuid: format!("GPU-{i:08x}-0000-0000-0000-000000000000"),
            index: i,
            model: "H100-80GB".into(),
            vram: 80 << 30,
            pci_address: format!("0000:{:02x}:00.0", 0x1b + i),
            numa_node: Some(0),
            node: DeviceNode {
                container_path: format!("/dev/nvidia{i}").into(),
                host_path: t.path().join(format!("nvidia{i}")),
                major: 195,
                minor: i,
            },
            driver: None,
            iommu_group: None,
            mig_enabled: false,
            mig: None,
        })
        .collect();
    let tel = Telemetry::new(
        "bench-host",
        gpus.iter()
            .map(|g| GpuMeta {
                uuid: g.uuid.clone(),
                index: g.index,
                model: g.model.clone(),
                model_name: "NVIDIA H100 80GB HBM3".into(),
                pci_address: g.pci_address.clone(),
            })
            .collect(),
    );
    let tenants: BTreeMap<String, String> = ids
        .iter()
        .map(|i| (i.clone(), "tenant-a".to_string()))
        .collect();
    let load = GpuLoad {
        running_milli: 500,
        limiter_used: 10 << 30,
        limiter_util_bp: 0,
    };

    let mut now = 1_700_000_000_000i64;
    let mut tick = || {
        let t0 = Instant::now();
        let readings = gpus.iter().map(|g| simulated_reading(g, &load)).collect();
        let instances = ids
            .iter()
            .map(|id| {
                let r = instance_reading(&root, id, container_usage(&root, &data, id, "gvhx"));
                // What a real instance adds: statvfs of its disk and one volume.
                let base = data.join("instances").join(id);
                let _ = nix::sys::statvfs::statvfs(&base.join("disk"));
                let _ = nix::sys::statvfs::statvfs(&base.join("volumes/v"));
                r
            })
            .collect();
        let read = t0.elapsed();
        let t1 = Instant::now();
        now += 1000;
        tel.ingest(
            now,
            HostSample {
                gpus: readings,
                instances,
                xids: vec![],
            },
            &tenants,
        );
        (read, t1.elapsed())
    };
    // Warm up past the first minute so minute aggregation is in the measurement.
    for _ in 0..120 {
        tick();
    }
    let n = 600;
    let (mut read, mut ingest) = (Duration::ZERO, Duration::ZERO);
    let mut ticks = Vec::with_capacity(n);
    for _ in 0..n {
        let (r, i) = tick();
        read += r;
        ingest += i;
        ticks.push(r + i);
    }
    ticks.sort();
    let mean_tick = (read + ingest) / n as u32;
    let mut renders = Vec::with_capacity(1000);
    let mut bytes = 0;
    for i in 0..1000 {
        let t0 = Instant::now();
        let text = tel.render(if i % 2 == 0 {
            Format::Text004
        } else {
            Format::OpenMetrics
        });
        renders.push(t0.elapsed());
        bytes = text.len();
    }
    renders.sort();
    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    println!("| measurement ({GPUS} simulated GPUs, {INSTANCES} instances) | value |");
    println!("|---|---|");
    println!("| host reads per tick (mean) | {} |", us(read / n as u32));
    println!("| ingest per tick (mean) | {} |", us(ingest / n as u32));
    println!("| sampler tick (mean) | {} |", us(mean_tick));
    println!("| sampler tick (p99) | {} |", us(ticks[n * 99 / 100]));
    println!(
        "| sampler CPU at 1 Hz | {:.3} % of one core |",
        mean_tick.as_secs_f64() * 100.0
    );
    println!("| /metrics render (median) | {} |", us(renders[500]));
    println!("| /metrics render (p99) | {} |", us(renders[990]));
    println!("| /metrics body | {bytes} bytes |");
}
