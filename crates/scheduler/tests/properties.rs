//! Property tests: never over-allocate, constraints respected, same seed same placements,
//! preemption never evicts equal or higher priority and always frees enough.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use gpuvisor_scheduler::{Gpu, GpuDemand, GpuKind, Node, Policy, Request, Scheduler, MILLI};
use proptest::prelude::*;

const MODELS: [&str; 3] = ["A100", "T4", "V100"];

fn arb_node() -> impl Strategy<Value = Node> {
    (
        1u64..=64,
        1u64..=256,
        0usize..=8,
        0usize..3,
        prop::sample::select(vec![GpuKind::Shareable, GpuKind::WholeOnly, GpuKind::Mig]),
        any::<bool>(),
    )
        .prop_map(|(cpus, mem_gib, n, model, kind, topo)| {
            let gpus = (0..n)
                .map(|i| {
                    let mut g = Gpu::new(MODELS[model], 16_384, kind);
                    if topo {
                        g.numa = Some((i / 4) as u32);
                        g.nvlink_peers = if i % 2 == 0 {
                            1 << (i + 1)
                        } else {
                            1 << (i - 1)
                        } & ((1u64 << n) - 1);
                    }
                    g
                })
                .collect();
            Node::new("n", cpus * 1000, mem_gib * 1024, gpus)
        })
}

fn arb_request() -> impl Strategy<Value = Request> {
    (
        0u64..=32_000,
        0u64..=65_536,
        prop_oneof![
            Just(GpuDemand::None),
            (1u32..=4).prop_map(GpuDemand::Whole),
            (1u32..=1000, 0u64..=8192).prop_map(|(m, v)| GpuDemand::Fraction {
                milli: m,
                vram_mib: v
            }),
        ],
        prop::option::of(0usize..3),
        0u32..4,
        any::<bool>(),
    )
        .prop_map(|(cpu, mem, gpu, model, priority, interruptible)| Request {
            cpu_milli: cpu,
            memory_mib: mem,
            gpu,
            models: model
                .map(|m| vec![MODELS[m].to_string()])
                .unwrap_or_default(),
            priority,
            interruptible,
            passthrough: false,
        })
}

fn check_invariants(s: &Scheduler, original: &[Node]) {
    for (n, o) in s.nodes().iter().zip(original) {
        let mut cpu = 0;
        let mut mem = 0;
        let mut milli = vec![0u32; o.gpus.len()];
        let mut vram = vec![0u64; o.gpus.len()];
        for (_, r, p) in s.placements() {
            if s.nodes()[p.node].name == n.name && std::ptr::eq(&s.nodes()[p.node], n) {
                cpu += r.cpu_milli;
                mem += r.memory_mib;
                for &(g, m, v) in &p.gpus {
                    milli[g] += m;
                    vram[g] += v;
                }
            }
        }
        assert!(cpu <= o.cpu_milli && mem <= o.memory_mib);
        assert_eq!(n.free_cpu_milli, o.cpu_milli - cpu);
        assert_eq!(n.free_memory_mib, o.memory_mib - mem);
        for (g, gpu) in n.gpus.iter().enumerate() {
            assert!(milli[g] <= MILLI, "gpu over-allocated");
            assert_eq!(gpu.free_milli, MILLI - milli[g]);
            assert!(vram[g] <= gpu.vram_mib);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn never_over_allocates_and_respects_constraints(
        nodes in prop::collection::vec(arb_node(), 1..6),
        reqs in prop::collection::vec(arb_request(), 1..40),
        policy in prop::sample::select(Policy::ALL.to_vec()),
        seed in any::<u64>(),
    ) {
        let mut s = Scheduler::new(nodes.clone(), policy, seed).unwrap();
        s.set_target_workload(&reqs);
        for (i, r) in reqs.iter().enumerate() {
            if let Ok(p) = s.place(i as u64, r) {
                let node = &s.nodes()[p.node];
                for &(g, m, _) in &p.gpus {
                    let gpu = &node.gpus[g];
                    if !r.models.is_empty() {
                        prop_assert!(r.models.contains(&gpu.model));
                    }
                    match r.gpu {
                        GpuDemand::Whole(_) => prop_assert_eq!(m, MILLI),
                        GpuDemand::Fraction { milli, .. } => {
                            prop_assert_eq!(m, milli);
                            prop_assert_eq!(gpu.kind, GpuKind::Shareable);
                        }
                        GpuDemand::None => prop_assert!(false, "gpu for a cpu-only request"),
                    }
                }
                let want = match r.gpu { GpuDemand::Whole(n) => n as usize, GpuDemand::Fraction{..} => 1, GpuDemand::None => 0 };
                prop_assert_eq!(p.gpus.len(), want);
            }
            // Release some to exercise the free path.
            if i % 7 == 3 {
                let _ = s.release((i - 1) as u64);
            }
        }
        check_invariants(&s, &nodes);
    }

    #[test]
    fn same_seed_same_placements(
        nodes in prop::collection::vec(arb_node(), 1..6),
        reqs in prop::collection::vec(arb_request(), 1..30),
        policy in prop::sample::select(Policy::ALL.to_vec()),
        seed in any::<u64>(),
    ) {
        let run = || {
            let mut s = Scheduler::new(nodes.clone(), policy, seed).unwrap();
            s.set_target_workload(&reqs);
            reqs.iter().enumerate().map(|(i, r)| s.place(i as u64, r).ok()).collect::<Vec<_>>()
        };
        prop_assert_eq!(run(), run());
    }

    #[test]
    fn preemption_rules(
        nodes in prop::collection::vec(arb_node(), 1..4),
        reqs in prop::collection::vec(arb_request(), 1..25),
        newcomer in arb_request(),
        seed in any::<u64>(),
    ) {
        let mut s = Scheduler::new(nodes, Policy::GvFrag, seed).unwrap();
        for (i, r) in reqs.iter().enumerate() {
            let _ = s.place(i as u64, r);
        }
        let Ok(plan) = s.plan_preemption(&newcomer) else { return Ok(()); };
        for v in &plan.victims {
            let (_, r, p) = s.placements().find(|(id, _, _)| id == v).unwrap();
            prop_assert!(r.interruptible);
            prop_assert!(r.priority < newcomer.priority);
            prop_assert_eq!(p.node, plan.node);
        }
        let placed = s.place_with_plan(1_000_000, &newcomer, &plan);
        prop_assert!(placed.is_ok(), "plan did not free enough: {:?}", placed);
    }
}
