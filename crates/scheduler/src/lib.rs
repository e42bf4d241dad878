//! gpuvisor's scheduler: where an instance goes, and whom to evict to make room.
//!
//! Why a crate of its own: the same code places instances in the daemon and replays production
//! traces in `gpuvisor sim`, so it must be pure (no I/O, no clock) and deterministic for a seed
//! (its own splitmix64 stream breaks ties). The key decision is the fragmentation-aware policy
//! `gvfrag` (see [`Policy::GvFrag`]), compared side by side with re-implementations of the
//! published best-fit and FGD; evaluations are memoised per (request shape, node version) so one
//! decision over thousands of nodes costs little more than a scan.

mod model;
mod policy;
pub mod rng;
mod scheduler;

pub use model::{Gpu, GpuDemand, GpuKind, Node, Placement, Request, MAX_GPUS_PER_NODE, MILLI};
pub use policy::Policy;
pub use scheduler::{InstanceId, PreemptionPlan, Scheduler};

/// Scheduler errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedError {
    #[error("unknown policy {0:?} (bestfit, fgd, spread, random, gvfrag)")]
    UnknownPolicy(String),
    #[error("node {0} has more than 64 GPUs")]
    TooManyGpus(String),
    #[error("more than 64 GPU models")]
    TooManyModels,
    #[error("no node can take the request")]
    NoFit,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("unknown instance {0}")]
    UnknownInstance(u64),
    #[error("instance {0} is already placed")]
    DuplicateInstance(u64),
    #[error("placement does not fit: {0}")]
    BadPlacement(&'static str),
}
