//! The scheduler: cluster state, placement decisions, release and preemption.
//!
//! Key decision: a node's evaluation for a request depends only on the node's state and the
//! request's *shape* (everything but its identity), never on randomness, so evaluations are
//! memoised per (shape, node) and invalidated by a per-node version counter. A placement changes
//! one node, so a decision over thousands of nodes re-evaluates one node and compares the rest.
//! Randomness only breaks exact ties, from a seeded splitmix64 stream.

use std::collections::{BTreeMap, HashMap};

use crate::model::{GpuDemand, GpuKind, Node, Placement, Request, MAX_GPUS_PER_NODE, MILLI};
use crate::policy::Policy;
use crate::rng::SplitMix64;
use crate::SchedError;

/// Identifies a placed instance (chosen by the caller).
pub type InstanceId = u64;

/// The published simulator's normalisation constants (128 CPUs, 8 GPUs).
const MAX_SPEC_CPU: f64 = 128_000.0;
const MAX_SPEC_GPU: f64 = 8_000.0;

/// A request compiled against the cluster's model table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    cpu: u64,
    mem: u64,
    demand: GpuDemand,
    /// Allowed model ids as a bitmask (all ones = any).
    models: u64,
    passthrough: bool,
}

impl Shape {
    fn kind_ok(&self, kind: GpuKind) -> bool {
        match self.demand {
            GpuDemand::None => false,
            GpuDemand::Whole(_) if self.passthrough => kind == GpuKind::Passthrough,
            GpuDemand::Whole(_) => {
                matches!(kind, GpuKind::WholeOnly | GpuKind::Shareable | GpuKind::Mig)
            }
            GpuDemand::Fraction { .. } => !self.passthrough && kind == GpuKind::Shareable,
        }
    }

    /// (GPUs needed, milli needed on each).
    fn need(&self) -> (u32, u32) {
        match self.demand {
            GpuDemand::None => (0, 0),
            GpuDemand::Whole(n) => (n, MILLI),
            GpuDemand::Fraction { milli, .. } => (1, milli),
        }
    }
}

/// One spec of the target workload with its popularity.
#[derive(Debug, Clone)]
struct Spec {
    shape: Shape,
    p: f64,
}

/// A memoised evaluation of one node for one shape. Nodes compare by (score, tie, tie2).
#[derive(Debug, Clone, Copy, Default)]
struct Eval {
    version: u32,
    fits: bool,
    score: f64,
    tie: f64,
    tie2: f64,
    /// GPUs to use (bitmask of indices).
    gpus: u64,
    /// gvfrag: the full-node request shapes (bits into `Scheduler::full`) that fit on the node
    /// now and would not after this placement.
    kills: u64,
}

/// How `decide` ranks a node (greater is better): gvfrag's reserve, gvfrag's pool pressure
/// (negated), score, tie, tie2.
type Key = (f64, f64, f64, f64, f64);

/// A full-node request shape of the target workload (as many GPUs as the largest node has),
/// with how many of them the sample holds per milli-GPU of its demand.
#[derive(Debug, Clone)]
struct FullSpec {
    shape: Shape,
    per_milli: f64,
}

#[derive(Debug, Clone)]
struct Instance {
    req: Request,
    placement: Placement,
}

/// A plan to make room for a request by evicting instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreemptionPlan {
    pub node: usize,
    /// Instances to evict, ascending.
    pub victims: Vec<InstanceId>,
    /// GPU capacity evicted, milli-GPU.
    pub evicted_milli: u64,
}

/// Cluster state plus a policy.
#[derive(Debug, Clone)]
pub struct Scheduler {
    nodes: Vec<Node>,
    policy: Policy,
    rng: SplitMix64,
    models: Vec<String>,
    /// Per node, per GPU: model id.
    gpu_model: Vec<Vec<u8>>,
    version: Vec<u32>,
    specs: Vec<Spec>,
    /// Per node, per spec: bitmask of GPUs whose model and kind suit the spec.
    spec_elig: Vec<Vec<u64>>,
    /// Per node: (version, fragmentation, stranding) before any change.
    frag_cache: Vec<(u32, f64, f64)>,
    shapes: HashMap<Shape, usize>,
    cache: Vec<Vec<Eval>>,
    instances: BTreeMap<InstanceId, Instance>,
    /// gvfrag's full-node reserve: the full-node shapes of the target workload (at most 64),
    /// per node a bitmask of those that fit now, per shape the number of nodes it fits on,
    /// and the cluster's free GPU milli.
    full: Vec<FullSpec>,
    full_fit: Vec<u64>,
    full_avail: Vec<u32>,
    free_milli: u64,
    /// gvfrag's pool pressure: per GPU model, the share of the target workload's GPU demand
    /// pinned to it (a request allowed k of the models counts 1/k for each), and the free GPU
    /// milli of that model in the cluster.
    pin_share: Vec<f64>,
    model_free: Vec<u64>,
}

const MAX_CACHED_SHAPES: usize = 4096;

impl Scheduler {
    /// A scheduler over `nodes` (their free amounts are taken as they are).
    pub fn new(nodes: Vec<Node>, policy: Policy, seed: u64) -> Result<Self, SchedError> {
        let mut models: Vec<String> = Vec::new();
        let mut gpu_model = Vec::with_capacity(nodes.len());
        for n in &nodes {
            if n.gpus.len() > MAX_GPUS_PER_NODE {
                return Err(SchedError::TooManyGpus(n.name.clone()));
            }
            let mut ids = Vec::with_capacity(n.gpus.len());
            for g in &n.gpus {
                let id = match models.iter().position(|m| *m == g.model) {
                    Some(i) => i,
                    None => {
                        models.push(g.model.clone());
                        models.len() - 1
                    }
                };
                if id >= 64 {
                    return Err(SchedError::TooManyModels);
                }
                ids.push(id as u8);
            }
            gpu_model.push(ids);
        }
        let n = nodes.len();
        Ok(Self {
            nodes,
            policy,
            rng: SplitMix64::new(seed),
            models,
            gpu_model,
            version: vec![1; n],
            specs: Vec::new(),
            spec_elig: vec![Vec::new(); n],
            frag_cache: vec![(0, 0.0, 0.0); n],
            shapes: HashMap::new(),
            cache: Vec::new(),
            instances: BTreeMap::new(),
            full: Vec::new(),
            full_fit: vec![0; n],
            full_avail: Vec::new(),
            free_milli: 0,
            pin_share: Vec::new(),
            model_free: Vec::new(),
        })
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The instances placed, with their placements.
    pub fn placements(&self) -> impl Iterator<Item = (InstanceId, &Request, &Placement)> {
        self.instances
            .iter()
            .map(|(id, i)| (*id, &i.req, &i.placement))
    }

    /// Sets the target workload of the fragmentation measure from a sample of requests: specs
    /// are (CPU, GPU demand, allowed models), most popular first, kept until they cover ≥ 95%
    /// of the sample, popularity renormalised over those kept (as FGD does). Memory is the
    /// smallest seen for the spec (used by `gvfrag` only). Without a workload the measure uses
    /// the request being placed as the only spec.
    pub fn set_target_workload(&mut self, sample: &[Request]) {
        let mut counts: HashMap<Shape, (u64, u64)> = HashMap::new();
        for r in sample {
            let mut s = self.compile(r);
            let mem = s.mem;
            s.mem = 0;
            if let GpuDemand::Fraction { milli, .. } = s.demand {
                s.demand = GpuDemand::Fraction { milli, vram_mib: 0 };
            }
            let e = counts.entry(s).or_insert((0, u64::MAX));
            e.0 += 1;
            e.1 = e.1.min(mem);
        }
        let mut list: Vec<(Shape, u64, u64)> =
            counts.into_iter().map(|(s, (c, m))| (s, c, m)).collect();
        list.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| shape_order(&a.0).cmp(&shape_order(&b.0)))
        });
        let total: u64 = list.iter().map(|x| x.1).sum();
        let mut kept = Vec::new();
        let mut cum = 0u64;
        for (s, c, m) in list {
            if total > 0 && cum * 100 >= total * 95 {
                break;
            }
            cum += c;
            let w = c as f64;
            kept.push(Spec {
                shape: Shape { mem: m, ..s },
                p: w,
            });
        }
        let sum: f64 = kept.iter().map(|s| s.p).sum();
        for s in &mut kept {
            s.p /= sum;
        }
        self.specs = kept;
        self.rebuild_elig();
        self.set_full_specs(sample);
        self.invalidate_all();
    }

    /// The full-node reserve's shapes: requests of the sample for as many whole GPUs as the
    /// largest node has, each with its count per milli-GPU of the sample's demand, so that
    /// `per_milli × free GPU milli` is how many of them to expect before the cluster is full.
    fn set_full_specs(&mut self, sample: &[Request]) {
        let largest = self.nodes.iter().map(|n| n.gpus.len()).max().unwrap_or(0) as u32;
        let demand: u64 = sample.iter().map(|r| r.gpu.milli()).sum();
        let mut counts: Vec<(Shape, u64)> = Vec::new();
        for r in sample {
            let GpuDemand::Whole(k) = r.gpu else { continue };
            if k < largest || largest < 2 {
                continue;
            }
            let s = self.compile(r);
            match counts.iter_mut().find(|c| c.0 == s) {
                Some(c) => c.1 += 1,
                None => counts.push((s, 1)),
            }
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        counts.truncate(64);
        self.full = counts
            .into_iter()
            .map(|(shape, c)| FullSpec {
                shape,
                per_milli: if demand > 0 {
                    c as f64 / demand as f64
                } else {
                    0.0
                },
            })
            .collect();
        self.full_avail = vec![0; self.full.len()];
        self.free_milli = self.nodes.iter().map(Node::free_gpu_milli).sum();
        self.set_pin_shares(sample, demand);
        for n in 0..self.nodes.len() {
            self.full_fit[n] = 0;
            self.refresh_full(n);
        }
    }

    /// The pool pressure's inputs: per model, the share of the sample's GPU demand pinned to
    /// it, and the free GPU milli of each model now.
    fn set_pin_shares(&mut self, sample: &[Request], demand: u64) {
        let nm = self.models.len();
        let present: u64 = if nm >= 64 { u64::MAX } else { (1u64 << nm) - 1 };
        self.pin_share = vec![0.0; nm];
        for r in sample {
            let m = self.compile(r).models & present;
            let k = m.count_ones();
            if m == present || k == 0 || demand == 0 {
                continue;
            }
            let w = r.gpu.milli() as f64 / f64::from(k) / demand as f64;
            for (i, share) in self.pin_share.iter_mut().enumerate() {
                if m >> i & 1 == 1 {
                    *share += w;
                }
            }
        }
        self.model_free = vec![0; nm];
        for (n, node) in self.nodes.iter().enumerate() {
            for (g, gpu) in node.gpus.iter().enumerate() {
                self.model_free[usize::from(self.gpu_model[n][g])] += u64::from(gpu.free_milli);
            }
        }
    }

    /// gvfrag's pool pressure per model: the GPU demand pinned to the model expected before
    /// the cluster is full (pinned share × free GPU milli of the cluster) per free GPU milli of
    /// the model; 0 for a model nothing is pinned to, and below [`PRESSURE_GATE`]. `None` when
    /// nothing is pinned at all.
    fn pressure(&self) -> Option<[f64; 64]> {
        if !self.pin_share.iter().any(|&w| w > 0.0) {
            return None;
        }
        let mut out = [0.0; 64];
        for (i, (&w, &f)) in self.pin_share.iter().zip(&self.model_free).enumerate() {
            out[i] = if w == 0.0 {
                0.0
            } else if f == 0 {
                f64::INFINITY
            } else {
                w * self.free_milli as f64 / f as f64
            };
            // Below the gate the pool has room to spare: no reason to steer away from it.
            if out[i] < PRESSURE_GATE {
                out[i] = 0.0;
            }
        }
        Some(out)
    }

    /// Recomputes which full-node shapes fit on node `n` and the per-shape node counts.
    fn refresh_full(&mut self, n: usize) {
        if self.full.is_empty() {
            return;
        }
        let node = &self.nodes[n];
        let mut mask = 0u64;
        for (i, f) in self.full.iter().enumerate() {
            if fits_on(node, &self.gpu_model[n], &f.shape) {
                mask |= 1 << i;
            }
        }
        let old = self.full_fit[n];
        for i in 0..self.full.len() {
            let (was, is) = (old >> i & 1 == 1, mask >> i & 1 == 1);
            if was && !is {
                self.full_avail[i] -= 1;
            } else if is && !was {
                self.full_avail[i] += 1;
            }
        }
        self.full_fit[n] = mask;
    }

    /// The full-node shapes in short supply: no more nodes fit them than [`RESERVE_FACTOR`] times
    /// the requests for them expected before the cluster is full. gvfrag does not take a node's
    /// last room for such a shape while another node can take the request.
    fn scarce_full(&self) -> u64 {
        let mut m = 0u64;
        for (i, f) in self.full.iter().enumerate() {
            let expected = f.per_milli * self.free_milli as f64;
            if f64::from(self.full_avail[i]) <= expected.ceil() * RESERVE_FACTOR {
                m |= 1 << i;
            }
        }
        m
    }

    fn rebuild_elig(&mut self) {
        for (i, n) in self.nodes.iter().enumerate() {
            self.spec_elig[i] = self
                .specs
                .iter()
                .map(|s| elig_mask(n, &self.gpu_model[i], &s.shape))
                .collect();
        }
    }

    fn invalidate_all(&mut self) {
        for v in &mut self.version {
            *v = v.wrapping_add(1).max(1);
        }
    }

    fn touch(&mut self, node: usize) {
        self.version[node] = self.version[node].wrapping_add(1).max(1);
        self.refresh_full(node);
    }

    fn compile(&self, r: &Request) -> Shape {
        let models = if r.models.is_empty() {
            u64::MAX
        } else {
            let mut m = 0u64;
            for name in &r.models {
                if let Some(i) = self.models.iter().position(|x| x == name) {
                    m |= 1 << i;
                }
            }
            m
        };
        Shape {
            cpu: r.cpu_milli,
            mem: r.memory_mib,
            demand: r.gpu,
            models,
            passthrough: r.passthrough,
        }
    }

    /// Picks a node and GPUs for `req` without changing any state except the tie-breaking
    /// stream. Errors with [`SchedError::NoFit`] when no node can take it.
    pub fn decide(&mut self, req: &Request) -> Result<Placement, SchedError> {
        let shape = self.compile(req);
        if let GpuDemand::Whole(0) = shape.demand {
            return Err(SchedError::Invalid("zero whole GPUs".into()));
        }
        if let GpuDemand::Fraction { milli, .. } = shape.demand {
            if milli == 0 || milli > MILLI {
                return Err(SchedError::Invalid(
                    "fraction must be 1..=1000 milli".into(),
                ));
            }
        }
        let sid = self.shape_id(shape);
        let scarce = if self.policy == Policy::GvFrag {
            self.scarce_full()
        } else {
            0
        };
        // gvfrag's second key, for GPU requests when the workload pins GPU models.
        let pressure = if self.policy == Policy::GvFrag && shape.demand.milli() > 0 {
            self.pressure()
        } else {
            None
        };
        let mut best: Option<(Key, usize, u64)> = None;
        let mut ties = 0u64;
        // FGD and gvfrag keep the first (lowest-index) of equal nodes: consolidation. With
        // uniform random ties our FGD leaves 9.9% unallocated at arrived 100% on openb default
        // instead of the published 4.77; with first-index ties it comes within 0.2.
        let random_ties = !matches!(self.policy, Policy::Fgd | Policy::GvFrag);
        for n in 0..self.nodes.len() {
            let e = self.eval_cached(sid, shape, n);
            if !e.fits {
                continue;
            }
            // gvfrag's first key: keep the last room for a scarce full-node request.
            let keep = if e.kills & scarce != 0 { 0.0 } else { 1.0 };
            // gvfrag's second key: the pool whose pinned demand presses least on its room,
            // judged by the most pressed pool among the GPUs the request would take (a node
            // may hold several models, e.g. MIG profiles).
            let press = match &pressure {
                Some(p) => -self.gpu_model[n]
                    .iter()
                    .enumerate()
                    .filter(|(g, _)| e.gpus >> g & 1 == 1)
                    .map(|(_, &m)| p[usize::from(m)])
                    .fold(0.0, f64::max),
                None => 0.0,
            };
            let key = (keep, press, e.score, e.tie, e.tie2);
            let cand = (key, n, e.gpus);
            match best {
                None => {
                    best = Some(cand);
                    ties = 1;
                }
                Some((k, _, _)) => match key.partial_cmp(&k) {
                    Some(std::cmp::Ordering::Greater) => {
                        best = Some(cand);
                        ties = 1;
                    }
                    Some(std::cmp::Ordering::Equal) => {
                        ties += 1;
                        if random_ties && self.rng.below(ties) == 0 {
                            best = Some(cand);
                        }
                    }
                    _ => {}
                },
            }
        }
        let (_, node, gpus) = best.ok_or(SchedError::NoFit)?;
        Ok(self.placement_of(node, gpus, &shape))
    }

    fn placement_of(&self, node: usize, gpus: u64, shape: &Shape) -> Placement {
        let mut out = Vec::new();
        for g in 0..self.nodes[node].gpus.len() {
            if gpus >> g & 1 == 1 {
                match shape.demand {
                    GpuDemand::Whole(_) => out.push((g, MILLI, self.nodes[node].gpus[g].vram_mib)),
                    GpuDemand::Fraction { milli, vram_mib } => out.push((g, milli, vram_mib)),
                    GpuDemand::None => {}
                }
            }
        }
        Placement { node, gpus: out }
    }

    /// Decides and commits.
    pub fn place(&mut self, id: InstanceId, req: &Request) -> Result<Placement, SchedError> {
        if self.instances.contains_key(&id) {
            return Err(SchedError::DuplicateInstance(id));
        }
        let p = self.decide(req)?;
        self.commit(id, req, p.clone())?;
        Ok(p)
    }

    /// Records a placement (checked: it must fit now).
    pub fn commit(
        &mut self,
        id: InstanceId,
        req: &Request,
        placement: Placement,
    ) -> Result<(), SchedError> {
        if self.instances.contains_key(&id) {
            return Err(SchedError::DuplicateInstance(id));
        }
        let shape = self.compile(req);
        let node = self
            .nodes
            .get(placement.node)
            .ok_or(SchedError::BadPlacement("no such node"))?;
        if node.free_cpu_milli < req.cpu_milli || node.free_memory_mib < req.memory_mib {
            return Err(SchedError::BadPlacement("cpu or memory"));
        }
        let (want, _) = shape.need();
        if placement.gpus.len() != want as usize {
            return Err(SchedError::BadPlacement("gpu count"));
        }
        let mut seen = 0u64;
        for &(g, milli, vram) in &placement.gpus {
            let gpu = node
                .gpus
                .get(g)
                .ok_or(SchedError::BadPlacement("no such gpu"))?;
            if seen >> g & 1 == 1 {
                return Err(SchedError::BadPlacement("gpu twice"));
            }
            seen |= 1 << g;
            let model_ok = shape.models >> self.gpu_model[placement.node][g] & 1 == 1;
            let fits = match shape.demand {
                GpuDemand::Whole(_) => gpu.is_empty() && milli == MILLI,
                GpuDemand::Fraction { milli: m, vram_mib } => {
                    m == milli
                        && vram == vram_mib
                        && gpu.free_milli >= m
                        && (gpu.vram_mib == 0 || gpu.free_vram_mib >= vram_mib)
                }
                GpuDemand::None => false,
            };
            if !model_ok || !shape.kind_ok(gpu.kind) || !fits {
                return Err(SchedError::BadPlacement("gpu does not fit"));
            }
        }
        let node = &mut self.nodes[placement.node];
        node.free_cpu_milli -= req.cpu_milli;
        node.free_memory_mib -= req.memory_mib;
        for &(g, milli, vram) in &placement.gpus {
            let gpu = &mut node.gpus[g];
            gpu.free_milli -= milli;
            gpu.free_vram_mib = gpu.free_vram_mib.saturating_sub(vram);
            self.free_milli = self.free_milli.saturating_sub(u64::from(milli));
            let model = usize::from(self.gpu_model[placement.node][g]);
            if let Some(f) = self.model_free.get_mut(model) {
                *f = f.saturating_sub(u64::from(milli));
            }
        }
        self.touch(placement.node);
        self.instances.insert(
            id,
            Instance {
                req: req.clone(),
                placement,
            },
        );
        Ok(())
    }

    /// Frees what an instance holds.
    pub fn release(&mut self, id: InstanceId) -> Result<Placement, SchedError> {
        let inst = self
            .instances
            .remove(&id)
            .ok_or(SchedError::UnknownInstance(id))?;
        let node = &mut self.nodes[inst.placement.node];
        node.free_cpu_milli += inst.req.cpu_milli;
        node.free_memory_mib += inst.req.memory_mib;
        for &(g, milli, vram) in &inst.placement.gpus {
            let gpu = &mut node.gpus[g];
            gpu.free_milli += milli;
            gpu.free_vram_mib = (gpu.free_vram_mib + vram).min(gpu.vram_mib);
            self.free_milli += u64::from(milli);
            let model = usize::from(self.gpu_model[inst.placement.node][g]);
            if let Some(f) = self.model_free.get_mut(model) {
                *f += u64::from(milli);
            }
        }
        self.touch(inst.placement.node);
        Ok(inst.placement)
    }

    fn shape_id(&mut self, shape: Shape) -> usize {
        if let Some(&i) = self.shapes.get(&shape) {
            return i;
        }
        if self.shapes.len() >= MAX_CACHED_SHAPES {
            self.shapes.clear();
            self.cache.clear();
        }
        let i = self.shapes.len();
        self.shapes.insert(shape, i);
        self.cache.push(vec![Eval::default(); self.nodes.len()]);
        i
    }

    fn eval_cached(&mut self, sid: usize, shape: Shape, n: usize) -> Eval {
        let v = self.version[n];
        let c = self.cache[sid][n];
        if c.version == v {
            return c;
        }
        let mut e = self.eval(&shape, n);
        e.version = v;
        if e.fits && self.full_fit[n] != 0 && self.policy == Policy::GvFrag {
            e.kills = self.kills(n, &shape, e.gpus);
        }
        self.cache[sid][n] = e;
        e
    }

    /// The full-node shapes that fit on node `n` now and would not once `shape` is placed
    /// there on the GPUs `gpus`.
    fn kills(&self, n: usize, shape: &Shape, gpus: u64) -> u64 {
        let node = &self.nodes[n];
        let cpu = node.free_cpu_milli - shape.cpu;
        let mem = node.free_memory_mib - shape.mem;
        let (_, milli) = shape.need();
        let mut empty = 0u64;
        for (g, gpu) in node.gpus.iter().enumerate() {
            let used = gpus >> g & 1 == 1 && milli > 0;
            if gpu.is_empty() && !used {
                empty |= 1 << g;
            }
        }
        let mut out = 0u64;
        for (i, f) in self.full.iter().enumerate() {
            if self.full_fit[n] >> i & 1 == 0 {
                continue;
            }
            let elig = elig_mask(node, &self.gpu_model[n], &f.shape);
            let fits = cpu >= f.shape.cpu
                && mem >= f.shape.mem
                && (elig & empty).count_ones() >= f.shape.need().0;
            if !fits {
                out |= 1 << i;
            }
        }
        out
    }

    /// Fragmentation and (gvfrag only) stranding of node `n` before any change, memoised per
    /// node version.
    fn frag_now(&mut self, n: usize, shape: &Shape) -> (f64, f64) {
        let node = &self.nodes[n];
        let (cpu, mem) = (node.free_cpu_milli, node.free_memory_mib);
        let frees: Vec<u32> = node.gpus.iter().map(|g| g.free_milli).collect();
        if self.specs.is_empty() {
            return (
                self.frag_single(n, shape, cpu, mem, &frees),
                self.strand_any(n, shape, cpu, mem, &frees),
            );
        }
        let v = self.version[n];
        if self.frag_cache[n].0 == v {
            return (self.frag_cache[n].1, self.frag_cache[n].2);
        }
        let f = self.frag(n, cpu, mem, &frees);
        let s = self.strand_any(n, shape, cpu, mem, &frees);
        self.frag_cache[n] = (v, f, s);
        (f, s)
    }

    /// gvfrag's stranding measure S_n(M) = Σ_m p_m·S_n(m) (see [`spec_strand`]); 0 for the
    /// other policies, which do not use it.
    fn strand_any(&self, n: usize, shape: &Shape, cpu: u64, mem: u64, frees: &[u32]) -> f64 {
        if self.policy != Policy::GvFrag {
            return 0.0;
        }
        let total: u64 = frees.iter().map(|&f| u64::from(f)).sum();
        if total == 0 {
            return 0.0;
        }
        if self.specs.is_empty() {
            let mask = elig_mask(&self.nodes[n], &self.gpu_model[n], shape);
            return spec_strand(shape, mask, cpu, mem, frees, total);
        }
        let mut acc = 0.0;
        for (s, &mask) in self.specs.iter().zip(&self.spec_elig[n]) {
            acc += s.p * spec_strand(&s.shape, mask, cpu, mem, frees, total);
        }
        acc
    }

    /// Node `n`'s fragmentation now, in milli-GPU, as reported by the simulator: FGD's measure
    /// (CPU and GPU, not memory) over the GPU specs of the target workload, popularity
    /// renormalised over them: the free GPU milli a random GPU pod of the workload could not
    /// use on this node. (The CPU-only specs, which count every free GPU as a fragment, are left
    /// out: they shift every node alike.) 0 without a target workload.
    pub fn node_fragmentation_milli(&self, n: usize) -> f64 {
        let Some(node) = self.nodes.get(n) else {
            return 0.0;
        };
        let frees: Vec<u32> = node.gpus.iter().map(|g| g.free_milli).collect();
        let total: u64 = frees.iter().map(|&f| u64::from(f)).sum();
        let (mut acc, mut weight) = (0.0, 0.0);
        for (s, &mask) in self.specs.iter().zip(&self.spec_elig[n]) {
            if s.shape.need().0 == 0 {
                continue;
            }
            weight += s.p;
            acc += s.p
                * spec_frag(
                    &s.shape,
                    mask,
                    node.free_cpu_milli,
                    node.free_memory_mib,
                    &frees,
                    total,
                    false,
                ) as f64;
        }
        if weight > 0.0 {
            acc / weight
        } else {
            0.0
        }
    }

    fn frag_any(&self, n: usize, shape: &Shape, cpu: u64, mem: u64, frees: &[u32]) -> f64 {
        if self.specs.is_empty() {
            self.frag_single(n, shape, cpu, mem, frees)
        } else {
            self.frag(n, cpu, mem, frees)
        }
    }

    /// F_n(M) = Σ_m p_m·F_n(m): the free GPU milli that spec m cannot use on this node.
    /// A CPU-only spec counts all free GPU milli, as the published code does (it shifts every
    /// node's score equally, so it does not change a decision).
    fn frag(&self, n: usize, cpu: u64, mem: u64, frees: &[u32]) -> f64 {
        let total: u64 = frees.iter().map(|&f| u64::from(f)).sum();
        if total == 0 {
            return 0.0;
        }
        let elig = &self.spec_elig[n];
        let mut acc = 0.0;
        for (s, &mask) in self.specs.iter().zip(elig) {
            acc += s.p * spec_frag(&s.shape, mask, cpu, mem, frees, total, false) as f64;
        }
        acc
    }

    fn frag_single(&self, n: usize, shape: &Shape, cpu: u64, mem: u64, frees: &[u32]) -> f64 {
        let total: u64 = frees.iter().map(|&f| u64::from(f)).sum();
        let mask = elig_mask(&self.nodes[n], &self.gpu_model[n], shape);
        spec_frag(shape, mask, cpu, mem, frees, total, true) as f64
    }

    /// Evaluates node `n` for `shape`: whether it fits, the policy's score (higher is better),
    /// a tie-breaker and the GPUs to use.
    fn eval(&mut self, shape: &Shape, n: usize) -> Eval {
        let no = Eval::default();
        {
            let node = &self.nodes[n];
            if node.free_cpu_milli < shape.cpu || node.free_memory_mib < shape.mem {
                return no;
            }
        }
        let usable = usable_mask(&self.nodes[n], &self.gpu_model[n], shape);
        let (need, _) = shape.need();
        if usable.count_ones() < need {
            return no;
        }
        let (before, strand_before) = match self.policy {
            Policy::Fgd | Policy::GvFrag => self.frag_now(n, shape),
            _ => (0.0, 0.0),
        };
        // gvfrag's third key: the stranding move, at the resolution of FGD's score.
        let strand_gain = |after: f64| gv(strand_before, after);
        let node = &self.nodes[n];
        let cpu_after = node.free_cpu_milli - shape.cpu;
        let mem_after = node.free_memory_mib - shape.mem;
        let gpu_free = node.free_gpu_milli();
        let gpu_after = gpu_free - shape.demand.milli();
        let mut frees: Vec<u32> = node.gpus.iter().map(|g| g.free_milli).collect();
        let pack = |cpu_after: u64, gpu_after: u64| pack_of(node, cpu_after, gpu_after);
        match shape.demand {
            GpuDemand::Fraction { milli, .. } => {
                let policy = self.policy;
                let mut best: Option<(f64, f64, f64, usize)> = None;
                let mut tried: Vec<(u8, u32)> = Vec::new();
                for g in 0..node.gpus.len() {
                    if usable >> g & 1 == 0 {
                        continue;
                    }
                    let key = (self.gpu_model[n][g], node.gpus[g].free_milli);
                    if tried.contains(&key) {
                        continue;
                    }
                    tried.push(key);
                    let left = node.gpus[g].free_milli - milli;
                    let (s, t, t2) = match policy {
                        Policy::Fgd => {
                            frees[g] = left;
                            let after = self.frag_any(n, shape, cpu_after, mem_after, &frees);
                            frees[g] = node.gpus[g].free_milli;
                            (fgd_score(before, after), 0.0, 0.0)
                        }
                        Policy::GvFrag => {
                            frees[g] = left;
                            let after = self.frag_any(n, shape, cpu_after, mem_after, &frees);
                            let strand = self.strand_any(n, shape, cpu_after, mem_after, &frees);
                            frees[g] = node.gpus[g].free_milli;
                            (gv(before, after), strand_gain(strand), -f64::from(left))
                        }
                        Policy::BestFit | Policy::Random => (-f64::from(left), 0.0, 0.0),
                        Policy::Spread => (f64::from(left), 0.0, 0.0),
                    };
                    if best.is_none_or(|(bs, bt, bt2, _)| (s, t, t2) > (bs, bt, bt2)) {
                        best = Some((s, t, t2, g));
                    }
                }
                let Some((gpu_s, gpu_t, gpu_t2, g)) = best else {
                    return no;
                };
                let (score, tie, tie2) = match policy {
                    Policy::Fgd => (gpu_s, 0.0, 0.0),
                    Policy::GvFrag => (gpu_s, gpu_t, gpu_t2),
                    Policy::BestFit => (bestfit_score(cpu_after, gpu_after), 0.0, 0.0),
                    Policy::Spread => (pack(cpu_after, gpu_after), f64::from(gpu_s as u32), 0.0),
                    Policy::Random => (0.0, 0.0, 0.0),
                };
                Eval {
                    version: 0,
                    fits: true,
                    score,
                    tie,
                    tie2,
                    gpus: 1 << g,
                    kills: 0,
                }
            }
            GpuDemand::Whole(k) => {
                let gpus = choose_whole(node, usable, k);
                let (score, tie, tie2) = match self.policy {
                    Policy::Fgd | Policy::GvFrag => {
                        for (g, f) in frees.iter_mut().enumerate() {
                            if gpus >> g & 1 == 1 {
                                *f = 0;
                            }
                        }
                        let after = self.frag_any(n, shape, cpu_after, mem_after, &frees);
                        if self.policy == Policy::Fgd {
                            (fgd_score(before, after), 0.0, 0.0)
                        } else {
                            let strand = self.strand_any(n, shape, cpu_after, mem_after, &frees);
                            (
                                gv(before, after),
                                strand_gain(strand),
                                -pack(cpu_after, gpu_after),
                            )
                        }
                    }
                    Policy::BestFit => (bestfit_score(cpu_after, gpu_after), 0.0, 0.0),
                    Policy::Spread => (pack(cpu_after, gpu_after), 0.0, 0.0),
                    Policy::Random => (0.0, 0.0, 0.0),
                };
                Eval {
                    version: 0,
                    fits: true,
                    score,
                    tie,
                    tie2,
                    gpus,
                    kills: 0,
                }
            }
            GpuDemand::None => {
                let (score, tie, tie2) = match self.policy {
                    Policy::Fgd | Policy::GvFrag => {
                        let after = self.frag_any(n, shape, cpu_after, mem_after, &frees);
                        if self.policy == Policy::Fgd {
                            (fgd_score(before, after), 0.0, 0.0)
                        } else {
                            let strand = self.strand_any(n, shape, cpu_after, mem_after, &frees);
                            (
                                gv(before, after),
                                strand_gain(strand),
                                -pack(cpu_after, gpu_after),
                            )
                        }
                    }
                    Policy::BestFit => (bestfit_score(cpu_after, gpu_after), 0.0, 0.0),
                    Policy::Spread => (pack(cpu_after, gpu_after), 0.0, 0.0),
                    Policy::Random => (0.0, 0.0, 0.0),
                };
                Eval {
                    version: 0,
                    fits: true,
                    score,
                    tie,
                    tie2,
                    gpus: 0,
                    kills: 0,
                }
            }
        }
    }

    /// The cheapest way to make room for `req` by evicting interruptible instances of strictly
    /// lower priority: least GPU capacity evicted, then fewest instances, then lowest node
    /// index. `Ok` with no victims when it already fits; `Err(NoFit)` when no eviction helps.
    /// Exact for up to 12 candidate victims on a node; greedy (smallest first, then pruned)
    /// beyond, which still frees enough but may not be the cheapest.
    pub fn plan_preemption(&self, req: &Request) -> Result<PreemptionPlan, SchedError> {
        let shape = self.compile(req);
        for (n, node) in self.nodes.iter().enumerate() {
            if fits_on(node, &self.gpu_model[n], &shape) {
                return Ok(PreemptionPlan {
                    node: n,
                    victims: Vec::new(),
                    evicted_milli: 0,
                });
            }
        }
        let mut by_node: BTreeMap<usize, Vec<(InstanceId, &Instance)>> = BTreeMap::new();
        for (id, inst) in &self.instances {
            if inst.req.interruptible && inst.req.priority < req.priority {
                by_node
                    .entry(inst.placement.node)
                    .or_default()
                    .push((*id, inst));
            }
        }
        let mut best: Option<(u64, usize, usize, Vec<InstanceId>)> = None;
        for (n, cands) in by_node {
            let node = &self.nodes[n];
            let models = &self.gpu_model[n];
            let cost = |set: &[usize]| -> (u64, usize) {
                (
                    set.iter().map(|&i| cands[i].1.req.gpu.milli()).sum(),
                    set.len(),
                )
            };
            let fits_without = |set: &[usize]| -> bool {
                let mut tmp = node.clone();
                for &i in set {
                    give_back(&mut tmp, cands[i].1);
                }
                fits_on(&tmp, models, &shape)
            };
            let all: Vec<usize> = (0..cands.len()).collect();
            if !fits_without(&all) {
                continue;
            }
            let chosen: Vec<usize> = if cands.len() <= 12 {
                let mut bestset: Option<((u64, usize), Vec<usize>)> = None;
                for mask in 1u32..(1 << cands.len()) {
                    let set: Vec<usize> = (0..cands.len()).filter(|i| mask >> i & 1 == 1).collect();
                    let c = cost(&set);
                    if bestset.as_ref().is_some_and(|(bc, _)| c >= *bc) {
                        continue;
                    }
                    if fits_without(&set) {
                        bestset = Some((c, set));
                    }
                }
                match bestset {
                    Some((_, s)) => s,
                    None => continue,
                }
            } else {
                let mut order = all.clone();
                order.sort_by_key(|&i| (cands[i].1.req.gpu.milli(), cands[i].0));
                let mut set = Vec::new();
                for i in order {
                    set.push(i);
                    if fits_without(&set) {
                        break;
                    }
                }
                let mut j = set.len();
                while j > 0 {
                    j -= 1;
                    let mut trial = set.clone();
                    trial.remove(j);
                    if fits_without(&trial) {
                        set = trial;
                    }
                }
                set
            };
            let (milli, count) = cost(&chosen);
            let better = best
                .as_ref()
                .is_none_or(|(bm, bc, bn, _)| (milli, count, n) < (*bm, *bc, *bn));
            if better {
                let mut ids: Vec<InstanceId> = chosen.iter().map(|&i| cands[i].0).collect();
                ids.sort_unstable();
                best = Some((milli, count, n, ids));
            }
        }
        let (evicted_milli, _, node, victims) = best.ok_or(SchedError::NoFit)?;
        Ok(PreemptionPlan {
            node,
            victims,
            evicted_milli,
        })
    }

    /// Carries out a plan in the model: releases the victims and places `req` on the plan's
    /// node (the engine stops the victims first, then calls this).
    pub fn place_with_plan(
        &mut self,
        id: InstanceId,
        req: &Request,
        plan: &PreemptionPlan,
    ) -> Result<Placement, SchedError> {
        for v in &plan.victims {
            self.release(*v)?;
        }
        let shape = self.compile(req);
        let e = self.eval(&shape, plan.node);
        if !e.fits {
            return Err(SchedError::NoFit);
        }
        let p = self.placement_of(plan.node, e.gpus, &shape);
        self.commit(id, req, p.clone())?;
        Ok(p)
    }
}

/// gvfrag keeps room for a full-node request shape while the nodes that can take it number no
/// more than this many times the requests for it expected before the cluster is full. The one
/// constant of gvfrag chosen on data: on the development set (seeds 42..46 of default, cpu050,
/// cpu200 and the generator-seed-1 families gpu-spec:0.25, share:0.6, multi:0.3), 1, 2, 4 and
/// 8 still lose to FGD somewhere, 16 does not, 32 and "always" cost more at arrived 100%.
const RESERVE_FACTOR: f64 = 16.0;

/// gvfrag's pool pressure counts only from this level on: a pool whose free room is more than
/// twice the pinned demand expected for it before the cluster is full is not pressed, and FGD's
/// score decides there. Without a gate one lightly pinned pod switched the key fully on. Chosen
/// on the development set (seeds 42..46, generator seed 1, gpu-spec families: the only ones
/// that pin models): 0.35–0.75 are a plateau (mean gvfrag − fgd over the reported points
/// −2.82 at 0.5 against −2.32 ungated), 0.25 falls back to the ungated figures on gpu-spec
/// 0.25 and 0.33, 1 and 2 cost 1–3 points at 90–95% arrived. See docs/bench/scheduler.md.
pub(crate) const PRESSURE_GATE: f64 = 0.5;

fn pack_of(node: &Node, cpu_after: u64, gpu_after: u64) -> f64 {
    let c = cpu_after as f64 / node.cpu_milli.max(1) as f64;
    let g = if node.gpus.is_empty() {
        1.0
    } else {
        gpu_after as f64 / node.total_gpu_milli() as f64
    };
    0.5 * c + 0.5 * g
}

fn shape_order(s: &Shape) -> (u64, u64, u32, u32, u64) {
    let (n, m) = s.need();
    (s.cpu, s.mem, n, m, s.models)
}

/// gvfrag's stranding key at the published score's resolution (about 1/25 GPU near zero):
/// finer differences are noise from the popularity estimate, and treating them as equal lets
/// packing decide.
fn gv(before: f64, after: f64) -> f64 {
    fgd_score(before, after)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The published FGD score: `int64(sigmoid((before − after)/1000) · 100)`.
fn fgd_score(before: f64, after: f64) -> f64 {
    (sigmoid((before - after) / 1000.0) * 100.0).trunc()
}

/// The published best-fit score: `int64((1 − Σ w_i·free_after_i/maxspec_i) · 100)`.
fn bestfit_score(cpu_after: u64, gpu_after: u64) -> f64 {
    let s = 0.5 * cpu_after as f64 / MAX_SPEC_CPU + 0.5 * gpu_after as f64 / MAX_SPEC_GPU;
    ((1.0 - s) * 100.0).trunc()
}

/// GPUs whose model and kind suit `shape` (regardless of what is free).
fn elig_mask(node: &Node, models: &[u8], shape: &Shape) -> u64 {
    let mut m = 0u64;
    for (g, gpu) in node.gpus.iter().enumerate() {
        if shape.models >> models[g] & 1 == 1 && shape.kind_ok(gpu.kind) {
            m |= 1 << g;
        }
    }
    m
}

/// GPUs that can take (their part of) `shape` now.
fn usable_mask(node: &Node, models: &[u8], shape: &Shape) -> u64 {
    let mut m = 0u64;
    for (g, gpu) in node.gpus.iter().enumerate() {
        if shape.models >> models[g] & 1 == 0 || !shape.kind_ok(gpu.kind) {
            continue;
        }
        let ok = match shape.demand {
            GpuDemand::None => false,
            GpuDemand::Whole(_) => gpu.is_empty(),
            GpuDemand::Fraction { milli, vram_mib } => {
                gpu.free_milli >= milli && (gpu.vram_mib == 0 || gpu.free_vram_mib >= vram_mib)
            }
        };
        if ok {
            m |= 1 << g;
        }
    }
    m
}

fn fits_on(node: &Node, models: &[u8], shape: &Shape) -> bool {
    node.free_cpu_milli >= shape.cpu
        && node.free_memory_mib >= shape.mem
        && usable_mask(node, models, shape).count_ones() >= shape.need().0
}

fn give_back(node: &mut Node, inst: &Instance) {
    node.free_cpu_milli += inst.req.cpu_milli;
    node.free_memory_mib += inst.req.memory_mib;
    for &(g, milli, vram) in &inst.placement.gpus {
        if let Some(gpu) = node.gpus.get_mut(g) {
            gpu.free_milli += milli;
            gpu.free_vram_mib = (gpu.free_vram_mib + vram).min(gpu.vram_mib);
        }
    }
}

/// F_n(m) for one spec.
fn spec_frag(
    s: &Shape,
    elig: u64,
    cpu: u64,
    mem: u64,
    frees: &[u32],
    total: u64,
    use_mem: bool,
) -> u64 {
    let (need, milli) = s.need();
    if need == 0 || cpu < s.cpu || (use_mem && mem < s.mem) {
        return total;
    }
    let mut count = 0u32;
    let mut small = 0u64;
    for (g, &f) in frees.iter().enumerate() {
        if elig >> g & 1 == 1 && f >= milli {
            count += 1;
        } else {
            small += u64::from(f);
        }
    }
    if count >= need {
        small
    } else {
        total
    }
}

/// S_n(m): the free GPU milli of node `n` that spec `m` cannot use because the node's CPU or
/// memory runs out first. The GPUs where m fits offer `c` copies of it (per GPU
/// ⌊free/need⌋, or ⌊empty GPUs/N⌋ for N whole GPUs) but CPU and memory only afford
/// `k = min(cpu/cpu_m, mem/mem_m)` (a real number): a share `(c − k)/c` of that GPU capacity is
/// stranded. Free milli on GPUs too small for m is counted too, as in F_n(m), and a node that
/// cannot take m at all strands all its free milli. Unlike F_n(m), which only notices when the
/// very next copy no longer fits, this sees the CPU/GPU balance drift before it is too late.
fn spec_strand(s: &Shape, elig: u64, cpu: u64, mem: u64, frees: &[u32], total: u64) -> f64 {
    let (need, milli) = s.need();
    if need == 0 || cpu < s.cpu || mem < s.mem {
        return total as f64;
    }
    let mut k = f64::INFINITY;
    if s.cpu > 0 {
        k = k.min(cpu as f64 / s.cpu as f64);
    }
    if s.mem > 0 {
        k = k.min(mem as f64 / s.mem as f64);
    }
    let mut copies = 0u64;
    let mut small = 0u64;
    for (g, &f) in frees.iter().enumerate() {
        if elig >> g & 1 == 1 && f >= milli {
            copies += u64::from(f / milli);
        } else {
            small += u64::from(f);
        }
    }
    let c = (copies / u64::from(need)) as f64;
    if c == 0.0 {
        return total as f64;
    }
    if k >= c {
        return small as f64;
    }
    small as f64 + (total - small) as f64 * (c - k) / c
}

/// Picks `k` GPUs from `usable`: the set with the most NVLink links inside it, then the most
/// GPUs on one NUMA node, then the lowest indices. Without topology this is the first `k`.
fn choose_whole(node: &Node, usable: u64, k: u32) -> u64 {
    let idx: Vec<usize> = (0..node.gpus.len())
        .filter(|&g| usable >> g & 1 == 1)
        .collect();
    let first: u64 = idx.iter().take(k as usize).fold(0, |m, &g| m | 1 << g);
    let topo = idx
        .iter()
        .any(|&g| node.gpus[g].nvlink_peers != 0 || node.gpus[g].numa.is_some());
    if !topo || k <= 1 {
        return first;
    }
    let quality = |set: u64| -> (u32, u32) {
        let mut links = 0;
        let mut numa: BTreeMap<u32, u32> = BTreeMap::new();
        for &g in &idx {
            if set >> g & 1 == 1 {
                links += (node.gpus[g].nvlink_peers & set).count_ones();
                if let Some(z) = node.gpus[g].numa {
                    *numa.entry(z).or_default() += 1;
                }
            }
        }
        (links, numa.values().copied().max().unwrap_or(0))
    };
    let mut best = (quality(first), first);
    // Greedy growth from every start: add the usable GPU with most links into the set, then
    // one on the start's NUMA node, then the lowest index.
    for &start in &idx {
        let mut set = 1u64 << start;
        while set.count_ones() < k {
            let pick = idx
                .iter()
                .filter(|&&g| set >> g & 1 == 0)
                .max_by_key(|&&g| {
                    let links = (node.gpus[g].nvlink_peers & set).count_ones();
                    let same = u32::from(
                        node.gpus[g].numa.is_some() && node.gpus[g].numa == node.gpus[start].numa,
                    );
                    (links, same, std::cmp::Reverse(g))
                })
                .copied();
            match pick {
                Some(g) => set |= 1 << g,
                None => break,
            }
        }
        let q = quality(set);
        if set.count_ones() == k && q > best.0 {
            best = (q, set);
        }
    }
    best.1
}
