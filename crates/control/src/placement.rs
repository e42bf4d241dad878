//! Placement on one host, behind the [`Placer`] trait. Pure: it sees a snapshot of capacity and
//! of the instances already there ([`Resident`]) and returns an assignment, an eviction plan, or
//! an error naming the missing resource; it never touches the store or the host. Its only state
//! is a [`Scheduled`] placer's window of recent demands (below).
//!
//! Two placers: [`SingleHost`] holds the rules (and picks pinned CPUs, and explains refusals);
//! [`Scheduled`] asks the scheduler crate's policy (`gvfrag` by default) which GPUs to use and
//! for the cheapest preemption plan, then applies the same rules. The daemon uses `Scheduled`.
//!
//! The fragmentation policies measure a placement against a *target workload* (FGD's "recent
//! workload distribution"). [`Scheduled`] and [`Cluster`] give the scheduler the residents'
//! requests, the recent demands a `Scheduled` placer has accepted ([`RecentDemands`]: bounded,
//! and no one GPU size may fill more than a quarter of it, so a flood of tiny requests cannot
//! push the rest out) and the request itself. Without it FGD's measure sees the request alone.
//! gvfrag's full-node reserve and pool pressure choose between nodes, so they act over the
//! simulated nodes ([`Cluster`]); on one host the workload changes which GPUs FGD's measure
//! picks. The window lives in memory: a restarted daemon starts with the residents only.
//!
//! Rules: whole GPUs are exclusive; fractional requests share a GPU up to 100% of its compute
//! and of its VRAM, packed best-fit so whole GPUs stay free for whole requests; pinned CPUs are
//! exclusive unless an oversubscription ratio above 1 is configured, and are taken from the NUMA
//! node of the instance's GPUs first. A GPU bound to vfio-pci (`GpuSlot::passthrough`) is for
//! VMs (`Demand::passthrough`), whole, and only for them; every other GPU only for containers:
//! each request sees the host with the other kind's GPUs left out ([`HostCapacity::for_demand`]),
//! so a container's placement is exactly what it was before VMs existed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// One GPU's capacity and what is already taken.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSlot {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    pub vram: u64,
    pub numa_node: Option<u32>,
    pub used_milli: u32,
    pub used_vram: u64,
    /// A MIG slice: an exclusive whole device, placed on only when asked for by its model.
    pub mig: bool,
    /// Bound to vfio-pci: given whole to VMs by passthrough, never to containers.
    pub passthrough: bool,
}

/// An instance already on the host, as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Resident {
    pub id: String,
    /// (GPU UUID, milli-GPU, VRAM bytes).
    pub gpus: Vec<(String, u32, u64)>,
    pub cpus: Vec<u32>,
    pub vcpus: u32,
    pub memory: u64,
    /// Priority rank (higher is more important).
    pub priority: u32,
    pub interruptible: bool,
}

impl HostCapacity {
    /// The same host with the residents in `ids` made non-interruptible, so no preemption plan
    /// picks them (a tenant without the right to preempt other tenants).
    pub fn protecting(mut self, ids: &std::collections::BTreeSet<String>) -> Self {
        for r in &mut self.residents {
            r.interruptible &= !ids.contains(&r.id);
        }
        self
    }
}

/// A snapshot of one host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostCapacity {
    pub gpus: Vec<GpuSlot>,
    /// Host CPU ids with the NUMA node of each.
    pub cpus: Vec<(u32, u32)>,
    /// How many instances already pin each CPU.
    pub cpu_use: BTreeMap<u32, u32>,
    /// Instances per CPU allowed (1 = exclusive).
    pub cpu_ratio: u32,
    pub memory: u64,
    pub used_memory: u64,
    /// The instances whose usage is counted above (for preemption plans).
    pub residents: Vec<Resident>,
}

impl HostCapacity {
    /// Capacity with the usage of `residents` counted in.
    pub fn new(
        mut gpus: Vec<GpuSlot>,
        cpus: Vec<(u32, u32)>,
        cpu_ratio: u32,
        memory: u64,
        residents: Vec<Resident>,
    ) -> Self {
        let mut cpu_use = BTreeMap::new();
        let mut used_memory = 0;
        for r in &residents {
            for (uuid, milli, vram) in &r.gpus {
                if let Some(s) = gpus.iter_mut().find(|s| &s.uuid == uuid) {
                    s.used_milli += milli;
                    s.used_vram += vram;
                }
            }
            for c in &r.cpus {
                *cpu_use.entry(*c).or_insert(0) += 1;
            }
            used_memory += r.memory;
        }
        Self {
            gpus,
            cpus,
            cpu_use,
            cpu_ratio,
            memory,
            used_memory,
            residents,
        }
    }

    /// The same host with some residents gone (as after an eviction).
    pub fn without(&self, ids: &[String]) -> Self {
        let mut gpus = self.gpus.clone();
        for g in &mut gpus {
            g.used_milli = 0;
            g.used_vram = 0;
        }
        let keep = self
            .residents
            .iter()
            .filter(|r| !ids.contains(&r.id))
            .cloned()
            .collect();
        Self::new(gpus, self.cpus.clone(), self.cpu_ratio, self.memory, keep)
    }
}

/// What one instance needs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Demand {
    pub whole_gpus: u32,
    /// Fractional compute share in milli-GPU (0 when none or whole).
    pub milli: u32,
    /// VRAM for a fractional GPU; `None` = proportional to the share.
    pub vram: Option<u64>,
    pub model: Option<String>,
    pub vcpus: u32,
    pub memory: u64,
    /// Priority rank (higher is more important).
    pub priority: u32,
    pub interruptible: bool,
    /// A VM: its GPUs are whole ones bound to vfio-pci.
    pub passthrough: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GpuAssignment {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    pub milli: u32,
    pub vram: u64,
}

impl From<GpuAssignment> for gpuvisor_wire::GpuBinding {
    fn from(g: GpuAssignment) -> Self {
        Self {
            uuid: g.uuid,
            index: g.index,
            model: g.model,
            milli: g.milli,
            vram: g.vram,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub gpus: Vec<GpuAssignment>,
    pub cpus: Vec<u32>,
}

#[derive(Debug, Error, PartialEq)]
pub enum PlacementError {
    #[error("not enough GPUs: {wanted} {model} wanted, {free} free of {total}{}", for_vms_hint(*.for_vms))]
    Gpus {
        wanted: u32,
        model: String,
        free: u32,
        total: u32,
        /// GPUs of that model left out because they are bound to vfio-pci (for VMs).
        for_vms: u32,
    },
    #[error("not enough GPUs bound to vfio-pci for a VM: {wanted} {model} wanted, {free} free of {total}{}", passthrough_hint(*.total, *.for_containers))]
    PassthroughGpus {
        wanted: u32,
        model: String,
        free: u32,
        total: u32,
        /// GPUs of that model on the host driver (for containers).
        for_containers: u32,
    },
    #[error("no {model} GPU has {milli} milli-GPU and {vram} bytes of VRAM free")]
    GpuShare {
        model: String,
        milli: u32,
        vram: u64,
    },
    #[error("not enough CPUs: {wanted} vCPUs wanted, {free} free of {total}")]
    Cpus { wanted: u32, free: u32, total: u32 },
    #[error("not enough memory: {wanted} bytes wanted, {free} bytes free of {total}")]
    Memory { wanted: u64, free: u64, total: u64 },
    #[error("no eviction of lower-priority interruptible instances makes room")]
    NoPreemption,
    #[error("scheduler model: {0}")]
    Model(String),
}

fn for_vms_hint(n: u32) -> String {
    if n == 0 {
        return String::new();
    }
    format!(
        "; {n} more {} bound to vfio-pci, for VMs (an admin's `gpuvisor gpu release GPU` gives one back to containers)",
        if n == 1 { "is" } else { "are" }
    )
}

fn passthrough_hint(total: u32, containers: u32) -> String {
    let mut s = String::new();
    if total == 0 {
        s.push_str("; a VM takes whole GPUs by passthrough: ask an admin to bind one to vfio-pci (`gpuvisor gpu bind-vfio GPU`, while no instance uses it)");
    }
    if containers > 0 {
        s.push_str(&format!(
            "; {containers} on the host driver {} for containers",
            if containers == 1 { "is" } else { "are" }
        ));
    }
    s
}

impl HostCapacity {
    /// The host as `d` sees it: only the GPUs of its kind (bound to vfio-pci for a VM, the
    /// others for a container). Borrowed when nothing is left out.
    pub fn for_demand(&self, d: &Demand) -> std::borrow::Cow<'_, HostCapacity> {
        if self.gpus.iter().all(|g| g.passthrough == d.passthrough) {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut view = self.clone();
        view.gpus.retain(|g| g.passthrough == d.passthrough);
        std::borrow::Cow::Owned(view)
    }
}

/// Chooses where an instance runs, and whom to evict when it does not fit.
pub trait Placer: Send + Sync {
    fn place(&self, host: &HostCapacity, demand: &Demand) -> Result<Assignment, PlacementError>;

    /// Residents to evict so that `demand` fits: interruptible ones of strictly lower priority,
    /// the least GPU capacity first, then the fewest. Empty when it fits as it is.
    fn plan_preemption(
        &self,
        host: &HostCapacity,
        demand: &Demand,
    ) -> Result<Vec<String>, PlacementError> {
        let _ = (host, demand);
        Err(PlacementError::NoPreemption)
    }

    /// Tenant `tenant`'s `demand` became an instance (its row exists; `host` is the capacity
    /// it was placed against): a placer that measures against recent demands remembers it.
    /// Called by the engine, not by `place` (a placed demand may still be refused after).
    fn accepted(&self, tenant: &str, host: &HostCapacity, demand: &Demand) {
        let _ = (tenant, host, demand);
    }

    /// The recent demands this placer has accepted, oldest first, as the scheduler's requests
    /// (for [`Cluster::with_recent`]); none for a placer that keeps no history.
    fn recent_demands(&self) -> Vec<gpuvisor_scheduler::Request> {
        Vec::new()
    }
}

/// The single-host placer.
#[derive(Debug, Default, Clone)]
pub struct SingleHost;

/// The GPU may serve a request for `model`: any whole GPU when none is named, a MIG slice only
/// when its model (`A100-80GB-3g.40gb`) is named.
fn model_ok(g: &GpuSlot, model: &Option<String>) -> bool {
    match model {
        Some(m) => g.model.eq_ignore_ascii_case(m),
        None => !g.mig,
    }
}

impl Placer for SingleHost {
    fn place(&self, all: &HostCapacity, d: &Demand) -> Result<Assignment, PlacementError> {
        // Whole GPUs of the other kind (counted for the refusal's hint).
        let other_kind = all
            .gpus
            .iter()
            .filter(|g| g.passthrough != d.passthrough && model_ok(g, &d.model))
            .count() as u32;
        let host = &*all.for_demand(d);
        let free_mem = host.memory.saturating_sub(host.used_memory);
        if d.memory > free_mem {
            return Err(PlacementError::Memory {
                wanted: d.memory,
                free: free_mem,
                total: host.memory,
            });
        }
        let model_name = d.model.clone().unwrap_or_else(|| "any".to_string());
        let mut gpus = Vec::new();
        if d.whole_gpus > 0 {
            let candidates: Vec<&GpuSlot> =
                host.gpus.iter().filter(|g| model_ok(g, &d.model)).collect();
            let free: Vec<&GpuSlot> = candidates
                .iter()
                .copied()
                .filter(|g| g.used_milli == 0 && g.used_vram == 0)
                .collect();
            if (free.len() as u32) < d.whole_gpus {
                let (wanted, free, total) =
                    (d.whole_gpus, free.len() as u32, candidates.len() as u32);
                return Err(if d.passthrough {
                    PlacementError::PassthroughGpus {
                        wanted,
                        model: model_name,
                        free,
                        total,
                        for_containers: other_kind,
                    }
                } else {
                    PlacementError::Gpus {
                        wanted,
                        model: model_name,
                        free,
                        total,
                        for_vms: other_kind,
                    }
                });
            }
            // Prefer one NUMA node that can hold the whole request, the fullest such node
            // first (keeps other nodes whole), then lowest index.
            let mut by_node: BTreeMap<Option<u32>, Vec<&GpuSlot>> = BTreeMap::new();
            for g in &free {
                by_node.entry(g.numa_node).or_default().push(g);
            }
            let chosen: Vec<&GpuSlot> = match by_node
                .values()
                .filter(|v| v.len() as u32 >= d.whole_gpus)
                .min_by_key(|v| v.len())
            {
                Some(v) => v.iter().take(d.whole_gpus as usize).copied().collect(),
                None => free.iter().take(d.whole_gpus as usize).copied().collect(),
            };
            gpus = chosen
                .into_iter()
                .map(|g| GpuAssignment {
                    uuid: g.uuid.clone(),
                    index: g.index,
                    model: g.model.clone(),
                    milli: 1000,
                    vram: g.vram,
                })
                .collect();
        } else if d.milli > 0 {
            // Best fit: the GPU with the least compute left that still fits, so partly used GPUs
            // fill up before a whole one is broken.
            let best = host
                .gpus
                .iter()
                .filter(|g| model_ok(g, &d.model) && !g.mig)
                .filter_map(|g| {
                    let vram = d.vram.unwrap_or(g.vram / 1000 * u64::from(d.milli));
                    let fits = g.used_milli + d.milli <= 1000 && g.used_vram + vram <= g.vram;
                    fits.then(|| (1000 - g.used_milli - d.milli, g.index, g, vram))
                })
                .min_by_key(|(left, idx, _, _)| (*left, *idx));
            match best {
                Some((_, _, g, vram)) => gpus.push(GpuAssignment {
                    uuid: g.uuid.clone(),
                    index: g.index,
                    model: g.model.clone(),
                    milli: d.milli,
                    vram,
                }),
                None => {
                    return Err(PlacementError::GpuShare {
                        model: model_name,
                        milli: d.milli,
                        vram: d.vram.unwrap_or(0),
                    })
                }
            }
        }
        let cpus = pick_cpus(host, &gpus, d.vcpus)?;
        Ok(Assignment { gpus, cpus })
    }
}

/// Pinned CPUs for an instance: least used first, the NUMA node of its first GPU first, then
/// by id (deterministic); each CPU takes at most `cpu_ratio` instances.
fn pick_cpus(
    host: &HostCapacity,
    gpus: &[GpuAssignment],
    vcpus: u32,
) -> Result<Vec<u32>, PlacementError> {
    let numa: Option<u32> = gpus
        .first()
        .and_then(|a| host.gpus.iter().find(|g| g.uuid == a.uuid))
        .and_then(|g| g.numa_node);
    let ratio = host.cpu_ratio.max(1);
    let mut free_cpus: Vec<(u32, u32, u32)> = host
        .cpus
        .iter()
        .map(|(cpu, node)| (*cpu, *node, host.cpu_use.get(cpu).copied().unwrap_or(0)))
        .filter(|(_, _, used)| *used < ratio)
        .collect();
    if (free_cpus.len() as u32) < vcpus {
        return Err(PlacementError::Cpus {
            wanted: vcpus,
            free: free_cpus.len() as u32,
            total: host.cpus.len() as u32,
        });
    }
    free_cpus.sort_by_key(|(cpu, node, used)| (*used, numa.is_some_and(|n| n != *node), *cpu));
    let mut cpus: Vec<u32> = free_cpus.iter().take(vcpus as usize).map(|c| c.0).collect();
    cpus.sort_unstable();
    Ok(cpus)
}

/// How many recent demands a [`Scheduled`] placer keeps for its target workload.
pub const RECENT_DEMANDS: usize = 256;

/// No one tenant has more of them than this.
pub const RECENT_PER_TENANT: usize = RECENT_DEMANDS / 8;

/// The last [`RECENT_DEMANDS`] instances created through a placer (their demands), for the
/// target workload.
///
/// Only what became an instance counts ([`Placer::accepted`], called by the engine once the
/// instance's row exists): a demand refused, or placed and then refused for another reason, is
/// not remembered. Bounded in length and per tenant: at most [`RECENT_PER_TENANT`] of one
/// tenant's, a new one of a tenant at its quota replacing that tenant's oldest, not the oldest
/// overall. So one tenant's flood (create, delete, create...) weighs at most an eighth of the
/// window, whatever its sizes, and the others' demands seen before it stay; sizes weigh as they
/// come, so a size that is most of the workload is most of the window.
#[derive(Debug, Default, Clone)]
pub struct RecentDemands {
    window: VecDeque<(String, gpuvisor_scheduler::Request)>,
}

impl RecentDemands {
    /// Remembers tenant `tenant`'s demand (its priority is dropped: only its shape counts).
    pub fn push(&mut self, tenant: &str, r: &gpuvisor_scheduler::Request) {
        let r = gpuvisor_scheduler::Request {
            priority: 0,
            interruptible: false,
            ..r.clone()
        };
        let own = self.window.iter().filter(|(t, _)| t == tenant).count();
        if own >= RECENT_PER_TENANT {
            if let Some(i) = self.window.iter().position(|(t, _)| t == tenant) {
                self.window.remove(i);
            }
        } else if self.window.len() >= RECENT_DEMANDS {
            self.window.pop_front();
        }
        self.window.push_back((tenant.to_string(), r));
    }

    /// The demands kept, oldest first.
    pub fn requests(&self) -> impl Iterator<Item = &gpuvisor_scheduler::Request> {
        self.window.iter().map(|(_, r)| r)
    }

    pub fn len(&self) -> usize {
        self.window.len()
    }

    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }
}

/// The scheduler crate's policies applied to one host, measured against a target workload of
/// the residents' requests, the recent demands it accepted and the request itself. Clones share
/// the recent demands.
#[derive(Debug, Clone)]
pub struct Scheduled {
    pub policy: gpuvisor_scheduler::Policy,
    recent: Arc<Mutex<RecentDemands>>,
}

impl Default for Scheduled {
    fn default() -> Self {
        Self::new(gpuvisor_scheduler::Policy::GvFrag)
    }
}

impl Scheduled {
    pub fn new(policy: gpuvisor_scheduler::Policy) -> Self {
        Self {
            policy,
            recent: Arc::default(),
        }
    }

    fn remember(&self, tenant: &str, r: &gpuvisor_scheduler::Request) {
        // A poisoned lock only means another placement panicked mid-push: the window is
        // still a valid (bounded) list.
        let mut w = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        w.push(tenant, r);
    }

    /// The window's demands for GPUs of one kind (`passthrough`: a VM's), or of both.
    fn recent(&self, passthrough: Option<bool>) -> Vec<gpuvisor_scheduler::Request> {
        let w = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        w.requests()
            .filter(|r| passthrough.is_none_or(|p| r.passthrough == p))
            .cloned()
            .collect()
    }
}

const MIB: u64 = 1 << 20;

fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

fn sched_request(host: &HostCapacity, d: &Demand) -> gpuvisor_scheduler::Request {
    use gpuvisor_scheduler::GpuDemand;
    let gpu = if d.whole_gpus > 0 {
        GpuDemand::Whole(d.whole_gpus)
    } else if d.milli > 0 {
        // VRAM of a share defaults to the same fraction of the GPU's VRAM; the smallest
        // eligible GPU gives the bound the scheduler checks.
        let vram = d.vram.unwrap_or_else(|| {
            host.gpus
                .iter()
                .filter(|g| model_ok(g, &d.model))
                .map(|g| g.vram / 1000 * u64::from(d.milli))
                .min()
                .unwrap_or(0)
        });
        GpuDemand::Fraction {
            milli: d.milli,
            vram_mib: mib_up(vram),
        }
    } else {
        GpuDemand::None
    };
    gpuvisor_scheduler::Request {
        cpu_milli: u64::from(d.vcpus) * 1000,
        memory_mib: mib_up(d.memory),
        gpu,
        models: d.model.iter().cloned().collect(),
        priority: d.priority,
        interruptible: d.interruptible,
        passthrough: d.passthrough,
    }
}

/// A resident as the scheduler sees it: its request and where its GPUs are. `gpu_of` maps a
/// GPU UUID to (index on the node, VRAM bytes); GPUs it does not know are left out.
fn resident_request(
    r: &Resident,
    passthrough: bool,
    gpu_of: impl Fn(&str) -> Option<(usize, u64)>,
) -> (gpuvisor_scheduler::Request, Vec<(usize, u32, u64)>) {
    use gpuvisor_scheduler::GpuDemand;
    let whole = !r.gpus.is_empty() && r.gpus.iter().all(|(_, m, _)| *m >= 1000);
    let placed: Vec<(usize, u32, u64)> = r
        .gpus
        .iter()
        .filter_map(|(uuid, milli, vram)| {
            let (g, gpu_vram) = gpu_of(uuid)?;
            // A whole GPU takes all of its VRAM; a share what it reserved.
            let vram_mib = if whole { gpu_vram / MIB } else { mib_up(*vram) };
            Some((g, *milli, vram_mib))
        })
        .collect();
    let gpu = match (whole, placed.first()) {
        (_, None) => GpuDemand::None,
        (true, _) => GpuDemand::Whole(placed.len() as u32),
        (false, Some(&(_, milli, vram_mib))) => GpuDemand::Fraction { milli, vram_mib },
    };
    let req = gpuvisor_scheduler::Request {
        cpu_milli: u64::from(r.vcpus) * 1000,
        memory_mib: r.memory / MIB,
        gpu,
        models: Vec::new(),
        priority: r.priority,
        interruptible: r.interruptible,
        // On the GPUs of a VM's view of the host (see `for_demand`), a VM.
        passthrough: passthrough && !placed.is_empty(),
    };
    (req, placed)
}

impl Scheduled {
    /// The host as one scheduler node with every resident committed (instance id = index).
    /// `host` is one kind's view ([`HostCapacity::for_demand`]). With `workload` (the request
    /// being placed), the target workload is the residents' requests that hold GPUs in this
    /// view, the recent demands of the request's kind, and the request.
    fn model(
        &self,
        host: &HostCapacity,
        workload: Option<&gpuvisor_scheduler::Request>,
    ) -> Result<gpuvisor_scheduler::Scheduler, PlacementError> {
        use gpuvisor_scheduler::{Gpu, GpuKind, Node, Placement, Scheduler};
        let err = |e: gpuvisor_scheduler::SchedError| PlacementError::Model(e.to_string());
        let gpus: Vec<Gpu> = host
            .gpus
            .iter()
            .map(|g| {
                let kind = if g.passthrough {
                    GpuKind::Passthrough
                } else if g.mig {
                    GpuKind::Mig
                } else {
                    GpuKind::Shareable
                };
                let mut m = Gpu::new(g.model.clone(), g.vram / MIB, kind);
                m.numa = g.numa_node;
                m
            })
            .collect();
        let cpu_milli = host.cpus.len() as u64 * u64::from(host.cpu_ratio.max(1)) * 1000;
        let node = Node::new("host", cpu_milli, host.memory / MIB, gpus);
        let mut sched = Scheduler::new(vec![node], self.policy, 0).map_err(err)?;
        let passthrough = host.gpus.iter().any(|g| g.passthrough);
        let mut sample = Vec::new();
        for (i, r) in host.residents.iter().enumerate() {
            let (req, placed) = resident_request(r, passthrough, |uuid| {
                let g = host.gpus.iter().position(|s| s.uuid == uuid)?;
                Some((g, host.gpus[g].vram))
            });
            sched
                .commit(
                    i as u64,
                    &req,
                    Placement {
                        node: 0,
                        gpus: placed,
                    },
                )
                .map_err(err)?;
            if workload.is_some() && req.gpu != gpuvisor_scheduler::GpuDemand::None {
                sample.push(req);
            }
        }
        if let Some(req) = workload {
            sample.extend(self.recent(Some(req.passthrough)));
            sample.push(req.clone());
            sched.set_target_workload(&sample);
        }
        Ok(sched)
    }
}

impl Placer for Scheduled {
    fn place(&self, all: &HostCapacity, d: &Demand) -> Result<Assignment, PlacementError> {
        // The rules first: they give the precise error when something does not fit.
        let rules = SingleHost.place(all, d)?;
        let host = &*all.for_demand(d);
        if d.whole_gpus == 0 && d.milli == 0 {
            return Ok(rules);
        }
        let req = sched_request(host, d);
        let mut sched = self.model(host, Some(&req))?;
        let Ok(p) = sched.decide(&req) else {
            return Ok(rules);
        };
        let gpus: Vec<GpuAssignment> = p
            .gpus
            .iter()
            .filter_map(|&(g, milli, _)| {
                let slot = host.gpus.get(g)?;
                Some(GpuAssignment {
                    uuid: slot.uuid.clone(),
                    index: slot.index,
                    model: slot.model.clone(),
                    milli,
                    vram: if milli >= 1000 {
                        slot.vram
                    } else {
                        d.vram.unwrap_or(slot.vram / 1000 * u64::from(milli))
                    },
                })
            })
            .collect();
        // The scheduler's choice must still satisfy the rules (VRAM in bytes, not MiB).
        let fits = gpus.iter().all(|a| {
            host.gpus.iter().any(|g| {
                g.uuid == a.uuid
                    && model_ok(g, &d.model)
                    && (!g.mig || a.milli >= 1000)
                    && g.used_milli + a.milli <= 1000
                    && g.used_vram + a.vram <= g.vram
            })
        });
        if !fits || gpus.is_empty() {
            return Ok(rules);
        }
        let cpus = pick_cpus(host, &gpus, d.vcpus)?;
        Ok(Assignment { gpus, cpus })
    }

    fn plan_preemption(
        &self,
        all: &HostCapacity,
        d: &Demand,
    ) -> Result<Vec<String>, PlacementError> {
        if SingleHost.place(all, d).is_ok() {
            return Ok(Vec::new());
        }
        let host = &*all.for_demand(d);
        // The cheapest plan does not depend on the workload.
        let sched = self.model(host, None)?;
        let plan = sched
            .plan_preemption(&sched_request(host, d))
            .map_err(|_| PlacementError::NoPreemption)?;
        let victims: Vec<String> = plan
            .victims
            .iter()
            .filter_map(|&i| host.residents.get(i as usize).map(|r| r.id.clone()))
            .collect();
        // The plan must satisfy the rules too (pinned CPUs are not in the scheduler's model).
        if victims.is_empty() || SingleHost.place(&host.without(&victims), d).is_err() {
            return Err(PlacementError::NoPreemption);
        }
        Ok(victims)
    }

    fn accepted(&self, tenant: &str, all: &HostCapacity, d: &Demand) {
        if d.whole_gpus == 0 && d.milli == 0 {
            return; // no GPU: nothing for the fragmentation measure
        }
        self.remember(tenant, &sched_request(&all.for_demand(d), d));
    }

    fn recent_demands(&self) -> Vec<gpuvisor_scheduler::Request> {
        self.recent(None)
    }
}

/// A simulated node (like a KWOK fake node): capacity only, nothing on this host.
#[derive(Debug, Clone, PartialEq)]
pub struct SimNode {
    pub id: String,
    pub cpus: u32,
    pub memory: u64,
    /// Every GPU of the node, in index order (`used_*` are ignored: residents count).
    pub gpus: Vec<GpuSlot>,
}

/// Where an instance goes on the simulated nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterAssignment {
    pub node_id: String,
    pub gpus: Vec<GpuAssignment>,
    /// Instances to evict first (empty when it fits as it is).
    pub victims: Vec<String>,
}

/// All simulated nodes as one scheduler, with the instances already on them committed. Built
/// once per decision (under the engine's placement lock); it never touches the host.
///
/// VRAM of a share that gives none is the share's fraction of the smallest eligible GPU, and
/// that is what is recorded, so what is committed and what is stored always agree.
pub struct Cluster {
    sched: gpuvisor_scheduler::Scheduler,
    nodes: Vec<SimNode>,
    /// Resident ids, by scheduler instance id.
    residents: Vec<String>,
    /// The target workload but for the request: the residents' requests, then recent demands.
    workload: Vec<gpuvisor_scheduler::Request>,
}

impl Cluster {
    /// `residents` are (node id, instance) pairs; ones on unknown nodes, or that no longer fit
    /// (the node list shrank), are left out of the model.
    pub fn new(
        nodes: Vec<SimNode>,
        residents: &[(String, Resident)],
        policy: gpuvisor_scheduler::Policy,
    ) -> Result<Self, PlacementError> {
        use gpuvisor_scheduler::{Gpu, GpuKind, Node, Placement, Scheduler};
        let err = |e: gpuvisor_scheduler::SchedError| PlacementError::Model(e.to_string());
        let model: Vec<Node> = nodes
            .iter()
            .map(|n| {
                let gpus = n
                    .gpus
                    .iter()
                    .map(|g| {
                        let mut m = Gpu::new(g.model.clone(), g.vram / MIB, GpuKind::Shareable);
                        m.numa = g.numa_node;
                        m
                    })
                    .collect();
                Node::new(n.id.clone(), u64::from(n.cpus) * 1000, n.memory / MIB, gpus)
            })
            .collect();
        let mut where_gpu: std::collections::HashMap<&str, (usize, usize)> =
            std::collections::HashMap::new();
        let mut where_node: std::collections::HashMap<&str, usize> =
            std::collections::HashMap::new();
        for (ni, n) in nodes.iter().enumerate() {
            where_node.insert(n.id.as_str(), ni);
            for (gi, g) in n.gpus.iter().enumerate() {
                where_gpu.insert(g.uuid.as_str(), (ni, gi));
            }
        }
        let mut sched = Scheduler::new(model, policy, 0).map_err(err)?;
        let mut ids = Vec::new();
        let mut workload = Vec::new();
        for (node_id, r) in residents {
            let Some(&node) = where_node.get(node_id.as_str()) else {
                continue;
            };
            let (req, placed) = resident_request(r, false, |uuid| {
                let &(n, g) = where_gpu.get(uuid)?;
                (n == node).then(|| (g, nodes[n].gpus[g].vram))
            });
            let id = ids.len() as u64;
            let placement = Placement { node, gpus: placed };
            if sched.commit(id, &req, placement).is_ok() {
                ids.push(r.id.clone());
                workload.push(req);
            }
        }
        Ok(Self {
            sched,
            nodes,
            residents: ids,
            workload,
        })
    }

    /// Adds recent demands (a placer's [`Placer::recent_demands`]) to the target workload.
    pub fn with_recent(mut self, recent: Vec<gpuvisor_scheduler::Request>) -> Self {
        self.workload.extend(recent);
        self
    }

    /// The target workload for `req`: the residents, the recent demands and `req` itself.
    fn measure_for(&mut self, req: &gpuvisor_scheduler::Request) {
        self.workload.push(req.clone());
        self.sched.set_target_workload(&self.workload);
        self.workload.pop();
    }

    fn request(&self, d: &Demand) -> gpuvisor_scheduler::Request {
        let mut req = sched_request(
            &HostCapacity {
                gpus: Vec::new(),
                cpus: Vec::new(),
                cpu_use: BTreeMap::new(),
                cpu_ratio: 1,
                memory: 0,
                used_memory: 0,
                residents: Vec::new(),
            },
            d,
        );
        if let gpuvisor_scheduler::GpuDemand::Fraction { milli, vram_mib } = &mut req.gpu {
            if d.vram.is_none() {
                *vram_mib = self
                    .nodes
                    .iter()
                    .flat_map(|n| &n.gpus)
                    .filter(|g| model_ok(g, &d.model))
                    .map(|g| mib_up(g.vram / 1000 * u64::from(*milli)))
                    .min()
                    .unwrap_or(0);
            }
        }
        req
    }

    fn assignment(
        &self,
        p: &gpuvisor_scheduler::Placement,
        victims: Vec<String>,
    ) -> Result<ClusterAssignment, PlacementError> {
        let node = self
            .nodes
            .get(p.node)
            .ok_or_else(|| PlacementError::Model(format!("no node {}", p.node)))?;
        let gpus =
            p.gpus
                .iter()
                .map(|&(g, milli, vram_mib)| {
                    let slot = node.gpus.get(g).ok_or_else(|| {
                        PlacementError::Model(format!("no GPU {g} on {}", node.id))
                    })?;
                    Ok(GpuAssignment {
                        uuid: slot.uuid.clone(),
                        index: slot.index,
                        model: slot.model.clone(),
                        milli,
                        vram: if milli >= 1000 {
                            slot.vram
                        } else {
                            vram_mib * MIB
                        },
                    })
                })
                .collect::<Result<Vec<_>, PlacementError>>()?;
        Ok(ClusterAssignment {
            node_id: node.id.clone(),
            gpus,
            victims,
        })
    }

    /// A node where `d` fits as things are.
    pub fn place(&mut self, d: &Demand) -> Result<ClusterAssignment, PlacementError> {
        let req = self.request(d);
        self.measure_for(&req);
        let p = self
            .sched
            .decide(&req)
            .map_err(|_| PlacementError::GpuShare {
                model: d.model.clone().unwrap_or_else(|| "any".into()),
                milli: if d.whole_gpus > 0 {
                    d.whole_gpus * 1000
                } else {
                    d.milli
                },
                vram: d.vram.unwrap_or(0),
            })?;
        self.assignment(&p, Vec::new())
    }

    /// The scheduler's cheapest eviction plan over all simulated nodes, and where `d` goes
    /// once the victims are gone.
    pub fn preempt(&mut self, d: &Demand) -> Result<ClusterAssignment, PlacementError> {
        let req = self.request(d);
        self.measure_for(&req);
        let plan = self
            .sched
            .plan_preemption(&req)
            .map_err(|_| PlacementError::NoPreemption)?;
        if plan.victims.is_empty() {
            return Err(PlacementError::NoPreemption);
        }
        let victims: Vec<String> = plan
            .victims
            .iter()
            .filter_map(|&i| self.residents.get(i as usize).cloned())
            .collect();
        let p = self
            .sched
            .place_with_plan(u64::MAX, &req, &plan)
            .map_err(|_| PlacementError::NoPreemption)?;
        self.assignment(&p, victims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(n_gpus: u32, cpus: u32) -> HostCapacity {
        HostCapacity {
            gpus: (0..n_gpus)
                .map(|i| GpuSlot {
                    uuid: format!("GPU-{i}"),
                    index: i,
                    model: if i < 2 {
                        "A100-80GB".into()
                    } else {
                        "H100-80GB".into()
                    },
                    vram: 80 << 30,
                    numa_node: Some(if i < n_gpus / 2 { 0 } else { 1 }),
                    used_milli: 0,
                    used_vram: 0,
                    mig: false,
                    passthrough: false,
                })
                .collect(),
            cpus: (0..cpus)
                .map(|c| (c, if c < cpus / 2 { 0 } else { 1 }))
                .collect(),
            cpu_use: BTreeMap::new(),
            cpu_ratio: 1,
            memory: 64 << 30,
            used_memory: 0,
            residents: vec![],
        }
    }

    fn apply(h: &mut HostCapacity, a: &Assignment, mem: u64) {
        for g in &a.gpus {
            let s = h.gpus.iter_mut().find(|s| s.uuid == g.uuid).unwrap();
            s.used_milli += g.milli;
            s.used_vram += g.vram;
        }
        for c in &a.cpus {
            *h.cpu_use.entry(*c).or_default() += 1;
        }
        h.used_memory += mem;
    }

    #[test]
    fn whole_gpus_are_exclusive() {
        let mut h = host(3, 8);
        let d = Demand {
            whole_gpus: 2,
            vcpus: 2,
            memory: 1 << 30,
            ..Default::default()
        };
        let a = SingleHost.place(&h, &d).unwrap();
        assert_eq!(a.gpus.len(), 2);
        apply(&mut h, &a, d.memory);
        let e = SingleHost.place(&h, &d).unwrap_err();
        assert!(
            matches!(
                e,
                PlacementError::Gpus {
                    wanted: 2,
                    free: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    /// MIG slices are whole devices, placed on only when asked for by their model, by both
    /// placers; a fraction never lands on one.
    #[test]
    fn mig_slices_only_by_model_and_whole() {
        let mut h = host(2, 8);
        for g in &mut h.gpus {
            g.mig = true;
            g.model = "A100-80GB-3g.40gb".into();
            g.vram = 40 << 30;
        }
        let plain = Demand {
            whole_gpus: 1,
            vcpus: 1,
            memory: 1 << 30,
            ..Default::default()
        };
        let by_model = Demand {
            model: Some("a100-80gb-3g.40gb".into()),
            ..plain.clone()
        };
        let fraction = Demand {
            whole_gpus: 0,
            milli: 500,
            ..by_model.clone()
        };
        let placers: [&dyn Placer; 2] = [&SingleHost, &Scheduled::default()];
        for p in placers {
            assert!(p.place(&h, &plain).is_err(), "no model: no slice");
            assert!(p.place(&h, &fraction).is_err(), "no fraction of a slice");
            let a = p.place(&h, &by_model).unwrap();
            assert_eq!((a.gpus[0].milli, a.gpus[0].vram), (1000, 40 << 30));
        }
    }

    #[test]
    fn fractions_share_up_to_whole_and_pack() {
        let mut h = host(2, 8);
        let d = Demand {
            milli: 250,
            vcpus: 1,
            memory: 1 << 30,
            ..Default::default()
        };
        let mut used = Vec::new();
        for _ in 0..4 {
            let a = SingleHost.place(&h, &d).unwrap();
            used.push(a.gpus[0].uuid.clone());
            apply(&mut h, &a, d.memory);
        }
        assert!(
            used.iter().all(|u| u == &used[0]),
            "packs onto one GPU: {used:?}"
        );
        let a = SingleHost.place(&h, &d).unwrap();
        assert_ne!(a.gpus[0].uuid, used[0]);
        assert_eq!(a.gpus[0].vram, (80u64 << 30) / 1000 * 250);
    }

    #[test]
    fn full_gpu_is_skipped_not_overflowed() {
        let mut h = host(2, 4);
        h.gpus[0].used_milli = 1000;
        h.gpus[1].used_milli = 950;
        let d = Demand {
            milli: 100,
            vcpus: 1,
            memory: 1,
            ..Default::default()
        };
        assert!(matches!(
            SingleHost.place(&h, &d),
            Err(PlacementError::GpuShare { .. })
        ));
    }

    #[test]
    fn fraction_vram_limit() {
        let h = host(1, 4);
        let d = Demand {
            milli: 100,
            vram: Some(81 << 30),
            vcpus: 1,
            memory: 1,
            ..Default::default()
        };
        assert!(matches!(
            SingleHost.place(&h, &d),
            Err(PlacementError::GpuShare { .. })
        ));
    }

    #[test]
    fn model_constraint() {
        let h = host(3, 4);
        let d = Demand {
            whole_gpus: 1,
            model: Some("h100-80gb".into()),
            vcpus: 1,
            memory: 1,
            ..Default::default()
        };
        assert_eq!(SingleHost.place(&h, &d).unwrap().gpus[0].uuid, "GPU-2");
        let d = Demand {
            whole_gpus: 2,
            model: Some("H100-80GB".into()),
            vcpus: 1,
            memory: 1,
            ..Default::default()
        };
        assert!(matches!(
            SingleHost.place(&h, &d),
            Err(PlacementError::Gpus { total: 1, .. })
        ));
    }

    #[test]
    fn cpus_exclusive_unless_oversubscribed() {
        let mut h = host(0, 2);
        let d = Demand {
            vcpus: 2,
            memory: 1,
            ..Default::default()
        };
        let a = SingleHost.place(&h, &d).unwrap();
        assert_eq!(a.cpus, vec![0, 1]);
        apply(&mut h, &a, 1);
        let d1 = Demand {
            vcpus: 1,
            memory: 1,
            ..Default::default()
        };
        assert!(matches!(
            SingleHost.place(&h, &d1),
            Err(PlacementError::Cpus { free: 0, .. })
        ));
        h.cpu_ratio = 2;
        assert_eq!(SingleHost.place(&h, &d1).unwrap().cpus.len(), 1);
    }

    #[test]
    fn memory_limit() {
        let h = host(0, 2);
        let d = Demand {
            vcpus: 1,
            memory: 65 << 30,
            ..Default::default()
        };
        assert!(matches!(
            SingleHost.place(&h, &d),
            Err(PlacementError::Memory { .. })
        ));
    }

    fn resident(id: &str, gpu: &str, milli: u32, priority: u32, interruptible: bool) -> Resident {
        Resident {
            id: id.into(),
            gpus: vec![(gpu.into(), milli, (80u64 << 30) / 1000 * u64::from(milli))],
            cpus: vec![0],
            vcpus: 1,
            memory: 1 << 30,
            priority,
            interruptible,
        }
    }

    fn host_with(residents: Vec<Resident>) -> HostCapacity {
        let h = host(3, 8);
        HostCapacity::new(h.gpus, h.cpus, 8, h.memory, residents)
    }

    #[test]
    fn scheduled_places_like_the_rules_allow() {
        let h = host_with(vec![resident("a", "GPU-0", 500, 1, false)]);
        let d = Demand {
            milli: 500,
            vcpus: 1,
            memory: 1 << 30,
            priority: 1,
            ..Default::default()
        };
        let a = Scheduled::default().place(&h, &d).unwrap();
        assert_eq!(a.gpus.len(), 1);
        assert_eq!(a.gpus[0].milli, 500);
        let d = Demand {
            whole_gpus: 4,
            vcpus: 1,
            memory: 1,
            ..Default::default()
        };
        assert!(matches!(
            Scheduled::default().place(&h, &d),
            Err(PlacementError::Gpus { .. })
        ));
    }

    #[test]
    fn preemption_evicts_only_lower_priority_interruptible() {
        // Every GPU busy: GPU-0 by a low-priority spot instance, the others on-demand.
        let h = host_with(vec![
            resident("spot", "GPU-0", 1000, 0, true),
            resident("od1", "GPU-1", 1000, 1, false),
            resident("od2", "GPU-2", 1000, 1, false),
        ]);
        let d = Demand {
            whole_gpus: 1,
            vcpus: 1,
            memory: 1 << 30,
            priority: 1,
            ..Default::default()
        };
        let s = Scheduled::default();
        assert!(s.place(&h, &d).is_err());
        assert_eq!(s.plan_preemption(&h, &d).unwrap(), vec!["spot".to_string()]);
        let after = s.place(&h.without(&["spot".to_string()]), &d).unwrap();
        assert_eq!(after.gpus[0].uuid, "GPU-0");
        // Equal priority is never evicted, even if interruptible.
        let d0 = Demand {
            priority: 0,
            ..d.clone()
        };
        assert_eq!(
            s.plan_preemption(&h, &d0),
            Err(PlacementError::NoPreemption)
        );
        // Non-interruptible instances are never evicted.
        let h2 = host_with(vec![
            resident("od0", "GPU-0", 1000, 0, false),
            resident("od1", "GPU-1", 1000, 0, false),
            resident("od2", "GPU-2", 1000, 0, false),
        ]);
        assert_eq!(
            s.plan_preemption(&h2, &d),
            Err(PlacementError::NoPreemption)
        );
    }

    #[test]
    fn cpus_follow_gpu_numa_node() {
        let h = host(4, 8);
        let d = Demand {
            whole_gpus: 1,
            model: Some("H100-80GB".into()),
            vcpus: 2,
            memory: 1,
            ..Default::default()
        };
        let a = SingleHost.place(&h, &d).unwrap();
        // GPU 2 is on node 1 -> CPUs 4..8
        assert!(a.cpus.iter().all(|c| *c >= 4), "{:?}", a.cpus);
    }

    fn sim_nodes(n: usize) -> Vec<SimNode> {
        (0..n)
            .map(|i| SimNode {
                id: format!("sim-{i}"),
                cpus: 8,
                memory: 64 << 30,
                gpus: (0..2)
                    .map(|g| GpuSlot {
                        uuid: format!("GPU-sim-{i}-{g}"),
                        index: g,
                        model: "T4".into(),
                        vram: 16 << 30,
                        numa_node: None,
                        used_milli: 0,
                        used_vram: 0,
                        mig: false,
                        passthrough: false,
                    })
                    .collect(),
            })
            .collect()
    }

    /// GPUs bound to vfio-pci are for VMs, whole, and only for them; the others only for
    /// containers; both placers; refusals say which kind is missing and how to change it.
    #[test]
    fn passthrough_gpus_are_for_vms_only() {
        let mut h = host(2, 8);
        h.gpus[0].passthrough = true;
        let container = Demand {
            whole_gpus: 1,
            vcpus: 1,
            memory: 1 << 30,
            ..Default::default()
        };
        let vm = Demand {
            passthrough: true,
            ..container.clone()
        };
        let placers: [&dyn Placer; 2] = [&SingleHost, &Scheduled::default()];
        for p in placers {
            assert_eq!(p.place(&h, &container).unwrap().gpus[0].uuid, "GPU-1");
            let a = p.place(&h, &vm).unwrap();
            assert_eq!(a.gpus[0].uuid, "GPU-0");
            assert_eq!((a.gpus[0].milli, a.gpus[0].vram), (1000, 80 << 30));

            let e = p
                .place(
                    &h,
                    &Demand {
                        whole_gpus: 2,
                        ..container.clone()
                    },
                )
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "not enough GPUs: 2 any wanted, 1 free of 1; 1 more is bound to vfio-pci, for VMs (an admin's `gpuvisor gpu release GPU` gives one back to containers)"
            );
            let e = p
                .place(
                    &h,
                    &Demand {
                        whole_gpus: 2,
                        ..vm.clone()
                    },
                )
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "not enough GPUs bound to vfio-pci for a VM: 2 any wanted, 1 free of 1; 1 on the host driver is for containers"
            );
            // A fraction is never placed on a passthrough GPU.
            let frac = Demand {
                whole_gpus: 0,
                milli: 500,
                ..container.clone()
            };
            assert_eq!(p.place(&h, &frac).unwrap().gpus[0].uuid, "GPU-1");
            // A VM without GPUs goes anywhere.
            let plain_vm = Demand {
                whole_gpus: 0,
                ..vm.clone()
            };
            assert!(p.place(&h, &plain_vm).unwrap().gpus.is_empty());
        }

        // No GPU bound to vfio-pci: the refusal says how to bind one.
        let h = host(2, 8);
        for p in placers {
            let e = p.place(&h, &vm).unwrap_err();
            assert!(
                matches!(e, PlacementError::PassthroughGpus { total: 0, .. }),
                "{e}"
            );
            assert_eq!(
                e.to_string(),
                "not enough GPUs bound to vfio-pci for a VM: 1 any wanted, 0 free of 0; a VM takes whole GPUs by passthrough: ask an admin to bind one to vfio-pci (`gpuvisor gpu bind-vfio GPU`, while no instance uses it); 2 on the host driver are for containers"
            );
        }
    }

    /// A VM on a passthrough GPU holds it for VMs and its CPUs and memory for everyone; a
    /// container's view of the host is the one it had before VMs (its GPU is left out).
    #[test]
    fn a_vm_resident_holds_its_gpu_and_counts_its_cpus() {
        let mut gpus = host(2, 4).gpus;
        gpus[0].passthrough = true;
        let resident = Resident {
            id: "vm".into(),
            gpus: vec![("GPU-0".into(), 1000, 80 << 30)],
            cpus: vec![0, 1],
            vcpus: 2,
            memory: 1 << 30,
            priority: 1,
            interruptible: true,
        };
        let h = HostCapacity::new(
            gpus,
            (0..4).map(|c| (c, 0)).collect(),
            1,
            64 << 30,
            vec![resident],
        );
        let vm = Demand {
            whole_gpus: 1,
            vcpus: 1,
            memory: 1 << 30,
            passthrough: true,
            priority: 1,
            ..Default::default()
        };
        let placers: [&dyn Placer; 2] = [&SingleHost, &Scheduled::default()];
        for p in placers {
            let e = p.place(&h, &vm).unwrap_err();
            assert!(
                matches!(
                    e,
                    PlacementError::PassthroughGpus {
                        free: 0,
                        total: 1,
                        ..
                    }
                ),
                "{e}"
            );
            let c = p
                .place(
                    &h,
                    &Demand {
                        passthrough: false,
                        vcpus: 2,
                        ..vm.clone()
                    },
                )
                .unwrap();
            assert_eq!(c.gpus[0].uuid, "GPU-1");
            assert_eq!(c.cpus, vec![2, 3], "the VM's CPUs are taken");
        }
        // A higher-priority VM may evict it.
        let urgent = Demand {
            priority: 5,
            ..vm.clone()
        };
        let s = Scheduled::default();
        assert_eq!(
            s.plan_preemption(&h, &urgent).unwrap(),
            vec!["vm".to_string()]
        );
        let a = s.place(&h.without(&["vm".to_string()]), &urgent).unwrap();
        assert_eq!(a.gpus[0].uuid, "GPU-0");
        // A container never evicts it for its GPU: the VM's GPU is not in its view.
        let c = Demand {
            passthrough: false,
            whole_gpus: 2,
            priority: 5,
            ..vm
        };
        assert!(s.plan_preemption(&h, &c).is_err());
    }

    /// Simulated nodes have no GPU bound to vfio-pci: a VM with GPUs never lands there.
    #[test]
    fn simulated_nodes_take_no_vm_with_gpus() {
        let mut c = Cluster::new(sim_nodes(2), &[], gpuvisor_scheduler::Policy::GvFrag).unwrap();
        let vm = Demand {
            whole_gpus: 1,
            vcpus: 1,
            memory: 1 << 30,
            passthrough: true,
            ..Default::default()
        };
        assert!(c.place(&vm).is_err());
        assert!(c
            .place(&Demand {
                passthrough: false,
                ..vm.clone()
            })
            .is_ok());
        assert!(c
            .place(&Demand {
                whole_gpus: 0,
                ..vm
            })
            .is_ok());
    }

    #[test]
    fn cluster_places_and_preempts_across_nodes() {
        let policy = gpuvisor_scheduler::Policy::GvFrag;
        let d = Demand {
            milli: 500,
            vcpus: 1,
            memory: 1 << 30,
            ..Default::default()
        };
        let mut c = Cluster::new(sim_nodes(2), &[], policy).unwrap();
        let a = c.place(&d).unwrap();
        assert_eq!(a.gpus[0].milli, 500);
        assert_eq!(a.gpus[0].vram, mib_up((16u64 << 30) / 1000 * 500) * MIB);
        // Both nodes full: three on-demand whole GPUs and one spot.
        let whole = |id: &str, node: usize, g: usize, prio: u32, spot: bool| {
            (
                format!("sim-{node}"),
                Resident {
                    id: id.into(),
                    gpus: vec![(format!("GPU-sim-{node}-{g}"), 1000, 16 << 30)],
                    cpus: vec![],
                    vcpus: 1,
                    memory: 1 << 30,
                    priority: prio,
                    interruptible: spot,
                },
            )
        };
        let res = vec![
            whole("a", 0, 0, 1, false),
            whole("b", 0, 1, 1, false),
            whole("c", 1, 0, 1, false),
            whole("spot", 1, 1, 0, true),
        ];
        let mut c = Cluster::new(sim_nodes(2), &res, policy).unwrap();
        let d = Demand {
            whole_gpus: 1,
            vcpus: 1,
            memory: 1 << 30,
            priority: 1,
            ..Default::default()
        };
        assert!(c.place(&d).is_err());
        let a = c.preempt(&d).unwrap();
        assert_eq!(a.victims, vec!["spot".to_string()]);
        assert_eq!(a.node_id, "sim-1");
        assert_eq!(a.gpus[0].uuid, "GPU-sim-1-1");
        let d0 = Demand { priority: 0, ..d };
        let mut c = Cluster::new(sim_nodes(2), &res, policy).unwrap();
        assert_eq!(c.preempt(&d0), Err(PlacementError::NoPreemption));
    }

    /// A 300-milli share on a host whose GPU-0 has 500 milli taken and GPU-2 is taken whole.
    /// Judged against the request alone (FGD without a workload), the empty GPU-1 looks best:
    /// nothing is left too small for another 300. Once the workload is known to hold whole-GPU
    /// requests, breaking GPU-1 costs a whole GPU, so the share goes onto GPU-0.
    fn share_host(residents: Vec<Resident>) -> (HostCapacity, Demand) {
        let d = Demand {
            milli: 300,
            vcpus: 1,
            memory: 1 << 30,
            ..Default::default()
        };
        (host_with(residents), d)
    }

    #[test]
    fn scheduled_measures_against_the_residents() {
        let (h, d) = share_host(vec![
            resident("w", "GPU-2", 1000, 1, false),
            resident("f", "GPU-0", 500, 1, false),
        ]);
        let a = Scheduled::default().place(&h, &d).unwrap();
        assert_eq!(a.gpus[0].uuid, "GPU-0");
    }

    #[test]
    fn scheduled_measures_against_the_demands_it_has_seen() {
        let (h, d) = share_host(vec![resident("f", "GPU-0", 500, 1, false)]);
        // A placer that has seen nothing but shares: the empty GPU is as good as any.
        let fresh = Scheduled::default();
        assert_eq!(fresh.place(&h, &d).unwrap().gpus[0].uuid, "GPU-1");
        // One that has seen whole-GPU requests keeps GPU-1 whole.
        let seen = Scheduled::default();
        let whole = Demand {
            whole_gpus: 1,
            vcpus: 1,
            memory: 1 << 30,
            ..Default::default()
        };
        // Placing them is not enough: only what became an instance counts.
        for _ in 0..2 {
            seen.place(&h, &whole).unwrap();
        }
        assert_eq!(seen.place(&h, &d).unwrap().gpus[0].uuid, "GPU-1");
        for _ in 0..2 {
            seen.accepted("t", &h, &whole);
        }
        assert_eq!(seen.place(&h, &d).unwrap().gpus[0].uuid, "GPU-0");
    }

    #[test]
    fn cluster_measures_against_the_residents() {
        let share = |id: &str, node: usize, g: usize, milli: u32| {
            (
                format!("sim-{node}"),
                Resident {
                    id: id.into(),
                    gpus: vec![(
                        format!("GPU-sim-{node}-{g}"),
                        milli,
                        (16u64 << 30) / 1000 * u64::from(milli),
                    )],
                    cpus: vec![],
                    vcpus: 1,
                    memory: 1 << 30,
                    priority: 1,
                    interruptible: false,
                },
            )
        };
        let res = vec![share("w", 1, 1, 1000), share("f", 0, 0, 500)];
        let mut c = Cluster::new(sim_nodes(2), &res, gpuvisor_scheduler::Policy::GvFrag).unwrap();
        let d = Demand {
            milli: 300,
            vcpus: 1,
            memory: 1 << 30,
            ..Default::default()
        };
        let a = c.place(&d).unwrap();
        assert_eq!(
            (a.node_id.as_str(), a.gpus[0].uuid.as_str()),
            ("sim-0", "GPU-sim-0-0")
        );
    }

    #[test]
    fn cluster_measures_against_recent_demands() {
        // sim-0 GPU 0 has 500 milli taken; no resident asks for whole GPUs, but recent demands do.
        let res = vec![(
            "sim-0".to_string(),
            Resident {
                id: "f".into(),
                gpus: vec![("GPU-sim-0-0".into(), 500, 8 << 30)],
                cpus: vec![],
                vcpus: 1,
                memory: 1 << 30,
                priority: 1,
                interruptible: false,
            },
        )];
        let d = Demand {
            milli: 300,
            vcpus: 1,
            memory: 1 << 30,
            ..Default::default()
        };
        let policy = gpuvisor_scheduler::Policy::GvFrag;
        let mut c = Cluster::new(sim_nodes(2), &res, policy).unwrap();
        assert_eq!(c.place(&d).unwrap().gpus[0].uuid, "GPU-sim-0-1");
        let seen = Scheduled::new(policy);
        let whole = Demand {
            whole_gpus: 1,
            vcpus: 1,
            memory: 1 << 30,
            ..Default::default()
        };
        // Placed is not remembered (the engine may still refuse it); created is.
        seen.place(&host(3, 8), &whole).unwrap();
        assert!(seen.recent_demands().is_empty());
        for _ in 0..2 {
            seen.accepted("t", &host(3, 8), &whole);
        }
        assert_eq!(seen.recent_demands().len(), 2);
        let mut c = Cluster::new(sim_nodes(2), &res, policy)
            .unwrap()
            .with_recent(seen.recent_demands());
        assert_eq!(c.place(&d).unwrap().gpus[0].uuid, "GPU-sim-0-0");
    }

    #[test]
    fn recent_demands_are_bounded_and_a_flood_keeps_the_rest() {
        use gpuvisor_scheduler::{GpuDemand, Request};
        let req = |gpu| Request {
            cpu_milli: 1000,
            gpu,
            ..Request::default()
        };
        let mut w = RecentDemands::default();
        for n in 1..=8 {
            w.push("a", &req(GpuDemand::Whole(n)));
        }
        // One tenant's flood, of any sizes: an eighth of the window at most, the others stay.
        for i in 0..10_000u32 {
            let gpu = match i % 3 {
                0 => GpuDemand::Whole(1),
                1 => GpuDemand::Whole(8),
                _ => GpuDemand::Fraction {
                    milli: 1 + i % 1000,
                    vram_mib: 0,
                },
            };
            w.push("flood", &req(gpu));
        }
        assert_eq!(w.len(), 8 + RECENT_PER_TENANT);
        for n in 1..=8 {
            assert!(w.requests().any(|r| r.gpu == GpuDemand::Whole(n)), "{n}");
        }
        // Many tenants fill the window, never past its length, the oldest going first.
        for t in 0..100 {
            for _ in 0..4 {
                w.push(&format!("t{t}"), &req(GpuDemand::Whole(2)));
            }
        }
        assert_eq!(w.len(), RECENT_DEMANDS);
        assert!(!w.requests().any(|r| r.gpu == GpuDemand::Whole(3)));
    }
}
