//! Placement policies, selectable by name.
//!
//! `bestfit` and `fgd` follow the published simulator of "Beware of Fragmentation" (USENIX
//! ATC'23) so that our policy can be compared against them in one run: their scores are the
//! same integers 0..=100. Best-fit breaks ties uniformly at random with the seeded PRNG, as the
//! Kubernetes framework does; FGD keeps the first, which is what reproduces the published figures. `gvfrag` is ours: see [`Policy::GvFrag`].

use std::fmt;
use std::str::FromStr;

use crate::SchedError;

/// A placement policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Published best-fit: least remaining CPU+GPU (weights ½, ½, normalised by 128 CPUs and 8
    /// GPUs), integer score, random ties; the tightest GPU for a fraction.
    BestFit,
    /// Published FGD: the node where the fragmentation of the target workload grows least,
    /// scored `int(sigmoid(-Δ/1000)·100)`; equal scores keep the lowest-index node (random
    /// ties measure far worse than published); for a fraction the first GPU with the best score.
    Fgd,
    /// Least-loaded node and GPU (keeps headroom everywhere; the opposite of packing).
    Spread,
    /// Uniformly random among the nodes that fit.
    Random,
    /// Ours: FGD's move, made safe for full-node requests and decided by CPU/memory stranding.
    /// Keys, in order: (1) the full-node reserve: a node whose placement would take the last
    /// room for a full-node request shape (as many GPUs as the largest node has) of the target
    /// workload is avoided while that shape is scarce, i.e. the nodes that can still take it
    /// number no more than 16× the requests for it expected before the cluster is full
    /// (per-shape share of the workload's GPU demand × free GPU milli); (2) for GPU requests,
    /// when the workload pins GPU models, the pool pressure of the node's model, lowest first:
    /// the GPU demand pinned to that model expected before the cluster is full (pinned share ×
    /// free GPU milli) per free GPU milli of the model (0 where nothing is pinned, and below
    /// 0.5: a pool with more than twice the room its pinned demand needs is not pressed; with
    /// no pinning at all this key is absent and decisions are unchanged); (3) FGD's score,
    /// exactly; (4) the stranding move at the same resolution: per spec, the share of the GPU
    /// capacity it could use that the node's remaining CPU and memory cannot feed (seen while
    /// the balance drifts, not only once the next copy no longer fits); (5) packing
    /// (whole-GPU and CPU-only) or the tightest GPU (fractions); (6) the lowest-index node.
    /// The reserve is what keeps 8-GPU jobs placeable as long as FGD does. Two constants are
    /// chosen on data (see docs/bench/scheduler.md): the reserve's factor 16 and the pressure
    /// gate 0.5.
    GvFrag,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        Policy::BestFit,
        Policy::Fgd,
        Policy::Spread,
        Policy::Random,
        Policy::GvFrag,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::BestFit => "bestfit",
            Policy::Fgd => "fgd",
            Policy::Spread => "spread",
            Policy::Random => "random",
            Policy::GvFrag => "gvfrag",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = SchedError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| SchedError::UnknownPolicy(s.to_string()))
    }
}
