//! One placement decision over the 1213-node openb cluster (6212 GPUs), half full, for each
//! policy. The cluster is built in code with the openb node mix so the bench needs no files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use gpuvisor_scheduler::{
    rng::SplitMix64, Gpu, GpuDemand, GpuKind, Node, Policy, Request, Scheduler,
};
use std::hint::black_box;

fn cluster() -> Vec<Node> {
    // (count, cpu milli, mem MiB, gpus, model): the openb mix, 1213 nodes, 6212 GPUs.
    let mix = [
        (549, 96_000, 786_432, 8, "G2"),
        (6, 96_000, 393_216, 0, "G2"),
        (421, 64_000, 262_144, 2, "T4"),
        (39, 96_000, 786_432, 8, "G3"),
        (133, 64_000, 262_144, 2, "P100"),
        (26, 96_000, 393_216, 8, "V100M32"),
        (38, 64_000, 262_144, 5, "V100M16"),
        (1, 64_000, 262_144, 2, "A10"),
    ];
    let mut nodes = Vec::new();
    for (count, cpu, mem, gpus, model) in mix {
        for _ in 0..count {
            let g = (0..gpus)
                .map(|_| Gpu::new(model, 0, GpuKind::Shareable))
                .collect();
            nodes.push(Node::new(format!("n{}", nodes.len()), cpu, mem, g));
        }
    }
    nodes
}

fn workload(rng: &mut SplitMix64, n: usize) -> Vec<Request> {
    (0..n)
        .map(|_| {
            let gpu = match rng.below(10) {
                0 => GpuDemand::None,
                1..=4 => GpuDemand::Whole(1),
                5 => GpuDemand::Whole(1 << rng.below(4)),
                _ => GpuDemand::Fraction {
                    milli: [230, 320, 470, 650, 810][rng.below(5) as usize],
                    vram_mib: 0,
                },
            };
            Request {
                cpu_milli: 4000 * (1 + rng.below(4)),
                memory_mib: 16_384 * (1 + rng.below(3)),
                gpu,
                ..Request::default()
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut rng = SplitMix64::new(42);
    let reqs = workload(&mut rng, 6000);
    for policy in [Policy::GvFrag, Policy::Fgd, Policy::BestFit] {
        let mut s = Scheduler::new(cluster(), policy, 42).unwrap();
        s.set_target_workload(&reqs);
        for (i, r) in reqs.iter().take(3000).enumerate() {
            let _ = s.place(i as u64, r);
        }
        let probe = reqs[3000..3100].to_vec();
        let mut k = 0;
        c.bench_function(&format!("decide/{policy}/1213 nodes half full"), |b| {
            b.iter(|| {
                k = (k + 1) % probe.len();
                black_box(s.decide(black_box(&probe[k])).ok())
            })
        });
        // Decide + commit + release: the node changes, so one node is re-evaluated next time.
        let mut id = 1_000_000;
        c.bench_function(&format!("place+release/{policy}/1213 nodes"), |b| {
            b.iter(|| {
                k = (k + 1) % probe.len();
                id += 1;
                if s.place(id, &probe[k]).is_ok() {
                    let _ = s.release(id);
                }
            })
        });
    }

    // gvfrag with pool pressure switched on: a third of the GPU pods pinned to one model (as
    // the gpu-spec:0.33 family), spread over the openb models by their GPU counts.
    let pinned = pin(&mut rng, &reqs, 3);
    let mut s = Scheduler::new(cluster(), Policy::GvFrag, 42).unwrap();
    s.set_target_workload(&pinned);
    for (i, r) in pinned.iter().take(3000).enumerate() {
        let _ = s.place(i as u64, r);
    }
    let probe = pinned[3000..3100].to_vec();
    let mut k = 0;
    c.bench_function("decide/gvfrag/1213 nodes half full, 1/3 pinned", |b| {
        b.iter(|| {
            k = (k + 1) % probe.len();
            black_box(s.decide(black_box(&probe[k])).ok())
        })
    });
}

/// `reqs` with one GPU pod in `every` pinned to a model drawn by the cluster's GPU counts.
fn pin(rng: &mut SplitMix64, reqs: &[Request], every: u64) -> Vec<Request> {
    // GPUs per model in `cluster()`.
    let models = [
        ("G2", 549 * 8),
        ("T4", 421 * 2),
        ("G3", 39 * 8),
        ("P100", 133 * 2),
        ("V100M32", 26 * 8),
        ("V100M16", 38 * 5),
        ("A10", 1),
    ];
    let total: u64 = models.iter().map(|m| m.1).sum();
    reqs.iter()
        .map(|r| {
            let mut r = r.clone();
            if r.gpu != GpuDemand::None && rng.below(every) == 0 {
                let mut x = rng.below(total);
                for (m, n) in models {
                    if x < n {
                        r.models = vec![m.to_string()];
                        break;
                    }
                    x -= n;
                }
            }
            r
        })
        .collect()
}

criterion_group!(benches, bench);
criterion_main!(benches);
