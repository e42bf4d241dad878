//! Command-line interface: `gpuvisor serve` runs the daemon, every other subcommand is a client of
//! its REST API (noun-verb: `gpuvisor instance create`).
//!
//! Arguments with a syntax of their own (sizes, `--volume NAME:/path[:SIZE]`, `--port 8888/http`)
//! are parsed here, in clap value parsers, so that something that cannot even be read is a usage
//! error (exit 2) before anything is sent. What makes a well-formed value acceptable (ranges, mount
//! paths, names, `--env K=V`, protocols) is the daemon's rule, kept in one place: it answers
//! `invalid_argument` (exit 5). Repeating a single-valued flag is not an error: the last one wins,
//! so scripts can append overrides. `--wait` polls the instance until it settles, because the
//! lifecycle routes answer before the work is done.
//!
//! # Exit codes
//!
//! Scripts can rely on these; they never change meaning.
//!
//! | code | meaning                                                                         |
//! |------|---------------------------------------------------------------------------------|
//! | 0    | success (`instance exec`: the command's own exit status instead; 124 when the   |
//! |      | daemon killed it at its deadline; `exec -i/-t`: 128+N when signal N ended the   |
//! |      | CLI itself)                                                                     |
//! | 1    | any other error (transport, unexpected answer, internal daemon error)           |
//! | 2    | usage error: bad flags or argument syntax (clap)                                |
//! | 3    | `not_found`                                                                     |
//! | 4    | `unauthorized` or `forbidden`                                                   |
//! | 5    | `invalid_argument`, `already_exists`, `in_use` or `invalid_state`               |
//! | 6    | `insufficient_resources`                                                        |
//! | 7    | `--wait` ended in `failed` or another settled state than the one waited for     |
//! | 8    | `--wait` timed out (`--timeout`, default 120s)                                  |
//! | 9    | the daemon cannot be reached (start `gpuvisor serve` or set `GPUVISOR_ENDPOINT`) |
//! | 10   | `resource_exhausted`: a limit on concurrent work was reached; retry later       |
//!
//! Errors are printed on stderr as `error: <message> (<code>)`.

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use gpuvisor_wire::{
    code, parse_size, CreateInstance, CreateKey, CreateTenant, CreateVolume, ExecRequest,
    ImportImage, Instance, InstanceState, Logs, PortSpec, RestartPolicy, Role, VolumeMount,
};
use thiserror::Error;

use crate::client::{Client, ClientError};
use crate::output::{self, Format};
use crate::serve::{serve, ServeArgs};

// The trace simulator runs locally (no daemon); declared here so that the binary's module list
// in main.rs stays as it is.
#[path = "sim.rs"]
pub mod sim;
// Host preflight and MIG run locally too.
#[path = "hostcli.rs"]
pub mod hostcli;

/// Exit codes; see the table in the module documentation.
pub mod exit {
    pub const OK: i32 = 0;
    pub const OTHER: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const NOT_FOUND: i32 = 3;
    pub const AUTH: i32 = 4;
    pub const INVALID: i32 = 5;
    pub const INSUFFICIENT_RESOURCES: i32 = 6;
    pub const WAIT_FAILED: i32 = 7;
    pub const WAIT_TIMEOUT: i32 = 8;
    pub const UNREACHABLE: i32 = 9;
    pub const EXHAUSTED: i32 = 10;
}

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (instance exec: the command's exit status)
  1  other error
  2  usage error
  3  not found
  4  unauthorized or forbidden
  5  invalid argument, already exists, in use, invalid state
  6  insufficient resources
  7  --wait ended in failed or an unexpected state
  8  --wait timed out
  9  cannot reach the daemon
  10 a limit on concurrent work was reached (retry later)";

pub const DEFAULT_ENDPOINT: &str = "https://127.0.0.1:7070";

/// The longest one long-poll of `--wait` may block (the daemon answers at once on a change).
const WAIT_POLL: Duration = Duration::from_secs(5);
const LOGS_POLL: Duration = Duration::from_millis(300);
/// A logs chunk at least this big suggests more is waiting: fetch again without sleeping.
const LOGS_FULL_CHUNK: usize = 32 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "gpuvisor",
    version,
    about = "GPU virtualization engine: `gpuvisor serve` runs the daemon, the other commands talk to it",
    after_long_help = EXIT_CODES_HELP,
    propagate_version = true,
    args_override_self = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Daemon REST endpoint.
    #[arg(
        long,
        global = true,
        env = "GPUVISOR_ENDPOINT",
        help_heading = "Global options",
        default_value = DEFAULT_ENDPOINT,
        value_name = "URL"
    )]
    pub endpoint: String,
    /// API key, sent in the x-api-key header.
    #[arg(
        long,
        global = true,
        env = "GPUVISOR_API_KEY",
        help_heading = "Global options",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    /// CA certificate(s) (PEM) the daemon's certificate must chain to; `system`: the public
    /// web's roots [default: /var/lib/gpuvisor/ca.pem when present, else the web's roots].
    #[arg(
        long,
        global = true,
        env = "GPUVISOR_CA",
        help_heading = "Global options",
        value_name = "PEM"
    )]
    pub ca: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(
        short = 'o',
        long,
        global = true,
        value_enum,
        default_value_t = Format::Table,
        help_heading = "Global options"
    )]
    pub output: Format,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve(Box<ServeArgs>),
    /// Show whether the daemon is up.
    Health,
    /// Tenants (admin).
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// API keys (admin; a tenant admin: its tenant's).
    #[command(subcommand)]
    Key(KeyCmd),
    /// The audit log of mutating calls (admin; a tenant admin: its tenant's).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Metered usage and its cost per instance, volume and resource (`-o table|json|csv`).
    Usage(UsageArgs),
    /// GPUs of the host.
    #[command(subcommand)]
    Gpu(GpuCmd),
    /// OCI images instances start from.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Registry logins of this tenant (used by `image pull`).
    #[command(subcommand)]
    Registry(RegistryCmd),
    /// Persistent volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Instance snapshots (`instance snapshot` takes one, `instance restore` rolls back to
    /// one, `instance create --from-snapshot` clones one).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Instance templates: `instance create --template NAME` starts from one.
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Instances: containers or micro-VMs with GPUs.
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Serverless endpoints: a job queue (RunPod's API at /v2/<id>/) served by workers made
    /// from a template, scaled with the queue down to zero.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Replay a GPU-cluster trace through the scheduler (local; no daemon needed).
    Sim(sim::SimArgs),
    /// Host preparation (local; no daemon needed): `gpuvisor host check`.
    #[command(subcommand)]
    Host(hostcli::HostCmd),
    /// Print a shell completion script: `gpuvisor completions bash > /etc/bash_completion.d/gpuvisor`.
    Completions { shell: clap_complete::Shell },
    /// Print the REST routes, one `METHOD PATH` per line (for tests and API tooling).
    #[command(hide = true)]
    Routes,
    /// Print the REST API's OpenAPI 3.1 description (local; the daemon serves the same at
    /// /openapi.json).
    Openapi,
    /// Print the GraphQL schema in SDL (docs/api/schema.graphql is this output).
    #[command(name = "graphql-schema", hide = true)]
    GraphqlSchema,
    /// Print the GraphQL root fields, one `KIND FIELD OPERATION` per line (for tests).
    #[command(name = "graphql-ops", hide = true)]
    GraphqlOps,
    /// Internal: relays an instance's output from stdin into its capped, rotated log (started
    /// by the daemon, one per running instance).
    #[command(name = "log-relay", hide = true)]
    LogRelay(LogRelayArgs),
    /// Internal: runs the OCI runtime for `instance exec -i/-t` and reports the command's exit
    /// status (started by the daemon, one per session).
    #[command(name = "exec-shim", hide = true)]
    ExecShim(ExecShimArgs),
    /// Internal: runs `instance exec` on a VM through its guest agent (started by the daemon).
    #[command(name = "qga-exec", hide = true)]
    QgaExec(QgaExecArgs),
}

#[derive(Debug, Args)]
pub struct QgaExecArgs {
    /// The guest agent's unix socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// Where `<own pid> <guest pid>` is written once the command runs.
    #[arg(long)]
    pub pid_file: PathBuf,
    /// `KEY=VALUE` for the command's environment.
    #[arg(long)]
    pub env: Vec<String>,
    /// Pass stdin to the command.
    #[arg(long)]
    pub stdin: bool,
    /// Most bytes of output (stdout and stderr together) printed; the rest is dropped.
    #[arg(long, default_value_t = gpuvisor_node::vm::qmp::MAX_AGENT_OUTPUT)]
    pub max_output: usize,
    #[arg(last = true, required = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ExecShimArgs {
    /// Where the runtime writes the command's pid.
    #[arg(long)]
    pub pid_file: PathBuf,
    /// Instance id.
    #[arg(long)]
    pub instance: String,
    /// The parent of the daemon's instance cgroups (`gpuvisor`, or `gpuvisor-<prefix>`).
    #[arg(long, default_value = gpuvisor_node::cgroup::PARENT)]
    pub cgroup_parent: String,
    /// The runtime runs in the foreground on the shim's stdio (`exec -i` without a terminal).
    #[arg(long)]
    pub pipes: bool,
    /// The runtime's command line, after `--`.
    #[arg(last = true, required = true)]
    pub runtime: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LogRelayArgs {
    /// The daemon's logs directory.
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long)]
    pub max_bytes: u64,
    #[arg(long)]
    pub reserve: u64,
    /// Instance id.
    pub id: String,
}

#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// Create a tenant.
    Create { name: String },
    /// List tenants.
    #[command(visible_alias = "ls")]
    List,
    /// A tenant's policy (quotas, priority rights) and what it holds now.
    Get { name: String },
    /// Change a tenant's policy (admin). Quotas take a number (sizes like 64GiB) or
    /// `unlimited`; options not given keep their value.
    Set(TenantSetArgs),
    /// A tenant's own quotas (its tenant admin, or an admin), each at most what the admin
    /// allows (`tenant set`); the stricter applies. Quota options only.
    Limit(TenantSetArgs),
    /// Delete a tenant (admin): refused while it owns instances or volumes, unless --cascade.
    /// Its network slot is reused by the next tenant.
    #[command(visible_alias = "delete")]
    Rm {
        name: String,
        /// Also terminate its instances and delete its volumes and keys.
        #[arg(long)]
        cascade: bool,
        /// --wait: until the tenant is gone (a cascade finishes once its instances are down).
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Debug, Args)]
pub struct TenantSetArgs {
    pub name: String,
    /// Instances (running and stopped).
    #[arg(long, value_name = "N|unlimited")]
    pub max_instances: Option<String>,
    /// Whole GPUs (MIG slices count as whole devices).
    #[arg(long, value_name = "N|unlimited")]
    pub max_gpus: Option<String>,
    /// Sum of GPU fractions, e.g. 2.5.
    #[arg(long, value_name = "GPUS|unlimited")]
    pub max_gpu_fraction: Option<String>,
    #[arg(long, value_name = "N|unlimited")]
    pub max_vcpus: Option<String>,
    #[arg(long, value_name = "SIZE|unlimited")]
    pub max_memory: Option<String>,
    /// Container disks and volumes together.
    #[arg(long, value_name = "SIZE|unlimited")]
    pub max_disk: Option<String>,
    #[arg(long, value_name = "N|unlimited")]
    pub max_volumes: Option<String>,
    /// The highest --priority the tenant may ask for.
    #[arg(long, value_enum)]
    pub max_priority: Option<PriorityArg>,
    /// May the tenant's instances preempt other tenants' interruptible instances?
    #[arg(long, value_name = "true|false")]
    pub preempt_other_tenants: Option<bool>,
}

/// A quota value: `unlimited` (or `none`) clears it.
fn quota<T>(
    flag: &str,
    v: Option<String>,
    current: Option<T>,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, CliError> {
    match v.as_deref() {
        None => Ok(current),
        Some("unlimited" | "none") => Ok(None),
        Some(s) => parse(s).map(Some).ok_or_else(|| {
            CliError::Invalid(format!("--{flag} {s:?}: expected a number or `unlimited`"))
        }),
    }
}

impl TenantSetArgs {
    fn apply(self, p: &mut gpuvisor_wire::TenantPolicy) -> Result<(), CliError> {
        let n = |s: &str| s.parse::<u32>().ok();
        let size = |s: &str| parse_size(s).ok();
        p.max_instances = quota("max-instances", self.max_instances, p.max_instances, n)?;
        p.max_gpus = quota("max-gpus", self.max_gpus, p.max_gpus, n)?;
        p.max_gpu_milli = quota(
            "max-gpu-fraction",
            self.max_gpu_fraction,
            p.max_gpu_milli,
            |s| {
                s.parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite() && *f >= 0.0 && *f < 4e6)
                    .map(|f| (f * 1000.0).round() as u32)
            },
        )?;
        p.max_vcpus = quota("max-vcpus", self.max_vcpus, p.max_vcpus, n)?;
        p.max_memory = quota("max-memory", self.max_memory, p.max_memory, size)?;
        p.max_disk = quota("max-disk", self.max_disk, p.max_disk, size)?;
        p.max_volumes = quota("max-volumes", self.max_volumes, p.max_volumes, n)?;
        if let Some(m) = self.max_priority {
            p.max_priority = m.into();
        }
        if let Some(b) = self.preempt_other_tenants {
            p.preempt_other_tenants = b;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PriorityArg {
    Low,
    Normal,
    High,
}

impl From<PriorityArg> for gpuvisor_wire::PriorityClass {
    fn from(p: PriorityArg) -> Self {
        match p {
            PriorityArg::Low => Self::Low,
            PriorityArg::Normal => Self::Normal,
            PriorityArg::High => Self::High,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// Everything, every tenant.
    Admin,
    /// A member that also manages its tenant's keys.
    TenantAdmin,
    /// Creates and operates its tenant's instances and volumes.
    #[value(alias = "user")]
    Member,
    /// Reads its tenant's objects only.
    Viewer,
    /// Scrapes /metrics only (made by admins).
    Metrics,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Admin => Role::Admin,
            RoleArg::TenantAdmin => Role::TenantAdmin,
            RoleArg::Member => Role::Member,
            RoleArg::Viewer => Role::Viewer,
            RoleArg::Metrics => Role::Metrics,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Create an API key; its secret is printed once.
    Create {
        /// Tenant name.
        #[arg(long)]
        tenant: String,
        #[arg(long, value_enum, default_value_t = RoleArg::Member)]
        role: RoleArg,
    },
    /// List API keys.
    #[command(visible_alias = "ls")]
    List,
    /// Revoke an API key.
    Revoke { id: String },
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Admins: only this tenant (default: every tenant). Others see their own.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Start: a duration back (2h, 30d), epoch ms, RFC 3339 or a date [default: 30d].
    #[arg(long)]
    pub from: Option<String>,
    /// End, in the same forms [default: now].
    #[arg(long)]
    pub to: Option<String>,
    /// Only this instance (id or name) or volume (name).
    #[arg(long)]
    pub subject: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Calls that changed something: who, what, on what, with what result, from where.
    #[command(visible_alias = "ls")]
    List {
        /// Only calls since then: a duration back (90s, 2h, 7d) or epoch milliseconds.
        #[arg(long)]
        since: Option<String>,
        /// Only this tenant's calls.
        #[arg(long)]
        tenant: Option<String>,
        /// Rows after this sequence number (paging).
        #[arg(long)]
        after: Option<i64>,
        /// At most this many rows [default: 1000].
        #[arg(long)]
        limit: Option<i64>,
    },
    /// Walks the hash chain: fails (exit 1) on an edited, inserted or removed row.
    Verify,
}

#[derive(Debug, Subcommand)]
pub enum GpuCmd {
    /// List GPUs and what is allocated on them.
    #[command(visible_alias = "ls")]
    List,
    /// GPU models for rent: how many are free, on-demand and interruptible price per hour.
    Types,
    /// Hand a GPU (and its audio function) to vfio-pci for passthrough into VMs (admin; refused
    /// while an instance uses it or when its IOMMU group holds other devices).
    BindVfio {
        /// GPU UUID, index or PCI address.
        gpu: String,
    },
    /// Give a GPU back from vfio-pci to the host driver (admin).
    Release {
        /// GPU PCI address, UUID or index.
        gpu: String,
    },
    /// Take no new instances on a GPU (maintenance); running ones stay (admin).
    Cordon {
        /// GPU UUID, index or PCI address.
        gpu: String,
        /// Why (shown in `gpu list`).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a cordon, set by hand or by a fatal XID once the GPU was reset (admin).
    Uncordon {
        /// GPU UUID, index or PCI address.
        gpu: String,
    },
    /// MIG partitions through the daemon (admin; changes need --yes). New slices are
    /// schedulable at once as `--gpu-model <model>-<profile>`, e.g. A100-80GB-1g.10gb.
    #[command(subcommand)]
    Mig(hostcli::MigCmd),
    /// Live view of every GPU (utilisation, memory, temperature, power), refreshed each second;
    /// Ctrl-C to quit.
    Top {
        /// Stop after this many refreshes (default: until Ctrl-C).
        #[arg(long, short = 'n')]
        iterations: Option<u32>,
    },
    /// Metric history of a GPU (UUID or index).
    Metrics(MetricsArgs),
    /// The GPUs' events, newest first: XID errors, thermal alarms, losses, cordons (admin).
    Events {
        /// Only this GPU (UUID, index or PCI address).
        #[arg(long)]
        gpu: Option<String>,
        /// How far back: 90s, 10m, 2h, 7d, or epoch milliseconds.
        #[arg(long, default_value = "7d")]
        since: String,
        /// At most this many (at most 500).
        #[arg(long)]
        limit: Option<u32>,
    },
}

/// Which metric history to show.
#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// Instance id or name (GPU UUID or index for `gpu metrics`).
    pub id: String,
    /// How far back: 90s, 10m, 2h, 7d (1 s points are kept for an hour, 1 min for 7 days).
    #[arg(long, default_value = "5m")]
    pub since: String,
    /// Seconds per point, e.g. 1s, 10s, 1m [default: the finest available].
    #[arg(long)]
    pub step: Option<String>,
    /// Redraw every second until Ctrl-C.
    #[arg(long, short = 'w')]
    pub watch: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Import an image: a local OCI/docker-save tarball (optionally gzip) is uploaded to the
    /// daemon; a directory (OCI layout, docker save, rootfs) is read on the daemon's host.
    Import {
        path: PathBuf,
        #[arg(long)]
        name: String,
        /// PATH is on the daemon's host (not uploaded), even for a file.
        #[arg(long)]
        daemon_path: bool,
    },
    /// Pull an image from an OCI registry (e.g. registry.example.com:5000/team/app:1.0).
    Pull {
        reference: String,
        /// Image name [default: the reference].
        #[arg(long)]
        name: Option<String>,
    },
    /// Make a tenant's pulled image visible to every tenant (admin).
    Publish {
        name: String,
        /// The tenant whose image it is, when several have one of that name.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List images.
    #[command(visible_alias = "ls")]
    List,
    /// Remove an image.
    #[command(visible_alias = "remove")]
    Rm {
        name: String,
        /// The tenant whose image it is, when several have one of that name (admin).
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RegistryCmd {
    /// Store this tenant's login to a registry (the password is read from stdin).
    Login {
        /// Registry host[:port], e.g. registry.example.com:5000 or docker.io.
        host: String,
        #[arg(long, short = 'u')]
        username: String,
        /// Read the password (or token) from standard input (one line).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Forget this tenant's login to a registry.
    Logout { host: String },
    /// This tenant's registry logins (hosts and usernames).
    #[command(visible_alias = "ls")]
    List,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume.
    Create {
        name: String,
        /// Size, e.g. 10GiB.
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
    },
    /// List volumes.
    #[command(visible_alias = "ls")]
    List,
    /// Remove a volume (it must not be in use).
    #[command(visible_alias = "remove")]
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// List snapshots (an admin: every tenant's).
    #[command(visible_alias = "ls")]
    List,
    /// Show one snapshot, by id or name.
    Get { snapshot: String },
    /// Remove a snapshot (refused while a clone or a pending restore starts from it).
    #[command(visible_alias = "remove")]
    Rm { snapshot: String },
}

#[derive(Debug, Subcommand)]
pub enum EndpointCmd {
    /// Make an endpoint: its queue is `/v2/<id>/` on the API's address.
    Create(Box<EndpointArgs>),
    /// Your endpoints (an admin: every tenant's).
    #[command(visible_alias = "ls")]
    List,
    /// Show one endpoint (by id or name), with its queue and workers.
    Get {
        #[arg(value_name = "ENDPOINT")]
        id: String,
    },
    /// Change an endpoint's template, bounds or scaler.
    Update(Box<EndpointUpdateArgs>),
    /// Remove an endpoint: its queue is dropped and its workers terminated.
    #[command(visible_alias = "remove")]
    Rm {
        #[arg(value_name = "ENDPOINT")]
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct EndpointArgs {
    pub name: String,
    /// The template workers are made from.
    #[arg(long)]
    pub template: String,
    #[arg(long, default_value_t = 0)]
    pub workers_min: u32,
    #[arg(long, default_value_t = 3)]
    pub workers_max: u32,
    /// A worker idle this long is removed (down to --workers-min).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub idle_timeout: std::time::Duration,
    /// queue-delay:SECONDS (a job waited that long) or request-count:N (a worker per N jobs).
    #[arg(long, default_value = "queue-delay:4")]
    pub scaler: gpuvisor_wire::Scaler,
    /// Whole GPUs per worker (default: the template's).
    #[arg(long, conflicts_with = "gpu_fraction")]
    pub gpus: Option<u32>,
    /// A fraction of one GPU per worker.
    #[arg(long)]
    pub gpu_fraction: Option<f64>,
    /// Keep scaled-down workers stopped with their disks, to start them again first.
    #[arg(long)]
    pub flashboot: bool,
    /// A job running longer is TIMED_OUT (a job's policy.executionTimeout wins).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub execution_timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct EndpointUpdateArgs {
    /// The endpoint (id or name).
    #[arg(value_name = "ENDPOINT")]
    pub id: String,
    #[arg(long)]
    pub template: Option<String>,
    #[arg(long)]
    pub workers_min: Option<u32>,
    #[arg(long)]
    pub workers_max: Option<u32>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<std::time::Duration>,
    #[arg(long)]
    pub scaler: Option<gpuvisor_wire::Scaler>,
    #[arg(long)]
    pub flashboot: Option<bool>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub execution_timeout: Option<std::time::Duration>,
}

#[derive(Debug, Subcommand)]
pub enum TemplateCmd {
    /// Make a template (for your tenant; --public, an admin's, for every tenant).
    Create(Box<TemplateArgs>),
    /// Templates you may use: yours and the public ones.
    #[command(visible_alias = "ls")]
    List,
    /// Show one template.
    Get { name: String },
    /// Remove a template (yours; a public one: admins). Instances made from it stay as they are.
    #[command(visible_alias = "remove")]
    Rm { name: String },
}

#[derive(Debug, Args)]
pub struct TemplateArgs {
    pub name: String,
    /// Start from a file (TOML or JSON, the fields of `template get -o json` without name);
    /// the flags given override it. See examples/templates/.
    #[arg(long, value_name = "FILE")]
    pub from: Option<std::path::PathBuf>,
    /// Every tenant may use it (admins).
    #[arg(long)]
    pub public: bool,
    #[arg(long)]
    pub description: Option<String>,
    /// Image name; required unless --from gives it.
    #[arg(long, required_unless_present = "from")]
    pub image: Option<String>,
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// The command, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

impl TemplateArgs {
    /// The file's spec (if any) with the flags over it.
    fn spec(self) -> Result<gpuvisor_wire::TemplateSpec, CliError> {
        let mut s = match &self.from {
            Some(p) => read_template_file(p)?,
            None => Default::default(),
        };
        if let Some(i) = self.image {
            s.image = i;
        }
        s.description = self.description.or(s.description);
        let f = self.shape;
        s.runtime = f.runtime.or(s.runtime);
        if f.gpus.is_some() || f.gpu_fraction.is_some() {
            s.gpus = f.gpus;
            s.gpu_fraction = f.gpu_fraction;
        }
        s.gpu_model = f.gpu_model.or(s.gpu_model);
        s.vcpus = f.vcpus.or(s.vcpus);
        s.memory = f.memory.or(s.memory);
        s.container_disk = f.container_disk.or(s.container_disk);
        s.volumes.extend(f.volumes);
        s.env.extend(f.env);
        s.ports.extend(f.ports);
        if !self.command.is_empty() {
            s.command = self.command;
        }
        if let Some(script) = read_script(f.startup_script.as_deref())? {
            s.startup_script = Some(script);
        }
        Ok(s)
    }
}

/// A template file: TOML (`.toml`) or JSON, sizes as bytes or `8GiB`.
fn read_template_file(p: &std::path::Path) -> Result<gpuvisor_wire::TemplateSpec, CliError> {
    let bad = |e: String| CliError::Invalid(format!("template file {}: {e}", p.display()));
    let text = std::fs::read_to_string(p).map_err(|e| bad(e.to_string()))?;
    let mut value: serde_json::Value = if p.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).map_err(|e| bad(e.to_string()))?
    } else {
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?
    };
    // Human sizes: "8GiB" → bytes.
    for key in ["memory", "container_disk"] {
        if let Some(s) = value.get(key).and_then(|v| v.as_str()).map(str::to_string) {
            value[key] = parse_size_arg(&s)
                .map_err(|e| bad(format!("{key}: {e}")))?
                .into();
        }
    }
    if let Some(vols) = value.get_mut("volumes").and_then(|v| v.as_array_mut()) {
        for v in vols {
            if let Some(s) = v.get("size").and_then(|s| s.as_str()).map(str::to_string) {
                v["size"] = parse_size_arg(&s)
                    .map_err(|e| bad(format!("volume size: {e}")))?
                    .into();
            }
        }
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait until the instance reaches the state asked for.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 90s, 5m).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    pub timeout: Duration,
}

/// What an instance is made of: the flags `instance create` and `template create` share.
#[derive(Debug, Args)]
pub struct ShapeArgs {
    /// Whole GPUs.
    #[arg(long, conflicts_with = "gpu_fraction")]
    pub gpus: Option<u32>,
    /// A fraction of one GPU, in (0, 1), e.g. 0.25.
    #[arg(long, value_parser = parse_fraction)]
    pub gpu_fraction: Option<f64>,
    /// Only GPUs of this model, as `gpu list` shows it.
    #[arg(long)]
    pub gpu_model: Option<String>,
    /// vCPUs [default: the template's, else 1].
    #[arg(long, value_parser = parse_vcpus)]
    pub vcpus: Option<u32>,
    /// Memory limit, e.g. 16GiB [default: the template's, else 1GiB].
    #[arg(long, value_parser = parse_nonzero_size)]
    pub memory: Option<u64>,
    /// Ephemeral container disk, e.g. 20GiB [default: the template's, else 10GiB].
    #[arg(long, value_parser = parse_nonzero_size)]
    pub container_disk: Option<u64>,
    /// Volume to mount; created with SIZE if it does not exist (repeatable).
    #[arg(long = "volume", short = 'v', value_name = "NAME:/PATH[:SIZE]", value_parser = parse_volume)]
    pub volumes: Vec<VolumeMount>,
    /// Environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Port to expose (repeatable).
    #[arg(long = "port", short = 'p', value_name = "PORT[/PROTO]", value_parser = parse_port)]
    pub ports: Vec<PortSpec>,
    /// What runs the instance: `container` (an OCI container, runc) or `vm` (a QEMU micro-VM
    /// booted from the image's template, whole GPUs by passthrough) [default: the
    /// template's, else container].
    #[arg(long, value_name = "RUNTIME", value_parser = gpuvisor_wire::RuntimeKind::parse)]
    pub runtime: Option<gpuvisor_wire::RuntimeKind>,
    /// A script read from FILE: a VM's cloud-init runs it once at first boot; a container's
    /// /bin/sh runs it before the command at every start.
    #[arg(long, value_name = "FILE")]
    pub startup_script: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Start from this template (see `gpuvisor template list`); the flags given override it.
    #[arg(long)]
    pub template: Option<String>,
    /// Image name (see `gpuvisor image list`); required without --template or
    /// --from-snapshot.
    #[arg(long, required_unless_present_any = ["template", "from_snapshot"])]
    pub image: Option<String>,
    /// Clone a snapshot (by id or name): the new instance's disk starts from the snapshot's
    /// at every start, and its image, runtime and disk size are the snapshot's. Disks only:
    /// a VM clone boots afresh.
    #[arg(long, value_name = "SNAPSHOT")]
    pub from_snapshot: Option<String>,
    /// Instance name (default: generated).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// VRAM for a fractional GPU (default: the fraction of the GPU's VRAM).
    #[arg(long, value_parser = parse_size_arg)]
    pub vram: Option<u64>,
    /// Priority class: a higher class may preempt lower interruptible instances.
    #[arg(long, value_enum, default_value_t = PriorityArg::Normal)]
    pub priority: PriorityArg,
    /// Spot instance: may be stopped and marked `interrupted` for a higher-priority or
    /// on-demand one, or a higher bid (see `gpu types` for prices).
    #[arg(long)]
    pub interruptible: bool,
    /// With --interruptible: the most to pay per GPU-hour (at least the current interruptible
    /// price); a higher bid may take a GPU from a lower one [default: the floor price].
    #[arg(long, value_name = "PRICE")]
    pub bid: Option<f64>,
    /// Stop the instance (volumes kept) after this long without traffic through the proxy,
    /// with no open connection to its ports and its GPUs below 5% busy, e.g. 30m.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub idle_timeout: Option<std::time::Duration>,
    #[command(flatten)]
    pub disk_io: DiskIoArgs,
    /// When the main process exits: `no` (stay stopped), `on-failure[:N]` (restart after a
    /// non-zero exit, at most N times since the last create/start), `always` (restart after
    /// every exit; never after `instance stop`). Restarts back off from 1 s, doubling to 5 min
    /// while the process keeps exiting within 10 s.
    #[arg(long, value_name = "POLICY", default_value = "always", value_parser = RestartPolicy::parse)]
    pub restart: RestartPolicy,
    /// VMs: an SSH public key for the guest's user (repeatable): the key line, or @FILE to
    /// read it (e.g. @~/.ssh/id_ed25519.pub).
    #[arg(long = "ssh-key", value_name = "KEY|@FILE")]
    pub ssh_keys: Vec<String>,
    /// VMs: a Debian package cloud-init installs at first boot (repeatable; NAME or
    /// NAME=VERSION; the guest needs a route to its mirror).
    #[arg(long = "package", value_name = "NAME")]
    pub packages: Vec<String>,
    #[command(flatten)]
    pub wait: WaitArgs,
    /// Command overriding the image's, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum InstanceCmd {
    /// Create (and start) an instance.
    Create(Box<CreateArgs>),
    /// List instances.
    #[command(visible_alias = "ls")]
    List,
    /// Show one instance.
    Get { id: String },
    /// Print the instance's output.
    Logs {
        id: String,
        /// Keep printing until the instance stops.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Run a command in a running instance; its output streams as it comes; exits with its exit
    /// status (124 when the deadline killed it). `-it` opens a terminal: `exec -it web -- sh`.
    Exec {
        id: String,
        /// Environment variable (repeatable).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Send this terminal's input to the command (its stdin).
        #[arg(short = 'i', long)]
        interactive: bool,
        /// Run the command on a terminal (window size and resizes follow this one; keys such
        /// as ^C go to the command).
        #[arg(short = 't', long)]
        tty: bool,
        /// Kill the command after this long, e.g. 30s (default and maximum: the daemon's
        /// exec_timeout and exec_max_timeout).
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        timeout: Option<Duration>,
        /// The command, after `--`.
        #[arg(
            required = true,
            num_args = 1..,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
    /// Attach to a VM's serial console (what the guest writes there is also in `logs`). Keys go
    /// to the guest; the escape key (default ^], i.e. Ctrl+]) detaches and leaves the VM
    /// running. One attach per instance at a time.
    Console {
        id: String,
        /// The detach key: a control key as `^X` (`^]`, `^A`..`^Z`, `^\\`, `^^`, `^_`).
        #[arg(long, default_value = "^]", value_parser = parse_escape_key, value_name = "KEY")]
        escape: u8,
    },
    /// Stop an instance (its disks and volumes stay).
    Stop {
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Start a stopped instance.
    Start {
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Resize an instance: a running container's vCPUs and memory change in place; a GPU
    /// count or a VM's size needs --restart (stop, resize, start).
    Scale {
        id: String,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long, value_parser = parse_size_arg)]
        memory: Option<u64>,
        /// Whole GPUs.
        #[arg(long)]
        gpus: Option<u32>,
        /// New disk I/O limits (live, containers and VMs).
        #[command(flatten)]
        disk_io: DiskIoArgs,
        /// Consent to a stop and start when the change cannot be made live.
        #[arg(long)]
        restart: bool,
    },
    /// Save a running instance's disk and volumes as snapshot NAME (`--memory`: a VM's running
    /// state too). Waits until the copy is complete.
    Snapshot {
        id: String,
        /// The snapshot's name (unique in the tenant).
        name: String,
        /// VMs: save the running state too (restoring it resumes the VM where it was).
        #[arg(long)]
        memory: bool,
    },
    /// Roll an instance back to one of its snapshots: it is stopped if it runs, its volumes
    /// rolled back, and it starts from the snapshot's disk (a VM from its saved running
    /// state, if the snapshot has one).
    Restore {
        id: String,
        /// The snapshot, by id or name.
        snapshot: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Live-migrate a running VM to a new QEMU process, here or at another daemon, without
    /// stopping it (admin): the guest pauses only for the switchover (under TCG with QEMU
    /// before 9.0, a VM started before its RAM was padded for that pauses for the whole copy,
    /// or with --postcopy until it switches over, at once: `paused_copy`). Answers once it
    /// runs there, with the figures.
    Migrate {
        id: String,
        /// The node to move to: another daemon's node id (one of this daemon's `[[peer]]`s),
        /// or (default) this daemon's own node: a new QEMU process here.
        #[arg(long)]
        to: Option<String>,
        /// Switch to post-copy after the first pass, at once under TCG before QEMU 9.0 (bounded downtime; a
        /// failure after the switch loses the guest, which restarts from its disks).
        #[arg(long)]
        postcopy: bool,
        /// The longest pause of the guest at the switchover, ms.
        #[arg(long, default_value_t = 300)]
        max_downtime_ms: u64,
    },
    /// A signed link that opens a private HTTP port in a browser (through the HTTPS proxy)
    /// until it expires; anyone holding it gets in.
    Link {
        id: String,
        port: u16,
        /// How long the link works (at most 7d).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        ttl: std::time::Duration,
    },
    /// Terminate an instance and free everything it holds but its volumes.
    #[command(visible_alias = "rm")]
    Terminate {
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Show the instance's events.
    Events { id: String },
    /// CPU, memory, disk, network and GPU use over time (`--watch` for a live view).
    Metrics(MetricsArgs),
}

// ---- argument syntax ----

/// `--disk-iops`, `--disk-bandwidth`: per disk (the container disk, each volume; a VM's
/// drives). 0 takes a limit away.
#[derive(Debug, Default, Clone, Args)]
pub struct DiskIoArgs {
    /// Disk operations per second, each disk: N for reads and for writes, or
    /// read=N,write=M (either alone too); 0: no limit.
    #[arg(long, value_name = "N|read=N,write=M", value_parser = parse_rw_count)]
    pub disk_iops: Option<ReadWrite>,
    /// Disk bytes per second, each disk: SIZE (e.g. 50MiB) for reads and for writes, or
    /// read=SIZE,write=SIZE (either alone too); 0: no limit.
    #[arg(long, value_name = "SIZE|read=SIZE,write=SIZE", value_parser = parse_rw_size)]
    pub disk_bandwidth: Option<ReadWrite>,
}

/// A read and a write value, either unset.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadWrite {
    pub read: Option<u64>,
    pub write: Option<u64>,
}

impl DiskIoArgs {
    pub fn wire(&self) -> gpuvisor_wire::DiskIo {
        let iops = self.disk_iops.unwrap_or_default();
        let bw = self.disk_bandwidth.unwrap_or_default();
        gpuvisor_wire::DiskIo {
            read_iops: iops.read,
            write_iops: iops.write,
            read_bps: bw.read,
            write_bps: bw.write,
        }
    }
}

/// `V` (both) or `read=V,write=V` (either or both), each V read by `one`.
fn parse_rw(s: &str, one: fn(&str) -> Result<u64, String>) -> Result<ReadWrite, String> {
    if !s.contains('=') {
        let v = one(s)?;
        return Ok(ReadWrite {
            read: Some(v),
            write: Some(v),
        });
    }
    let mut rw = ReadWrite::default();
    for part in s.split(',') {
        let slot = match part.split_once('=') {
            Some(("read", v)) => (&mut rw.read, v),
            Some(("write", v)) => (&mut rw.write, v),
            _ => return Err(format!("{part:?}: expected read=VALUE or write=VALUE")),
        };
        if slot.0.is_some() {
            return Err(format!("{part:?} given twice"));
        }
        *slot.0 = Some(one(slot.1)?);
    }
    Ok(rw)
}

fn parse_rw_count(s: &str) -> Result<ReadWrite, String> {
    parse_rw(s, |v| {
        v.parse::<u64>()
            .map_err(|_| format!("{v:?} is not a count of operations per second"))
    })
}

fn parse_rw_size(s: &str) -> Result<ReadWrite, String> {
    parse_rw(s, parse_size_arg)
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// `^X` → the control byte of X (`^]` → 0x1d).
fn parse_escape_key(s: &str) -> Result<u8, String> {
    match s.as_bytes() {
        [b'^', c @ (b'@'..=b'_' | b'a'..=b'z')] => Ok(c.to_ascii_uppercase() & 0x1f),
        _ => Err(format!(
            "escape key {s:?}: give a control key as ^X, e.g. ^] or ^A (^C and ^Z are for the guest too)"
        )),
    }
}

/// A size that must not be 0 (0 would mean "unset" to the daemon).
fn parse_nonzero_size(s: &str) -> Result<u64, String> {
    match parse_size_arg(s)? {
        0 => Err("must be more than 0".into()),
        n => Ok(n),
    }
}

fn parse_vcpus(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?} is not a number of vCPUs: {e}")),
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .ok_or_else(|| format!("{s:?} is not a number (e.g. 0.25)"))
}

/// `NAME:/path[:SIZE]`. Only the shape is checked here; what makes a valid name or mount path is
/// the daemon's rule.
pub fn parse_volume(s: &str) -> Result<VolumeMount, String> {
    const SYNTAX: &str = "expected NAME:/PATH[:SIZE], e.g. data:/workspace:50GiB";
    let mut parts = s.splitn(3, ':');
    let name = parts.next().unwrap_or("");
    let path = parts.next().ok_or_else(|| format!("{s:?}: {SYNTAX}"))?;
    if name.is_empty() {
        return Err(format!("{s:?}: the volume name is empty; {SYNTAX}"));
    }
    if path.is_empty() {
        return Err(format!("{s:?}: the mount path is empty; {SYNTAX}"));
    }
    let size = match parts.next() {
        None => None,
        Some(size) => Some(parse_size(size).map_err(|e| format!("{s:?}: {e}"))?),
    };
    Ok(VolumeMount {
        name: name.to_string(),
        path: path.to_string(),
        size,
    })
}

/// `PORT[/PROTO]` (default protocol tcp; the daemon knows which protocols it serves).
/// `--ssh-key` values: a key line as given, or `@FILE`'s non-empty, non-comment lines.
/// `--startup-script FILE`: the script's text.
fn read_script(path: Option<&std::path::Path>) -> Result<Option<String>, CliError> {
    path.map(|p| {
        std::fs::read_to_string(p)
            .map_err(|e| CliError::Invalid(format!("--startup-script {}: {e}", p.display())))
    })
    .transpose()
}

fn read_ssh_keys(args: &[String]) -> Result<Vec<String>, CliError> {
    let mut keys = Vec::new();
    for a in args {
        match a.strip_prefix('@') {
            Some(path) => {
                let path = match path.strip_prefix("~/") {
                    Some(rest) => std::env::var_os("HOME")
                        .map_or_else(|| path.into(), |h| std::path::Path::new(&h).join(rest)),
                    None => std::path::PathBuf::from(path),
                };
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    CliError::Invalid(format!("--ssh-key @{}: {e}", path.display()))
                })?;
                keys.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(String::from),
                );
            }
            None => keys.push(a.clone()),
        }
    }
    Ok(keys)
}

pub fn parse_port(s: &str) -> Result<PortSpec, String> {
    PortSpec::parse(s)
}

// ---- errors ----

#[derive(Debug, Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    WaitFailed(String),
    #[error("{0}")]
    WaitTimeout(String),
    #[error("{0}")]
    Invalid(String),
    #[error("writing output: {0}")]
    Output(io::Error),
    /// stdout was closed (`| head`): stop quietly.
    #[error("broken pipe")]
    BrokenPipe,
    #[error("{0:#}")]
    Serve(anyhow::Error),
}

impl From<io::Error> for CliError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe {
            CliError::BrokenPipe
        } else {
            CliError::Output(e)
        }
    }
}

impl CliError {
    pub fn code(&self) -> &str {
        match self {
            CliError::Client(e) => e.code(),
            CliError::WaitFailed(_) => "wait_failed",
            CliError::WaitTimeout(_) => "timeout",
            CliError::Invalid(_) => code::INVALID_ARGUMENT,
            CliError::Output(_) | CliError::BrokenPipe => "io",
            CliError::Serve(_) => "serve",
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Client(ClientError::Unreachable { .. }) => exit::UNREACHABLE,
            CliError::Client(ClientError::Api { code, .. }) => exit_code_for_api(code),
            CliError::Client(_) | CliError::Output(_) | CliError::Serve(_) => exit::OTHER,
            CliError::WaitFailed(_) => exit::WAIT_FAILED,
            CliError::WaitTimeout(_) => exit::WAIT_TIMEOUT,
            CliError::Invalid(_) => exit::INVALID,
            CliError::BrokenPipe => exit::OK,
        }
    }
}

/// Maps an API error code to the exit code of the table in the module documentation.
pub fn exit_code_for_api(c: &str) -> i32 {
    match c {
        code::NOT_FOUND => exit::NOT_FOUND,
        code::UNAUTHORIZED | code::FORBIDDEN => exit::AUTH,
        code::INVALID_ARGUMENT | code::ALREADY_EXISTS | code::IN_USE | code::INVALID_STATE => {
            exit::INVALID
        }
        code::INSUFFICIENT_RESOURCES | code::QUOTA_EXCEEDED | code::UNAVAILABLE => {
            exit::INSUFFICIENT_RESOURCES
        }
        code::RESOURCE_EXHAUSTED => exit::EXHAUSTED,
        code::PAYLOAD_TOO_LARGE => exit::INVALID,
        _ => exit::OTHER,
    }
}

// ---- entry point ----

/// Parses the command line, runs it and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version come as "errors" printed on stdout, exit 0.
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(CliError::BrokenPipe) => exit::OK,
        Err(e) => {
            eprintln!("error: {e} ({})", e.code());
            e.exit_code()
        }
    }
}

/// Runs a parsed command; `Ok` carries the exit code (not always 0: `instance exec`).
pub fn run(cli: Cli) -> Result<i32, CliError> {
    let Cli { global, command } = cli;
    // Serve needs no client; every other command builds one (and fails early on a bad endpoint).
    let connect = || -> Result<Ctx, CliError> {
        Ok(Ctx {
            client: Client::new(
                &global.endpoint,
                global.api_key.clone(),
                global.ca.as_deref(),
            )?,
            format: global.output,
        })
    };
    match command {
        Command::Serve(args) => run_serve(*args),
        Command::Sim(args) => sim::run(args, global.output),
        Command::Host(cmd) => hostcli::run_host(cmd, global.output),
        Command::Routes => {
            for (method, path, _) in crate::api::route_table() {
                println!("{method} {path}");
            }
            Ok(exit::OK)
        }
        Command::Openapi => {
            let text = serde_json::to_string_pretty(crate::api::openapi_document())
                .map_err(std::io::Error::other)?;
            output::print_text(&text)?;
            Ok(exit::OK)
        }
        Command::GraphqlSchema => {
            use std::io::Write;
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::stdout().write_all(crate::graphql::sdl().as_bytes());
            Ok(exit::OK)
        }
        Command::GraphqlOps => {
            use std::io::Write;
            let text: String = crate::graphql::FIELDS
                .iter()
                .map(|(kind, field, op)| {
                    format!("{kind} {field} {}\n", op.map_or("-", |o| o.name()))
                })
                .collect();
            let _ = std::io::stdout().write_all(text.as_bytes());
            Ok(exit::OK)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            use std::io::Write;
            // Into a buffer first: clap_complete panics on a write error (e.g. `| head`).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "gpuvisor", &mut script);
            let _ = std::io::stdout().write_all(&script);
            Ok(exit::OK)
        }
        Command::LogRelay(a) => {
            // Only SIGKILL (teardown, after the container is gone) ends a relay early: a relay
            // that died would break the container's stdout.
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGPIPE] {
                // SAFETY: setting a signal's disposition to SIG_IGN has no handler to race with.
                unsafe {
                    libc::signal(sig, libc::SIG_IGN);
                }
            }
            let limits = gpuvisor_node::logs::LogLimits {
                max_bytes: a.max_bytes,
                reserve: a.reserve,
                relay: None,
            };
            let dir = gpuvisor_node::logs::instance_dir(&a.dir, &a.id);
            gpuvisor_node::logs::relay(io::stdin().lock(), &dir, limits)
                .map_err(|e| CliError::Invalid(format!("log relay {}: {e}", a.id)))?;
            Ok(exit::OK)
        }
        Command::QgaExec(a) => Ok(gpuvisor_node::vm::qmp::agent_exec_main(
            &a.socket,
            &a.pid_file,
            &a.args,
            &a.env,
            a.stdin,
            a.max_output,
        )),
        Command::ExecShim(a) => Ok(gpuvisor_node::console::shim_main(
            &gpuvisor_node::HostRoot::real().with_cgroup_parent(a.cgroup_parent.clone()),
            &a.instance,
            &a.pid_file,
            &a.runtime,
            a.pipes,
        )),
        Command::Health => connect()?.health(),
        Command::Tenant(cmd) => connect()?.tenant(cmd),
        Command::Key(cmd) => connect()?.key(cmd),
        Command::Audit(cmd) => connect()?.audit(cmd),
        Command::Usage(a) => connect()?.usage(a),
        Command::Gpu(cmd) => connect()?.gpu(cmd),
        Command::Image(cmd) => connect()?.image(cmd),
        Command::Registry(cmd) => connect()?.registry(cmd),
        Command::Volume(cmd) => connect()?.volume(cmd),
        Command::Snapshot(cmd) => connect()?.snapshot(cmd),
        Command::Template(cmd) => connect()?.template(cmd),
        Command::Instance(cmd) => connect()?.instance(cmd),
        Command::Endpoint(cmd) => connect()?.endpoint(cmd),
    }
}

fn run_serve(args: ServeArgs) -> Result<i32, CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Serve(anyhow::Error::new(e).context("starting the runtime")))?;
    runtime.block_on(serve(args)).map_err(CliError::Serve)?;
    Ok(exit::OK)
}

struct Ctx {
    client: Client,
    format: Format,
}

/// Telemetry views: live redraws for `gpu top` and `--watch`.
impl Ctx {
    /// Prints `value`; in a table view on a terminal, clears the screen first so the view
    /// redraws in place (structured output just appends one document per refresh).
    fn redraw<T: serde::Serialize + ?Sized>(
        &self,
        value: &T,
        table: impl FnOnce(&T) -> String,
    ) -> Result<(), CliError> {
        if self.format == Format::Table && io::stdout().is_terminal() {
            print!("\x1b[2J\x1b[H");
        }
        output::print(self.format, value, table)?;
        Ok(())
    }

    fn metrics_loop(
        &self,
        a: &MetricsArgs,
        fetch: impl Fn(&Client, &MetricsArgs) -> Result<gpuvisor_wire::MetricsHistory, ClientError>,
    ) -> Result<(), CliError> {
        loop {
            let h = fetch(&self.client, a)?;
            self.redraw(&h, output::metrics_table)?;
            if !a.watch {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

impl Ctx {
    fn health(&self) -> Result<i32, CliError> {
        let h = self.client.health()?;
        output::print(self.format, &h, output::health_table)?;
        Ok(exit::OK)
    }

    fn gpu(&self, cmd: GpuCmd) -> Result<i32, CliError> {
        match cmd {
            GpuCmd::List => {
                let gpus = self.client.list_gpus()?;
                output::print(self.format, &gpus, |g| output::gpus_table(g))?;
            }
            GpuCmd::Types => {
                let types = self.client.gpu_types()?;
                output::print(self.format, &types, |t| output::gpu_types_table(t))?;
            }
            GpuCmd::BindVfio { gpu } => {
                let g = self.client.bind_vfio(&gpu)?;
                output::print(self.format, &g, |g| {
                    output::gpus_table(std::slice::from_ref(g))
                })?;
            }
            GpuCmd::Release { gpu } => {
                let g = self.client.release_gpu(&gpu)?;
                output::print(self.format, &g, |g| {
                    output::gpus_table(std::slice::from_ref(g))
                })?;
            }
            GpuCmd::Cordon { gpu, reason } => {
                let g = self.client.cordon_gpu(&gpu, reason)?;
                output::print(self.format, &g, |g| {
                    output::gpus_table(std::slice::from_ref(g))
                })?;
            }
            GpuCmd::Uncordon { gpu } => {
                let g = self.client.uncordon_gpu(&gpu)?;
                output::print(self.format, &g, |g| {
                    output::gpus_table(std::slice::from_ref(g))
                })?;
            }
            GpuCmd::Mig(cmd) => hostcli::run_mig(&self.client, cmd, self.format)?,
            GpuCmd::Top { iterations } => {
                let mut n = 0u32;
                loop {
                    let stats = self.client.gpu_stats()?;
                    self.redraw(&stats, |s| output::gpu_top_table(s))?;
                    n += 1;
                    if iterations.is_some_and(|max| n >= max) {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            GpuCmd::Metrics(a) => {
                self.metrics_loop(&a, |c, a| c.gpu_metrics(&a.id, &a.since, a.step.as_deref()))?
            }
            GpuCmd::Events { gpu, since, limit } => {
                let q = gpuvisor_wire::GpuEventsQuery {
                    since: Some(since),
                    gpu,
                    limit,
                };
                let events = self.client.gpu_events(&q)?;
                output::print(self.format, &events, |e| output::gpu_events_table(e))?;
            }
        }
        Ok(exit::OK)
    }

    fn tenant(&self, cmd: TenantCmd) -> Result<i32, CliError> {
        let now = output::now_ms();
        match cmd {
            TenantCmd::Create { name } => {
                let t = self.client.create_tenant(&CreateTenant { name })?;
                output::print(self.format, &t, |t| {
                    output::tenants_table(std::slice::from_ref(t), now)
                })?;
            }
            TenantCmd::List => {
                let ts = self.client.list_tenants()?;
                output::print(self.format, &ts, |ts| output::tenants_table(ts, now))?;
            }
            TenantCmd::Get { name } => {
                let t = self.client.get_tenant(&name)?;
                output::print(self.format, &t, output::tenant_detail)?;
            }
            TenantCmd::Rm {
                name,
                cascade,
                wait,
            } => {
                let r = self.client.delete_tenant(&name, cascade)?;
                if wait.wait && !r.deleted {
                    let deadline = Instant::now() + wait.timeout;
                    loop {
                        match self.client.get_tenant(&name) {
                            Err(ClientError::Api { code, .. }) if code == code::NOT_FOUND => break,
                            Err(e) => return Err(e.into()),
                            Ok(_) if Instant::now() > deadline => {
                                return Err(CliError::WaitTimeout(format!(
                                    "tenant {name:?} is still being deleted after {}",
                                    humantime::format_duration(wait.timeout)
                                )))
                            }
                            Ok(_) => std::thread::sleep(Duration::from_millis(250)),
                        }
                    }
                }
                let gone = r.deleted || wait.wait;
                output::print(self.format, &r, |r| {
                    if gone {
                        format!("tenant {} deleted", r.name)
                    } else {
                        format!(
                            "tenant {} is being deleted: {} instance(s) terminating, then {} \
                             volume(s) and the tenant are removed",
                            r.name,
                            r.instances.len(),
                            r.volumes.len()
                        )
                    }
                })?;
            }
            TenantCmd::Limit(args) => {
                let name = args.name.clone();
                let mut limits = self.client.get_tenant(&name)?.limits;
                args.apply(&mut limits)?;
                let t = self.client.set_tenant_limits(&name, &limits)?;
                output::print(self.format, &t, output::tenant_detail)?;
            }
            TenantCmd::Set(args) => {
                let name = args.name.clone();
                let mut policy = self.client.get_tenant(&name)?.policy;
                args.apply(&mut policy)?;
                let t = self.client.set_tenant_policy(&name, &policy)?;
                output::print(self.format, &t, output::tenant_detail)?;
            }
        }
        Ok(exit::OK)
    }

    fn key(&self, cmd: KeyCmd) -> Result<i32, CliError> {
        let now = output::now_ms();
        match cmd {
            KeyCmd::Create { tenant, role } => {
                let created = self.client.create_key(&CreateKey {
                    tenant,
                    role: role.into(),
                })?;
                output::print(self.format, &created, output::created_key_text)?;
            }
            KeyCmd::List => {
                let keys = self.client.list_keys()?;
                output::print(self.format, &keys, |k| output::keys_table(k, now))?;
            }
            KeyCmd::Revoke { id } => {
                let key = self.client.revoke_key(&id)?;
                output::print(self.format, &key, |k| format!("key {} revoked", k.id))?;
            }
        }
        Ok(exit::OK)
    }

    fn usage(&self, a: UsageArgs) -> Result<i32, CliError> {
        let r = self.client.usage(&gpuvisor_wire::UsageQuery {
            tenant: a.tenant,
            from: a.from,
            to: a.to,
            subject: a.subject,
        })?;
        if self.format == output::Format::Csv {
            output::print_text(&output::usage_csv(&r))?;
        } else {
            output::print(self.format, &r, output::usage_table)?;
        }
        Ok(exit::OK)
    }

    fn audit(&self, cmd: AuditCmd) -> Result<i32, CliError> {
        match cmd {
            AuditCmd::List {
                since,
                tenant,
                after,
                limit,
            } => {
                let rows = self.client.audit(&gpuvisor_wire::AuditQuery {
                    since,
                    tenant,
                    after,
                    limit,
                })?;
                output::print(self.format, &rows, |r| output::audit_table(r))?;
                Ok(exit::OK)
            }
            AuditCmd::Verify => {
                let v = self.client.audit_verify()?;
                output::print(self.format, &v, output::audit_verification_text)?;
                Ok(if v.ok { exit::OK } else { exit::OTHER })
            }
        }
    }

    fn image(&self, cmd: ImageCmd) -> Result<i32, CliError> {
        let now = output::now_ms();
        match cmd {
            ImageCmd::Import {
                path,
                name,
                daemon_path,
            } => {
                let image = if !daemon_path && path.is_file() {
                    // A local archive goes to the daemon in the request body.
                    let file = std::fs::File::open(&path).map_err(|e| {
                        CliError::Invalid(format!("image file {}: {e}", path.display()))
                    })?;
                    self.client.upload_image(&name, file)?
                } else {
                    // A directory is read where the daemon runs, in its own working directory.
                    let path = std::path::absolute(&path).map_err(|e| {
                        CliError::Invalid(format!("image path {}: {e}", path.display()))
                    })?;
                    self.client.import_image(&ImportImage {
                        path: path.to_string_lossy().into_owned(),
                        name,
                    })?
                };
                output::print(self.format, &image, |i| {
                    output::images_table(std::slice::from_ref(i), now)
                })?;
            }
            ImageCmd::Pull { reference, name } => {
                let image = self.pull(&reference, name, false)?;
                output::print(self.format, &image, |i| {
                    output::images_table(std::slice::from_ref(i), now)
                })?;
            }
            ImageCmd::Publish { name, tenant } => {
                let image = self.client.publish_image(&name, tenant.as_deref())?;
                output::print(self.format, &image, |i| {
                    format!("image {} is public", i.name)
                })?;
            }
            ImageCmd::List => {
                let images = self.client.list_images()?;
                output::print(self.format, &images, |i| output::images_table(i, now))?;
            }
            ImageCmd::Rm { name, tenant } => {
                let image = self.client.remove_image(&name, tenant.as_deref())?;
                output::print(self.format, &image, |i| format!("image {} removed", i.name))?;
            }
        }
        Ok(exit::OK)
    }

    /// Starts a pull (or joins one) and follows it to the end, drawing progress on stderr.
    fn pull(
        &self,
        reference: &str,
        name: Option<String>,
        if_missing: bool,
    ) -> Result<gpuvisor_wire::Image, CliError> {
        let mut job = self.client.pull_image(&gpuvisor_wire::PullImage {
            reference: reference.to_string(),
            name,
            if_missing,
        })?;
        let mut progress = output::PullProgress::new(io::stderr().is_terminal());
        loop {
            progress.show(&job);
            match job.state.as_str() {
                "running" => {}
                "done" => {
                    progress.finish(&job);
                    return job.image.ok_or_else(|| {
                        CliError::Client(ClientError::Decode(
                            "the finished pull names no image".into(),
                        ))
                    });
                }
                _ => {
                    progress.finish(&job);
                    return Err(CliError::Client(ClientError::Api {
                        status: 0,
                        code: job.code.clone().unwrap_or_else(|| "unavailable".into()),
                        message: job
                            .error
                            .clone()
                            .unwrap_or_else(|| format!("pull of {reference} failed")),
                    }));
                }
            }
            let since = job.version;
            // A daemon restarting resumes the job: wait for it to come back (bounded).
            let mut tries = 0;
            job = loop {
                match self.client.get_pull(&job.id, Some(since), 5000) {
                    Err(ClientError::Unreachable { .. }) if tries < 60 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    other => break other?,
                }
            };
            // At most ~5 redraws a second however fast bytes arrive.
            if job.state == "running" {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn registry(&self, cmd: RegistryCmd) -> Result<i32, CliError> {
        let now = output::now_ms();
        match cmd {
            RegistryCmd::Login {
                host,
                username,
                password_stdin,
            } => {
                if !password_stdin {
                    return Err(CliError::Invalid(
                        "give the password on standard input with --password-stdin (never on the command line)".into(),
                    ));
                }
                let mut password = String::new();
                io::stdin()
                    .read_line(&mut password)
                    .map_err(|e| CliError::Invalid(format!("reading the password: {e}")))?;
                let password = password.trim_end_matches(['\n', '\r']).to_string();
                let c = self.client.registry_login(&gpuvisor_wire::RegistryLogin {
                    host,
                    username,
                    password,
                })?;
                output::print(self.format, &c, |c| {
                    format!("logged in to {} as {}", c.host, c.username)
                })?;
            }
            RegistryCmd::Logout { host } => {
                let c = self.client.registry_logout(&host)?;
                output::print(self.format, &c, |c| format!("logged out of {}", c.host))?;
            }
            RegistryCmd::List => {
                let list = self.client.registry_list()?;
                output::print(self.format, &list, |l| output::registries_table(l, now))?;
            }
        }
        Ok(exit::OK)
    }

    fn template(&self, cmd: TemplateCmd) -> Result<i32, CliError> {
        let now = output::now_ms();
        match cmd {
            TemplateCmd::Create(args) => {
                let (name, public) = (args.name.clone(), args.public);
                let spec = args.spec()?;
                let t = self
                    .client
                    .create_template(&gpuvisor_wire::CreateTemplate { name, public, spec })?;
                output::print(self.format, &t, output::template_detail)?;
            }
            TemplateCmd::List => {
                let ts = self.client.list_templates()?;
                output::print(self.format, &ts, |t| output::templates_table(t, now))?;
            }
            TemplateCmd::Get { name } => {
                let t = self.client.get_template(&name)?;
                output::print(self.format, &t, output::template_detail)?;
            }
            TemplateCmd::Rm { name } => {
                let t = self.client.remove_template(&name)?;
                output::print(self.format, &t, |t| format!("template {} removed", t.name))?;
            }
        }
        Ok(exit::OK)
    }

    fn endpoint(&self, cmd: EndpointCmd) -> Result<i32, CliError> {
        let now = output::now_ms();
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        match cmd {
            EndpointCmd::Create(a) => {
                let req = gpuvisor_wire::CreateEndpoint {
                    name: a.name,
                    spec: gpuvisor_wire::EndpointSpec {
                        template: a.template,
                        workers_min: a.workers_min,
                        workers_max: a.workers_max,
                        idle_timeout_secs: a.idle_timeout.as_secs(),
                        scaler: a.scaler,
                        gpus: a.gpus,
                        gpu_fraction: a.gpu_fraction,
                        flashboot: a.flashboot,
                        execution_timeout_ms: ms(a.execution_timeout),
                    },
                };
                let e = self.client.create_endpoint(&req)?;
                output::print(self.format, &e, output::endpoint_detail)?;
            }
            EndpointCmd::List => {
                let es = self.client.list_endpoints()?;
                output::print(self.format, &es, |e| output::endpoints_table(e, now))?;
            }
            EndpointCmd::Get { id } => {
                let e = self.client.get_endpoint(&id)?;
                output::print(self.format, &e, output::endpoint_detail)?;
            }
            EndpointCmd::Update(a) => {
                let req = gpuvisor_wire::UpdateEndpoint {
                    template: a.template,
                    workers_min: a.workers_min,
                    workers_max: a.workers_max,
                    idle_timeout_secs: a.idle_timeout.map(|d| d.as_secs()),
                    scaler: a.scaler,
                    flashboot: a.flashboot,
                    execution_timeout_ms: a.execution_timeout.map(ms),
                };
                let e = self.client.update_endpoint(&a.id, &req)?;
                output::print(self.format, &e, output::endpoint_detail)?;
            }
            EndpointCmd::Rm { id } => {
                let e = self.client.remove_endpoint(&id)?;
                output::print(self.format, &e, |e| {
                    format!("endpoint {} ({}) removed", e.name, e.id)
                })?;
            }
        }
        Ok(exit::OK)
    }

    fn volume(&self, cmd: VolumeCmd) -> Result<i32, CliError> {
        let now = output::now_ms();
        match cmd {
            VolumeCmd::Create { name, size } => {
                let v = self.client.create_volume(&CreateVolume { name, size })?;
                output::print(self.format, &v, |v| {
                    output::volumes_table(std::slice::from_ref(v), now)
                })?;
            }
            VolumeCmd::List => {
                let vs = self.client.list_volumes()?;
                output::print(self.format, &vs, |v| output::volumes_table(v, now))?;
            }
            VolumeCmd::Rm { name } => {
                let v = self.client.remove_volume(&name)?;
                output::print(self.format, &v, |v| format!("volume {} removed", v.name))?;
            }
        }
        Ok(exit::OK)
    }

    fn snapshot(&self, cmd: SnapshotCmd) -> Result<i32, CliError> {
        let now = output::now_ms();
        match cmd {
            SnapshotCmd::List => {
                let list = self.client.list_snapshots()?;
                output::print(self.format, &list, |l| output::snapshots_table(l, now))?;
            }
            SnapshotCmd::Get { snapshot } => {
                let s = self.client.get_snapshot(&snapshot)?;
                output::print(self.format, &s, |s| output::snapshot_detail(s, now))?;
            }
            SnapshotCmd::Rm { snapshot } => {
                let s = self.client.delete_snapshot(&snapshot)?;
                output::print(self.format, &s, |s| format!("snapshot {} removed", s.name))?;
            }
        }
        Ok(exit::OK)
    }

    fn instance(&self, cmd: InstanceCmd) -> Result<i32, CliError> {
        match cmd {
            InstanceCmd::Create(args) => {
                let mut args = *args;
                // A registry reference no image is named after is pulled first, with progress.
                if let Some(reference) = args
                    .image
                    .as_deref()
                    .filter(|i| gpuvisor_wire::looks_like_reference(i))
                {
                    let image = self.pull(reference, None, true)?;
                    args.image = Some(image.name);
                }
                let req = CreateInstance {
                    template: args.template,
                    image: args.image.unwrap_or_default(),
                    name: args.name,
                    gpus: args.shape.gpus,
                    gpu_fraction: args.shape.gpu_fraction,
                    vram: args.vram,
                    gpu_model: args.shape.gpu_model,
                    vcpus: args.shape.vcpus.unwrap_or(0),
                    memory: args.shape.memory.unwrap_or(0),
                    container_disk: args.shape.container_disk.unwrap_or(0),
                    volumes: args.shape.volumes,
                    env: args.shape.env,
                    ports: args.shape.ports,
                    command: args.command,
                    priority: args.priority.into(),
                    interruptible: args.interruptible,
                    bid_per_gpu_hour: args.bid,
                    restart: args.restart,
                    runtime: args.shape.runtime,
                    ssh_keys: read_ssh_keys(&args.ssh_keys)?,
                    startup_script: read_script(args.shape.startup_script.as_deref())?,
                    packages: args.packages,
                    idle_timeout_secs: args.idle_timeout.map(|d| d.as_secs()),
                    disk_io: args.disk_io.wire(),
                    from_snapshot: args.from_snapshot,
                };
                let inst = self.client.create_instance(&req)?;
                self.finish_lifecycle(inst, InstanceState::Running, &args.wait)
            }
            InstanceCmd::List => {
                let list = self.client.list_instances()?;
                let now = output::now_ms();
                output::print(self.format, &list, |l| output::instances_table(l, now))?;
                Ok(exit::OK)
            }
            InstanceCmd::Get { id } => {
                let inst = self.client.get_instance(&id)?;
                let now = output::now_ms();
                output::print(self.format, &inst, |i| output::instance_detail(i, now))?;
                Ok(exit::OK)
            }
            InstanceCmd::Logs { id, follow } => {
                let id = self.client.get_instance(&id)?.id;
                self.logs(&id, follow)?;
                Ok(exit::OK)
            }
            InstanceCmd::Exec {
                id,
                env,
                interactive,
                tty,
                timeout,
                command,
            } => {
                if interactive || tty {
                    return self.exec_interactive(&id, command, env, interactive, tty, timeout);
                }
                let id = self.client.get_instance(&id)?.id;
                let req = ExecRequest {
                    command,
                    env,
                    timeout_ms: timeout.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                };
                self.exec(&id, &req)
            }
            InstanceCmd::Console { id, escape } => self.console(&id, escape),
            InstanceCmd::Stop { id, wait } => {
                let id = self.client.get_instance(&id)?.id;
                let inst = self.client.stop_instance(&id)?;
                self.finish_lifecycle(inst, InstanceState::Stopped, &wait)
            }
            InstanceCmd::Start { id, wait } => {
                let id = self.client.get_instance(&id)?.id;
                let inst = self.client.start_instance(&id)?;
                self.finish_lifecycle(inst, InstanceState::Running, &wait)
            }
            InstanceCmd::Scale {
                id,
                vcpus,
                memory,
                gpus,
                disk_io,
                restart,
            } => {
                let req = gpuvisor_wire::ScaleInstance {
                    vcpus,
                    memory,
                    gpus,
                    disk_io: disk_io.wire(),
                    restart,
                };
                let inst = self.client.scale_instance(&id, &req)?;
                let now = output::now_ms();
                output::print(self.format, &inst, |i| {
                    output::instances_table(std::slice::from_ref(i), now)
                })?;
                Ok(exit::OK)
            }
            InstanceCmd::Snapshot { id, name, memory } => {
                let req = gpuvisor_wire::CreateSnapshot { name, memory };
                let snap = self.client.create_snapshot(&id, &req)?;
                let now = output::now_ms();
                output::print(self.format, &snap, |s| {
                    output::snapshots_table(std::slice::from_ref(s), now)
                })?;
                Ok(exit::OK)
            }
            InstanceCmd::Restore { id, snapshot, wait } => {
                let id = self.client.get_instance(&id)?.id;
                let req = gpuvisor_wire::RestoreInstance { snapshot };
                let inst = self.client.restore_instance(&id, &req)?;
                self.finish_lifecycle(inst, InstanceState::Running, &wait)
            }
            InstanceCmd::Migrate {
                id,
                to,
                postcopy,
                max_downtime_ms,
            } => {
                let req = gpuvisor_wire::MigrateInstance {
                    to,
                    postcopy,
                    max_downtime_ms: Some(max_downtime_ms),
                };
                let r = self.client.migrate_instance(&id, &req)?;
                output::print(self.format, &r, |r| {
                    format!(
                        "instance {} migrated on node {}: {}\n",
                        r.instance,
                        r.node,
                        r.summary()
                    )
                })?;
                Ok(exit::OK)
            }
            InstanceCmd::Link { id, port, ttl } => {
                let req = gpuvisor_wire::CreateLink {
                    port,
                    ttl_secs: ttl.as_secs(),
                };
                let link = self.client.create_link(&id, &req)?;
                output::print(self.format, &link, |l| format!("{}\n", l.url))?;
                Ok(exit::OK)
            }
            InstanceCmd::Terminate { id, wait } => {
                let inst = self.client.terminate_instance(&id)?;
                self.finish_lifecycle(inst, InstanceState::Terminated, &wait)
            }
            InstanceCmd::Events { id } => {
                let id = self.client.get_instance(&id)?.id;
                let events = self.client.events(&id)?;
                output::print(self.format, &events, |e| output::events_table(e))?;
                Ok(exit::OK)
            }
            InstanceCmd::Metrics(a) => {
                self.metrics_loop(&a, |c, a| {
                    c.instance_metrics(&a.id, &a.since, a.step.as_deref())
                })?;
                Ok(exit::OK)
            }
        }
    }

    /// Prints the instance a lifecycle call answered, after waiting for `target` if asked to.
    fn finish_lifecycle(
        &self,
        inst: Instance,
        target: InstanceState,
        wait: &WaitArgs,
    ) -> Result<i32, CliError> {
        let inst = if wait.wait {
            wait_for(&self.client, inst, target, wait.timeout)?
        } else {
            inst
        };
        let now = output::now_ms();
        output::print(self.format, &inst, |i| {
            output::instances_table(std::slice::from_ref(i), now)
        })?;
        Ok(exit::OK)
    }

    /// `instance exec`: output printed as it arrives (table format) or gathered into one
    /// `ExecResult` (JSON/YAML). A command the daemon killed (output cap, deadline) gets a line
    /// on stderr saying so.
    fn exec(&self, id: &str, req: &ExecRequest) -> Result<i32, CliError> {
        use gpuvisor_wire::exec::STDOUT;
        let structured = !matches!(self.format, Format::Table);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut write_error: Option<io::Error> = None;
        let ended = self.client.exec(id, req, |kind, data| {
            if structured {
                if kind == STDOUT { &mut out } else { &mut err }.extend_from_slice(data);
                return Ok(());
            }
            let r = if kind == STDOUT {
                let mut o = io::stdout().lock();
                o.write_all(data).and_then(|()| o.flush())
            } else {
                let mut e = io::stderr().lock();
                e.write_all(data).and_then(|()| e.flush())
            };
            if let Err(e) = &r {
                write_error = Some(io::Error::new(e.kind(), e.to_string()));
            }
            r
        });
        if let Some(e) = write_error {
            return Err(e.into());
        }
        let end = ended?;
        if structured {
            let result = gpuvisor_wire::ExecResult {
                exit_code: end.exit_code,
                stdout: String::from_utf8_lossy(&out).into_owned(),
                stderr: String::from_utf8_lossy(&err).into_owned(),
                limit: end.limit,
                message: end.message.clone(),
            };
            if let Some(text) = output::structured(self.format, &result)? {
                output::print_text(&text)?;
            }
        } else if let Some(msg) = &end.message {
            eprintln!("gpuvisor: {msg}");
        }
        Ok(match end.limit {
            Some(gpuvisor_wire::ExecLimit::Deadline) => 124,
            _ => exec_exit_code(end.exit_code),
        })
    }

    /// `instance exec -i/-t`: an interactive session over a WebSocket. With `-it` this
    /// terminal is in raw mode while it runs. Exits with the command's status (124 when the
    /// daemon's deadline ended it; 128+N when a signal ended this client).
    fn exec_interactive(
        &self,
        id: &str,
        command: Vec<String>,
        mut env: Vec<String>,
        stdin: bool,
        tty: bool,
        timeout: Option<Duration>,
    ) -> Result<i32, CliError> {
        use std::os::fd::AsFd;
        if tty && stdin && !io::stdin().is_terminal() {
            return Err(CliError::Invalid(
                "-t needs a terminal on stdin: use -i alone to pipe input".into(),
            ));
        }
        let id = self.client.get_instance(id)?.id;
        if tty && !env.iter().any(|e| e.starts_with("TERM=")) {
            env.push(format!(
                "TERM={}",
                std::env::var("TERM").unwrap_or_else(|_| "xterm".into())
            ));
        }
        let size = tty
            .then(|| {
                crate::exectty::window_size(io::stdout().as_fd())
                    .or_else(|| crate::exectty::window_size(io::stdin().as_fd()))
            })
            .flatten();
        let req = gpuvisor_wire::ExecSessionRequest {
            command,
            env,
            tty,
            stdin,
            size,
            timeout_ms: timeout.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        let ws = self.client.exec_session(&id, &req)?;
        match self.run_session(ws, stdin, tty, tty && stdin, None)? {
            crate::exectty::Outcome::Signalled(code) => Ok(code),
            crate::exectty::Outcome::Detached => Ok(exit::OK),
            crate::exectty::Outcome::Exit(end) => {
                if let Some(msg) = &end.message {
                    eprintln!("gpuvisor: {msg}");
                }
                Ok(match end.limit {
                    Some(gpuvisor_wire::ExecLimit::Deadline) => 124,
                    _ => exec_exit_code(end.exit_code),
                })
            }
        }
    }

    /// Drives a connected session: signal handlers (resizes sent when `tty`), raw mode when
    /// `raw` (this terminal's keys all go to the other side), `escape` detaches.
    fn run_session(
        &self,
        ws: crate::client::SessionSocket,
        stdin: bool,
        tty: bool,
        raw: bool,
        escape: Option<u8>,
    ) -> Result<crate::exectty::Outcome, CliError> {
        use std::os::fd::AsFd;
        // Handlers first, raw mode second; left in the reverse order, so no signal ever finds
        // the terminal raw with its default action.
        let signals = crate::exectty::Signals::install(tty, raw).map_err(|e| {
            CliError::Invalid(format!("cannot handle signals for the session: {e}"))
        })?;
        let raw = if raw {
            Some(crate::exectty::RawMode::enter(io::stdin().as_fd())?)
        } else {
            None
        };
        let outcome = crate::exectty::run(ws, stdin, &signals, raw.as_ref(), escape);
        // The terminal is ours again before anything is printed.
        drop(raw);
        drop(signals);
        Ok(outcome?)
    }

    /// `instance console`: the VM's serial console until the escape key (exit 0, the VM keeps
    /// running) or the console closes (the VM stopped: the reason on stderr).
    fn console(&self, id: &str, escape: u8) -> Result<i32, CliError> {
        let id = self.client.get_instance(id)?.id;
        let ws = self.client.console_session(&id)?;
        let tty = io::stdin().is_terminal();
        let key = char::from(escape | 0x40);
        eprintln!("gpuvisor: attached to the console of {id}; ^{key} detaches");
        match self.run_session(ws, true, tty, tty, Some(escape))? {
            crate::exectty::Outcome::Signalled(code) => Ok(code),
            crate::exectty::Outcome::Detached => {
                eprintln!("\r\ngpuvisor: detached from the console of {id}");
                Ok(exit::OK)
            }
            crate::exectty::Outcome::Exit(end) => {
                if let Some(msg) = &end.message {
                    eprintln!("\r\ngpuvisor: {msg}");
                }
                Ok(exit::OK)
            }
        }
    }

    fn logs(&self, id: &str, follow: bool) -> Result<(), CliError> {
        let mut offset = 0u64;
        let mut finishing = false;
        // Without --follow the whole log is gathered into one answer for JSON/YAML.
        let mut all = Logs {
            offset: 0,
            next: 0,
            data: String::new(),
        };
        loop {
            let chunk = self.client.logs(id, offset)?;
            if chunk.offset > offset && matches!(self.format, Format::Table) {
                // Older output was rotated away (the daemon keeps limits.log_max_bytes).
                eprintln!(
                    "gpuvisor: {} bytes of log were rotated away before they could be read",
                    chunk.offset - offset
                );
            }
            let advanced = chunk.next > offset && !chunk.data.is_empty();
            offset = chunk.next;
            if !chunk.data.is_empty() {
                if follow {
                    self.write_log_chunk(&chunk)?;
                } else {
                    all.data.push_str(&chunk.data);
                }
            }
            all.next = chunk.next;
            if advanced {
                if chunk.data.len() < LOGS_FULL_CHUNK && follow {
                    std::thread::sleep(LOGS_POLL);
                }
                continue;
            }
            if !follow || finishing {
                break;
            }
            match self.client.get_instance(id) {
                Ok(i) if i.state.is_settled() && i.state != InstanceState::Running => {
                    // One more read picks up what was written before it stopped.
                    finishing = true;
                    continue;
                }
                Ok(_) => {}
                Err(e) if e.is_not_found() => break,
                Err(e) => return Err(e.into()),
            }
            std::thread::sleep(LOGS_POLL);
        }
        if !follow {
            match output::structured(self.format, &all)? {
                Some(text) => output::print_text(&text)?,
                None => output::print_raw(all.data.as_bytes())?,
            }
        }
        Ok(())
    }

    /// `--follow`: raw data in table mode; one JSON object per line or one YAML document per
    /// chunk otherwise, so that a consumer can parse as it reads.
    fn write_log_chunk(&self, chunk: &Logs) -> Result<(), CliError> {
        match self.format {
            Format::Table | Format::Csv => output::print_raw(chunk.data.as_bytes())?,
            Format::Json => {
                let line = serde_json::to_string(chunk).map_err(io::Error::other)?;
                output::print_text(&line)?;
            }
            Format::Yaml => {
                let doc = serde_yaml::to_string(chunk).map_err(io::Error::other)?;
                output::print_text(&format!("---\n{doc}"))?;
            }
        }
        Ok(())
    }
}

/// A remote exit status as a process exit code: signals (negative) as 128+N like a shell.
fn exec_exit_code(code: i32) -> i32 {
    match code {
        0..=255 => code,
        c if (-127..0).contains(&c) => 128 - c,
        _ => exit::OTHER,
    }
}

// ---- --wait ----

#[derive(Debug, PartialEq)]
pub enum WaitStep {
    Done,
    Continue,
    Failed(String),
}

/// Decides, poll after poll, whether a wait for `target` is over.
///
/// Lifecycle calls answer before the reconciler acts, so the first polls may still show the old
/// settled state (`stopped` right after `start`): a settled state other than the target only
/// ends the wait once the instance has been seen to change since the call answered.
pub struct Waiter {
    target: InstanceState,
    initial: (InstanceState, i64),
    moved: bool,
}

impl Waiter {
    pub fn new(answer: &Instance, target: InstanceState) -> Self {
        Waiter {
            target,
            initial: (answer.state, answer.updated_at),
            moved: false,
        }
    }

    pub fn step(&mut self, inst: &Instance) -> WaitStep {
        if inst.state == self.target {
            return WaitStep::Done;
        }
        if (inst.state, inst.updated_at) != self.initial {
            self.moved = true;
        }
        // Terminate asked during a stop: `stopped` is a stage on the way, not the end.
        let headed_there =
            self.target == InstanceState::Terminated && inst.desired == InstanceState::Terminated;
        if self.moved && inst.state.is_settled() && !headed_there {
            let mut msg = format!(
                "instance {} ({}) is {}, not {}",
                inst.name, inst.id, inst.state, self.target
            );
            if let Some(reason) = inst.reason.as_deref().filter(|r| !r.is_empty()) {
                msg.push_str(": ");
                msg.push_str(reason);
            }
            return WaitStep::Failed(msg);
        }
        WaitStep::Continue
    }
}

fn wait_for(
    client: &Client,
    answer: Instance,
    target: InstanceState,
    timeout: Duration,
) -> Result<Instance, CliError> {
    let deadline = Instant::now() + timeout;
    let started = Instant::now();
    let progress = Progress::new();
    let mut waiter = Waiter::new(&answer, target);
    let mut last = answer;
    let result = loop {
        match waiter.step(&last) {
            WaitStep::Done => break Ok(last),
            WaitStep::Failed(msg) => break Err(CliError::WaitFailed(msg)),
            WaitStep::Continue => {}
        }
        progress.show(&last, target, started.elapsed());
        let now = Instant::now();
        if now >= deadline {
            break Err(CliError::WaitTimeout(format!(
                "timed out after {} waiting for instance {} ({}) to be {target}; it is {}",
                humantime::format_duration(timeout),
                last.name,
                last.id,
                last.state
            )));
        }
        match client.watch_instance(&last.id, last.updated_at, WAIT_POLL.min(deadline - now)) {
            Ok(inst) => last = inst,
            // A terminated instance may already be forgotten.
            Err(e) if e.is_not_found() && target == InstanceState::Terminated => {
                last.state = InstanceState::Terminated;
                break Ok(last);
            }
            Err(e) => break Err(e.into()),
        }
    };
    progress.clear();
    result
}

/// A status line on stderr while waiting, only when stderr is a terminal.
struct Progress {
    enabled: bool,
}

impl Progress {
    fn new() -> Self {
        Progress {
            enabled: io::stderr().is_terminal(),
        }
    }

    fn show(&self, inst: &Instance, target: InstanceState, elapsed: Duration) {
        if self.enabled {
            let mut err = io::stderr().lock();
            let _ = write!(
                err,
                "\r\x1b[2Kwaiting for {} to be {target}: {} ({}s)",
                inst.name,
                inst.state,
                elapsed.as_secs()
            );
            let _ = err.flush();
        }
    }

    fn clear(&self) {
        if self.enabled {
            let mut err = io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_io_flags_read_both_or_each_side() {
        let both = parse_rw_count("200").unwrap();
        assert_eq!((both.read, both.write), (Some(200), Some(200)));
        let one = parse_rw_size("write=8MiB").unwrap();
        assert_eq!((one.read, one.write), (None, Some(8 << 20)));
        let two = parse_rw_size("read=1MiB,write=0").unwrap();
        assert_eq!((two.read, two.write), (Some(1 << 20), Some(0)));
        for bad in ["read=1,read=2", "sideways=1", "read=x", "", "1,2"] {
            assert!(parse_rw_count(bad).is_err(), "{bad:?} was taken");
        }
        let args = DiskIoArgs {
            disk_iops: Some(parse_rw_count("read=10").unwrap()),
            disk_bandwidth: Some(parse_rw_size("5MiB").unwrap()),
        };
        assert_eq!(
            args.wire(),
            gpuvisor_wire::DiskIo {
                read_iops: Some(10),
                write_iops: None,
                read_bps: Some(5 << 20),
                write_bps: Some(5 << 20),
            }
        );
    }
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("gpuvisor").chain(args.iter().copied()))
    }

    fn create_args(args: &[&str]) -> CreateArgs {
        match parse(args).unwrap().command {
            Command::Instance(InstanceCmd::Create(a)) => *a,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn clap_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn create_full() {
        let a = create_args(&[
            "instance",
            "create",
            "--image",
            "pytorch",
            "--gpu-fraction",
            "0.25",
            "--vram",
            "20GiB",
            "--vcpus",
            "4",
            "--memory",
            "16G",
            "--volume",
            "data:/workspace:50GiB",
            "--volume",
            "cache:/cache",
            "--env",
            "A=1",
            "-e",
            "B=",
            "--port",
            "8888/http",
            "--wait",
            "--timeout",
            "5m",
            "--",
            "python",
            "-c",
            "print(1)",
        ]);
        assert_eq!(a.shape.gpu_fraction, Some(0.25));
        assert_eq!(a.vram, Some(20 << 30));
        assert_eq!(a.shape.memory, Some(16 << 30));
        assert_eq!(a.shape.container_disk, None, "unset: the daemon's default");
        assert_eq!(
            a.shape.volumes,
            vec![
                VolumeMount {
                    name: "data".into(),
                    path: "/workspace".into(),
                    size: Some(50 << 30)
                },
                VolumeMount {
                    name: "cache".into(),
                    path: "/cache".into(),
                    size: None
                },
            ]
        );
        assert_eq!(a.shape.env, ["A=1", "B="]);
        assert_eq!(
            a.shape.ports,
            vec![PortSpec {
                port: 8888,
                protocol: "http".into(),
                public: false,
                host_port: None,
            }]
        );
        assert!(a.wait.wait);
        assert_eq!(a.wait.timeout, Duration::from_secs(300));
        assert_eq!(a.command, ["python", "-c", "print(1)"]);
    }

    #[test]
    fn create_defaults() {
        // Unset: the daemon applies the template's, else its defaults (1, 1GiB, 10GiB).
        let a = create_args(&["instance", "create", "--image", "x"]);
        assert_eq!(a.shape.vcpus, None);
        assert_eq!(a.shape.memory, None);
        assert_eq!(a.shape.container_disk, None);
        assert_eq!(a.shape.runtime, None);
        assert_eq!(a.shape.gpus, None);
        assert!(!a.wait.wait);
        assert_eq!(a.wait.timeout, Duration::from_secs(120));
        assert!(a.command.is_empty());
    }

    #[test]
    fn gpus_and_fraction_conflict() {
        let err = parse(&[
            "instance",
            "create",
            "--image",
            "x",
            "--gpus",
            "1",
            "--gpu-fraction",
            "0.5",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert_eq!(err.exit_code(), exit::USAGE);
    }

    #[test]
    fn bad_syntax_is_a_usage_error() {
        for bad in [
            ["--memory", "lots"],
            ["--vram", "4XB"],
            ["--gpu-fraction", "half"],
            ["--gpus", "-1"],
            ["--volume", "data"],
            ["--volume", ":/x"],
            ["--volume", "d:"],
            ["--volume", "d:/x:big"],
            ["--port", "http"],
            ["--port", "70000/tcp"],
            ["--port", "80/"],
            ["--timeout", "soon"],
        ] {
            let mut args = vec!["instance", "create", "--image", "x"];
            args.extend(bad);
            let err = parse(&args).unwrap_err();
            assert_eq!(err.exit_code(), exit::USAGE, "{bad:?}");
        }
    }

    #[test]
    fn well_formed_values_go_to_the_daemon() {
        // The daemon owns these rules and answers invalid_argument (exit 5).
        let a = create_args(&[
            "instance",
            "create",
            "--image",
            "x",
            "--gpu-fraction",
            "1.5",
            "--env",
            "NOVALUE",
            "--volume",
            "v:relative/path:64MiB",
            "--port",
            "80/gopher",
        ]);
        assert_eq!(a.shape.gpu_fraction, Some(1.5));
        assert_eq!(a.shape.env, ["NOVALUE"]);
        assert_eq!(a.shape.volumes[0].path, "relative/path");
        assert_eq!(a.shape.ports[0].protocol, "gopher");
        // 0 vCPUs or bytes would read as "unset" to the daemon: refused here.
        for (flag, v) in [
            ("--vcpus", "0"),
            ("--memory", "0"),
            ("--container-disk", "0B"),
        ] {
            let e =
                Cli::try_parse_from(["gpuvisor", "instance", "create", "--image", "x", flag, v]);
            assert!(e.is_err(), "{flag} {v}");
        }
        // Repeated single-valued flags: the last one wins.
        let a = create_args(&[
            "instance", "create", "--image", "a", "--gpus", "0", "--image", "b", "--gpus", "1000",
        ]);
        assert_eq!(a.image.as_deref(), Some("b"));
        assert_eq!(a.shape.gpus, Some(1000));
    }

    #[test]
    fn argument_syntax() {
        assert_eq!(
            parse_port("22"),
            Ok(PortSpec {
                port: 22,
                protocol: "tcp".into(),
                public: false,
                host_port: None,
            })
        );
        assert_eq!(
            parse_port("8888/http:public").map(|p| (p.protocol, p.public)),
            Ok(("http".to_string(), true))
        );
        assert_eq!(parse_port("8888/http:private").map(|p| p.public), Ok(false));
        assert!(parse_port("8888/http:open").is_err());
        assert_eq!(
            parse_port("8888/HTTP").map(|p| p.protocol),
            Ok("http".into())
        );
        assert!(parse_port("443/https").is_ok());
        assert!(parse_port("x/tcp").is_err());
        let v = parse_volume("d:/mnt/x:1.5GiB").unwrap();
        assert_eq!(v.size, Some(3 << 29));
        assert_eq!(parse_volume("d:/mnt").unwrap().size, None);
        assert!(parse_volume("d:/x:").is_err());
        assert!(parse_fraction("0.5").is_ok());
        assert!(parse_fraction("abc").is_err());
        assert!(parse_fraction("NaN").is_err());
    }

    #[test]
    fn globals_before_or_after() {
        let cli = parse(&["-o", "json", "instance", "list"]).unwrap();
        assert_eq!(cli.global.output, Format::Json);
        let cli = parse(&[
            "instance",
            "list",
            "--output",
            "yaml",
            "--endpoint",
            "http://h:1",
            "--api-key",
            "k",
        ])
        .unwrap();
        assert_eq!(cli.global.output, Format::Yaml);
        assert_eq!(cli.global.endpoint, "http://h:1");
        assert_eq!(cli.global.api_key.as_deref(), Some("k"));
        assert!(parse(&["-o", "xml", "gpu", "list"]).is_err());
    }

    #[test]
    fn exec_takes_the_rest() {
        let cli = parse(&["instance", "exec", "web", "--", "ls", "-la", "/"]).unwrap();
        match cli.command {
            Command::Instance(InstanceCmd::Exec { id, command, .. }) => {
                assert_eq!(id, "web");
                assert_eq!(command, ["ls", "-la", "/"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        // Flags after the command belong to the command.
        let cli = parse(&["instance", "exec", "web", "sh", "-c", "echo -o json"]).unwrap();
        match cli.command {
            Command::Instance(InstanceCmd::Exec { command, .. }) => {
                assert_eq!(command, ["sh", "-c", "echo -o json"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(parse(&["instance", "exec", "web"]).is_err());
    }

    #[test]
    fn other_commands_parse() {
        assert!(parse(&["key", "create", "--tenant", "acme", "--role", "admin"]).is_ok());
        assert!(parse(&["key", "create", "--tenant", "acme", "--role", "root"]).is_err());
        assert!(parse(&["volume", "create", "v", "--size", "10GiB"]).is_ok());
        assert!(parse(&["volume", "create", "v", "--size", "ten"]).is_err());
        assert!(parse(&["image", "import", "./img.tar", "--name", "img"]).is_ok());
        assert!(parse(&["instance", "logs", "web", "-f"]).is_ok());
        assert!(parse(&["instance", "terminate", "web", "--wait"]).is_ok());
        assert!(parse(&["instance", "stop", "web", "--wait", "--timeout", "10s"]).is_ok());
        assert!(parse(&["serve"]).is_ok());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code_for_api("not_found"), 3);
        assert_eq!(exit_code_for_api("unauthorized"), 4);
        assert_eq!(exit_code_for_api("forbidden"), 4);
        for c in [
            "invalid_argument",
            "already_exists",
            "in_use",
            "invalid_state",
        ] {
            assert_eq!(exit_code_for_api(c), 5, "{c}");
        }
        assert_eq!(exit_code_for_api("insufficient_resources"), 6);
        assert_eq!(exit_code_for_api("internal"), 1);
        assert_eq!(exit_code_for_api("something_new"), 1);
        let unreachable = CliError::Client(ClientError::Unreachable {
            endpoint: "http://x".into(),
            reason: "refused".into(),
        });
        assert_eq!(unreachable.exit_code(), 9);
        assert_eq!(CliError::WaitFailed("x".into()).exit_code(), 7);
        assert_eq!(CliError::WaitTimeout("x".into()).exit_code(), 8);
        let api = CliError::Client(ClientError::Api {
            status: 409,
            code: "in_use".into(),
            message: "volume data is in use".into(),
        });
        assert_eq!(api.exit_code(), 5);
        assert_eq!(
            format!("error: {api} ({})", api.code()),
            "error: volume data is in use (in_use)"
        );
        assert_eq!(exec_exit_code(0), 0);
        assert_eq!(exec_exit_code(42), 42);
        assert_eq!(exec_exit_code(-9), 137);
        assert_eq!(exec_exit_code(1000), 1);
    }

    fn inst(state: InstanceState, updated_at: i64) -> Instance {
        Instance {
            id: "i-1".into(),
            node: "host".into(),
            name: "web".into(),
            tenant: "t".into(),
            image: "img".into(),
            state,
            reason: None,
            desired: InstanceState::Running,
            vcpus: 1,
            cpus: vec![],
            memory: 1 << 30,
            container_disk: 10 << 30,
            gpus: vec![],
            volumes: vec![],
            env: vec![],
            ports: vec![],
            command: vec![],
            ip: None,
            urls: Vec::new(),
            idle_timeout_secs: None,
            disk_io: Default::default(),
            last_activity_at: None,
            gpu_usage: vec![],
            guest_memory: None,
            gpu_fraction: None,
            priority: Default::default(),
            interruptible: false,
            bid_per_gpu_hour: None,
            cost: None,
            restart: Default::default(),
            runtime: Default::default(),
            restart_count: 0,
            exit_code: None,
            accel: None,
            created_at: 0,
            updated_at,
        }
    }

    #[test]
    fn wait_reaches_target() {
        use InstanceState::*;
        let mut w = Waiter::new(&inst(Pending, 1), Running);
        assert_eq!(w.step(&inst(Pending, 1)), WaitStep::Continue);
        assert_eq!(w.step(&inst(Provisioning, 2)), WaitStep::Continue);
        assert_eq!(w.step(&inst(Running, 3)), WaitStep::Done);
    }

    #[test]
    fn wait_ignores_the_old_state_until_something_moves() {
        use InstanceState::*;
        let mut w = Waiter::new(&inst(Stopped, 5), Running);
        assert_eq!(w.step(&inst(Stopped, 5)), WaitStep::Continue);
        assert_eq!(w.step(&inst(Provisioning, 6)), WaitStep::Continue);
        let mut back = inst(Stopped, 7);
        back.reason = Some("exited with status 1".into());
        match w.step(&back) {
            WaitStep::Failed(msg) => {
                assert!(msg.contains("is stopped, not running"), "{msg}");
                assert!(msg.contains("exited with status 1"), "{msg}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn wait_fails_on_failed() {
        use InstanceState::*;
        let mut w = Waiter::new(&inst(Pending, 1), Running);
        let mut failed = inst(Failed, 2);
        failed.reason = Some("no such image".into());
        assert!(matches!(w.step(&failed), WaitStep::Failed(m) if m.contains("no such image")));
        // Terminating a failed instance waits through it.
        let mut w = Waiter::new(&inst(Failed, 1), Terminated);
        assert_eq!(w.step(&inst(Failed, 1)), WaitStep::Continue);
        assert_eq!(w.step(&inst(Terminating, 2)), WaitStep::Continue);
        assert_eq!(w.step(&inst(Terminated, 3)), WaitStep::Done);
    }

    #[test]
    fn wait_for_terminated_passes_through_stopped() {
        use InstanceState::*;
        let mut w = Waiter::new(&inst(Stopping, 1), Terminated);
        let mut stopped = inst(Stopped, 2);
        stopped.desired = Terminated;
        assert_eq!(w.step(&stopped), WaitStep::Continue);
        assert_eq!(w.step(&inst(Terminated, 3)), WaitStep::Done);
        // Stopped with nothing more to come is the end.
        let mut w = Waiter::new(&inst(Stopping, 1), Terminated);
        let mut stopped = inst(Stopped, 2);
        stopped.desired = Stopped;
        assert!(matches!(w.step(&stopped), WaitStep::Failed(_)));
    }
}
