//! `gpuvisor host check` (local, without the daemon, like `gpuvisor sim`) and the client side of
//! `gpuvisor gpu mig ...`.
//!
//! Why preflight is local: it is most needed before the daemon can even start (IOMMU off, driver
//! mismatch). MIG goes through the daemon, like `gpu bind-vfio`: only the daemon knows whether an
//! instance holds a slice, and it must re-read its inventory so new slices are schedulable. MIG
//! changes need `--yes`: they destroy whatever runs on the partitions.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use gpuvisor_node::hostcheck::{self, Check, NvmlFacts, Status};
use gpuvisor_node::mig::MigState;
use gpuvisor_node::HostRoot;

use crate::cli::{exit, CliError};
use crate::client::Client;
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

/// Runs `gpu mig ...` through the daemon, which owns the MIG layout: it refuses to destroy a
/// slice an instance holds and re-reads its inventory after each change.
pub fn run_mig(client: &Client, cmd: MigCmd, format: Format) -> Result<(), CliError> {
    match cmd {
        MigCmd::Create { yes: false, .. } | MigCmd::Destroy { yes: false, .. } => {
            Err(CliError::Invalid(CONFIRM.into()))
        }
        MigCmd::List { gpu } => Ok(output::print(format, &client.mig_state(&gpu)?, mig_text)?),
        MigCmd::Create { gpu, profile, .. } => {
            let gi = client.mig_create(&gpu, &profile)?;
            Ok(output::print(format, &gi, |gi| {
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
            })?)
        }
        MigCmd::Destroy { gpu, gi, .. } => {
            let g = client.mig_destroy(&gpu, gi)?;
            Ok(output::print(format, &g, |g| {
                format!(
                    "destroyed GPU instance {} ({}) and {} compute instance(s)",
                    g.id,
                    g.profile,
                    g.compute_instances.len()
                )
            })?)
        }
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

    #[test]
    fn mig_changes_need_yes_before_any_request() {
        // Nothing listens on port 9: the refusal must come before a request is made.
        let client = Client::new("http://127.0.0.1:9", None, None).unwrap();
        for cmd in [
            MigCmd::Create {
                gpu: "0".into(),
                profile: "1g.10gb".into(),
                yes: false,
            },
            MigCmd::Destroy {
                gpu: "0".into(),
                gi: 1,
                yes: false,
            },
        ] {
            let err = run_mig(&client, cmd, Format::Json).unwrap_err();
            assert!(err.to_string().contains("--yes"), "{err}");
            assert_eq!(err.exit_code(), exit::INVALID);
        }
    }

    #[test]
    fn mig_text_shows_profiles_and_instances() {
        let s = gpuvisor_node::mig::SimulatedMig::new(&[("GPU-aaaa", 81559 << 20, true)]);
        gpuvisor_node::mig::create(&s, "0", "3g.40gb").unwrap();
        gpuvisor_node::mig::create(&s, "0", "3g.40gb").unwrap();
        let text = mig_text(&gpuvisor_node::mig::state(&s, "0").unwrap());
        assert!(text.contains("3g.40gb"), "{text}");
        assert!(text.contains("0/2"), "{text}");
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
