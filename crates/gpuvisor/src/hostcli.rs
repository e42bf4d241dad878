//! `gpuvisor host check` and `gpuvisor gpu mig ...`: host preparation commands that run locally,
//! without the daemon, like `gpuvisor sim`.
//!
//! Why local: preflight is most needed before the daemon can even start (IOMMU off, driver
//! mismatch), and MIG partitioning is a host-setup step done as root on the machine. Binding to
//! vfio-pci is different and goes through the daemon (`gpu bind-vfio`), which knows whether an
//! instance uses the GPU. MIG changes need `--yes`: they destroy whatever runs on the partitions.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use gpuvisor_node::hostcheck::{self, Check, NvmlFacts, Status};
use gpuvisor_node::mig::{self, MigControl, MigState, NvmlMig};
use gpuvisor_node::HostRoot;

use crate::cli::{exit, CliError};
use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// Preflight: IOMMU, IOMMU groups, vfio-pci, SR-IOV, BARs, driver/CUDA, MIG, fabric
    /// manager, persistence daemon, AppArmor/SELinux, device permissions, cgroups, KVM. Exit 1
    /// when any check fails.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Read the host from this directory instead of `/` (a fixture tree; NVML is not asked).
    #[arg(long, hide = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum MigCmd {
    /// MIG mode, GPU-instance profiles (with free slots and placements) and existing instances.
    #[command(visible_alias = "ls")]
    List {
        /// GPU: NVML index, UUID or PCI address.
        gpu: String,
    },
    /// Create a GPU instance of PROFILE (`1g.10gb`, `3g.40gb`, or `id:N`) with one compute
    /// instance spanning it.
    Create {
        gpu: String,
        profile: String,
        /// Confirm: this changes the GPU's partitions.
        #[arg(long)]
        yes: bool,
    },
    /// Destroy GPU instance GI (and its compute instances).
    Destroy {
        gpu: String,
        gi: u32,
        /// Confirm: work running on the instance is killed.
        #[arg(long)]
        yes: bool,
    },
}

/// Runs `host ...`; the exit code is 1 when a check failed.
pub fn run_host(cmd: HostCmd, format: Format) -> Result<i32, CliError> {
    match cmd {
        HostCmd::Check(args) => {
            let root = args.root.map_or_else(HostRoot::real, HostRoot::at);
            let checks = hostcheck::check(&root, &NvmlFacts::probe(&root));
            output::print(format, &checks, |c| checks_text(c))?;
            Ok(if hostcheck::passed(&checks) {
                exit::OK
            } else {
                exit::OTHER
            })
        }
    }
}

/// One line per check, the remedy indented under anything not passing.
pub fn checks_text(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let tag = match c.status {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        };
        let _ = writeln!(out, "{tag}  {}: {}", c.title, c.detail);
        if !c.remedy.is_empty() && c.status != Status::Pass {
            let _ = writeln!(out, "      fix: {}", c.remedy);
        }
    }
    let count = |s: Status| checks.iter().filter(|c| c.status == s).count();
    let _ = write!(
        out,
        "\n{} passed, {} warnings, {} failed, {} skipped",
        count(Status::Pass),
        count(Status::Warn),
        count(Status::Fail),
        count(Status::Skip)
    );
    out
}

const CONFIRM: &str =
    "this changes the GPU's MIG partitions and kills work running on them: add --yes to confirm";

/// Runs `gpu mig ...` against NVML.
pub fn run_mig(cmd: MigCmd, format: Format) -> Result<i32, CliError> {
    if matches!(
        cmd,
        MigCmd::Create { yes: false, .. } | MigCmd::Destroy { yes: false, .. }
    ) {
        return Err(CliError::Invalid(CONFIRM.into()));
    }
    match NvmlMig::init() {
        Ok(ctl) => run_mig_with(&ctl, cmd, format),
        Err(e) => {
            eprintln!("error: {e}: MIG needs the NVIDIA driver on this host (mig)");
            Ok(exit::OTHER)
        }
    }
}

/// `gpu mig ...` against any [`MigControl`] (the tests use the simulated one).
pub fn run_mig_with(ctl: &dyn MigControl, cmd: MigCmd, format: Format) -> Result<i32, CliError> {
    let done = match cmd {
        MigCmd::List { gpu } => mig::state(ctl, &gpu)
            .map(|s| output::print(format, &s, mig_text).map_err(CliError::from)),
        MigCmd::Create { yes: false, .. } | MigCmd::Destroy { yes: false, .. } => {
            return Err(CliError::Invalid(CONFIRM.into()));
        }
        MigCmd::Create { gpu, profile, .. } => mig::create(ctl, &gpu, &profile).map(|gi| {
            output::print(format, &gi, |gi| {
                format!(
                    "created GPU instance {} ({}) at slices {}..{} with compute instance {}",
                    gi.id,
                    gi.profile,
                    gi.placement.start,
                    gi.placement.start + gi.placement.size,
                    gi.compute_instances
                        .first()
                        .map_or("-".to_string(), |c| c.id.to_string())
                )
            })
            .map_err(CliError::from)
        }),
        MigCmd::Destroy { gpu, gi, .. } => mig::destroy(ctl, &gpu, gi).map(|g| {
            output::print(format, &g, |g| {
                format!(
                    "destroyed GPU instance {} ({}) and {} compute instance(s)",
                    g.id,
                    g.profile,
                    g.compute_instances.len()
                )
            })
            .map_err(CliError::from)
        }),
    };
    match done {
        Ok(printed) => printed.map(|()| exit::OK),
        Err(e @ (mig::MigError::NoGpu(_) | mig::MigError::NoInstance { .. })) => {
            eprintln!("error: {e} (not_found)");
            Ok(exit::NOT_FOUND)
        }
        Err(e @ mig::MigError::Nvml(_)) | Err(e @ mig::MigError::MissingSymbol(_)) => {
            eprintln!("error: {e} (mig)");
            Ok(exit::OTHER)
        }
        Err(e) => Err(CliError::Invalid(e.to_string())),
    }
}

fn mig_text(s: &MigState) -> String {
    let mut out = format!(
        "GPU {}: MIG {}\n\nPROFILE      ID  SLICES  MEMORY    SMS  FREE/MAX  PLACEMENTS\n",
        s.gpu,
        if s.enabled { "on" } else { "off" }
    );
    for p in &s.profiles {
        let places: Vec<String> = p
            .placements
            .iter()
            .map(|pl| format!("{}:{}", pl.start, pl.size))
            .collect();
        let _ = writeln!(
            out,
            "{:<12} {:>2}  {:>6}  {:<8} {:>4}  {:>8}  {}",
            p.name,
            p.id,
            p.slices,
            gpuvisor_wire::format_size(p.memory_mib << 20),
            p.multiprocessors,
            format!("{}/{}", p.free, p.max_instances),
            places.join(" ")
        );
    }
    if s.instances.is_empty() {
        out.push_str("\nno GPU instances");
    } else {
        out.push_str("\nGI  PROFILE      PLACEMENT  COMPUTE INSTANCES\n");
        for g in &s.instances {
            let cis: Vec<String> = g
                .compute_instances
                .iter()
                .map(|c| c.id.to_string())
                .collect();
            let _ = writeln!(
                out,
                "{:<3} {:<12} {:<10} {}",
                g.id,
                g.profile,
                format!("{}:{}", g.placement.start, g.placement.size),
                if cis.is_empty() {
                    "-".into()
                } else {
                    cis.join(",")
                }
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use gpuvisor_node::mig::SimulatedMig;

    fn sim() -> SimulatedMig {
        SimulatedMig::new(&[("GPU-aaaa", 81559 << 20, true)])
    }

    #[test]
    fn mig_create_needs_yes() {
        let err = run_mig(
            MigCmd::Create {
                gpu: "0".into(),
                profile: "1g.10gb".into(),
                yes: false,
            },
            Format::Json,
        )
        .unwrap_err();
        assert!(err.to_string().contains("--yes"));
        assert_eq!(err.exit_code(), exit::INVALID);
        let s = sim();
        let err = run_mig_with(
            &s,
            MigCmd::Destroy {
                gpu: "0".into(),
                gi: 1,
                yes: false,
            },
            Format::Json,
        )
        .unwrap_err();
        assert!(err.to_string().contains("--yes"));
    }

    #[test]
    fn mig_create_list_destroy_against_the_double() {
        let s = sim();
        let create = |profile: &str| {
            run_mig_with(
                &s,
                MigCmd::Create {
                    gpu: "0".into(),
                    profile: profile.into(),
                    yes: true,
                },
                Format::Json,
            )
            .unwrap()
        };
        assert_eq!(create("3g.40gb"), exit::OK);
        assert_eq!(create("3g.40gb"), exit::OK);
        // Full: a third refused as invalid (exit 5).
        let err = run_mig_with(
            &s,
            MigCmd::Create {
                gpu: "0".into(),
                profile: "3g.40gb".into(),
                yes: true,
            },
            Format::Json,
        )
        .unwrap_err();
        assert_eq!(err.exit_code(), exit::INVALID);
        let state = mig::state(&s, "0").unwrap();
        assert_eq!(state.instances.len(), 2);
        let text = mig_text(&state);
        assert!(text.contains("3g.40gb"), "{text}");
        assert!(text.contains("0/2"), "{text}");
        let gi = state.instances[0].id;
        let code = run_mig_with(
            &s,
            MigCmd::Destroy {
                gpu: "0".into(),
                gi,
                yes: true,
            },
            Format::Json,
        )
        .unwrap();
        assert_eq!(code, exit::OK);
        assert_eq!(mig::state(&s, "0").unwrap().instances.len(), 1);
        let code = run_mig_with(&s, MigCmd::List { gpu: "7".into() }, Format::Json).unwrap();
        assert_eq!(code, exit::NOT_FOUND);
    }

    #[test]
    fn host_check_exit_code_follows_failures() {
        // An empty root: no kernel release, no IOMMU, no cgroups → failures → exit 1.
        let dir = tempfile::tempdir().unwrap();
        let code = run_host(
            HostCmd::Check(CheckArgs {
                root: Some(dir.path().to_path_buf()),
            }),
            Format::Json,
        )
        .unwrap();
        assert_eq!(code, exit::OTHER);
        let checks = hostcheck::check(&HostRoot::at(dir.path()), &NvmlFacts::default());
        let text = checks_text(&checks);
        assert!(text.contains("FAIL  IOMMU enabled"), "{text}");
        assert!(text.contains("fix: enable VT-d"), "{text}");
    }
}
