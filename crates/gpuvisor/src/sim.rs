//! `gpuvisor sim`: replays a GPU-cluster trace (Alibaba openb CSV formats) through the scheduler
//! crate and reports unallocated GPU % per policy, so a policy change is judged on production
//! data, side by side with re-implementations of the published best-fit and FGD.
//!
//! The protocol is the FGD paper's (USENIX ATC'23), as `shared/data/openb/README.md` states it:
//! per seed, sort pods by name and shuffle them; inflate to 1.3× GPU capacity by sampling with
//! replacement; feed them one at a time with no deletions, dropping what does not fit; after
//! every pod bucket alloc% by the integer arrived%; average the buckets over seeds. The key
//! decision: file reading and the protocol live here (I/O stays out of the pure scheduler), and
//! the seeds × policies runs are independent, so they run on all cores.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use gpuvisor_scheduler::{
    rng::SplitMix64, Gpu, GpuDemand, GpuKind, Node, Policy, Request, Scheduler,
};

#[path = "simgen.rs"]
mod simgen;
#[path = "simreplay.rs"]
mod simreplay;

use serde::Serialize;
pub use simgen::GenerateArgs;
pub use simreplay::Replay;

use crate::cli::CliError;
use crate::output::Format;

/// The arrived-% points reported.
pub const POINTS: [usize; 5] = [90, 95, 100, 110, 130];
/// The range over which a policy is compared with FGD point by point.
const COMPARE: std::ops::RangeInclusive<usize> = 90..=130;
const INFLATE: f64 = 1.3;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SimArgs {
    #[command(subcommand)]
    pub action: Option<SimAction>,
    /// Node list CSV (`sn,cpu_milli,memory_mib,gpu,model`).
    #[arg(long, value_name = "FILE", required = true)]
    pub nodes: Option<PathBuf>,
    /// Pod list CSV: `name,cpu_milli,memory_mib,num_gpu,gpu_milli` required, in any order;
    /// `gpu_spec` (allowed GPU models, `|`-separated), `creation_time`, `deletion_time` and the
    /// trace's other columns optional.
    #[arg(long, value_name = "FILE", required = true)]
    pub pods: Option<PathBuf>,
    /// How pods are fed: `shuffle` (the published protocol: per seed shuffled, inflated to 1.3×,
    /// no departures), `time` (trace time: arrivals and departures, no inflation) or `creation`
    /// (creation order, no departures).
    #[arg(long, value_enum, default_value = "shuffle")]
    pub replay: Replay,
    /// Policies to compare (repeat or comma-separate): bestfit, fgd, spread, random, gvfrag.
    #[arg(long = "policy", value_delimiter = ',', default_values_t = vec!["bestfit".to_string(), "fgd".to_string(), "gvfrag".to_string()])]
    pub policies: Vec<String>,
    /// Seeds: `42..51` (inclusive), `42,43` or `42`.
    #[arg(long, default_value = "42..51")]
    pub seeds: String,
    /// Published results to compare with (default: reference_alloc_fgd_atc23.csv beside --pods).
    #[arg(long, value_name = "FILE")]
    pub reference: Option<PathBuf>,
    /// Write the mean allocation curve (arrived % → alloc % per policy) as CSV.
    #[arg(long, value_name = "FILE")]
    pub curve: Option<PathBuf>,
    /// Plot unallocated GPU % against arrived % as SVG.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Time every placement (decide + commit) and report p50/p99 per policy (shuffle replay).
    #[arg(long)]
    pub timing: bool,
}

/// Per integer arrived %: (sum of alloc %, samples).
type Buckets = Vec<(f64, u32)>;
/// A named mean curve: alloc % per integer arrived % (`None` where no sample fell).
type Curve = (String, Vec<Option<f64>>);

/// `gpuvisor sim` sub-modes.
#[derive(Debug, Subcommand)]
pub enum SimAction {
    /// Write a workload family built from a pod list (seeded): a share of the GPU pods
    /// constrained to one GPU model, GPU-sharing, or multi-GPU. See docs/bench/scheduler.md.
    Generate(GenerateArgs),
}

#[derive(Debug, Clone)]
struct Pod {
    name: String,
    req: Request,
    /// `creation_time` and `deletion_time` where the list has them (time replay).
    created: Option<u64>,
    deleted: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Output {
    results: Vec<PolicyResult>,
}

#[derive(Debug, Serialize)]
struct PolicyResult {
    policy: String,
    unallocated_pct: BTreeMap<String, f64>,
    /// Largest (unallocated − fgd's) at the integer points 90..=130 and where.
    worst_vs_fgd: Option<(f64, usize)>,
    full_node: FullNode,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency: Option<Latency>,
}

/// Placement latency over every placement of every seed (`--timing`).
#[derive(Debug, Clone, Copy, Serialize)]
struct Latency {
    p50_us: f64,
    p99_us: f64,
    count: usize,
}

fn latency_of(runs: &[Run]) -> Option<Latency> {
    let mut all: Vec<u64> = runs
        .iter()
        .flat_map(|r| r.latency_ns.iter().copied())
        .collect();
    if all.is_empty() {
        return None;
    }
    all.sort_unstable();
    let at = |q: f64| all[((all.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    Some(Latency {
        p50_us: at(0.5),
        p99_us: at(0.99),
        count: all.len(),
    })
}

fn invalid(msg: impl Into<String>) -> CliError {
    CliError::Invalid(msg.into())
}

fn read(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|e| invalid(format!("reading {}: {e}", path.display())))
}

/// Splits a CSV with a header into rows addressed by column name (the openb files have no
/// quoting): each row has the `want` columns in that order, then the `optional` ones (empty
/// where the file has no such column: the openb release's files differ in which they carry).
/// A missing `want` column is an error that names it.
fn table(
    text: &str,
    path: &Path,
    want: &[&str],
    optional: &[&str],
) -> Result<Vec<Vec<String>>, CliError> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| invalid(format!("{}: empty file", path.display())))?
        .split(',')
        .map(str::trim)
        .collect();
    let position = |w: &str| header.iter().position(|h| *h == w);
    let mut idx: Vec<Option<usize>> = want
        .iter()
        .map(|w| {
            position(w).map(Some).ok_or_else(|| {
                invalid(format!(
                    "{}: the required column {w:?} is missing (the header has: {})",
                    path.display(),
                    header.join(",")
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    idx.extend(optional.iter().map(|w| position(w)));
    let mut out = Vec::new();
    for (n, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').collect();
        let row = idx
            .iter()
            .map(|i| match i {
                Some(i) => cells.get(*i).map(|c| c.trim().to_string()),
                None => Some(String::new()),
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                invalid(format!(
                    "{}: line {}: too few columns",
                    path.display(),
                    n + 2
                ))
            })?;
        out.push(row);
    }
    Ok(out)
}

fn num(s: &str, what: &str) -> Result<u64, CliError> {
    if s.is_empty() {
        return Ok(0);
    }
    s.parse::<u64>()
        .or_else(|_| s.parse::<f64>().map(|f| f.max(0.0) as u64))
        .map_err(|_| invalid(format!("{what}: not a number: {s:?}")))
}

/// The openb node list (also `serve --simulate-nodes`).
pub(crate) fn load_nodes(path: &Path) -> Result<Vec<Node>, CliError> {
    let rows = table(
        &read(path)?,
        path,
        &["sn", "cpu_milli", "memory_mib", "gpu", "model"],
        &[],
    )?;
    rows.iter()
        .map(|r| {
            let gpus = num(&r[3], "gpu")?;
            let gpus = (0..gpus)
                .map(|_| Gpu::new(r[4].clone(), 0, GpuKind::Shareable))
                .collect();
            Ok(Node::new(
                r[0].clone(),
                num(&r[1], "cpu_milli")?,
                num(&r[2], "memory_mib")?,
                gpus,
            ))
        })
        .collect()
}

fn load_pods(path: &Path) -> Result<Vec<Pod>, CliError> {
    pods_from(&read(path)?, path)
}

/// The pods of an openb pod list's text (`path` only names it in errors).
fn pods_from(text: &str, path: &Path) -> Result<Vec<Pod>, CliError> {
    let rows = table(
        text,
        path,
        &["name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli"],
        // The multi-GPU variants' pod lists have none of these.
        &[
            "gpu_spec",
            "qos",
            "pod_phase",
            "creation_time",
            "deletion_time",
            "scheduled_time",
        ],
    )?;
    rows.iter()
        .map(|r| {
            let n = num(&r[3], "num_gpu")? as u32;
            let milli = num(&r[4], "gpu_milli")? as u32;
            let gpu = match (n, milli) {
                (0, _) | (_, 0) => GpuDemand::None,
                (1, m) if m < 1000 => GpuDemand::Fraction {
                    milli: m,
                    vram_mib: 0,
                },
                (n, _) => GpuDemand::Whole(n),
            };
            let models = r[5]
                .split('|')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            let time = |s: &str, what: &str| -> Result<Option<u64>, CliError> {
                if s.is_empty() {
                    Ok(None)
                } else {
                    num(s, what).map(Some)
                }
            };
            Ok(Pod {
                name: r[0].clone(),
                req: Request {
                    cpu_milli: num(&r[1], "cpu_milli")?,
                    memory_mib: num(&r[2], "memory_mib")?,
                    gpu,
                    models,
                    ..Request::default()
                },
                created: time(&r[8], "creation_time")?,
                deleted: time(&r[9], "deletion_time")?,
            })
        })
        .collect()
}

fn parse_seeds(s: &str) -> Result<Vec<u64>, CliError> {
    let bad = || invalid(format!("--seeds {s:?}: expected 42..51, 42,43 or 42"));
    if let Some((a, b)) = s.split_once("..") {
        let a: u64 = a.trim().parse().map_err(|_| bad())?;
        let b: u64 = b
            .trim()
            .trim_start_matches('=')
            .parse()
            .map_err(|_| bad())?;
        if b < a {
            return Err(bad());
        }
        return Ok((a..=b).collect());
    }
    s.split(',')
        .map(|x| x.trim().parse().map_err(|_| bad()))
        .collect()
}

/// What one run of the protocol measured.
#[derive(Debug, Clone, Default)]
struct Run {
    buckets: Buckets,
    /// Arrived % when the first full-node request (as many GPUs as the largest node has) was
    /// refused; `None` if none was.
    first_full_refused: Option<f64>,
    /// Full-node requests refused by arrived 100%.
    full_refused_by_100: u32,
    /// With `--timing`: nanoseconds per placement (decide + commit), in order.
    latency_ns: Vec<u64>,
}

/// One run of the protocol: sum and count of alloc% per integer arrived%.
fn run_one(
    nodes: &[Node],
    pods: &[Pod],
    workload: &[Request],
    policy: Policy,
    seed: u64,
    timing: bool,
) -> Result<Run, CliError> {
    let capacity: u64 = nodes.iter().map(Node::total_gpu_milli).sum();
    if capacity == 0 {
        return Err(invalid("the node list has no GPUs"));
    }
    let mut order: Vec<usize> = (0..pods.len()).collect();
    order.sort_by(|&a, &b| pods[a].name.cmp(&pods[b].name));
    let mut rng = SplitMix64::new(seed);
    rng.shuffle(&mut order);
    let target = (INFLATE * capacity as f64) as u64;
    let mut total: u64 = order.iter().map(|&i| pods[i].req.gpu.milli()).sum();
    let base = order.clone();
    let any_gpu = pods.iter().any(|p| p.req.gpu.milli() > 0);
    while any_gpu && !base.is_empty() {
        let i = base[rng.below(base.len() as u64) as usize];
        let m = pods[i].req.gpu.milli();
        if total + m > target {
            break;
        }
        total += m;
        order.push(i);
    }
    let mut sched =
        Scheduler::new(nodes.to_vec(), policy, seed).map_err(|e| invalid(format!("nodes: {e}")))?;
    sched.set_target_workload(workload);
    let unit = capacity as f64 / 100.0;
    let full = nodes.iter().map(|n| n.gpus.len()).max().unwrap_or(0) as u32;
    let mut run = Run::default();
    let mut buckets: Vec<(f64, u32)> = Vec::new();
    let (mut arrived, mut allocated) = (0u64, 0u64);
    for (id, &i) in order.iter().enumerate() {
        let req = &pods[i].req;
        arrived += req.gpu.milli();
        let start = timing.then(std::time::Instant::now);
        let placed = sched.place(id as u64, req).is_ok();
        if let Some(t) = start {
            run.latency_ns.push(t.elapsed().as_nanos() as u64);
        }
        if placed {
            allocated += req.gpu.milli();
        } else if matches!(req.gpu, GpuDemand::Whole(n) if n >= full) {
            let at = arrived as f64 / unit;
            run.first_full_refused.get_or_insert(at);
            if at <= 100.0 {
                run.full_refused_by_100 += 1;
            }
        }
        let b = (arrived as f64 / unit).round() as usize;
        if buckets.len() <= b {
            buckets.resize(b + 1, (0.0, 0));
        }
        buckets[b].0 += allocated as f64 / unit;
        buckets[b].1 += 1;
    }
    run.buckets = buckets;
    Ok(run)
}

/// Mean over seeds of the per-seed bucket means; `None` where a bucket is empty in every seed.
fn mean_curve(runs: &[Vec<(f64, u32)>]) -> Vec<Option<f64>> {
    let len = runs.iter().map(Vec::len).max().unwrap_or(0);
    (0..len)
        .map(|b| {
            let vals: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.get(b).filter(|x| x.1 > 0).map(|x| x.0 / f64::from(x.1)))
                .collect();
            (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
        })
        .collect()
}

/// Published curves for this workload: policy name → mean alloc% per arrived%.
fn load_reference(path: &Path, workload: &str) -> Result<Vec<Curve>, CliError> {
    let text = read(path)?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (Some(w), Some(p), Some(c0)) = (col("workload"), col("sc_policy"), col("0")) else {
        return Err(invalid(format!("{}: not a reference file", path.display())));
    };
    let mut acc: BTreeMap<String, Vec<Vec<f64>>> = BTreeMap::new();
    for line in lines {
        let cells: Vec<&str> = line.split(',').collect();
        if cells.get(w) != Some(&workload) {
            continue;
        }
        let Some(pol) = cells.get(p) else { continue };
        let vals: Vec<f64> = cells[c0.min(cells.len())..]
            .iter()
            .map(|v| v.parse().unwrap_or(f64::NAN))
            .collect();
        acc.entry(pol.to_string()).or_default().push(vals);
    }
    Ok(acc
        .into_iter()
        .map(|(pol, runs)| {
            let len = runs.iter().map(Vec::len).max().unwrap_or(0);
            let curve = (0..len)
                .map(|b| {
                    let v: Vec<f64> = runs
                        .iter()
                        .filter_map(|r| r.get(b).copied().filter(|x| x.is_finite()))
                        .collect();
                    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
                })
                .collect();
            // "06-FGD" → "fgd (published)"
            let name = pol
                .split_once('-')
                .map_or(pol.as_str(), |x| x.1)
                .to_ascii_lowercase();
            (format!("{name} (published)"), curve)
        })
        .collect())
}

fn unalloc(curve: &[Option<f64>], at: usize) -> Option<f64> {
    curve.get(at).copied().flatten().map(|a| 100.0 - a)
}

/// Runs `f` over `jobs` on `threads` threads; results in job order.
fn par_map<J: Sync, R: Send>(
    jobs: &[J],
    threads: Option<usize>,
    f: impl Fn(&J) -> Result<R, CliError> + Sync,
) -> Result<Vec<R>, CliError> {
    let threads = threads
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
        .clamp(1, jobs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Result<Vec<(usize, R)>, CliError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(job) = jobs.get(j) else { break };
                        out.push((j, f(job)?));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(invalid("a simulation thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(jobs.len());
    for r in results {
        all.extend(r?);
    }
    all.sort_by_key(|x| x.0);
    Ok(all.into_iter().map(|x| x.1).collect())
}

/// Per policy: the mean arrived % of the first full-node refusal over the seeds that had one,
/// how many seeds had one, and the mean number refused by arrived 100%.
#[derive(Debug, Clone, Copy, Serialize)]
struct FullNode {
    first_refused_mean_pct: Option<f64>,
    seeds_with_refusal: usize,
    refused_by_100_mean: f64,
}

fn full_node(runs: &[Run]) -> FullNode {
    let firsts: Vec<f64> = runs.iter().filter_map(|r| r.first_full_refused).collect();
    FullNode {
        first_refused_mean_pct: (!firsts.is_empty())
            .then(|| firsts.iter().sum::<f64>() / firsts.len() as f64),
        seeds_with_refusal: firsts.len(),
        refused_by_100_mean: runs
            .iter()
            .map(|r| f64::from(r.full_refused_by_100))
            .sum::<f64>()
            / runs.len().max(1) as f64,
    }
}

/// The largest excess of `c` over `base` in unallocated % at the integer points 90..=130
/// (negative: below the base everywhere), with the point where it is reached.
fn worst_vs(c: &[Option<f64>], base: &[Option<f64>]) -> Option<(f64, usize)> {
    COMPARE
        .filter_map(|p| Some((unalloc(c, p)? - unalloc(base, p)?, p)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

pub fn run(args: SimArgs, format: Format) -> Result<i32, CliError> {
    if let Some(SimAction::Generate(g)) = args.action {
        return simgen::run(g);
    }
    let (Some(nodes_path), Some(pods_path)) = (&args.nodes, &args.pods) else {
        return Err(invalid("--nodes and --pods are required"));
    };
    let policies: Vec<Policy> = args
        .policies
        .iter()
        .map(|p| p.parse::<Policy>().map_err(|e| invalid(e.to_string())))
        .collect::<Result<_, _>>()?;
    let seeds = parse_seeds(&args.seeds)?;
    let nodes = load_nodes(nodes_path)?;
    let pods = load_pods(pods_path)?;
    let workload: Vec<Request> = pods.iter().map(|p| p.req.clone()).collect();
    let jobs: Vec<(usize, u64)> = (0..policies.len())
        .flat_map(|p| seeds.iter().map(move |&s| (p, s)))
        .collect();
    if args.replay != Replay::Shuffle {
        // Trace time needs the trace's times: a pod list without them would replay as one
        // instant with no departures.
        if args.replay == Replay::Time && pods.iter().all(|p| p.created.is_none()) {
            return Err(invalid(format!(
                "--replay time needs creation_time (and deletion_time) in the pod list; {} has \
                 none: use --replay creation or the shuffled protocol",
                pods_path.display()
            )));
        }
        let events = simreplay::events(&pods, args.replay == Replay::Time);
        let runs = par_map(&jobs, args.jobs, |&(p, seed)| {
            simreplay::replay(&nodes, &pods, &workload, &events, policies[p], seed)
        })?;
        let results: Vec<simreplay::TimeResult> = (0..policies.len())
            .map(|p| {
                let mine: Vec<_> = jobs
                    .iter()
                    .zip(&runs)
                    .filter(|(j, _)| j.0 == p)
                    .map(|(_, r)| r.clone())
                    .collect();
                simreplay::mean(&mine)
            })
            .collect();
        return print_replay(&args, format, &nodes, &pods, &results);
    }

    let runs = par_map(&jobs, args.jobs, |&(p, seed)| {
        run_one(&nodes, &pods, &workload, policies[p], seed, args.timing)
    })?;
    let mut per_policy: Vec<Vec<Run>> = vec![Vec::new(); policies.len()];
    for (j, r) in jobs.iter().zip(runs) {
        per_policy[j.0].push(r);
    }
    let curves: Vec<Curve> = policies
        .iter()
        .zip(&per_policy)
        .map(|(p, runs)| {
            let b: Vec<Buckets> = runs.iter().map(|r| r.buckets.clone()).collect();
            (p.name().to_string(), mean_curve(&b))
        })
        .collect();
    let fulls: Vec<FullNode> = per_policy.iter().map(|r| full_node(r)).collect();
    let latency: Vec<Option<Latency>> = per_policy.iter().map(|r| latency_of(r)).collect();
    let fgd = policies
        .iter()
        .position(|p| *p == Policy::Fgd)
        .map(|i| curves[i].1.clone());
    let vs_fgd: Vec<Option<(f64, usize)>> = curves
        .iter()
        .map(|(_, c)| fgd.as_ref().and_then(|f| worst_vs(c, f)))
        .collect();

    let reference_path = args.reference.clone().or_else(|| {
        let p = pods_path.with_file_name("reference_alloc_fgd_atc23.csv");
        p.exists().then_some(p)
    });
    let workload_name = pods_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let published = match &reference_path {
        Some(p) => load_reference(p, &workload_name)?,
        None => Vec::new(),
    };

    if let Some(path) = &args.curve {
        write_curve(path, &curves)?;
    }
    if let Some(path) = &args.plot {
        write_plot(path, &curves, &published, &workload_name)?;
    }

    let mut stdout = std::io::stdout().lock();
    match format {
        Format::Table => {
            let mut t = comfy_table::Table::new();
            let mut header = vec!["policy".to_string()];
            header.extend(POINTS.iter().map(|p| format!("@{p}%")));
            header.push("worst − fgd @90..130".to_string());
            header.push("1st 8-GPU refused @% (seeds)".to_string());
            header.push("8-GPU refused ≤100%".to_string());
            t.set_header(header);
            let fmt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.2}"));
            for (((name, c), full), vs) in curves.iter().zip(&fulls).zip(&vs_fgd) {
                let mut row = vec![name.clone()];
                row.extend(POINTS.iter().map(|&p| fmt(unalloc(c, p))));
                row.push(vs.map_or("-".to_string(), |(d, p)| format!("{d:+.2} @{p}")));
                row.push(match full.first_refused_mean_pct {
                    Some(x) => format!("{x:.1} ({}/{})", full.seeds_with_refusal, seeds.len()),
                    None => "never".to_string(),
                });
                row.push(format!("{:.1}", full.refused_by_100_mean));
                t.add_row(row);
            }
            for (name, c) in &published {
                let mut row = vec![name.clone()];
                row.extend(POINTS.iter().map(|&p| fmt(unalloc(c, p))));
                row.extend(["", "", ""].map(String::from));
                t.add_row(row);
            }
            writeln!(
                stdout,
                "unallocated GPU % by arrived workload % ({} nodes, {} pods, seeds {}, mean)",
                nodes.len(),
                pods.len(),
                args.seeds
            )?;
            writeln!(stdout, "{t}")?;
            for ((name, _), l) in curves.iter().zip(&latency) {
                if let Some(l) = l {
                    writeln!(
                        stdout,
                        "{name}: placement (decide + commit) p50 {:.1} µs, p99 {:.1} µs, {} placements",
                        l.p50_us, l.p99_us, l.count
                    )?;
                }
            }
        }
        Format::Json | Format::Yaml | Format::Csv => {
            let out = Output {
                results: curves
                    .iter()
                    .zip(&fulls)
                    .zip(&vs_fgd)
                    .zip(&latency)
                    .map(|((((name, c), full), vs), l)| PolicyResult {
                        policy: name.clone(),
                        unallocated_pct: POINTS
                            .iter()
                            .map(|&p| (p.to_string(), round2(unalloc(c, p).unwrap_or(f64::NAN))))
                            .collect(),
                        worst_vs_fgd: vs.map(|(d, p)| (round2(d), p)),
                        full_node: *full,
                        latency: *l,
                    })
                    .collect(),
            };
            write_structured(&mut stdout, format, &out)?;
        }
    }
    Ok(0)
}

fn write_structured(
    out: &mut impl std::io::Write,
    format: Format,
    value: &impl Serialize,
) -> Result<(), CliError> {
    let text = if format == Format::Json {
        serde_json::to_string(value).map_err(|e| invalid(e.to_string()))?
    } else {
        serde_yaml::to_string(value).map_err(|e| invalid(e.to_string()))?
    };
    writeln!(out, "{text}")?;
    Ok(())
}

fn print_replay(
    args: &SimArgs,
    format: Format,
    nodes: &[Node],
    pods: &[Pod],
    results: &[simreplay::TimeResult],
) -> Result<i32, CliError> {
    let mut stdout = std::io::stdout().lock();
    if format != Format::Table {
        write_structured(&mut stdout, format, &results)?;
        return Ok(0);
    }
    let mut t = comfy_table::Table::new();
    t.set_header(vec![
        "policy",
        "arrived GPU % (sum)",
        "refused GPU demand %",
        "refused pods",
        "of them 8-GPU",
        "peak alloc %",
        "frag % of free (mean / max)",
    ]);
    for r in results {
        t.add_row(vec![
            r.policy.clone(),
            format!("{:.1}", r.arrived_pct),
            format!("{:.3}", r.refused_demand_pct),
            r.refused_pods.to_string(),
            r.refused_full_node_pods.to_string(),
            format!("{:.2}", r.peak_alloc_pct),
            format!("{:.2} / {:.2}", r.frag_mean_pct, r.frag_max_pct),
        ]);
    }
    writeln!(
        stdout,
        "replay {:?} ({} nodes, {} pods, seeds {}, mean)",
        args.replay,
        nodes.len(),
        pods.len(),
        args.seeds
    )?;
    writeln!(stdout, "{t}")?;
    let mut o = comfy_table::Table::new();
    let mut header = vec!["policy".to_string(), "measure".to_string()];
    header.extend(
        (0..simreplay::SAMPLES).map(|i| format!("t{}%", i * 100 / (simreplay::SAMPLES - 1))),
    );
    o.set_header(header);
    for r in results {
        for (what, vals) in [
            ("frag % of free", &r.frag_at_pct),
            ("alloc %", &r.alloc_at_pct),
        ] {
            let mut row = vec![r.policy.clone(), what.to_string()];
            row.extend(vals.iter().map(|v| format!("{v:.2}")));
            o.add_row(row);
        }
    }
    writeln!(stdout, "over time (first to last event):\n{o}")?;
    Ok(0)
}

fn round2(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

fn write_curve(path: &Path, curves: &[(String, Vec<Option<f64>>)]) -> Result<(), CliError> {
    let len = curves.iter().map(|c| c.1.len()).max().unwrap_or(0);
    let mut s = String::from("arrived_pct");
    for (n, _) in curves {
        let _ = write!(s, ",{n}_alloc_pct");
    }
    s.push('\n');
    for b in 0..len {
        let _ = write!(s, "{b}");
        for (_, c) in curves {
            match c.get(b).copied().flatten() {
                Some(v) => {
                    let _ = write!(s, ",{v:.4}");
                }
                None => s.push(','),
            }
        }
        s.push('\n');
    }
    std::fs::write(path, s).map_err(|e| invalid(format!("writing {}: {e}", path.display())))
}

fn write_plot(
    path: &Path,
    curves: &[(String, Vec<Option<f64>>)],
    published: &[(String, Vec<Option<f64>>)],
    title: &str,
) -> Result<(), CliError> {
    const COLORS: [&str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
    ];
    let (w, h, l, r, t, b) = (720.0, 440.0, 60.0, 180.0, 30.0, 50.0);
    let (x0, x1) = (80.0, 130.0);
    let all = curves.iter().chain(published);
    let ymax = all
        .clone()
        .flat_map(|(_, c)| (80..=130).filter_map(|p| unalloc(c, p)))
        .fold(5.0_f64, f64::max)
        .ceil();
    let px = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let py = |y: f64| h - b - (y / ymax) * (h - t - b);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{l}\" y=\"18\">unallocated GPU % vs arrived workload % — {title}</text>\n"
    );
    for k in 0..=5 {
        let x = x0 + f64::from(k) * 10.0;
        let _ = writeln!(s, "<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"#ddd\"/><text x=\"{0}\" y=\"{3}\" text-anchor=\"middle\">{x}</text>", px(x), py(0.0), py(ymax), py(0.0) + 16.0);
        let y = ymax * f64::from(k) / 5.0;
        let _ = writeln!(s, "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"#ddd\"/><text x=\"{3}\" y=\"{4}\" text-anchor=\"end\">{y:.1}</text>", px(x0), py(y), px(x1), px(x0) - 6.0, py(y) + 4.0);
    }
    for (i, (name, c)) in all.enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dash = if name.ends_with("(published)") {
            " stroke-dasharray=\"5,3\""
        } else {
            ""
        };
        let pts: Vec<String> = (80..=130)
            .filter_map(|p| unalloc(c, p).map(|y| format!("{:.1},{:.1}", px(p as f64), py(y))))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\"{dash} points=\"{}\"/>",
            pts.join(" ")
        );
        let ly = t + 16.0 * i as f64 + 10.0;
        let _ = writeln!(s, "<line x1=\"{0}\" y1=\"{ly}\" x2=\"{1}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/><text x=\"{2}\" y=\"{3}\">{name}</text>", w - r + 10.0, w - r + 30.0, w - r + 36.0, ly + 4.0);
    }
    s.push_str("</svg>\n");
    std::fs::write(path, s).map_err(|e| invalid(format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(text: &str) -> Result<Vec<Pod>, CliError> {
        pods_from(text, Path::new("pods.csv"))
    }

    /// The default trace's shape: every column, models in `gpu_spec`.
    #[test]
    fn a_full_openb_pod_list_is_read_with_its_models() {
        let p = pods(
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time\n\
             a,1000,2048,1,500,V100M16|V100M32,LS,Running,0,10,1\n\
             b,2000,4096,2,1000,,BE,Succeeded,1,20,2\n",
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0].req.gpu,
            GpuDemand::Fraction {
                milli: 500,
                vram_mib: 0
            }
        );
        assert_eq!(p[0].req.models, vec!["V100M16", "V100M32"]);
        assert_eq!(p[1].req.gpu, GpuDemand::Whole(2));
        assert!(p[1].req.models.is_empty());
    }

    /// `--replay time` over a pod list without times is refused with the reason, not replayed
    /// as one instant with nobody leaving.
    #[test]
    fn a_time_replay_needs_the_trace_times() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            sim: SimArgs,
        }
        let d = tempfile::tempdir().unwrap();
        let (nodes, pods) = (d.path().join("nodes.csv"), d.path().join("pods.csv"));
        std::fs::write(
            &nodes,
            "sn,cpu_milli,memory_mib,gpu,model\nn0,96000,786432,8,V100M32\n",
        )
        .unwrap();
        std::fs::write(
            &pods,
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli\nx,4000,8192,1,1000\n",
        )
        .unwrap();
        let args = |replay: &str| {
            <Cli as clap::Parser>::try_parse_from([
                "sim",
                "--nodes",
                nodes.to_str().unwrap(),
                "--pods",
                pods.to_str().unwrap(),
                "--replay",
                replay,
                "--policy",
                "fgd",
                "--seeds",
                "1..1",
            ])
            .unwrap()
            .sim
        };
        let err = run(args("time"), Format::Json).unwrap_err().to_string();
        assert!(err.contains("creation_time"), "{err}");
        assert!(run(args("creation"), Format::Json).is_ok());
    }

    /// The multi-GPU variants' shape: only the five required columns.
    #[test]
    fn a_pod_list_with_only_the_required_columns_is_read() {
        let p =
            pods("name,cpu_milli,memory_mib,num_gpu,gpu_milli\nx,4000,8192,8,1000\ny,100,64,0,0\n")
                .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].req.gpu, GpuDemand::Whole(8));
        assert_eq!(p[0].req.cpu_milli, 4000);
        assert_eq!(p[1].req.gpu, GpuDemand::None);
        assert!(p[0].req.models.is_empty());
    }

    /// Columns in another order, some optional ones only.
    #[test]
    fn columns_are_found_by_name_in_any_order() {
        let p =
            pods("gpu_milli,name,qos,num_gpu,memory_mib,cpu_milli\n250,z,LS,1,512,300\n").unwrap();
        assert_eq!(p[0].name, "z");
        assert_eq!(p[0].req.memory_mib, 512);
        assert_eq!(
            p[0].req.gpu,
            GpuDemand::Fraction {
                milli: 250,
                vram_mib: 0
            }
        );
    }

    /// A missing required column is refused with its name; a short row with its line.
    #[test]
    fn a_missing_required_column_is_named() {
        for missing in ["name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli"] {
            let header: Vec<&str> = ["name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli"]
                .into_iter()
                .filter(|c| *c != missing)
                .collect();
            let err = pods(&format!("{}\n", header.join(",")))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("required column \"{missing}\" is missing")),
                "{err}"
            );
        }
        let err = pods("name,cpu_milli,memory_mib,num_gpu,gpu_milli\na,1,2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2: too few columns"), "{err}");
    }
}
