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
}

criterion_group!(benches, bench);
criterion_main!(benches);
