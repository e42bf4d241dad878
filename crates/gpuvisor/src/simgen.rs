//! `gpuvisor sim generate`: workload families built from an openb pod list the way the FGD paper
//! built its variants (USENIX ATC'23, §6): a share of the GPU pods constrained to one GPU model,
//! a share of GPU-sharing pods, a share of multi-GPU pods. The published variant files are not
//! in our data, so we generate our own, seeded and reproducible, and say exactly how.
//!
//! Every family fixes a share *of the GPU pods, by count*; CPU-only pods are kept as they are.
//! - `gpu-spec:F`: a random F of the GPU pods (that have none yet) get a `gpu_spec` of one model,
//!   drawn in proportion to the model's GPU count among models with a node that can hold the pod.
//! - `share:F` and `multi:F`: the GPU pods are redrawn, as many as before: round(F·N) from the
//!   pods of the class (GPU-sharing: `gpu_milli` < 1000; multi-GPU: `num_gpu` ≥ 2), the rest
//!   from the other GPU pods. Each class is shuffled and taken in turn (cyclically), so every
//!   source pod is used ⌊k/|class|⌋ or one more times: exact shares, no chance duplicates.
//!
//! Families apply in the order given. Copies keep the source pod's resources and times; names
//! get a `-gN` suffix so they stay unique. The key decision: the generator works on the parsed
//! pods (the same reader as the simulator) and writes the columns the simulator reads.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use gpuvisor_scheduler::{rng::SplitMix64, GpuDemand, Node};

use super::{invalid, load_nodes, load_pods, Pod};
use crate::cli::CliError;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Source pod list (openb CSV), e.g. openb_pod_list_default.csv.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// Node list CSV (gpu-spec draws only models with a node that can hold the pod).
    #[arg(long, value_name = "FILE")]
    pub nodes: PathBuf,
    /// Family and share of the GPU pods, repeatable, applied in order: `gpu-spec:0.25`,
    /// `share:0.6`, `multi:0.3`.
    #[arg(long = "family", value_name = "KIND:SHARE", required = true)]
    pub families: Vec<String>,
    /// Generator seed (splitmix64).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output pod list CSV.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// One family step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Family {
    /// A share of GPU pods constrained to one model.
    GpuSpec(f64),
    /// A share of GPU pods that share a GPU (fractions).
    Share(f64),
    /// A share of GPU pods with two or more GPUs.
    Multi(f64),
}

impl std::str::FromStr for Family {
    type Err = CliError;

    fn from_str(s: &str) -> Result<Self, CliError> {
        let bad = || {
            invalid(format!(
                "--family {s:?}: expected gpu-spec:F, share:F or multi:F with F in 0..=1"
            ))
        };
        let (kind, share) = s.split_once(':').ok_or_else(bad)?;
        let f: f64 = share.trim().parse().map_err(|_| bad())?;
        if !(0.0..=1.0).contains(&f) {
            return Err(bad());
        }
        match kind.trim() {
            "gpu-spec" => Ok(Family::GpuSpec(f)),
            "share" => Ok(Family::Share(f)),
            "multi" => Ok(Family::Multi(f)),
            _ => Err(bad()),
        }
    }
}

pub fn run(args: GenerateArgs) -> Result<i32, CliError> {
    let families: Vec<Family> = args
        .families
        .iter()
        .map(|f| f.parse())
        .collect::<Result<_, _>>()?;
    let nodes = load_nodes(&args.nodes)?;
    let mut pods = load_pods(&args.from)?;
    let mut rng = SplitMix64::new(args.seed);
    for f in families {
        pods = apply(&pods, f, &nodes, &mut rng)?;
    }
    std::fs::write(&args.out, to_csv(&pods))
        .map_err(|e| invalid(format!("writing {}: {e}", args.out.display())))?;
    Ok(0)
}

/// One family step over `pods`.
pub(crate) fn apply(
    pods: &[Pod],
    family: Family,
    nodes: &[Node],
    rng: &mut SplitMix64,
) -> Result<Vec<Pod>, CliError> {
    match family {
        Family::GpuSpec(f) => constrain(pods, f, nodes, rng),
        Family::Share(f) => redraw(pods, f, rng, "share", |d| {
            matches!(d, GpuDemand::Fraction { .. })
        }),
        Family::Multi(f) => redraw(
            pods,
            f,
            rng,
            "multi",
            |d| matches!(d, GpuDemand::Whole(n) if *n >= 2),
        ),
    }
}

fn is_gpu(p: &Pod) -> bool {
    p.req.gpu.milli() > 0
}

/// round(f·n) as a count.
fn share_of(f: f64, n: usize) -> usize {
    ((f * n as f64).round() as usize).min(n)
}

fn redraw(
    pods: &[Pod],
    f: f64,
    rng: &mut SplitMix64,
    what: &str,
    in_class: impl Fn(&GpuDemand) -> bool,
) -> Result<Vec<Pod>, CliError> {
    let mut class: Vec<usize> = Vec::new();
    let mut other: Vec<usize> = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        if !is_gpu(p) {
            continue;
        }
        if in_class(&p.req.gpu) {
            class.push(i);
        } else {
            other.push(i);
        }
    }
    let n = class.len() + other.len();
    let k = share_of(f, n);
    if (k > 0 && class.is_empty()) || (n - k > 0 && other.is_empty()) {
        return Err(invalid(format!(
            "{what}:{f}: the pod list has no pods to draw from ({} {what} pods, {} other GPU pods)",
            class.len(),
            other.len()
        )));
    }
    rng.shuffle(&mut class);
    rng.shuffle(&mut other);
    let mut out: Vec<Pod> = pods.iter().filter(|p| !is_gpu(p)).cloned().collect();
    for (list, count) in [(&class, k), (&other, n - k)] {
        for j in 0..count {
            let src = &pods[list[j % list.len()]];
            let mut p = src.clone();
            p.name = format!("{}-g{}", src.name, j / list.len());
            out.push(p);
        }
    }
    Ok(out)
}

fn constrain(
    pods: &[Pod],
    f: f64,
    nodes: &[Node],
    rng: &mut SplitMix64,
) -> Result<Vec<Pod>, CliError> {
    // Per model: its GPU count (the draw's weight) and its nodes' (GPUs, CPU, memory).
    type Sizes = Vec<(usize, u64, u64)>;
    let mut models: Vec<(String, u64, Sizes)> = Vec::new();
    for n in nodes {
        let Some(g) = n.gpus.first() else { continue };
        let i = match models.iter().position(|m| m.0 == g.model) {
            Some(i) => i,
            None => {
                models.push((g.model.clone(), 0, Vec::new()));
                models.len() - 1
            }
        };
        models[i].1 += n.gpus.len() as u64;
        models[i].2.push((n.gpus.len(), n.cpu_milli, n.memory_mib));
    }
    let gpu_pods = pods.iter().filter(|p| is_gpu(p)).count();
    let want = share_of(f, gpu_pods);
    let mut free: Vec<usize> = (0..pods.len())
        .filter(|&i| is_gpu(&pods[i]) && pods[i].req.models.is_empty())
        .collect();
    rng.shuffle(&mut free);
    let mut out = pods.to_vec();
    let mut done = 0;
    for i in free {
        if done == want {
            break;
        }
        let r = &pods[i].req;
        let gpus = match r.gpu {
            GpuDemand::Whole(n) => n as usize,
            _ => 1,
        };
        let fits: Vec<(usize, u64)> = models
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                m.2.iter()
                    .any(|&(g, c, mem)| g >= gpus && c >= r.cpu_milli && mem >= r.memory_mib)
            })
            .map(|(j, m)| (j, m.1))
            .collect();
        let total: u64 = fits.iter().map(|x| x.1).sum();
        if total == 0 {
            continue;
        }
        let mut draw = rng.below(total);
        let mut pick = fits[0].0;
        for (j, w) in fits {
            if draw < w {
                pick = j;
                break;
            }
            draw -= w;
        }
        out[i].req.models = vec![models[pick].0.clone()];
        done += 1;
    }
    Ok(out)
}

/// The pods as an openb pod list (the columns the simulator reads; times where known).
pub(crate) fn to_csv(pods: &[Pod]) -> String {
    let mut s = String::from(
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,creation_time,deletion_time\n",
    );
    for p in pods {
        let (n, m) = match p.req.gpu {
            GpuDemand::None => (0, 0),
            GpuDemand::Whole(n) => (n, 1000),
            GpuDemand::Fraction { milli, .. } => (1, milli),
        };
        let t = |x: Option<u64>| x.map(|v| v.to_string()).unwrap_or_default();
        let _ = writeln!(
            s,
            "{},{},{},{n},{m},{},{},{}",
            p.name,
            p.req.cpu_milli,
            p.req.memory_mib,
            p.req.models.join("|"),
            t(p.created),
            t(p.deleted)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuvisor_scheduler::{Gpu, GpuKind, Request};

    fn pod(name: &str, gpu: GpuDemand) -> Pod {
        Pod {
            name: name.to_string(),
            req: Request {
                cpu_milli: 4000,
                memory_mib: 8192,
                gpu,
                ..Request::default()
            },
            created: Some(1),
            deleted: Some(2),
        }
    }

    /// 100 GPU pods (60 whole 1-GPU, 30 sharing, 10 multi-GPU) and 20 CPU-only pods.
    fn sample() -> Vec<Pod> {
        let mut v = Vec::new();
        for i in 0..60 {
            v.push(pod(&format!("w{i}"), GpuDemand::Whole(1)));
        }
        for i in 0..30 {
            v.push(pod(
                &format!("s{i}"),
                GpuDemand::Fraction {
                    milli: 500,
                    vram_mib: 0,
                },
            ));
        }
        for i in 0..10 {
            v.push(pod(&format!("m{i}"), GpuDemand::Whole(2 + (i % 2) * 6)));
        }
        for i in 0..20 {
            v.push(pod(&format!("c{i}"), GpuDemand::None));
        }
        v
    }

    fn nodes() -> Vec<Node> {
        let mk = |name: &str, model: &str, gpus: usize| {
            Node::new(
                name,
                64_000,
                262_144,
                (0..gpus)
                    .map(|_| Gpu::new(model, 0, GpuKind::Shareable))
                    .collect(),
            )
        };
        vec![mk("a", "T4", 2), mk("b", "G2", 8), mk("c", "G2", 8)]
    }

    fn gen(families: &[Family], seed: u64) -> Vec<Pod> {
        let mut rng = SplitMix64::new(seed);
        let mut pods = sample();
        for &f in families {
            pods = apply(&pods, f, &nodes(), &mut rng).unwrap();
        }
        pods
    }

    #[test]
    fn the_same_seed_gives_the_same_file_and_another_seed_another() {
        let fams = [Family::Share(0.6), Family::GpuSpec(0.25)];
        assert_eq!(to_csv(&gen(&fams, 7)), to_csv(&gen(&fams, 7)));
        assert_ne!(to_csv(&gen(&fams, 7)), to_csv(&gen(&fams, 8)));
    }

    #[test]
    fn family_shares_are_exact_and_cpu_pods_are_kept() {
        let count = |pods: &[Pod], f: &dyn Fn(&Pod) -> bool| pods.iter().filter(|p| f(p)).count();
        for share in [0.2, 0.6, 1.0] {
            let p = gen(&[Family::Share(share)], 1);
            assert_eq!(count(&p, &|p| is_gpu(p)), 100);
            assert_eq!(count(&p, &|p| !is_gpu(p)), 20);
            let sharing = count(&p, &|p| matches!(p.req.gpu, GpuDemand::Fraction { .. }));
            assert_eq!(sharing, (share * 100.0) as usize);
        }
        for share in [0.2, 0.5] {
            let p = gen(&[Family::Multi(share)], 1);
            let multi = count(&p, &|p| matches!(p.req.gpu, GpuDemand::Whole(n) if n >= 2));
            assert_eq!(multi, (share * 100.0) as usize);
            assert_eq!(count(&p, &|p| is_gpu(p)), 100);
        }
        for share in [0.1, 0.25, 0.33] {
            let p = gen(&[Family::GpuSpec(share)], 1);
            let constrained = count(&p, &|p| p.req.models.len() == 1);
            assert_eq!(constrained, (share * 100.0_f64).round() as usize);
            assert_eq!(count(&p, &|p| !is_gpu(p) && !p.req.models.is_empty()), 0);
            // An 8-GPU pod only gets a model with an 8-GPU node.
            assert!(p
                .iter()
                .filter(|p| p.req.gpu == GpuDemand::Whole(8))
                .all(|p| p.req.models.iter().all(|m| m == "G2")));
        }
    }

    #[test]
    fn copies_are_spread_evenly_with_unique_names_and_times_kept() {
        let p = gen(&[Family::Multi(0.5)], 3);
        let mut names: Vec<&str> = p.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), p.len());
        // 50 draws from 10 multi-GPU pods: each exactly 5 times.
        for i in 0..10 {
            let n = p
                .iter()
                .filter(|x| x.name.starts_with(&format!("m{i}-g")))
                .count();
            assert_eq!(n, 5);
        }
        assert!(p
            .iter()
            .all(|x| x.created == Some(1) && x.deleted == Some(2)));
        // The written list reads back to the same pods.
        let back = super::super::pods_from(&to_csv(&p), std::path::Path::new("x.csv")).unwrap();
        assert_eq!(back.len(), p.len());
        assert!(back
            .iter()
            .zip(&p)
            .all(|(a, b)| a.req == b.req && a.name == b.name));
    }

    #[test]
    fn bad_families_are_refused() {
        for bad in ["share", "share:1.5", "gpu:0.2", "multi:x"] {
            assert!(bad.parse::<Family>().is_err(), "{bad}");
        }
        assert_eq!(
            "gpu-spec:0.25".parse::<Family>().unwrap(),
            Family::GpuSpec(0.25)
        );
    }
}
