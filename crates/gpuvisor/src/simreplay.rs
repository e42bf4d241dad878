//! `gpuvisor sim --replay time`: the trace in its own time, with departures. Pods arrive at their
//! `creation_time` and leave at their `deletion_time`, in trace order, without the shuffle and
//! inflation of the published protocol; what does not fit when it arrives is refused for good.
//! `--replay creation` keeps the arrival order but no pod ever leaves (the trace order's answer
//! to the shuffled protocol).
//!
//! Rules for the order, so that a run is exact and reproducible:
//! - events sort by time; at one instant departures come first (they free capacity), then
//!   arrivals, both in name order;
//! - a pod without `creation_time` arrives at time 0, before every timed pod at 0;
//! - a pod without `deletion_time`, or whose deletion is before its creation, never leaves; one
//!   deleted at its creation instant leaves after that instant's arrivals (it still counts as
//!   arrived, and as refused if it did not fit).
//!
//! Measured per policy: the share of arrived GPU demand refused, and fragmentation over time:
//! the cluster's FGD fragmentation (of the GPU specs of the target workload) as a share of the
//! free GPU capacity, kept up to date per event (a placement or departure changes one node).

use gpuvisor_scheduler::{Policy, Scheduler};
use serde::Serialize;

use super::{invalid, Pod};
use crate::cli::CliError;

/// Time samples reported (evenly spaced from the first to the last event).
pub const SAMPLES: usize = 10;

/// How the pods are fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Replay {
    /// The published protocol: shuffled per seed, inflated to 1.3× capacity, no departures.
    Shuffle,
    /// Trace time: arrivals at creation_time, departures at deletion_time.
    Time,
    /// Trace order of creation, no departures.
    Creation,
}

/// One pod event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Event {
    pub time: u64,
    /// 0 = departure, 1 = arrival, 2 = departure at the instant of its own arrival (after the
    /// arrivals of that instant).
    pub phase: u8,
    /// Index into the pod list (pods are sorted by name first, so this is name order).
    pub pod: usize,
}

/// The events of a replay, in order. `departures` false: arrivals only.
pub(crate) fn events(pods: &[Pod], departures: bool) -> Vec<Event> {
    let mut order: Vec<usize> = (0..pods.len()).collect();
    order.sort_by(|&a, &b| pods[a].name.cmp(&pods[b].name));
    let mut rank = vec![0; pods.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r;
    }
    let mut ev = Vec::with_capacity(pods.len() * 2);
    for (i, p) in pods.iter().enumerate() {
        let created = p.created.unwrap_or(0);
        ev.push(Event {
            time: created,
            phase: 1,
            pod: rank[i],
        });
        if !departures {
            continue;
        }
        match p.deleted {
            Some(d) if d > created => ev.push(Event {
                time: d,
                phase: 0,
                pod: rank[i],
            }),
            Some(d) if d == created => ev.push(Event {
                time: d,
                phase: 2,
                pod: rank[i],
            }),
            _ => {}
        }
    }
    ev.sort_unstable();
    // Back from name rank to pod index.
    for e in &mut ev {
        e.pod = order[e.pod];
    }
    ev
}

/// What one replay measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TimeResult {
    pub policy: String,
    /// Arrived GPU demand, % of the cluster's GPU capacity (sum over the whole replay).
    pub arrived_pct: f64,
    /// Share of the arrived GPU demand refused, %.
    pub refused_demand_pct: f64,
    pub refused_pods: u64,
    /// Refused pods asking for as many GPUs as the largest node has.
    pub refused_full_node_pods: u64,
    /// Highest allocated GPU %, at any instant.
    pub peak_alloc_pct: f64,
    /// Fragmentation as % of the free GPU capacity: time-weighted mean and highest.
    pub frag_mean_pct: f64,
    pub frag_max_pct: f64,
    /// Fragmentation % of free GPU at `SAMPLES` evenly spaced instants.
    pub frag_at_pct: Vec<f64>,
    /// Allocated GPU % at the same instants.
    pub alloc_at_pct: Vec<f64>,
}

/// Replays `events` under one policy.
pub(crate) fn replay(
    nodes: &[gpuvisor_scheduler::Node],
    pods: &[Pod],
    workload: &[gpuvisor_scheduler::Request],
    events: &[Event],
    policy: Policy,
    seed: u64,
) -> Result<TimeResult, CliError> {
    let capacity: u64 = nodes
        .iter()
        .map(gpuvisor_scheduler::Node::total_gpu_milli)
        .sum();
    if capacity == 0 {
        return Err(invalid("the node list has no GPUs"));
    }
    let full = nodes.iter().map(|n| n.gpus.len()).max().unwrap_or(0) as u64;
    let mut sched =
        Scheduler::new(nodes.to_vec(), policy, seed).map_err(|e| invalid(format!("nodes: {e}")))?;
    sched.set_target_workload(workload);
    let mut frag: Vec<f64> = (0..nodes.len())
        .map(|n| sched.node_fragmentation_milli(n))
        .collect();
    let mut frag_sum: f64 = frag.iter().sum();
    let mut free = capacity as f64;
    let (t0, t1) = match (events.first(), events.last()) {
        (Some(a), Some(b)) => (a.time, b.time),
        _ => (0, 0),
    };
    let span = (t1 - t0).max(1) as f64;
    let cap = capacity as f64;
    let mut r = TimeResult {
        policy: policy.name().to_string(),
        ..TimeResult::default()
    };
    let (mut arrived, mut refused, mut allocated) = (0u64, 0u64, 0u64);
    let (mut weighted, mut last_t) = (0.0, t0);
    let mut next_sample = 0usize;
    let rate = |fs: f64, free: f64| if free > 0.0 { 100.0 * fs / free } else { 0.0 };
    for e in events {
        // Samples due before this event's change see the state before it.
        while next_sample < SAMPLES
            && (t0 as f64 + span * next_sample as f64 / (SAMPLES - 1) as f64) < e.time as f64
        {
            r.frag_at_pct.push(rate(frag_sum, free));
            r.alloc_at_pct.push(100.0 * allocated as f64 / cap);
            next_sample += 1;
        }
        weighted += rate(frag_sum, free) * (e.time - last_t) as f64;
        last_t = e.time;
        let req = &pods[e.pod].req;
        let touched = if e.phase == 1 {
            arrived += req.gpu.milli();
            match sched.place(e.pod as u64, req) {
                Ok(p) => {
                    allocated += req.gpu.milli();
                    Some(p.node)
                }
                Err(_) => {
                    refused += req.gpu.milli();
                    r.refused_pods += 1;
                    if let gpuvisor_scheduler::GpuDemand::Whole(n) = req.gpu {
                        if u64::from(n) >= full {
                            r.refused_full_node_pods += 1;
                        }
                    }
                    None
                }
            }
        } else {
            // Pods refused on arrival have nothing to release.
            match sched.release(e.pod as u64) {
                Ok(p) => {
                    allocated -= req.gpu.milli();
                    Some(p.node)
                }
                Err(_) => None,
            }
        };
        if let Some(n) = touched {
            let f = sched.node_fragmentation_milli(n);
            frag_sum += f - frag[n];
            frag[n] = f;
            free = (capacity - allocated) as f64;
            let now = rate(frag_sum, free);
            r.frag_max_pct = r.frag_max_pct.max(now);
            r.peak_alloc_pct = r.peak_alloc_pct.max(100.0 * allocated as f64 / cap);
        }
    }
    while r.frag_at_pct.len() < SAMPLES {
        r.frag_at_pct.push(rate(frag_sum, free));
        r.alloc_at_pct.push(100.0 * allocated as f64 / cap);
    }
    r.arrived_pct = 100.0 * arrived as f64 / cap;
    r.refused_demand_pct = if arrived > 0 {
        100.0 * refused as f64 / arrived as f64
    } else {
        0.0
    };
    r.frag_mean_pct = if t1 > t0 {
        weighted / span
    } else {
        rate(frag_sum, free)
    };
    Ok(r)
}

/// Mean of several runs of one policy (seeds only break ties).
pub(crate) fn mean(runs: &[TimeResult]) -> TimeResult {
    let n = runs.len().max(1) as f64;
    let Some(first) = runs.first() else {
        return TimeResult::default();
    };
    let avg = |f: &dyn Fn(&TimeResult) -> f64| runs.iter().map(f).sum::<f64>() / n;
    let avg_vec = |f: &dyn Fn(&TimeResult) -> &Vec<f64>| {
        (0..f(first).len())
            .map(|i| runs.iter().map(|r| f(r)[i]).sum::<f64>() / n)
            .collect()
    };
    TimeResult {
        policy: first.policy.clone(),
        arrived_pct: avg(&|r| r.arrived_pct),
        refused_demand_pct: avg(&|r| r.refused_demand_pct),
        refused_pods: (avg(&|r| r.refused_pods as f64)).round() as u64,
        refused_full_node_pods: (avg(&|r| r.refused_full_node_pods as f64)).round() as u64,
        peak_alloc_pct: avg(&|r| r.peak_alloc_pct),
        frag_mean_pct: avg(&|r| r.frag_mean_pct),
        frag_max_pct: avg(&|r| r.frag_max_pct),
        frag_at_pct: avg_vec(&|r| &r.frag_at_pct),
        alloc_at_pct: avg_vec(&|r| &r.alloc_at_pct),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuvisor_scheduler::{Gpu, GpuDemand, GpuKind, Node, Request};

    fn pod(name: &str, created: Option<u64>, deleted: Option<u64>) -> Pod {
        Pod {
            name: name.to_string(),
            req: Request {
                cpu_milli: 1000,
                memory_mib: 1024,
                gpu: GpuDemand::Whole(1),
                ..Request::default()
            },
            created,
            deleted,
        }
    }

    fn one_gpu() -> Vec<Node> {
        vec![Node::new(
            "n",
            8000,
            16_384,
            vec![Gpu::new("T4", 0, GpuKind::Shareable)],
        )]
    }

    fn run(pods: &[Pod], departures: bool) -> TimeResult {
        let ev = events(pods, departures);
        let work: Vec<Request> = pods.iter().map(|p| p.req.clone()).collect();
        replay(&one_gpu(), pods, &work, &ev, Policy::Fgd, 1).unwrap()
    }

    #[test]
    fn events_are_in_time_order_departures_first_then_names() {
        let pods = vec![
            pod("b", Some(10), Some(20)),
            pod("a", Some(10), Some(30)),
            pod("c", Some(0), Some(10)),
        ];
        let ev: Vec<(u64, u8, &str)> = events(&pods, true)
            .iter()
            .map(|e| (e.time, e.phase, pods[e.pod].name.as_str()))
            .collect();
        assert_eq!(
            ev,
            vec![
                (0, 1, "c"),
                (10, 0, "c"),
                (10, 1, "a"),
                (10, 1, "b"),
                (20, 0, "b"),
                (30, 0, "a"),
            ]
        );
    }

    #[test]
    fn a_departure_frees_the_gpu_for_a_later_pod() {
        // One GPU: the first pod leaves at 10, the second arrives at 10 and fits.
        let pods = vec![pod("x", Some(0), Some(10)), pod("y", Some(10), Some(20))];
        let r = run(&pods, true);
        assert_eq!(r.refused_pods, 0);
        assert!((r.peak_alloc_pct - 100.0).abs() < 1e-9);
        // Without departures the second is refused; overlapping pods too.
        assert_eq!(run(&pods, false).refused_pods, 1);
        let pods = vec![pod("x", Some(0), Some(11)), pod("y", Some(10), Some(20))];
        let r = run(&pods, true);
        assert_eq!(r.refused_pods, 1);
        assert!((r.refused_demand_pct - 50.0).abs() < 1e-9);
    }

    #[test]
    fn pods_without_times_follow_the_stated_rules() {
        // No creation time: arrives at time 0; no deletion time: never leaves, so "late",
        // arriving at 5 on the one GPU, is refused.
        let pods = vec![pod("late", Some(5), Some(9)), pod("untimed", None, None)];
        let ev = events(&pods, true);
        assert_eq!(ev.len(), 3);
        assert_eq!((ev[0].time, pods[ev[0].pod].name.as_str()), (0, "untimed"));
        assert_eq!(run(&pods, true).refused_pods, 1);
        // A deletion before the creation never leaves; one at the creation instant leaves
        // right after arriving, so the next pod at that instant fits.
        let pods = vec![pod("a", Some(5), Some(3)), pod("b", Some(6), None)];
        assert_eq!(events(&pods, true).len(), 2);
        assert_eq!(run(&pods, true).refused_pods, 1);
        let pods = vec![pod("a", Some(5), Some(5)), pod("b", Some(5), None)];
        let ev = events(&pods, true);
        assert_eq!(
            ev.iter().map(|e| (e.phase, e.pod)).collect::<Vec<_>>(),
            vec![(1, 0), (1, 1), (2, 0)]
        );
        // "a" arrives and takes the GPU, "b" arrives at the same instant (refused), then "a"
        // leaves: a zero-length pod holds the GPU for the arrivals of its instant.
        assert_eq!(run(&pods, true).refused_pods, 1);
    }
}
