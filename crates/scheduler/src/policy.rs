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
    /// Ours: the fragmentation gradient with memory as a hard limit, then CPU/memory stranding.
    /// FGD's measure only asks whether a target spec's CPU and GPU still fit, so it happily
    /// strands a node's free GPUs behind exhausted memory; gvfrag counts a spec that no longer
    /// fits in memory as making all the node's free GPU milli a fragment (each spec carries the
    /// smallest memory seen for it). Moves are compared at the published score's resolution;
    /// equal ones are decided by the stranding move at the same resolution: per spec, the
    /// share of the GPU capacity it could use that the node's remaining CPU and memory cannot
    /// feed (seen while the balance drifts, not only once the next copy no longer fits); then
    /// by packing (whole-GPU and CPU-only) or the tightest GPU (fractions); then the
    /// lowest-index node. No constant is fitted to a trace.
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
