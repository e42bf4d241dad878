//! GraphQL's object and input types, mapped from and to the wire types in this one place.
//! Field names follow RunPod's where the meaning is the same (`imageName`, `desiredStatus`,
//! `gpuCount`, `vcpuCount`, `memoryInGb`, `containerDiskInGb`, `volumeInGb`, `ports`, `env`);
//! docs/api/graphql.md lists them side by side.

use async_graphql::{ComplexObject, Context, Enum, InputObject, SimpleObject, ID};
use gpuvisor_wire as wire;

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes in GiB (what `…InGb` fields carry).
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

/// GiB in bytes; `None` for a negative or non-finite size.
pub fn bytes(gib: f64) -> Option<u64> {
    (gib.is_finite() && gib >= 0.0).then(|| (gib * GIB).round() as u64)
}

/// An instance's state (observed, or desired).
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum Status {
    Pending,
    Provisioning,
    Running,
    Stopping,
    Stopped,
    Terminating,
    Terminated,
    Failed,
    Interrupted,
}

impl From<wire::InstanceState> for Status {
    fn from(s: wire::InstanceState) -> Self {
        use wire::InstanceState as S;
        match s {
            S::Pending => Self::Pending,
            S::Provisioning => Self::Provisioning,
            S::Running => Self::Running,
            S::Stopping => Self::Stopping,
            S::Stopped => Self::Stopped,
            S::Terminating => Self::Terminating,
            S::Terminated => Self::Terminated,
            S::Failed => Self::Failed,
            S::Interrupted => Self::Interrupted,
        }
    }
}

/// What runs an instance.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug, Default)]
pub enum Runtime {
    #[default]
    Container,
    Vm,
}

impl From<wire::RuntimeKind> for Runtime {
    fn from(r: wire::RuntimeKind) -> Self {
        match r {
            wire::RuntimeKind::Container => Self::Container,
            wire::RuntimeKind::Vm => Self::Vm,
        }
    }
}

impl From<Runtime> for wire::RuntimeKind {
    fn from(r: Runtime) -> Self {
        match r {
            Runtime::Container => Self::Container,
            Runtime::Vm => Self::Vm,
        }
    }
}

/// A GPU (or a share of one) bound to an instance.
#[derive(SimpleObject, Clone)]
pub struct InstanceGpu {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    /// Compute share in thousandths of a GPU (1000 = whole).
    pub milli: u32,
    /// VRAM reserved, GiB.
    pub memory_in_gb: f64,
}

impl From<&wire::GpuBinding> for InstanceGpu {
    fn from(g: &wire::GpuBinding) -> Self {
        Self {
            uuid: g.uuid.clone(),
            index: g.index,
            model: g.model.clone(),
            milli: g.milli,
            memory_in_gb: gib(g.vram),
        }
    }
}

/// A volume mounted into an instance.
#[derive(SimpleObject, Clone)]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
}

/// An instance: a container or micro-VM with GPUs (RunPod's `Pod`).
#[derive(SimpleObject, Clone)]
#[graphql(complex)]
pub struct Instance {
    pub id: ID,
    pub name: String,
    /// The tenant that owns it.
    pub tenant: String,
    /// The node it is placed on.
    pub node: String,
    pub image_name: String,
    pub runtime: Runtime,
    /// What it is now.
    pub status: Status,
    /// What its owner last asked for: RUNNING, STOPPED or TERMINATED.
    pub desired_status: Status,
    /// Why it is in its state (a failure, an exit status).
    pub reason: Option<String>,
    /// Whole GPUs.
    pub gpu_count: u32,
    /// A fraction of one GPU (0.25), when it has one.
    pub gpu_fraction: Option<f64>,
    pub gpus: Vec<InstanceGpu>,
    pub vcpu_count: u32,
    /// The host CPUs it is pinned to.
    pub cpus: Vec<u32>,
    pub memory_in_gb: f64,
    pub container_disk_in_gb: f64,
    pub volumes: Vec<VolumeMount>,
    /// Where its first volume is mounted (RunPod's `volumeMountPath`).
    pub volume_mount_path: Option<String>,
    /// `8888/http,22/tcp`, as RunPod writes them.
    pub ports: String,
    /// `KEY=VALUE`.
    pub env: Vec<String>,
    /// The command it runs (the image's default when none was given).
    pub command: Vec<String>,
    /// May be preempted (spot).
    pub interruptible: bool,
    /// A spot instance's bid per GPU-hour (what it pays).
    pub bid_per_gpu_hour: Option<f64>,
    /// What an hour costs in its current state (`instance` only; RunPod's `costPerHr`).
    pub cost_per_hr: Option<f64>,
    /// Metered since creation (`instance` only).
    pub total_cost: Option<f64>,
    /// `low`, `normal` or `high`.
    pub priority: String,
    /// Its address on its tenant's network (none on a simulated node).
    pub ip: Option<String>,
    pub restart_count: u32,
    pub exit_code: Option<i32>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
}

impl From<wire::Instance> for Instance {
    fn from(i: wire::Instance) -> Self {
        let whole = i.gpus.iter().filter(|g| g.milli >= 1000).count() as u32;
        let fraction: u32 = i
            .gpus
            .iter()
            .filter(|g| g.milli < 1000)
            .map(|g| g.milli)
            .sum();
        Self {
            id: ID(i.id),
            name: i.name,
            tenant: i.tenant,
            node: i.node,
            image_name: i.image,
            runtime: i.runtime.into(),
            status: i.state.into(),
            desired_status: i.desired.into(),
            reason: i.reason,
            gpu_count: whole,
            gpu_fraction: (fraction > 0).then(|| f64::from(fraction) / 1000.0),
            gpus: i.gpus.iter().map(InstanceGpu::from).collect(),
            vcpu_count: i.vcpus,
            cpus: i.cpus,
            memory_in_gb: gib(i.memory),
            container_disk_in_gb: gib(i.container_disk),
            volume_mount_path: i.volumes.first().map(|v| v.path.clone()),
            volumes: i
                .volumes
                .into_iter()
                .map(|v| VolumeMount {
                    name: v.name,
                    mount_path: v.path,
                })
                .collect(),
            ports: ports_text(&i.ports),
            env: i.env,
            command: i.command,
            interruptible: i.interruptible,
            bid_per_gpu_hour: i.bid_per_gpu_hour,
            cost_per_hr: i.cost.as_ref().map(|c| c.per_hour),
            total_cost: i.cost.as_ref().map(|c| c.total),
            priority: i.priority.as_str().to_string(),
            ip: i.ip,
            restart_count: i.restart_count,
            exit_code: i.exit_code,
            created_at: i.created_at,
            updated_at: i.updated_at,
        }
    }
}

#[ComplexObject]
impl Instance {
    /// The size of its volumes together, GiB (RunPod's `volumeInGb`).
    async fn volume_in_gb(&self, ctx: &Context<'_>) -> async_graphql::Result<f64> {
        if self.volumes.is_empty() {
            return Ok(0.0);
        }
        let all = super::volumes_of_request(ctx).await?;
        let size = self
            .volumes
            .iter()
            .filter_map(|m| {
                all.iter()
                    .find(|v| v.name == m.name && v.tenant == self.tenant)
            })
            .map(|v| v.size)
            .sum();
        Ok(gib(size))
    }
}

/// `8888/http:public,22/tcp`.
pub fn ports_text(ports: &[wire::PortSpec]) -> String {
    ports
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `8888/http:public,22/tcp` (a port alone is `tcp`); the engine checks the values.
pub fn parse_ports(text: &str) -> Result<Vec<wire::PortSpec>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(wire::PortSpec::parse)
        .collect()
}

/// One of the host's GPUs (or MIG slices).
#[derive(SimpleObject, Clone)]
pub struct Gpu {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    pub memory_in_gb: f64,
    pub pci_address: String,
    /// `nvml`, `sysfs` or `simulated`.
    pub backend: String,
    /// Compute taken, thousandths of the GPU.
    pub allocated_milli: u32,
    pub allocated_memory_in_gb: f64,
    /// Ids of the instances on it.
    pub instances: Vec<String>,
    /// Bound to vfio-pci, for VMs.
    pub passthrough_ready: bool,
    pub mig_enabled: bool,
    /// Why it takes no new instances, when cordoned.
    pub cordoned: Option<String>,
}

impl From<wire::Gpu> for Gpu {
    fn from(g: wire::Gpu) -> Self {
        Self {
            uuid: g.uuid,
            index: g.index,
            model: g.model,
            memory_in_gb: gib(g.vram),
            pci_address: g.pci_address,
            backend: g.backend,
            allocated_milli: g.allocated_milli,
            allocated_memory_in_gb: gib(g.allocated_vram),
            instances: g.instances,
            passthrough_ready: g.passthrough_ready,
            mig_enabled: g.mig_enabled,
            cordoned: g.cordoned,
        }
    }
}

/// A GPU model for rent (RunPod's `GpuType`): how many, how many free, what an hour costs.
#[derive(SimpleObject, Clone)]
pub struct GpuType {
    /// The model, as `gpuTypeId` takes it (`A100-80GB`).
    pub id: String,
    pub display_name: String,
    pub memory_in_gb: f64,
    /// GPUs of this model that take instances (not cordoned).
    pub total_count: u32,
    /// Of those, how many have nothing placed on them.
    pub free_count: u32,
    /// On-demand price per GPU-hour (RunPod's `securePrice`).
    pub on_demand_price: f64,
    /// What an interruptible bid must reach now: the floor while one is free, else above the
    /// lowest bid holding one.
    pub interruptible_price: f64,
    /// The interruptible floor (RunPod's `lowestPrice.minimumBidPrice`).
    pub minimum_bid_price: f64,
    pub currency: String,
}

impl From<wire::GpuType> for GpuType {
    fn from(t: wire::GpuType) -> Self {
        Self {
            display_name: t.model.clone(),
            id: t.model,
            memory_in_gb: gib(t.vram),
            total_count: t.total,
            free_count: t.free,
            on_demand_price: t.on_demand_price,
            interruptible_price: t.interruptible_price,
            minimum_bid_price: t.interruptible_floor,
            currency: t.currency,
        }
    }
}

#[derive(SimpleObject, Clone)]
pub struct Image {
    pub name: String,
    /// `sha256:…`.
    pub digest: String,
    pub size_in_gb: f64,
    pub command: Vec<String>,
    pub env: Vec<String>,
    /// The tenant that alone sees it; none: public.
    pub tenant: Option<String>,
    /// The registry reference it was pulled from.
    pub source: Option<String>,
    pub created_at: i64,
}

impl From<wire::Image> for Image {
    fn from(i: wire::Image) -> Self {
        Self {
            name: i.name,
            digest: i.digest,
            size_in_gb: gib(i.size),
            command: i.command,
            env: i.env,
            tenant: i.tenant,
            source: i.source,
            created_at: i.created_at,
        }
    }
}

/// A persistent volume (RunPod's `NetworkVolume`).
#[derive(SimpleObject, Clone)]
pub struct Volume {
    pub name: String,
    pub tenant: String,
    pub size_in_gb: f64,
    /// `pending` or `ready`.
    pub state: String,
    /// The instance that has it mounted.
    pub in_use_by: Option<String>,
    pub created_at: i64,
}

impl From<wire::Volume> for Volume {
    fn from(v: wire::Volume) -> Self {
        Self {
            name: v.name,
            tenant: v.tenant,
            size_in_gb: gib(v.size),
            state: serde_json::to_value(v.state)
                .ok()
                .and_then(|s| s.as_str().map(str::to_string))
                .unwrap_or_default(),
            in_use_by: v.in_use_by,
            created_at: v.created_at,
        }
    }
}

/// A port of an instance and where to reach it. Until the ingress proxy exists this is the
/// instance's own address on its tenant's network.
#[derive(SimpleObject, Clone)]
pub struct Endpoint {
    pub instance_id: ID,
    pub instance_name: String,
    pub ip: String,
    pub port: u16,
    /// `http`, `tcp`, …
    pub protocol: String,
    /// `http://10.88.0.2:8888` for http ports, `tcp://…` otherwise.
    pub url: String,
}

/// The endpoints of `i`: one per port, when it has an address.
pub fn endpoints(i: &wire::Instance) -> Vec<Endpoint> {
    let Some(ip) = &i.ip else {
        return Vec::new();
    };
    i.ports
        .iter()
        .map(|p| Endpoint {
            instance_id: ID(i.id.clone()),
            instance_name: i.name.clone(),
            ip: ip.clone(),
            port: p.port,
            protocol: p.protocol.clone(),
            url: format!("{}://{ip}:{}", p.protocol, p.port),
        })
        .collect()
}

/// The caller (RunPod's `myself`).
#[derive(SimpleObject, Clone)]
pub struct Myself {
    /// The API key's id.
    pub key_id: String,
    pub tenant: String,
    pub tenant_id: String,
    /// `admin`, `tenant-admin`, `member`, `viewer` or `metrics`.
    pub role: String,
}

/// One point of a metric series.
#[derive(SimpleObject, Clone)]
pub struct MetricPoint {
    /// The bucket's start, unix milliseconds.
    pub t: i64,
    pub avg: f64,
    pub max: f64,
}

#[derive(SimpleObject, Clone)]
pub struct MetricSeries {
    /// `gpu_util_percent`, `gpu_memory_bytes`, `cpu_percent`, `memory_bytes`,
    /// `net_rx_bytes_per_s`, `net_tx_bytes_per_s`, `disk_used_bytes`, `volume_used_bytes`.
    pub metric: String,
    pub points: Vec<MetricPoint>,
}

/// An instance's metric history.
#[derive(SimpleObject, Clone)]
pub struct Metrics {
    pub instance_id: ID,
    /// Seconds per point actually used.
    pub step_seconds: u64,
    pub series: Vec<MetricSeries>,
}

impl From<wire::MetricsHistory> for Metrics {
    fn from(h: wire::MetricsHistory) -> Self {
        Self {
            instance_id: ID(h.id),
            step_seconds: h.step_s,
            series: h
                .series
                .into_iter()
                .map(|s| MetricSeries {
                    metric: s.metric,
                    points: s
                        .points
                        .into_iter()
                        .map(|p| MetricPoint {
                            t: p.t,
                            avg: p.avg,
                            max: p.max,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// The newest 1 s sample of an instance (what the `instanceMetrics` subscription streams).
#[derive(SimpleObject, Clone, Default)]
pub struct MetricsSample {
    pub instance_id: ID,
    /// The sample's time, unix milliseconds (none before the first sample).
    pub t: Option<i64>,
    pub gpu_util_percent: Option<f64>,
    pub gpu_memory_bytes: Option<f64>,
    pub cpu_percent: Option<f64>,
    pub memory_bytes: Option<f64>,
    pub net_rx_bytes_per_second: Option<f64>,
    pub net_tx_bytes_per_second: Option<f64>,
}

impl MetricsSample {
    /// The newest point of each series of `h`.
    pub fn newest(h: &wire::MetricsHistory) -> Self {
        let last = |name: &str| {
            h.series
                .iter()
                .find(|s| s.metric == name)
                .and_then(|s| s.points.last())
        };
        let v = |name: &str| last(name).map(|p| p.avg);
        Self {
            instance_id: ID(h.id.clone()),
            t: h.series
                .iter()
                .filter_map(|s| s.points.last())
                .map(|p| p.t)
                .max(),
            gpu_util_percent: v("gpu_util_percent"),
            gpu_memory_bytes: v("gpu_memory_bytes"),
            cpu_percent: v("cpu_percent"),
            memory_bytes: v("memory_bytes"),
            net_rx_bytes_per_second: v("net_rx_bytes_per_s"),
            net_tx_bytes_per_second: v("net_tx_bytes_per_s"),
        }
    }
}

/// `KEY=VALUE` of an instance's environment (RunPod's `EnvironmentVariableInput`).
#[derive(InputObject, Clone)]
pub struct EnvInput {
    pub key: String,
    pub value: String,
}

/// What `clusterFindAndDeployOnDemand` asks for (RunPod's `PodFindAndDeployOnDemandInput`):
/// the requirements placement finds a host and GPUs for.
#[derive(InputObject, Clone, Default)]
pub struct DeployInput {
    pub name: Option<String>,
    /// Start from this template (`templates`); the fields given override it.
    pub template_id: Option<String>,
    /// An image visible to the caller (`gpuvisor image list`); required without a template.
    pub image_name: Option<String>,
    #[graphql(flatten)]
    pub shape: ShapeInput,
    /// `low`, `normal` (default) or `high` (within the tenant's allowance).
    pub priority: Option<String>,
}

/// What an instance is made of: the fields a deploy and a template share. Left out: the
/// template's (for a deploy), else the defaults (1 vCPU, 1 GiB, a 10 GiB disk, a container).
#[derive(InputObject, Clone, Default)]
pub struct ShapeInput {
    pub runtime: Option<Runtime>,
    /// Whole GPUs.
    pub gpu_count: Option<u32>,
    /// A fraction of one GPU, in (0, 1) (instead of `gpuCount`).
    pub gpu_fraction: Option<f64>,
    /// Only GPUs of this model (a `gpuTypes` id, e.g. `A100-80GB`).
    pub gpu_type_id: Option<String>,
    pub vcpu_count: Option<u32>,
    pub memory_in_gb: Option<f64>,
    pub container_disk_in_gb: Option<f64>,
    /// A persistent volume: created with `volumeInGb` when it does not exist yet.
    pub volume_name: Option<String>,
    pub volume_in_gb: Option<f64>,
    /// Where the volume is mounted (default `/workspace`).
    pub volume_mount_path: Option<String>,
    /// `8888/http,22/tcp`.
    pub ports: Option<String>,
    pub env: Option<Vec<EnvInput>>,
    /// Overrides the image's command.
    pub command: Option<Vec<String>>,
}

/// What `clusterRentInterruptible` asks for (RunPod's `PodRentInterruptableInput`): an
/// instance that is preempted when on-demand work needs its GPU.
#[derive(InputObject, Clone)]
pub struct RentInterruptibleInput {
    /// The most it pays per GPU-hour: at least the current interruptible price (`gpuTypes`);
    /// a higher bid takes a GPU from a lower one when none is free. Default: the floor.
    pub bid_per_gpu_hour: Option<f64>,
    #[graphql(flatten)]
    pub deploy: DeployInput,
}

/// `clusterScaleResources`: a new size for an instance.
#[derive(InputObject, Clone)]
pub struct ScaleInput {
    pub id: ID,
    pub vcpu_count: Option<u32>,
    pub memory_in_gb: Option<f64>,
    /// Whole GPUs: changing them needs `restart: true` (a stop and a start).
    pub gpu_count: Option<u32>,
    /// Consent to a stop and start when the runtime cannot make the change live.
    #[graphql(default = false)]
    pub restart: bool,
}

/// `createVolume`.
#[derive(InputObject, Clone)]
pub struct VolumeInput {
    pub name: String,
    pub size_in_gb: f64,
}

/// The answer of a deploy: the instance, its GPUs and how to reach it.
#[derive(SimpleObject, Clone)]
pub struct Deployment {
    pub instance: Instance,
    pub gpus: Vec<InstanceGpu>,
    /// Its address on its tenant's network (none on a simulated node).
    pub ip: Option<String>,
    pub endpoints: Vec<Endpoint>,
    /// A shell in it: `gpuvisor instance exec -it <id> -- sh`.
    pub exec_command: String,
}

impl From<wire::Instance> for Deployment {
    fn from(i: wire::Instance) -> Self {
        Self {
            gpus: i.gpus.iter().map(InstanceGpu::from).collect(),
            ip: i.ip.clone(),
            endpoints: endpoints(&i),
            exec_command: format!("gpuvisor instance exec -it {} -- sh", i.id),
            instance: i.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_read_as_runpod_writes_them() {
        let p = parse_ports("8888/http, 22/tcp,9000").unwrap();
        assert_eq!(ports_text(&p), "8888/http,22/tcp,9000/tcp");
        assert!(parse_ports("http/8888").is_err());
        assert!(parse_ports("").unwrap().is_empty());
    }

    #[test]
    fn sizes_are_gib() {
        assert_eq!(bytes(0.5), Some(512 << 20));
        assert_eq!(gib(2 << 30), 2.0);
        assert_eq!(bytes(-1.0), None);
        assert_eq!(bytes(f64::NAN), None);
    }
}

/// `usage`: what was metered in a range (`gpuvisor usage`).
#[derive(SimpleObject, Clone)]
pub struct UsageReport {
    /// Unix ms.
    pub from: i64,
    pub to: i64,
    pub currency: String,
    pub lines: Vec<UsageLine>,
    pub total_cost: f64,
}

/// One resource of one instance or volume at one price.
#[derive(SimpleObject, Clone)]
pub struct UsageLine {
    pub tenant: String,
    /// `instance` or `volume`.
    pub subject: String,
    pub id: String,
    pub name: String,
    /// `gpu`, `vcpu`, `memory`, `disk` or `volume`.
    pub resource: String,
    pub gpu_type_id: Option<String>,
    /// GPU lines: each GPU's share (1 = whole).
    pub gpu_fraction: Option<f64>,
    pub interruptible: bool,
    pub seconds: f64,
    /// GPU-, vCPU- or GiB-seconds.
    pub unit_seconds: f64,
    /// Per unit-hour.
    pub unit_price: f64,
    pub cost: f64,
}

impl From<wire::UsageReport> for UsageReport {
    fn from(r: wire::UsageReport) -> Self {
        Self {
            from: r.from,
            to: r.to,
            currency: r.currency,
            total_cost: r.total_cost,
            lines: r
                .lines
                .into_iter()
                .map(|l| UsageLine {
                    tenant: l.tenant,
                    subject: l.subject,
                    id: l.id,
                    name: l.name,
                    resource: l.resource,
                    gpu_type_id: l.model,
                    gpu_fraction: l.milli.map(|m| f64::from(m) / 1000.0),
                    interruptible: l.interruptible,
                    seconds: l.seconds,
                    unit_seconds: l.unit_seconds,
                    unit_price: l.unit_price,
                    cost: l.cost,
                })
                .collect(),
        }
    }
}

/// An instance template (RunPod's `PodTemplate`).
#[derive(SimpleObject, Clone)]
pub struct Template {
    pub name: String,
    /// Every tenant's to use (an admin's).
    pub is_public: bool,
    /// The owning tenant of a private one.
    pub tenant: Option<String>,
    pub description: Option<String>,
    pub image_name: String,
    pub runtime: Option<Runtime>,
    pub gpu_count: Option<u32>,
    pub gpu_fraction: Option<f64>,
    pub gpu_type_id: Option<String>,
    pub vcpu_count: Option<u32>,
    pub memory_in_gb: Option<f64>,
    pub container_disk_in_gb: Option<f64>,
    pub volumes: Vec<TemplateVolume>,
    /// `8888/http,22/tcp`.
    pub ports: String,
    pub env: Vec<String>,
    pub command: Vec<String>,
    pub startup_script: Option<String>,
    pub created_at: i64,
}

#[derive(SimpleObject, Clone)]
pub struct TemplateVolume {
    pub name: String,
    pub mount_path: String,
    pub volume_in_gb: Option<f64>,
}

impl From<wire::Template> for Template {
    fn from(t: wire::Template) -> Self {
        let s = t.spec;
        Self {
            name: t.name,
            is_public: t.public,
            tenant: t.tenant,
            description: s.description,
            image_name: s.image,
            runtime: s.runtime.map(Into::into),
            gpu_count: s.gpus,
            gpu_fraction: s.gpu_fraction,
            gpu_type_id: s.gpu_model,
            vcpu_count: s.vcpus,
            memory_in_gb: s.memory.map(gib),
            container_disk_in_gb: s.container_disk.map(gib),
            volumes: s
                .volumes
                .into_iter()
                .map(|v| TemplateVolume {
                    name: v.name,
                    mount_path: v.path,
                    volume_in_gb: v.size.map(gib),
                })
                .collect(),
            ports: ports_text(&s.ports),
            env: s.env,
            command: s.command,
            startup_script: s.startup_script,
            created_at: t.created_at,
        }
    }
}

/// `createTemplate`.
#[derive(InputObject, Clone)]
pub struct TemplateInput {
    pub name: String,
    /// Every tenant may use it (admins only).
    #[graphql(default = false)]
    pub is_public: bool,
    pub description: Option<String>,
    pub image_name: String,
    #[graphql(flatten)]
    pub shape: ShapeInput,
    /// Run at start: by cloud-init once in a VM, before the command in a container.
    pub startup_script: Option<String>,
}
