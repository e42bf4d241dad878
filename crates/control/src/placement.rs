//! Placement on one host, behind the [`Placer`] trait that the scheduler crate will implement
//! for many hosts. Pure: it sees a snapshot of capacity and usage and returns an assignment or
//! an error naming the missing resource; it never touches the store or the host.
//!
//! Rules: whole GPUs are exclusive; fractional requests share a GPU up to 100% of its compute
//! and of its VRAM, packed best-fit so whole GPUs stay free for whole requests; pinned CPUs are
//! exclusive unless an oversubscription ratio above 1 is configured, and are taken from the NUMA
//! node of the instance's GPUs first.

use std::collections::BTreeMap;
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
}

#[derive(Debug, Clone, PartialEq)]
pub struct GpuAssignment {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    pub milli: u32,
    pub vram: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub gpus: Vec<GpuAssignment>,
    pub cpus: Vec<u32>,
}

#[derive(Debug, Error, PartialEq)]
pub enum PlacementError {
    #[error("not enough GPUs: {wanted} {model} wanted, {free} free of {total}")]
    Gpus {
        wanted: u32,
        model: String,
        free: u32,
        total: u32,
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
}

/// Chooses where an instance runs. The scheduler issue replaces the implementation, not the
/// interface.
pub trait Placer: Send + Sync {
    fn place(&self, host: &HostCapacity, demand: &Demand) -> Result<Assignment, PlacementError>;
}

/// The single-host placer.
#[derive(Debug, Default, Clone)]
pub struct SingleHost;

fn model_ok(g: &GpuSlot, model: &Option<String>) -> bool {
    model
        .as_ref()
        .is_none_or(|m| g.model.eq_ignore_ascii_case(m))
}

impl Placer for SingleHost {
    fn place(&self, host: &HostCapacity, d: &Demand) -> Result<Assignment, PlacementError> {
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
                return Err(PlacementError::Gpus {
                    wanted: d.whole_gpus,
                    model: model_name,
                    free: free.len() as u32,
                    total: candidates.len() as u32,
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
                .filter(|g| model_ok(g, &d.model))
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
        if (free_cpus.len() as u32) < d.vcpus {
            return Err(PlacementError::Cpus {
                wanted: d.vcpus,
                free: free_cpus.len() as u32,
                total: host.cpus.len() as u32,
            });
        }
        // Least used first, the GPUs' NUMA node first, then by id: deterministic.
        free_cpus.sort_by_key(|(cpu, node, used)| (*used, numa.is_some_and(|n| n != *node), *cpu));
        let mut cpus: Vec<u32> = free_cpus
            .iter()
            .take(d.vcpus as usize)
            .map(|c| c.0)
            .collect();
        cpus.sort_unstable();
        Ok(Assignment { gpus, cpus })
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
                })
                .collect(),
            cpus: (0..cpus)
                .map(|c| (c, if c < cpus / 2 { 0 } else { 1 }))
                .collect(),
            cpu_use: BTreeMap::new(),
            cpu_ratio: 1,
            memory: 64 << 30,
            used_memory: 0,
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
}
