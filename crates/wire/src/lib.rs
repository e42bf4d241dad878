//! Wire types of the gpuvisor API: what the REST server sends and receives and what the CLI
//! client decodes. Kept in their own crate so that server and client cannot drift apart; nothing
//! here does I/O. Sizes travel as plain byte counts; the human forms (`4GiB`) are parsed here
//! once, by [`parse_size`], for every front end.

mod cpulist;
pub mod metrics;
pub mod mig;
pub mod migration;
mod restart;
pub mod serverless;
mod size;
pub mod snapshot;
pub mod template;
pub mod usage;

pub use cpulist::{format_cpu_list, parse_cpu_list};
pub use metrics::{
    GpuEvent, GpuEventsQuery, GpuStats, MetricPoint, MetricSeries, MetricsHistory, MetricsQuery,
    MetricsUpdate,
};
pub use migration::{
    DropMigration, MigrateInstance, MigrationAccepted, MigrationChannel, MigrationOffer,
    MigrationPhase, MigrationReport, MigrationStatus, MIGRATION_UPGRADE,
};
pub use restart::{RestartPolicy, VolumeState};
pub use serverless::{
    CreateEndpoint, Endpoint, EndpointHealth, EndpointSpec, JobPolicy, JobState, JobStatus, Purged,
    RunRequest, Scaler, ScalerKind, StreamChunk, StreamStatus, UpdateEndpoint,
};
pub use size::{format_size, parse_size, SizeError};
pub use snapshot::{CreateSnapshot, RestoreInstance, Snapshot, SnapshotState};
pub use template::{CreateTemplate, Template, TemplateSpec};
pub use usage::{GpuType, InstanceCost, UsageLine, UsageQuery, UsageReport};

use serde::{Deserialize, Serialize};

/// The API version prefix of every route.
pub const API_PREFIX: &str = "/v1";

/// The header that carries an API key (`Authorization: Bearer <key>` is accepted too).
pub const API_KEY_HEADER: &str = "x-api-key";

/// The web console's session cookie (HttpOnly, Secure, SameSite=Strict): a session token
/// that `POST /v1/sessions` gave for an API key.
/// The `__Host-` prefix binds it to this host, path `/` and TLS: a page of a sibling host
/// (e.g. an instance behind the HTTPS proxy) cannot plant one of its own.
pub const SESSION_COOKIE: &str = "__Host-gv_session";

/// The header a request authenticated by [`SESSION_COOKIE`] must carry unless it is a `GET`
/// (value `1`): a page of another site cannot send it without a CORS preflight, which the
/// daemon never grants.
pub const CSRF_HEADER: &str = "x-gpuvisor-csrf";

/// The prefix of a web console session token.
pub const SESSION_TOKEN_PREFIX: &str = "gvs_";

/// Environment variables the platform owns inside an instance: which GPUs it sees, how the
/// limiter and the NVIDIA stack are set up. A user (`--env`, `exec --env`) may not set them, an
/// image's `Env` entries for them are dropped, and the node sets them last. `LD_PRELOAD` and
/// `LD_LIBRARY_PATH` stay the user's: the limiter is loaded through `/etc/ld.so.preload`, which
/// neither can remove.
pub fn platform_env(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "CUDA_VISIBLE_DEVICES",
        "NVIDIA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES",
        "NVIDIA_MIG_CONFIG_DEVICES",
        "NVIDIA_MIG_MONITOR_DEVICES",
        "CUDA_DEVICE_ORDER",
    ];
    // GPUVISOR_* is ours; CUDA_MPS_* would point the CUDA runtime at another tenant's MPS
    // server; NVIDIA_REQUIRE_* are the container toolkit's checks.
    const PREFIX: &[&str] = &["GPUVISOR_", "CUDA_MPS_", "NVIDIA_REQUIRE_"];
    EXACT.contains(&name) || PREFIX.iter().any(|p| name.starts_with(p))
}

/// Stable, machine-readable error codes. Scripts match on these; never rename one.
pub mod code {
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const FORBIDDEN: &str = "forbidden";
    pub const NOT_FOUND: &str = "not_found";
    pub const INVALID_ARGUMENT: &str = "invalid_argument";
    pub const ALREADY_EXISTS: &str = "already_exists";
    pub const INSUFFICIENT_RESOURCES: &str = "insufficient_resources";
    /// A tenant quota set by an admin would be exceeded; the message names the quota.
    pub const QUOTA_EXCEEDED: &str = "quota_exceeded";
    pub const IN_USE: &str = "in_use";
    pub const INVALID_STATE: &str = "invalid_state";
    /// The host lacks a capability the request needs (e.g. the GPU limiter for fractions).
    /// HTTP 422.
    pub const UNAVAILABLE: &str = "unavailable";
    pub const INTERNAL: &str = "internal";
    /// A limit on concurrent work was reached (execs per tenant, requests per key): retry
    /// later. HTTP 429.
    pub const RESOURCE_EXHAUSTED: &str = "resource_exhausted";
    /// The request body is larger than the daemon accepts. HTTP 413.
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// The request did not arrive in time (a body sent too slowly). HTTP 408.
    pub const DEADLINE_EXCEEDED: &str = "deadline_exceeded";
}

/// The body of every non-2xx answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ErrorBody {
    pub error: ApiError,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ApiError {
    /// One of [`code`].
    pub code: String,
    pub message: String,
}

/// Lifecycle states of an instance, persisted in the store.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Pending,
    Provisioning,
    Running,
    Stopping,
    Stopped,
    Terminating,
    Terminated,
    Failed,
    /// Evicted to make room for a higher-priority instance (interruptible instances only).
    Interrupted,
}

impl InstanceState {
    pub const ALL: [InstanceState; 9] = [
        Self::Pending,
        Self::Provisioning,
        Self::Running,
        Self::Stopping,
        Self::Stopped,
        Self::Terminating,
        Self::Terminated,
        Self::Failed,
        Self::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Provisioning => "provisioning",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Terminating => "terminating",
            Self::Terminated => "terminated",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// States in which the instance holds host resources (GPUs, CPUs, memory) in placement.
    pub fn holds_resources(self) -> bool {
        !matches!(self, Self::Terminated)
    }

    /// States a `--wait` can end in.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            Self::Running | Self::Stopped | Self::Terminated | Self::Failed
        )
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Priority class of an instance: who may preempt whom, and the GPU limiter's priority.
#[derive(
    Debug,
    Clone,
    Copy,
    Serialize,
    Deserialize,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PriorityClass {
    Low,
    #[default]
    Normal,
    High,
}

impl PriorityClass {
    /// Higher is more important; preemption only evicts strictly lower ranks.
    pub fn rank(self) -> u32 {
        match self {
            Self::Low => 0,
            Self::Normal => 1,
            Self::High => 2,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Normal => "normal",
            Self::High => "high",
        }
    }
}

/// What runs an instance: an OCI container (runc) or a QEMU micro-VM. One API, placement,
/// lifecycle and telemetry for both; the node layer's `Runtime` trait is the seam.
#[derive(
    Debug,
    Clone,
    Copy,
    Serialize,
    Deserialize,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
    Hash,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    #[default]
    Container,
    Vm,
}

impl RuntimeKind {
    pub const ALL: [RuntimeKind; 2] = [RuntimeKind::Container, RuntimeKind::Vm];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Container => "container",
            Self::Vm => "vm",
        }
    }

    /// Parses `container` or `vm`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "container" => Ok(Self::Container),
            "vm" => Ok(Self::Vm),
            _ => Err(format!("runtime {s:?} is not one of: container, vm")),
        }
    }
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A volume to mount into an instance: `NAME:/path[:SIZE]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct VolumeMount {
    pub name: String,
    pub path: String,
    /// Create the volume with this size if it does not exist yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// A port the instance exposes: `8888/http` (private: reached through the HTTPS proxy with
/// an API key of its tenant or a signed link), `8888/http:public` (anyone with the URL),
/// `22/tcp` (a host port from the proxy's pool is mapped to it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct PortSpec {
    pub port: u16,
    pub protocol: String,
    /// HTTP(S) ports: served by the proxy to anyone, without a key or link.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public: bool,
    /// TCP ports: the host port mapped to it (set by the daemon; ignored in a request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
}

impl PortSpec {
    /// The syntax in words, for errors.
    pub const SYNTAX: &'static str = "expected PORT[/PROTOCOL][:public], e.g. 8888/http:public";

    /// `PORT[/PROTOCOL][:public|:private]`; a port alone is `tcp`. The engine checks the
    /// protocol and the access against each other.
    pub fn parse(s: &str) -> Result<Self, String> {
        let syntax = Self::SYNTAX;
        let (spec, access) = match s.rsplit_once(':') {
            Some((spec, a)) => (spec, Some(a.trim().to_ascii_lowercase())),
            None => (s, None),
        };
        let public = match access.as_deref() {
            None | Some("private") => false,
            Some("public") => true,
            Some(other) => {
                return Err(format!(
                    "{s:?}: access {other:?} is not public or private; {syntax}"
                ))
            }
        };
        let (port, protocol) = match spec.split_once('/') {
            Some((p, proto)) => (p, proto.trim().to_ascii_lowercase()),
            None => (spec, "tcp".to_string()),
        };
        let port: u16 = port
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: the port must be a number from 1 to 65535; {syntax}"))?;
        if protocol.is_empty() {
            return Err(format!("{s:?}: the protocol is empty; {syntax}"));
        }
        Ok(Self {
            port,
            protocol,
            public,
            host_port: None,
        })
    }

    /// Served by the HTTPS proxy (`http` or `https` inside the instance).
    pub fn is_http(&self) -> bool {
        matches!(self.protocol.as_str(), "http" | "https")
    }
}

impl std::fmt::Display for PortSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)?;
        if self.public {
            f.write_str(":public")?;
        }
        Ok(())
    }
}

/// `POST /v1/instances/{id}/links`: a link that opens a private HTTP port in a browser.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct CreateLink {
    pub port: u16,
    /// Seconds the link works (at most 7 days) [default: 3600].
    #[serde(default = "default_link_ttl")]
    pub ttl_secs: u64,
}

fn default_link_ttl() -> u64 {
    3600
}

/// A signed link to an instance's private HTTP port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Link {
    pub url: String,
    /// Unix milliseconds.
    pub expires_at: i64,
}

/// `POST /v1/instances`. With a `template`, what the request leaves unset (an empty image,
/// zero sizes, no GPUs, no runtime, empty lists) comes from the template; without one, the
/// defaults: 1 vCPU, 1 GiB of memory, a 10 GiB container disk, a container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default, schemars::JsonSchema)]
pub struct CreateInstance {
    /// Start from this template (the caller's own, else a public one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default)]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whole GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// A fraction of one GPU, in (0, 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_fraction: Option<f64>,
    /// VRAM for a fractional GPU, in bytes (default: the fraction of the GPU's VRAM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram: Option<u64>,
    /// Only GPUs of this model (as `gpu list` shows it, e.g. `A100-80GB`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_model: Option<String>,
    /// 0: the template's, else 1.
    #[serde(default)]
    pub vcpus: u32,
    /// Bytes; 0: the template's, else 1 GiB.
    #[serde(default)]
    pub memory: u64,
    /// Bytes; 0: the template's, else 10 GiB.
    #[serde(default)]
    pub container_disk: u64,
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// `KEY=VALUE` pairs.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// Overrides the image's command.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub priority: PriorityClass,
    /// Spot: may be preempted (stopped and marked `interrupted`) for a higher-priority
    /// instance, an on-demand one or a higher bid.
    #[serde(default)]
    pub interruptible: bool,
    /// Interruptible only: the most it pays per GPU-hour (default: the current interruptible
    /// price). Refused below that price; outbid by a higher bid when GPUs run out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bid_per_gpu_hour: Option<f64>,
    /// What happens when the main process exits (default `always`).
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Container (default) or micro-VM; unset: the template's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeKind>,
    /// VMs: SSH public keys (`authorized_keys` lines) for the guest's user, set by cloud-init.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// A script run at start (its text): by cloud-init once at a VM's first boot; by
    /// `/bin/sh` before the command at each start of a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_script: Option<String>,
    /// VMs: Debian packages cloud-init installs at first boot (`name`, `name=version`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// Stop it (volumes kept) after this many seconds without traffic through the proxy, no
    /// open connection to its ports and its GPUs below 5% busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    /// Disk I/O limits, each of its disks on its own (unset: none).
    #[serde(default, skip_serializing_if = "DiskIo::is_unlimited")]
    pub disk_io: DiskIo,
    /// Start from this snapshot (the tenant's own, by id or name): the instance's container
    /// (or VM root) disk is a copy of the snapshot's at every start, as an image's would be.
    /// The image, runtime and disk size are the snapshot's (left out, they are taken from
    /// it). Disks only: a VM clone boots afresh, it does not resume a saved running state;
    /// its volumes are the request's (the snapshot's copies of volumes restore only its own
    /// instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
}

/// Disk I/O limits of an instance, per disk: a container's disk and each of its volumes (the
/// cgroup's throttle on each block device), a VM's root disk and each volume drive (QEMU's
/// throttling). Unset: no limit. In a request, 0 takes a limit away.
#[derive(
    Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct DiskIo {
    /// Read operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_iops: Option<u64>,
    /// Write operations per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_iops: Option<u64>,
    /// Bytes read per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bps: Option<u64>,
    /// Bytes written per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_bps: Option<u64>,
}

/// `read 200 IOPS, 50MiB/s; write 8MiB/s`, or `none`.
impl std::fmt::Display for DiskIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut sides = Vec::new();
        for (name, iops, bps) in [
            ("read", self.read_iops, self.read_bps),
            ("write", self.write_iops, self.write_bps),
        ] {
            let parts: Vec<String> = iops
                .map(|n| format!("{n} IOPS"))
                .into_iter()
                .chain(bps.map(|b| format!("{}/s", format_size(b))))
                .collect();
            if !parts.is_empty() {
                sides.push(format!("{name} {}", parts.join(", ")));
            }
        }
        if sides.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&sides.join("; "))
        }
    }
}

impl DiskIo {
    pub fn is_unlimited(&self) -> bool {
        *self == DiskIo::default()
    }

    /// These limits with `change`'s set fields applied: a value replaces, 0 takes away.
    pub fn with(self, change: &DiskIo) -> DiskIo {
        let pick = |old: Option<u64>, new: Option<u64>| match new {
            Some(0) => None,
            Some(v) => Some(v),
            None => old,
        };
        DiskIo {
            read_iops: pick(self.read_iops, change.read_iops),
            write_iops: pick(self.write_iops, change.write_iops),
            read_bps: pick(self.read_bps, change.read_bps),
            write_bps: pick(self.write_bps, change.write_bps),
        }
    }
}

impl CreateInstance {
    /// What runs it (a container unless it says otherwise).
    pub fn runtime(&self) -> RuntimeKind {
        self.runtime.unwrap_or_default()
    }
}

/// `POST /v1/instances/{id}/scale` (GraphQL `clusterScaleResources`): a new size for an
/// instance. Absent fields keep their value. A running container changes vCPUs and memory in
/// place; what its runtime cannot change live (a GPU count, a VM's size) is refused unless
/// `restart` is true, when the instance is stopped, resized and started again.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ScaleInstance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Whole GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// Disk I/O limits to change (live, for containers and VMs); 0 takes one away.
    #[serde(default, skip_serializing_if = "DiskIo::is_unlimited")]
    pub disk_io: DiskIo,
    /// Consent to a stop and start when the change cannot be made live.
    #[serde(default)]
    pub restart: bool,
}

/// One GPU (or share of one) bound to an instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct GpuBinding {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    /// Compute share in thousandths of a GPU (1000 = whole).
    pub milli: u32,
    /// VRAM reserved, bytes.
    pub vram: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Instance {
    pub id: String,
    /// The node it is placed on: this host's id, or a simulated node's.
    #[serde(default)]
    pub node: String,
    pub name: String,
    pub tenant: String,
    pub image: String,
    /// Container or micro-VM.
    #[serde(default)]
    pub runtime: RuntimeKind,
    pub state: InstanceState,
    /// Why the instance is in its state (failure reason, exit status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the user last asked for: running, stopped or terminated.
    pub desired: InstanceState,
    pub vcpus: u32,
    /// Host CPUs the instance is pinned to.
    pub cpus: Vec<u32>,
    pub memory: u64,
    pub container_disk: u64,
    pub gpus: Vec<GpuBinding>,
    pub volumes: Vec<VolumeMount>,
    pub env: Vec<String>,
    pub ports: Vec<PortSpec>,
    pub command: Vec<String>,
    #[serde(default)]
    pub priority: PriorityClass,
    #[serde(default)]
    pub interruptible: bool,
    /// Interruptible: what it pays per GPU-hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bid_per_gpu_hour: Option<f64>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Automatic restarts since the last `create`/`start` (what `on-failure:N` counts).
    #[serde(default)]
    pub restart_count: u32,
    /// Exit code of the main process's last run (128 + N for signal N), when it was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// VMs: how the host runs the guest (`kvm`, or `tcg (why KVM is not used)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Its idle timeout, seconds (see [`CreateInstance::idle_timeout_secs`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    /// Its disk I/O limits.
    #[serde(default, skip_serializing_if = "DiskIo::is_unlimited")]
    pub disk_io: DiskIo,
    /// Running: when it was last in use (traffic or a connection through the proxy, busy
    /// GPUs) or started, unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_at: Option<i64>,
    /// Where its ports are reached: `https://ID-PORT.DOMAIN:8443/` through the proxy for
    /// HTTP ports, `tcp://HOST:PORT` for mapped TCP ports (none while the proxy is off).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Live usage of fractional GPUs from the limiter (only in `get`, not in lists).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_usage: Vec<GpuUsage>,
    /// A running VM's memory as its balloon sees it (only in `get`, not in lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_memory: Option<GuestMemory>,
    /// For a fractional GPU: what the fraction guarantees on its host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_fraction: Option<FractionGuarantee>,
    /// What it costs now per hour and since creation (only in `get`, not in lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<InstanceCost>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
}

/// What a fractional GPU guarantees on the host it runs on. A fraction is enforced in user
/// space by `libgpuvisor_limiter.so` (and, where the driver can be asked per process, checked
/// from outside); real isolation needs a MIG slice or a whole GPU.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct FractionGuarantee {
    /// The VRAM quota is enforced for programs that use the CUDA driver API through the
    /// dynamic loader.
    pub vram_quota_enforced: bool,
    /// The compute share is enforced (only where per-process utilisation can be measured).
    pub compute_share_enforced: bool,
    /// A process that bypasses the limiter and goes over the VRAM quota is detected (and by
    /// default killed).
    pub bypass_detection: bool,
    /// The same, in words.
    pub summary: String,
}

/// A running VM's memory, bytes: what the balloon leaves the guest (`actual`), and what the
/// guest's balloon driver last reported (its word: informational, never used for placement
/// or billing; absent until it has reported).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct GuestMemory {
    pub actual: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// `total` less what the guest counts as available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<u64>,
    /// When the guest last reported (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_at: Option<i64>,
}

/// What the GPU limiter reports for one fractional GPU of an instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct GpuUsage {
    pub uuid: String,
    /// VRAM the instance's processes hold, bytes.
    pub vram_used: u64,
    pub vram_quota: u64,
    /// Compute share, thousandths of the GPU.
    pub share_milli: u32,
    /// Last sampled utilisation of the instance, thousandths of the GPU.
    pub util_milli: u32,
    /// Kernel and graph launches through the limiter.
    pub launches: u64,
}

/// One result of the host preflight (`gpuvisor host check`; `GET /v1/host/checks`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct HostCheck {
    /// Stable id (`kernel`, `iommu`, `iommu_group:0000:3b:00.0`).
    pub id: String,
    pub title: String,
    /// `pass`, `warn`, `fail` or `skip` (does not apply to this host).
    pub status: String,
    /// What was found.
    pub detail: String,
    /// What to do about it (absent when nothing needs doing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remedy: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Gpu {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    pub vram: u64,
    pub pci_address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// `nvml`, `sysfs` or `simulated`.
    pub backend: String,
    /// Compute allocated, thousandths of the GPU.
    pub allocated_milli: u32,
    pub allocated_vram: u64,
    /// Ids of the instances that use it.
    pub instances: Vec<String>,
    /// Kernel driver bound now (`nvidia`, `vfio-pci`); absent when unbound or simulated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Bound to vfio-pci: ready for PCIe passthrough into a micro-VM (containers cannot use it).
    #[serde(default)]
    pub passthrough_ready: bool,
    /// The physical GPU is in MIG mode: it is scheduled through its MIG slices, not whole.
    #[serde(default)]
    pub mig_enabled: bool,
    /// This device is a MIG slice (its `uuid` is `MIG-...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<mig::MigSlice>,
    /// Why the GPU takes no new instances (fatal XID, operator), when cordoned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cordoned: Option<String>,
}

/// `POST /v1/gpus/{gpu}/cordon`: no new placements on the GPU until it is uncordoned.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct CordonGpu {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Image {
    pub name: String,
    /// Content digest of the image (`sha256:...`).
    pub digest: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    /// Unpacked size, bytes.
    pub size: u64,
    /// Default command from the image config, if any.
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub created_at: i64,
    /// The tenant that pulled it and alone sees it; absent: public.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The registry reference it was pulled from; absent for imports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

// ---- registry pulls and credentials ------------------------------------------------------------

/// `POST /v1/images/pulls`: pull `reference` from its registry into an image named `name`
/// (default: the reference as given).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct PullImage {
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When an image of that name is already visible to the caller, answer a finished job
    /// at once instead of pulling again (what `instance create --image REF` uses).
    #[serde(default)]
    pub if_missing: bool,
}

/// One layer of a pull job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct PullLayer {
    /// Blob digest.
    pub digest: String,
    /// Compressed size, bytes.
    pub size: u64,
    /// Bytes on disk so far.
    pub done: u64,
    /// `waiting`, `downloading`, `done`, or `present` (no download needed).
    pub state: String,
}

/// A pull job (`GET /v1/images/pulls/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ImagePull {
    pub id: String,
    pub reference: String,
    pub name: String,
    pub tenant: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Stable code of the failure (`unauthorized`, `not_found`, `unavailable`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Manifest digest, once resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default)]
    pub layers: Vec<PullLayer>,
    /// All blobs are here and the layers are being unpacked.
    #[serde(default)]
    pub unpacking: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Image>,
    /// Bumped on every change: `?since=<version>` long-polls for the next one.
    pub version: u64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// `POST /v1/registries`: a tenant's login to one registry.
#[derive(Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct RegistryLogin {
    pub host: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryLogin")
            .field("host", &self.host)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A stored registry login as shown: never the password.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct RegistryCredential {
    pub host: String,
    pub username: String,
    pub created_at: i64,
}

/// Whether an image name is meant as a registry reference (`host/repo:tag`, `repo:tag`,
/// `repo@sha256:...`): what `instance create --image` pulls when no image has that name.
/// Plain names (`busybox`) are local image names only.
pub fn looks_like_reference(s: &str) -> bool {
    !s.is_empty()
        && s.contains(['/', ':', '@'])
        && !s.starts_with(['/', '.'])
        && s.bytes().all(|b| b.is_ascii_graphic())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ImportImage {
    /// Path on the daemon's host: OCI layout directory, OCI or docker-save tarball, or a rootfs directory.
    pub path: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Volume {
    pub name: String,
    pub tenant: String,
    pub size: u64,
    #[serde(default)]
    pub state: VolumeState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use_by: Option<String>,
    pub created_at: i64,
    /// A VM has had it as a raw disk: it is for VMs only from then on (a guest may have written
    /// any of its blocks; the host does not mount it for a container).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vm_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct CreateVolume {
    pub name: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    #[serde(default)]
    pub policy: TenantPolicy,
    /// Quotas its tenant admin set, within `policy`'s: the stricter of the two applies.
    #[serde(default)]
    pub limits: TenantPolicy,
    /// What the tenant holds now (answered by `tenant get`, not by lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TenantUsage>,
    /// When `tenant rm --cascade` began (unix ms); the tenant is gone once its instances are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleting_since: Option<i64>,
}

/// The answer to `DELETE /v1/tenants/{name}[?cascade=true]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct TenantRemoval {
    pub name: String,
    /// The tenant is gone; false while a cascade waits for its instances to terminate.
    pub deleted: bool,
    /// Instances (names) it owned that were not terminated.
    #[serde(default)]
    pub instances: Vec<String>,
    /// Volumes it owned.
    #[serde(default)]
    pub volumes: Vec<String>,
}

/// What an admin allows a tenant. Quotas are `None` when unlimited; they are checked when an
/// instance or volume is created, against everything the tenant holds (running and stopped
/// instances keep their reservation; volumes count until removed).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TenantPolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_instances: Option<u32>,
    /// Whole GPUs (MIG slices count as whole devices).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_gpus: Option<u32>,
    /// Sum of GPU fractions, in thousandths of a GPU (2500 = 2.5 GPUs of fractions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_gpu_milli: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    /// Bytes of memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<u64>,
    /// Bytes of container disks, volumes and snapshots together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_disk: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_volumes: Option<u32>,
    /// The highest `--priority` the tenant may ask for (default `normal`).
    pub max_priority: PriorityClass,
    /// May the tenant's instances preempt other tenants' interruptible instances? Without it a
    /// tenant evicts only its own: choosing a priority never takes a neighbour's GPU.
    pub preempt_other_tenants: bool,
}

/// What a tenant holds, in the units of [`TenantPolicy`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct TenantUsage {
    pub instances: u32,
    pub gpus: u32,
    pub gpu_milli: u32,
    pub vcpus: u32,
    pub memory: u64,
    pub disk: u64,
    pub volumes: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct CreateTenant {
    pub name: String,
}

/// `POST /v1/sessions`: log in to the web console with an API key.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub api_key: String,
}

/// Never shows the key.
impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest")
            .field("api_key", &"<redacted>")
            .finish()
    }
}

/// A web console session: whom it acts for and until when (the token itself travels only in
/// the HttpOnly cookie).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct WebSession {
    pub tenant: String,
    pub role: Role,
    /// The API key it was exchanged for: revoking that key ends the session.
    pub key_id: String,
    /// Ms since the epoch.
    pub expires_at: i64,
}

/// What a key may do. One role per key.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Sees and manages everything: tenants, keys, images, GPUs, all instances.
    Admin,
    /// A member that also manages its tenant's keys (tenant-admin, member, viewer).
    TenantAdmin,
    /// Creates and operates its tenant's instances, volumes, pulls.
    #[serde(alias = "user")]
    Member,
    /// Reads its tenant's objects, logs and metrics; changes nothing.
    Viewer,
    /// Scrapes `/metrics` (the whole host: made by admins only) and nothing else.
    Metrics,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::TenantAdmin,
        Role::Member,
        Role::Viewer,
        Role::Metrics,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::TenantAdmin => "tenant-admin",
            Role::Member => "member",
            Role::Viewer => "viewer",
            Role::Metrics => "metrics",
        }
    }

    /// The name as stored and shown; `user` is the former name of `member`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Role::Member),
            _ => Self::ALL.into_iter().find(|r| r.as_str() == s),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ApiKey {
    pub id: String,
    pub tenant: String,
    pub role: Role,
    pub created_at: i64,
    pub revoked: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct CreateKey {
    /// Tenant name.
    pub tenant: String,
    #[serde(default = "default_role")]
    pub role: Role,
}

fn default_role() -> Role {
    Role::Member
}

/// One audit log row: a mutating call, who made it, what came of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct AuditEntry {
    pub seq: i64,
    /// Unix ms.
    pub at: i64,
    pub key_id: String,
    pub role: String,
    pub tenant: String,
    /// The operation's stable name, e.g. `instance.create`.
    pub op: String,
    /// What it was done to (the request path).
    pub target: String,
    /// The HTTP status of the answer.
    pub result: String,
    /// The client's address.
    pub source: String,
    pub hash: String,
}

/// `GET /v1/audit` parameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct AuditQuery {
    /// A duration back (`90s`, `2h`, `7d`) or unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Rows after this seq (paging).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

/// `GET /v1/audit/verify`: whether the chain is whole.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct AuditVerification {
    pub ok: bool,
    pub rows: u64,
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
    /// The newest row's hash: kept outside the store, it shows a later truncation.
    pub head_hash: Option<String>,
    /// The first break found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Answer to key creation: the only time the secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct CreatedKey {
    pub key: ApiKey,
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Event {
    pub at: i64,
    pub instance: String,
    /// Short machine-readable kind: `created`, `state`, `exited`, `restart`, `failed`,
    /// `gpu_gone`, ...
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default, schemars::JsonSchema)]
pub struct ExecRequest {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    /// Deadline in milliseconds (default: the daemon's `exec_timeout`; at most its
    /// `exec_max_timeout`). The command is killed when it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// Set when the daemon killed the command (output cap, deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<ExecLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The streamed answer of `POST /v1/instances/{id}/exec` (content type
/// [`exec::CONTENT_TYPE`]): frames of a 1-byte kind ([`exec::STDOUT`], [`exec::STDERR`],
/// [`exec::END`]), a 4-byte big-endian length and that many bytes, sent as the command writes.
/// The last frame is `END` with an [`ExecEnd`] in JSON; a stream without it was cut (daemon
/// gone).
pub mod exec {
    pub const CONTENT_TYPE: &str = "application/vnd.gpuvisor.exec-stream";
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    pub const END: u8 = 3;
    /// Bytes of a frame header.
    pub const HEADER: usize = 5;

    /// One frame, header and payload.
    pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(HEADER + payload.len());
        f.push(kind);
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// (kind, payload length) of a frame header.
    pub fn parse_header(h: [u8; HEADER]) -> (u8, usize) {
        (h[0], u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize)
    }
}

/// Why the daemon ended an exec before the command did.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecLimit {
    /// The output reached `exec_max_output` bytes (a session: `exec_session_max_bytes` of
    /// input and output): the command was killed.
    OutputLimit,
    /// The deadline passed: the command was killed.
    Deadline,
    /// A session saw no input and no output for `exec_session_idle_timeout`: killed.
    Idle,
}

// ---- interactive exec (`instance exec -i/-t`) ----------------------------------------------

/// An interactive exec session, asked with `GET /v1/instances/{id}/exec/ws?request=<this as
/// JSON>` and a WebSocket upgrade (the protocol is [`session`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default, schemars::JsonSchema)]
pub struct ExecSessionRequest {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    /// Run the command on a terminal (stdout and stderr are then one stream).
    #[serde(default)]
    pub tty: bool,
    /// Forward the client's input (without it the command's stdin is closed).
    #[serde(default)]
    pub stdin: bool,
    /// The terminal's first size (with `tty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<session::Size>,
    /// Total deadline in milliseconds (default and maximum: the daemon's
    /// `exec_session_max_time`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The WebSocket protocol of an exec session. Binary messages carry data: one channel byte
/// ([`STDIN`] from the client; [`STDOUT`], [`STDERR`] from the daemon — a terminal has only
/// `STDOUT`) then the bytes. Text messages are JSON [`Control`]s: `resize` and `eof` (stdin
/// closed) from the client, and last from the daemon `exit` with the command's status; then the
/// daemon closes. A client that goes away (close, or the connection drops) ends the session and
/// the command's process tree is killed.
pub mod session {
    use serde::{Deserialize, Serialize};

    /// The path under `/v1/instances/{id}/`.
    pub const PATH: &str = "exec/ws";
    /// A VM's serial console (`instance console`), the same protocol with no request: output
    /// on `STDOUT`, `resize` and `eof` ignored; `exit` (status 0, a message saying why) when
    /// the console closed (the VM stopped) or the session's deadline passed. Detaching is the
    /// client closing.
    pub const CONSOLE_PATH: &str = "console/ws";
    /// The query parameter carrying the [`super::ExecSessionRequest`] JSON.
    pub const QUERY: &str = "request";
    pub const STDIN: u8 = 0;
    pub const STDOUT: u8 = super::exec::STDOUT;
    pub const STDERR: u8 = super::exec::STDERR;

    #[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
    pub struct Size {
        pub rows: u16,
        pub cols: u16,
    }

    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub enum Control {
        /// The client's terminal changed size.
        Resize(Size),
        /// The client's input ended: the command's stdin is closed (ignored on a terminal).
        Eof,
        /// The command ended (last message from the daemon).
        Exit(super::ExecEnd),
    }

    /// A data message: the channel byte, then `data`.
    pub fn data(channel: u8, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(1 + data.len());
        v.push(channel);
        v.extend_from_slice(data);
        v
    }
}

/// The last frame of an exec stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ExecEnd {
    /// The command's exit status (128+N when killed by signal N).
    pub exit_code: i32,
    /// Set when the daemon killed the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<ExecLimit>,
    /// What happened, for people (set with `limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Logs {
    /// Bytes of the log returned start at this offset; pass `next` back as `offset` to follow.
    /// Offsets count every byte the instance ever wrote: when older output was rotated away,
    /// `offset` is later than the one asked for.
    pub offset: u64,
    pub next: u64,
    pub data: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub node: String,
}

#[cfg(test)]
mod session_tests {
    use super::session::{Control, Size};
    use super::*;

    /// The session's control messages as a browser client would write and read them.
    #[test]
    fn control_messages_are_tagged_json() {
        let r: Control = serde_json::from_str(r#"{"type":"resize","rows":40,"cols":132}"#)
            .unwrap_or(Control::Eof);
        assert_eq!(
            r,
            Control::Resize(Size {
                rows: 40,
                cols: 132
            })
        );
        let e = Control::Exit(ExecEnd {
            exit_code: 7,
            limit: Some(ExecLimit::Idle),
            message: None,
        });
        assert_eq!(
            serde_json::to_string(&e).unwrap_or_default(),
            r#"{"type":"exit","exit_code":7,"limit":"idle"}"#
        );
        assert_eq!(
            serde_json::to_string(&Control::Eof).unwrap_or_default(),
            r#"{"type":"eof"}"#
        );
        assert_eq!(session::data(session::STDIN, b"ls"), b"\0ls".to_vec());
    }
}

#[cfg(test)]
mod disk_io_tests {
    use super::DiskIo;

    #[test]
    fn a_change_replaces_sets_and_takes_away() {
        let now = DiskIo {
            read_iops: Some(100),
            write_bps: Some(1 << 20),
            ..Default::default()
        };
        let next = now.with(&DiskIo {
            read_iops: Some(0),
            write_iops: Some(50),
            ..Default::default()
        });
        assert_eq!(
            next,
            DiskIo {
                write_iops: Some(50),
                write_bps: Some(1 << 20),
                ..Default::default()
            }
        );
        assert!(DiskIo::default().is_unlimited());
        assert!(!next.is_unlimited());
    }
}
