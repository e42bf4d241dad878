//! Snapshot tests: small hand-made clusters with the placements we expect, written out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use gpuvisor_scheduler::{
    Gpu, GpuDemand, GpuKind, Node, Placement, Policy, PreemptionPlan, Request, Scheduler,
};

fn node(name: &str, gpus: usize) -> Node {
    node_of(name, gpus, "A100", 40_960)
}

/// A node of `gpus` shareable GPUs of `model` with `vram_mib` each.
fn node_of(name: &str, gpus: usize, model: &str, vram_mib: u64) -> Node {
    Node::new(
        name,
        32_000,
        131_072,
        (0..gpus)
            .map(|_| Gpu::new(model, vram_mib, GpuKind::Shareable))
            .collect(),
    )
}

fn frac(milli: u32) -> Request {
    Request {
        cpu_milli: 1000,
        memory_mib: 1024,
        gpu: GpuDemand::Fraction { milli, vram_mib: 0 },
        ..Request::default()
    }
}

fn whole(n: u32) -> Request {
    Request {
        cpu_milli: 1000,
        memory_mib: 1024,
        gpu: GpuDemand::Whole(n),
        ..Request::default()
    }
}

#[test]
fn bestfit_packs_fractions_onto_the_fullest_gpu() {
    let mut s = Scheduler::new(vec![node("a", 2), node("b", 2)], Policy::BestFit, 1).unwrap();
    let p1 = s.place(1, &frac(500)).unwrap();
    let p2 = s.place(2, &frac(300)).unwrap();
    assert_eq!(p2.node, p1.node);
    assert_eq!(p2.gpus, vec![(p1.gpus[0].0, 300, 0)]);
}

#[test]
fn spread_uses_an_empty_node() {
    let mut s = Scheduler::new(vec![node("a", 2), node("b", 2)], Policy::Spread, 1).unwrap();
    let p1 = s.place(1, &frac(500)).unwrap();
    let p2 = s.place(2, &frac(500)).unwrap();
    assert_ne!(p1.node, p2.node);
}

#[test]
fn frag_policies_keep_a_whole_node_for_a_big_request() {
    // Target workload: mostly 1-GPU, some 4-GPU. A 1-GPU request should go to the 2-GPU node
    // so that the 4-GPU node stays whole.
    for policy in [Policy::Fgd, Policy::GvFrag] {
        let mut s = Scheduler::new(vec![node("four", 4), node("two", 2)], policy, 3).unwrap();
        let sample: Vec<Request> = (0..9).map(|_| whole(1)).chain([whole(4)]).collect();
        s.set_target_workload(&sample);
        let p = s.place(1, &whole(1)).unwrap();
        assert_eq!(
            p,
            Placement {
                node: 1,
                gpus: vec![(0, 1000, 40_960)]
            },
            "{policy}"
        );
        let p = s.place(2, &whole(4)).unwrap();
        assert_eq!(p.node, 0);
    }
}

#[test]
fn gvfrag_avoids_stranding_gpus_behind_memory() {
    // Both nodes can take the CPU-only request; on "small" it would use the memory the GPU
    // workload needs, stranding its GPU. FGD ignores memory; gvfrag does not.
    let mut small = node("small", 1);
    small.memory_mib = 40_000;
    small.free_memory_mib = 40_000;
    let mut big = Node::new("big", 32_000, 262_144, vec![]);
    big.name = "cpu".into();
    let gpu_pod = Request {
        memory_mib: 30_000,
        ..whole(1)
    };
    let cpu_pod = Request {
        cpu_milli: 1000,
        memory_mib: 20_000,
        ..Request::default()
    };
    let mut s = Scheduler::new(vec![small, big], Policy::GvFrag, 1).unwrap();
    s.set_target_workload(&[gpu_pod.clone(), gpu_pod.clone(), cpu_pod.clone()]);
    assert_eq!(s.place(1, &cpu_pod).unwrap().node, 1);
    assert_eq!(s.place(2, &gpu_pod).unwrap().node, 0);
}

#[test]
fn gvfrag_keeps_cpu_for_the_gpus_before_it_runs_out() {
    // Two 4-GPU nodes with 48 cores; the workload is 1-GPU pods needing 11 cores each. Node
    // "a" has 19 cores left for 4 free GPUs (already short: about 1.7 pods' worth), "b" has 48
    // cores for 2 free GPUs. A small CPU-only pod fits both without making the next GPU pod
    // unplaceable, so FGD's measure sees no difference and takes the first node (packing
    // would too); gvfrag sees that on "a" it strands more GPU capacity behind CPU.
    let mk = |name: &str| {
        Node::new(
            name,
            48_000,
            262_144,
            (0..4)
                .map(|_| Gpu::new("A100", 40_960, GpuKind::Shareable))
                .collect(),
        )
    };
    let gpu_pod = Request {
        cpu_milli: 11_000,
        ..whole(1)
    };
    let cpu_pod = |cpu_milli| Request {
        cpu_milli,
        memory_mib: 1024,
        ..Request::default()
    };
    let no_cpu_gpu = Request {
        cpu_milli: 0,
        ..whole(1)
    };
    for (policy, want) in [(Policy::Fgd, 0), (Policy::GvFrag, 1)] {
        let mut s = Scheduler::new(vec![mk("a"), mk("b")], policy, 1).unwrap();
        s.set_target_workload(std::slice::from_ref(&gpu_pod));
        let on = |node, gpus| Placement { node, gpus };
        s.commit(1, &cpu_pod(29_000), on(0, vec![])).unwrap();
        s.commit(2, &no_cpu_gpu, on(1, vec![(0, 1000, 40_960)]))
            .unwrap();
        s.commit(3, &no_cpu_gpu, on(1, vec![(1, 1000, 40_960)]))
            .unwrap();
        assert_eq!(s.decide(&cpu_pod(4000)).unwrap().node, want, "{policy}");
    }
}

#[test]
fn multi_gpu_prefers_nvlink_then_numa() {
    let mut gpus: Vec<Gpu> = (0..4)
        .map(|_| Gpu::new("H100", 81_920, GpuKind::WholeOnly))
        .collect();
    // NVLink pairs (0,3) and (1,2); NUMA 0 = {0,1}, 1 = {2,3}.
    gpus[0].nvlink_peers = 1 << 3;
    gpus[3].nvlink_peers = 1;
    gpus[1].nvlink_peers = 1 << 2;
    gpus[2].nvlink_peers = 1 << 1;
    for (i, g) in gpus.iter_mut().enumerate() {
        g.numa = Some((i / 2) as u32);
    }
    let mut s = Scheduler::new(
        vec![Node::new("h", 64_000, 524_288, gpus)],
        Policy::BestFit,
        1,
    )
    .unwrap();
    let p = s.place(1, &whole(2)).unwrap();
    let mut idx: Vec<usize> = p.gpus.iter().map(|g| g.0).collect();
    idx.sort_unstable();
    assert_eq!(idx, vec![0, 3]);
}

#[test]
fn model_constraint_and_kinds() {
    let mut t4 = node("t4", 1);
    t4.gpus[0].model = "T4".into();
    let mut mig = node("mig", 1);
    mig.gpus[0].kind = GpuKind::Mig;
    let mut s = Scheduler::new(vec![t4, mig], Policy::BestFit, 1).unwrap();
    let want_t4 = Request {
        models: vec!["T4".into()],
        ..frac(100)
    };
    assert_eq!(s.place(1, &want_t4).unwrap().node, 0);
    // A fraction never lands on a MIG slice; a whole request may.
    let mut s2 = Scheduler::new(
        vec![node("x", 0), {
            let mut m = node("mig", 1);
            m.gpus[0].kind = GpuKind::Mig;
            m
        }],
        Policy::BestFit,
        1,
    )
    .unwrap();
    assert!(s2.place(1, &frac(100)).is_err());
    assert_eq!(s2.place(2, &whole(1)).unwrap().node, 1);
}

#[test]
fn preemption_picks_the_cheapest_victims() {
    let mut s = Scheduler::new(vec![node("a", 2), node("b", 2)], Policy::BestFit, 1).unwrap();
    let spot = |milli: u32, priority: u32| Request {
        priority,
        interruptible: true,
        ..frac(milli)
    };
    // Best-fit stacks them on node a: GPU0 = 600 (id 1) + 300 (id 3), GPU1 = 600 (id 2) + 300
    // (id 4); on-demand fractions then fill node b.
    let mut id = 0;
    for (m, prio) in [(600, 0), (600, 0), (300, 0), (300, 0)] {
        id += 1;
        s.place(id, &spot(m, prio)).unwrap();
    }
    // Fill the rest with on-demand, priority 1, not interruptible.
    let od = Request {
        priority: 1,
        ..frac(400)
    };
    while s.place(id + 1, &od).is_ok() {
        id += 1;
    }
    let on_demand = Request {
        priority: 1,
        ..whole(1)
    };
    assert!(s.place(100, &on_demand).is_err());
    let plan = s.plan_preemption(&on_demand).unwrap();
    // A whole GPU needs one of node a's GPUs emptied: 900 milli, two victims, the first GPU.
    assert_eq!(
        plan,
        PreemptionPlan {
            node: 0,
            victims: vec![1, 3],
            evicted_milli: 900
        }
    );
    let p = s.place_with_plan(100, &on_demand, &plan).unwrap();
    assert_eq!(p.node, plan.node);
}

#[test]
fn preemption_never_evicts_equal_priority() {
    let mut s = Scheduler::new(vec![node("a", 1)], Policy::GvFrag, 1).unwrap();
    let spot = Request {
        priority: 1,
        interruptible: true,
        ..whole(1)
    };
    s.place(1, &spot).unwrap();
    let same = Request {
        priority: 1,
        ..whole(1)
    };
    assert!(s.plan_preemption(&same).is_err());
    let higher = Request {
        priority: 2,
        ..whole(1)
    };
    assert_eq!(
        s.plan_preemption(&higher).unwrap(),
        PreemptionPlan {
            node: 0,
            victims: vec![1],
            evicted_milli: 1000
        }
    );
}

/// gvfrag's full-node reserve. Node "a" has 96 CPUs, "b" 128; the workload's 8-GPU jobs need
/// 110 CPUs, so only "b" can run one, and they are too rare to be in the target workload that
/// FGD's and the stranding measure see. On "a", after a 1-GPU pod, 24 more CPUs would strand
/// GPUs (12 CPUs per GPU pod); on "b" they would not, so without the reserve the CPU-heavy pod
/// goes to "b" and the 8-GPU job is refused. With it, "b" stays whole.
#[test]
fn gvfrag_keeps_the_last_full_node_for_a_full_node_job() {
    let big = |name: &str, cpu: u64| {
        Node::new(
            name,
            cpu,
            1_048_576,
            (0..8)
                .map(|_| Gpu::new("G2", 0, GpuKind::Shareable))
                .collect(),
        )
    };
    let eight = Request {
        cpu_milli: 110_000,
        memory_mib: 65_536,
        gpu: GpuDemand::Whole(8),
        ..Request::default()
    };
    let one = Request {
        cpu_milli: 12_000,
        memory_mib: 16_384,
        gpu: GpuDemand::Whole(1),
        ..Request::default()
    };
    let cpu_heavy = Request {
        cpu_milli: 24_000,
        memory_mib: 32_768,
        ..Request::default()
    };
    let mut s =
        Scheduler::new(vec![big("a", 96_000), big("b", 128_000)], Policy::GvFrag, 1).unwrap();
    let sample: Vec<Request> = (0..40)
        .map(|_| one.clone())
        .chain([eight.clone(), cpu_heavy.clone()])
        .collect();
    s.set_target_workload(&sample);
    assert_eq!(s.place(1, &one).unwrap().node, 0);
    assert_eq!(s.place(2, &cpu_heavy).unwrap().node, 0, "b stays whole");
    assert_eq!(s.place(3, &eight).unwrap().node, 1);
}

/// gvfrag's pool pressure. Node "p" has model P (2 GPUs), four "q" nodes model Q (8 GPUs each);
/// 4% of the workload's GPU demand is pinned to P, too little for FGD's target workload (95%
/// coverage), so FGD's score cannot tell the nodes apart and the lowest index ("p") would win.
/// P's pool is pressed (0.04 × 34 GPUs free / 2 GPUs free = 0.68, above the gate 0.5): pool
/// pressure sends the unpinned 1-GPU pods to Q's nodes, so the pods pinned to P find room.
#[test]
fn gvfrag_keeps_a_pinned_pool_for_its_pinned_pods() {
    let any = whole(1);
    let pinned = Request {
        models: vec!["P".to_string()],
        ..whole(1)
    };
    let mut nodes = vec![node_of("p", 2, "P", 0)];
    nodes.extend((0..4).map(|i| node_of(&format!("q{i}"), 8, "Q", 0)));
    let mut s = Scheduler::new(nodes.clone(), Policy::GvFrag, 1).unwrap();
    let mut fgd = Scheduler::new(nodes, Policy::Fgd, 1).unwrap();
    let sample: Vec<Request> = (0..4)
        .map(|_| pinned.clone())
        .chain((0..96).map(|_| any.clone()))
        .collect();
    s.set_target_workload(&sample);
    fgd.set_target_workload(&sample);
    assert_eq!(fgd.place(1, &any).unwrap().node, 0, "FGD's lowest index");
    assert_eq!(s.place(1, &any).unwrap().node, 1);
    assert_eq!(s.place(2, &any).unwrap().node, 1);
    assert_eq!(s.place(3, &pinned).unwrap().node, 0);
    // P now has 1 GPU free of 31: pressure 0.04 × 31 / 1 = 1.24, still avoided.
    assert_eq!(s.place(4, &any).unwrap().node, 1);
    assert_eq!(s.place(5, &pinned).unwrap().node, 0);
    // P's pool is empty: infinite pressure, and nothing can take a P GPU anyway; the
    // unpinned pods go on, and a pinned one is refused rather than misplaced.
    assert_eq!(s.place(6, &any).unwrap().node, 1);
    assert!(s.place(7, &pinned).is_err());
    // A release gives P's GPU back: the next pinned pod takes it.
    s.release(3).unwrap();
    assert_eq!(s.place(8, &pinned).unwrap().node, 0);
}

/// The gate: a pool with far more room than its pinned demand (3% pinned to P, P has half the
/// GPUs: pressure 0.03 × 4 / 2 = 0.06) is not steered around; FGD's lowest index decides.
#[test]
fn gvfrag_ignores_pool_pressure_below_the_gate() {
    let two = |name: &str, model: &str| node_of(name, 2, model, 0);
    let any = whole(1);
    let pinned = Request {
        models: vec!["P".to_string()],
        ..whole(1)
    };
    let mut s = Scheduler::new(vec![two("p", "P"), two("q", "Q")], Policy::GvFrag, 1).unwrap();
    let sample: Vec<Request> = (0..3)
        .map(|_| pinned.clone())
        .chain((0..97).map(|_| any.clone()))
        .collect();
    s.set_target_workload(&sample);
    assert_eq!(s.place(1, &any).unwrap().node, 0);
}

/// A request allowed k models counts 1/k for each. Three 2-GPU pools R, P, Q; the workload's
/// GPU demand: 2/5 pinned to R, 2/5 allowed P or Q, 1/5 any. Pressures: R 0.4 × 6 / 2 = 1.2,
/// P and Q 0.2 × 6 / 2 = 0.6 each (counted whole, they would be 1.2 like R and the lowest
/// index, R, would win). So an unpinned pod goes to P, the least pressed pool.
#[test]
fn gvfrag_splits_a_request_allowed_k_models() {
    let two = |name: &str, model: &str| node_of(name, 2, model, 0);
    let any = whole(1);
    let on = |models: &[&str]| Request {
        models: models.iter().map(|m| m.to_string()).collect(),
        ..whole(1)
    };
    let nodes = vec![two("r", "R"), two("p", "P"), two("q", "Q")];
    let mut s = Scheduler::new(nodes, Policy::GvFrag, 1).unwrap();
    let sample = vec![
        on(&["R"]),
        on(&["R"]),
        on(&["P", "Q"]),
        on(&["P", "Q"]),
        any.clone(),
    ];
    s.set_target_workload(&sample);
    assert_eq!(s.place(1, &any).unwrap().node, 1);
}

/// A node with GPUs of two models is judged by the GPUs the request would take. Node "m" has a
/// Q GPU (taken) and a P GPU; nodes "q0", "q1" eight Q GPUs each. 4% of the workload is pinned
/// to P (out of FGD's target workload, so FGD's score sees no difference and packing would
/// pick m), and P's pool is pressed (0.04 × 17 / 1 = 0.68): a 1-GPU pod would take m's P GPU,
/// so it goes to "q0". Judged by m's first GPU, Q, m would look unpressed and win.
#[test]
fn gvfrag_judges_a_mixed_node_by_the_gpus_it_would_take() {
    let mixed = Node::new(
        "m",
        32_000,
        131_072,
        vec![
            Gpu::new("Q", 0, GpuKind::Shareable),
            Gpu::new("P", 0, GpuKind::Shareable),
        ],
    );
    let any = whole(1);
    let pinned = Request {
        models: vec!["P".to_string()],
        ..whole(1)
    };
    let nodes = vec![mixed, node_of("q0", 8, "Q", 0), node_of("q1", 8, "Q", 0)];
    let mut s = Scheduler::new(nodes, Policy::GvFrag, 1).unwrap();
    let sample: Vec<Request> = (0..4)
        .map(|_| pinned.clone())
        .chain((0..96).map(|_| any.clone()))
        .collect();
    s.set_target_workload(&sample);
    // m's Q GPU is taken whole.
    s.commit(
        1,
        &any,
        Placement {
            node: 0,
            gpus: vec![(0, 1000, 0)],
        },
    )
    .unwrap();
    assert_eq!(s.place(2, &any).unwrap().node, 1);
    // A share on m could only go on its P GPU too.
    assert_eq!(s.place(3, &frac(500)).unwrap().node, 1);
    assert_eq!(s.place(4, &pinned).unwrap().node, 0);
}

/// Without pinned pods the key is absent: gvfrag's choice is FGD's lowest index, as before.
#[test]
fn gvfrag_without_pins_is_unchanged_by_pool_pressure() {
    let two = |name: &str, model: &str| node_of(name, 2, model, 0);
    let any = whole(1);
    let mut s = Scheduler::new(vec![two("p", "P"), two("q", "Q")], Policy::GvFrag, 1).unwrap();
    s.set_target_workload(&vec![any.clone(); 100]);
    assert_eq!(s.place(1, &any).unwrap().node, 0);
    assert_eq!(s.place(2, &any).unwrap().node, 0);
}
