//! The GraphQL front end at `/graphql`: a second way into the same [`Engine`] commands as
//! REST. Every resolver calls one engine command with the caller's [`Principal`], so
//! authorisation, tenancy and validation are the engine's, as for REST; no rule lives here.
//!
//! Key decisions:
//! - The handler is ours (not async-graphql-axum, which turns on axum's default features):
//!   `POST /graphql` runs queries and mutations, `GET /graphql` upgrades to a WebSocket
//!   speaking graphql-transport-ws (async-graphql's protocol code over axum's socket).
//! - Whether a request reads or mutates is in its body, so the REST middleware leaves the rate
//!   to the handler ([`RateGate`]): a query is charged as a read, a mutation as a mutation.
//! - Each mutation is recorded in the audit log by the same [`AuditCall`] as a REST call,
//!   with its operation's stable name; errors carry the REST error codes in
//!   `extensions.code`.
//! - Depth and complexity are bounded ([`MAX_DEPTH`], [`MAX_COMPLEXITY`]); the body is bounded
//!   by the API's `max_body` like any other.

pub mod types;

use crate::api::{status_for, ApiError, AuditCall, ConnectionHold, Peer, RateGate, Who};
use async_graphql::http::{WebSocketProtocols, WsMessage};
use async_graphql::{Context, Data, Object, Schema, ID};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::{SinkExt, Stream, StreamExt};
use gpuvisor_control::engine::authz::Op;
use gpuvisor_control::{Engine, EngineError, Principal};
use gpuvisor_wire::{self as wire, code};
use std::sync::Arc;
use std::time::Duration;
use types::*;

/// The route of both the HTTP and the WebSocket end.
pub const PATH: &str = "/graphql";
/// Deepest selection a request may make (the standard introspection query is 13 deep).
pub const MAX_DEPTH: usize = 16;
/// Most fields a request may select, counted over its selection tree.
pub const MAX_COMPLEXITY: usize = 1000;
/// Largest WebSocket message a subscription client may send.
const WS_MAX_MESSAGE: usize = 64 << 10;

pub type GqlSchema = Schema<Query, Mutation, Subscription>;

/// The schema (built once: it holds no engine, which comes with each request).
pub fn schema() -> &'static GqlSchema {
    static SCHEMA: std::sync::OnceLock<GqlSchema> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| {
        Schema::build(Query, Mutation, Subscription)
            .limit_depth(MAX_DEPTH)
            .limit_complexity(MAX_COMPLEXITY)
            .finish()
    })
}

/// The schema in SDL (`gpuvisor graphql-schema`; committed as docs/api/schema.graphql).
pub fn sdl() -> String {
    schema().sdl()
}

/// Every root field with the engine operation it runs (`None`: any valid key), as
/// `gpuvisor graphql-ops` prints them: the role test reads this list, and a unit test checks
/// it against the schema, so a new field without a row fails.
pub const FIELDS: &[(&str, &str, Option<Op>)] = &[
    ("query", "myself", None),
    ("query", "instances", Some(Op::ListInstances)),
    ("query", "instance", Some(Op::GetInstance)),
    ("query", "gpus", Some(Op::ListGpus)),
    ("query", "gpuTypes", Some(Op::ListGpuTypes)),
    ("query", "images", Some(Op::ListImages)),
    ("query", "volumes", Some(Op::ListVolumes)),
    ("query", "endpoints", Some(Op::ListInstances)),
    ("query", "clusterGetMetrics", Some(Op::InstanceMetrics)),
    ("query", "usage", Some(Op::Usage)),
    ("query", "templates", Some(Op::ListTemplates)),
    (
        "mutation",
        "clusterFindAndDeployOnDemand",
        Some(Op::CreateInstance),
    ),
    (
        "mutation",
        "clusterRentInterruptible",
        Some(Op::CreateInstance),
    ),
    ("mutation", "clusterScaleResources", Some(Op::ScaleInstance)),
    ("mutation", "clusterStop", Some(Op::StopInstance)),
    ("mutation", "clusterResume", Some(Op::StartInstance)),
    ("mutation", "clusterTerminate", Some(Op::TerminateInstance)),
    ("mutation", "createVolume", Some(Op::CreateVolume)),
    ("mutation", "deleteVolume", Some(Op::RemoveVolume)),
    ("mutation", "createTemplate", Some(Op::CreateTemplate)),
    ("mutation", "deleteTemplate", Some(Op::RemoveTemplate)),
    ("subscription", "instanceMetrics", Some(Op::InstanceMetrics)),
];

/// Who is asking, through which engine, from where: each request's context.
#[derive(Clone)]
struct Caller {
    engine: Arc<Engine>,
    who: Principal,
    source: Option<std::net::IpAddr>,
}

fn caller<'a>(ctx: &Context<'a>) -> async_graphql::Result<&'a Caller> {
    ctx.data::<Caller>()
        .map_err(|_| gql(EngineError::Unauthorized("no API key".into())))
}

/// The caller's volumes, read once per request (for `Instance.volumeInGb`).
#[derive(Default)]
struct VolumeCache(tokio::sync::OnceCell<Vec<wire::Volume>>);

async fn volumes_of_request<'a>(ctx: &Context<'a>) -> async_graphql::Result<Vec<wire::Volume>> {
    let c = caller(ctx)?;
    let read = || async { c.engine.list_volumes(&c.who).await };
    match ctx.data_opt::<VolumeCache>() {
        Some(cache) => cache.0.get_or_try_init(read).await.cloned().map_err(gql),
        None => read().await.map_err(gql),
    }
}

/// An engine error as a GraphQL error: its message, and its stable code in
/// `extensions.code` (the same as REST's `error.code`).
fn gql(e: EngineError) -> async_graphql::Error {
    let c = e.code();
    if c == code::INTERNAL {
        tracing::error!("internal error: {e}");
    }
    use async_graphql::ErrorExtensions;
    async_graphql::Error::new(e.to_string()).extend_with(|_, ext| ext.set("code", c))
}

trait OrGql<T> {
    fn gql(self) -> async_graphql::Result<T>;
}

impl<T> OrGql<T> for Result<T, EngineError> {
    fn gql(self) -> async_graphql::Result<T> {
        self.map_err(gql)
    }
}

fn list<W, G: From<W>>(v: Vec<W>) -> Vec<G> {
    v.into_iter().map(G::from).collect()
}

pub struct Query;

#[Object]
impl Query {
    /// The caller: its key, tenant and role.
    async fn myself(&self, ctx: &Context<'_>) -> async_graphql::Result<Myself> {
        let c = caller(ctx)?;
        Ok(Myself {
            key_id: c.who.key_id.clone(),
            tenant: c.who.tenant.clone(),
            tenant_id: c.who.tenant_id.clone(),
            role: c.who.role.as_str().to_string(),
        })
    }

    /// The caller's instances (an admin: everyone's) that are not terminated.
    async fn instances(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Instance>> {
        let c = caller(ctx)?;
        Ok(list(c.engine.list_instances(&c.who).await.gql()?))
    }

    /// One instance, by id or name.
    async fn instance(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Instance> {
        let c = caller(ctx)?;
        Ok(c.engine.get_instance(&c.who, &id).await.gql()?.into())
    }

    /// The host's GPUs.
    async fn gpus(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Gpu>> {
        let c = caller(ctx)?;
        Ok(list(c.engine.list_gpus(&c.who).await.gql()?))
    }

    /// The GPU models for rent: how many are free, on-demand and interruptible prices.
    async fn gpu_types(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<GpuType>> {
        let c = caller(ctx)?;
        Ok(list(c.engine.gpu_types(&c.who).await.gql()?))
    }

    /// Metered usage and its cost in a range (`from`/`to`: a duration back like `30d`, epoch
    /// ms, RFC 3339 or a date; default the last 30 days). Admins may name a tenant.
    async fn usage(
        &self,
        ctx: &Context<'_>,
        tenant: Option<String>,
        from: Option<String>,
        to: Option<String>,
        subject: Option<String>,
    ) -> async_graphql::Result<UsageReport> {
        let c = caller(ctx)?;
        let q = wire::UsageQuery {
            tenant,
            from,
            to,
            subject,
        };
        Ok(c.engine.usage(&c.who, &q).await.gql()?.into())
    }

    /// The templates the caller may deploy from: its tenant's and the public ones.
    async fn templates(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Template>> {
        let c = caller(ctx)?;
        Ok(list(c.engine.list_templates(&c.who).await.gql()?))
    }

    /// The images the caller may start instances from.
    async fn images(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Image>> {
        let c = caller(ctx)?;
        Ok(list(c.engine.list_images(&c.who).await.gql()?))
    }

    /// The caller's persistent volumes.
    async fn volumes(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Volume>> {
        Ok(list(volumes_of_request(ctx).await?))
    }

    /// Every port of the caller's instances and where to reach it.
    async fn endpoints(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Endpoint>> {
        let c = caller(ctx)?;
        let all = c.engine.list_instances(&c.who).await.gql()?;
        Ok(all.iter().flat_map(endpoints).collect())
    }

    /// An instance's metric history: GPU utilisation and memory, CPU, memory, network.
    /// `range`: how far back (`90s`, `10m`, `2h`, `7d`); `step`: seconds per point (`1s`,
    /// `1m`); 1 s points are kept for an hour.
    async fn cluster_get_metrics(
        &self,
        ctx: &Context<'_>,
        id: ID,
        #[graphql(default = "5m")] range: String,
        #[graphql(default = "1s")] step: String,
    ) -> async_graphql::Result<Metrics> {
        let c = caller(ctx)?;
        let q = wire::MetricsQuery {
            since: Some(range),
            step: Some(step),
        };
        Ok(c.engine
            .instance_metrics(&c.who, &id, &q)
            .await
            .gql()?
            .into())
    }
}

/// Runs one mutation and records it in the audit log like a REST call: its operation, a
/// target naming the field and its object, the outcome as REST's status, the source address.
async fn audited<T>(
    c: &Caller,
    op: Op,
    target: String,
    work: impl std::future::Future<Output = Result<T, EngineError>>,
    subject: impl FnOnce(&T) -> String,
) -> async_graphql::Result<T> {
    let r = work.await;
    let (status, subject) = match &r {
        Ok(v) => (200, Some(subject(v))),
        Err(e) => (status_for(e.code()).as_u16(), None),
    };
    let call = AuditCall {
        who: c.who.clone(),
        op,
        target: format!("{PATH} {target}"),
        source: c.source,
    };
    call.record(&c.engine, subject.as_deref(), status).await;
    r.gql()
}

fn instance_subject(i: &wire::Instance) -> String {
    format!("instance {} ({})", i.id, i.name)
}

fn invalid(msg: impl Into<String>) -> EngineError {
    EngineError::InvalidArgument(msg.into())
}

fn size(what: &str, gib: f64) -> Result<u64, EngineError> {
    bytes(gib).ok_or_else(|| invalid(format!("{what} must be a size in GiB, 0 or more")))
}

fn opt_size(what: &str, gib: Option<f64>) -> Result<Option<u64>, EngineError> {
    gib.map(|g| size(what, g)).transpose()
}

/// The one volume of a deploy or template input (`volumeName`, `volumeInGb`,
/// `volumeMountPath`, default `/workspace`).
fn volume_input(
    name: &Option<String>,
    gib: Option<f64>,
    path: &Option<String>,
) -> Result<Vec<wire::VolumeMount>, EngineError> {
    match (name, gib) {
        (Some(name), gib) => Ok(vec![wire::VolumeMount {
            name: name.clone(),
            path: path.clone().unwrap_or_else(|| "/workspace".into()),
            size: opt_size("volumeInGb", gib)?,
        }]),
        (None, Some(_)) => Err(invalid(
            "volumeInGb needs volumeName: the persistent volume to create or reuse",
        )),
        (None, None) => Ok(Vec::new()),
    }
}

/// A [`ShapeInput`] in the engine's units.
struct Shape {
    runtime: Option<wire::RuntimeKind>,
    gpus: Option<u32>,
    gpu_fraction: Option<f64>,
    gpu_model: Option<String>,
    vcpus: Option<u32>,
    memory: Option<u64>,
    container_disk: Option<u64>,
    volumes: Vec<wire::VolumeMount>,
    env: Vec<String>,
    ports: Vec<wire::PortSpec>,
    command: Vec<String>,
}

fn shape(s: &ShapeInput) -> Result<Shape, EngineError> {
    Ok(Shape {
        runtime: s.runtime.map(Into::into),
        gpus: s.gpu_count.filter(|n| *n > 0),
        gpu_fraction: s.gpu_fraction,
        gpu_model: s.gpu_type_id.clone(),
        vcpus: s.vcpu_count,
        memory: opt_size("memoryInGb", s.memory_in_gb)?,
        container_disk: opt_size("containerDiskInGb", s.container_disk_in_gb)?,
        volumes: volume_input(&s.volume_name, s.volume_in_gb, &s.volume_mount_path)?,
        env: s
            .env
            .iter()
            .flatten()
            .map(|e| format!("{}={}", e.key, e.value))
            .collect(),
        ports: parse_ports(s.ports.as_deref().unwrap_or("")).map_err(invalid)?,
        command: s.command.clone().unwrap_or_default(),
    })
}

/// The engine's request for a deploy (`interruptible`: a spot rental, which on-demand work
/// and higher bids preempt; `normal` priority unless asked otherwise, as on REST). Sizes left
/// out are 0: the template's, else the defaults (`engine::templates::merge`).
fn create_request(
    d: &DeployInput,
    interruptible: bool,
) -> Result<wire::CreateInstance, EngineError> {
    let s = shape(&d.shape)?;
    let priority = match d.priority.as_deref() {
        None => wire::PriorityClass::Normal,
        Some(p) => serde_json::from_value(serde_json::Value::String(p.into()))
            .map_err(|_| invalid(format!("priority {p:?} is not one of: low, normal, high")))?,
    };
    Ok(wire::CreateInstance {
        template: d.template_id.clone(),
        image: d.image_name.clone().unwrap_or_default(),
        name: d.name.clone(),
        gpus: s.gpus,
        gpu_fraction: s.gpu_fraction,
        gpu_model: s.gpu_model,
        vcpus: s.vcpus.unwrap_or(0),
        memory: s.memory.unwrap_or(0),
        container_disk: s.container_disk.unwrap_or(0),
        volumes: s.volumes,
        env: s.env,
        ports: s.ports,
        command: s.command,
        priority,
        interruptible,
        runtime: s.runtime,
        ..Default::default()
    })
}

pub struct Mutation;

#[Object]
impl Mutation {
    /// Finds room for the requirements and deploys an instance there; answers the instance,
    /// its GPUs and how to reach it. The instance starts in the background (`instance`
    /// shows its status).
    async fn cluster_find_and_deploy_on_demand(
        &self,
        ctx: &Context<'_>,
        input: DeployInput,
    ) -> async_graphql::Result<Deployment> {
        let c = caller(ctx)?;
        let work = async {
            let req = create_request(&input, false)?;
            c.engine.create_instance(&c.who, &req).await
        };
        let target = "clusterFindAndDeployOnDemand".to_string();
        let i = audited(c, Op::CreateInstance, target, work, instance_subject).await?;
        Ok(i.into())
    }

    /// Rents an interruptible (spot) instance: preempted when on-demand work needs its GPU.
    async fn cluster_rent_interruptible(
        &self,
        ctx: &Context<'_>,
        input: RentInterruptibleInput,
    ) -> async_graphql::Result<Deployment> {
        let c = caller(ctx)?;
        // The bid: refused below the interruptible floor of the GPU placed; a higher bid
        // outranks a lower one when GPUs run out (engine::pricing).
        let work = async {
            let mut req = create_request(&input.deploy, true)?;
            req.bid_per_gpu_hour = input.bid_per_gpu_hour;
            c.engine.create_instance(&c.who, &req).await
        };
        let target = "clusterRentInterruptible".to_string();
        let i = audited(c, Op::CreateInstance, target, work, instance_subject).await?;
        Ok(i.into())
    }

    /// Changes an instance's vCPUs, memory or GPUs: a running container's vCPUs and memory
    /// in place; what its runtime cannot change live only with `restart: true`.
    async fn cluster_scale_resources(
        &self,
        ctx: &Context<'_>,
        input: ScaleInput,
    ) -> async_graphql::Result<Instance> {
        let c = caller(ctx)?;
        let work = async {
            let req = wire::ScaleInstance {
                vcpus: input.vcpu_count,
                memory: input
                    .memory_in_gb
                    .map(|g| size("memoryInGb", g))
                    .transpose()?,
                gpus: input.gpu_count,
                disk_io: Default::default(),
                restart: input.restart,
            };
            c.engine.scale_instance(&c.who, &input.id, &req).await
        };
        let target = format!("clusterScaleResources {}", input.id.as_str());
        Ok(
            audited(c, Op::ScaleInstance, target, work, instance_subject)
                .await?
                .into(),
        )
    }

    /// Stops an instance (its resources stay reserved).
    async fn cluster_stop(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Instance> {
        let c = caller(ctx)?;
        let work = c.engine.stop_instance(&c.who, &id);
        let target = format!("clusterStop {}", id.as_str());
        Ok(audited(c, Op::StopInstance, target, work, instance_subject)
            .await?
            .into())
    }

    /// Starts a stopped instance again.
    async fn cluster_resume(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Instance> {
        let c = caller(ctx)?;
        let work = c.engine.start_instance(&c.who, &id);
        let target = format!("clusterResume {}", id.as_str());
        Ok(
            audited(c, Op::StartInstance, target, work, instance_subject)
                .await?
                .into(),
        )
    }

    /// Terminates an instance: its container disk goes, its volumes stay.
    async fn cluster_terminate(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<Instance> {
        let c = caller(ctx)?;
        let work = c.engine.terminate_instance(&c.who, &id);
        let target = format!("clusterTerminate {}", id.as_str());
        Ok(
            audited(c, Op::TerminateInstance, target, work, instance_subject)
                .await?
                .into(),
        )
    }

    /// Creates a persistent volume.
    async fn create_volume(
        &self,
        ctx: &Context<'_>,
        input: VolumeInput,
    ) -> async_graphql::Result<Volume> {
        let c = caller(ctx)?;
        let work = async {
            let req = wire::CreateVolume {
                name: input.name.clone(),
                size: size("sizeInGb", input.size_in_gb)?,
            };
            c.engine.create_volume(&c.who, &req).await
        };
        let target = "createVolume".to_string();
        let v = audited(c, Op::CreateVolume, target, work, |v| {
            format!("volume {}", v.name)
        })
        .await?;
        Ok(v.into())
    }

    /// Removes a persistent volume that no instance uses.
    async fn delete_volume(
        &self,
        ctx: &Context<'_>,
        name: String,
    ) -> async_graphql::Result<Volume> {
        let c = caller(ctx)?;
        let work = c.engine.remove_volume(&c.who, &name);
        let target = format!("deleteVolume {name}");
        let v = audited(c, Op::RemoveVolume, target, work, |v| {
            format!("volume {}", v.name)
        })
        .await?;
        Ok(v.into())
    }

    /// Makes a template for the caller's tenant (`isPublic`: an admin's, for every tenant).
    async fn create_template(
        &self,
        ctx: &Context<'_>,
        input: TemplateInput,
    ) -> async_graphql::Result<Template> {
        let c = caller(ctx)?;
        let work = async {
            let req = template_request(&input)?;
            c.engine.create_template(&c.who, &req).await
        };
        let target = format!("createTemplate {}", input.name);
        let t = audited(c, Op::CreateTemplate, target, work, |t| {
            format!("template {}", t.name)
        })
        .await?;
        Ok(t.into())
    }

    /// Removes a template of the caller's tenant (a public one: admins).
    async fn delete_template(
        &self,
        ctx: &Context<'_>,
        name: String,
    ) -> async_graphql::Result<Template> {
        let c = caller(ctx)?;
        let work = c.engine.remove_template(&c.who, &name);
        let target = format!("deleteTemplate {name}");
        let t = audited(c, Op::RemoveTemplate, target, work, |t| {
            format!("template {}", t.name)
        })
        .await?;
        Ok(t.into())
    }
}

/// The engine's request for `createTemplate`.
fn template_request(t: &TemplateInput) -> Result<wire::CreateTemplate, EngineError> {
    let s = shape(&t.shape)?;
    Ok(wire::CreateTemplate {
        name: t.name.clone(),
        public: t.is_public,
        spec: wire::TemplateSpec {
            image: t.image_name.clone(),
            description: t.description.clone(),
            runtime: s.runtime,
            gpus: s.gpus,
            gpu_fraction: s.gpu_fraction,
            gpu_model: s.gpu_model,
            vcpus: s.vcpus,
            memory: s.memory,
            container_disk: s.container_disk,
            volumes: s.volumes,
            env: s.env,
            ports: s.ports,
            command: s.command,
            startup_script: t.startup_script.clone(),
        },
    })
}

pub struct Subscription;

/// The newest 1 s sample of instance `id` the caller may see.
async fn sample(c: &Caller, id: &str) -> Result<MetricsSample, EngineError> {
    let q = wire::MetricsQuery {
        since: Some("10s".into()),
        step: Some("1s".into()),
    };
    let h = c.engine.instance_metrics(&c.who, id, &q).await?;
    Ok(MetricsSample::newest(&h))
}

/// Whether the stream of `id` goes on: the caller's key is active and the instance is not
/// terminated (nor gone).
async fn still_watched(c: &Caller, id: &str) -> bool {
    if !c.engine.key_active(&c.who.key_id).await {
        return false;
    }
    c.engine
        .get_instance(&c.who, id)
        .await
        .is_ok_and(|i| i.state != wire::InstanceState::Terminated)
}

#[async_graphql::Subscription]
impl Subscription {
    /// An instance's newest metrics, each second; ends when the instance is terminated or
    /// the caller's key revoked.
    async fn instance_metrics(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> async_graphql::Result<impl Stream<Item = MetricsSample>> {
        let c = caller(ctx)?.clone();
        // The first answer at once: a refusal (not found, forbidden) is the subscription's.
        let first = sample(&c, &id).await.gql()?;
        let every = Duration::from_secs(1);
        let tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let state = (c, id.to_string(), Some(first), tick);
        Ok(futures_util::stream::unfold(
            state,
            |(c, id, first, mut tick)| async move {
                if let Some(s) = first {
                    return Some((s, (c, id, None, tick)));
                }
                tick.tick().await;
                if !still_watched(&c, &id).await {
                    return None;
                }
                let s = sample(&c, &id).await.ok()?;
                Some((s, (c, id, None, tick)))
            },
        ))
    }
}

/// Whether the request's operation (the one `operationName` picks) is a mutation; an
/// ambiguous document with any mutation in it counts as one. A document that does not parse
/// is a read (it runs nothing).
/// Most root fields (aliases included) one mutation request may carry.
pub const MAX_MUTATION_FIELDS: u32 = 10;

/// The operation the request runs: whether it is a mutation, and how many root fields it
/// selects (aliases each count; fragments at the root count their fields): what it is charged.
fn operation_cost(req: &mut async_graphql::Request) -> (bool, u32) {
    use async_graphql::parser::types::{
        DocumentOperations, ExecutableDocument, OperationType, Selection, SelectionSet,
    };
    fn fields(doc: &ExecutableDocument, set: &SelectionSet, depth: u32) -> u32 {
        set.items
            .iter()
            .map(|s| match &s.node {
                Selection::Field(_) => 1,
                // Fragments nest; a cycle is the validator's to refuse, this only counts.
                _ if depth > 8 => 1,
                Selection::InlineFragment(f) => fields(doc, &f.node.selection_set.node, depth + 1),
                Selection::FragmentSpread(f) => doc
                    .fragments
                    .get(&f.node.fragment_name.node)
                    .map_or(1, |d| fields(doc, &d.node.selection_set.node, depth + 1)),
            })
            .sum::<u32>()
            .max(1)
    }
    let name = req.operation_name.clone();
    let Ok(doc) = req.parsed_query() else {
        return (false, 1);
    };
    let op = match &doc.operations {
        DocumentOperations::Single(op) => Some(op),
        DocumentOperations::Multiple(ops) => match name {
            Some(n) => ops.iter().find(|(k, _)| k.as_str() == n).map(|(_, op)| op),
            // Unnamed among several: GraphQL refuses it; charged as the costliest.
            None => ops.values().max_by_key(|op| {
                (
                    op.node.ty == OperationType::Mutation,
                    op.node.selection_set.node.items.len(),
                )
            }),
        },
    };
    match op {
        Some(op) => (
            op.node.ty == OperationType::Mutation,
            fields(doc, &op.node.selection_set.node, 0),
        ),
        None => (false, 1),
    }
}

/// `POST /graphql`: `{"query", "variables", "operationName"}`; the answer is GraphQL's
/// `{"data", "errors"}` with status 200 (authentication, rates and body size are answered
/// before, as for REST).
pub async fn http(
    State(engine): State<Arc<Engine>>,
    Who(who): Who,
    gate: Option<Extension<RateGate>>,
    peer: Option<Extension<Peer>>,
    body: axum::body::Bytes,
) -> Response {
    let mut req: async_graphql::Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::from(invalid(format!(
                "bad GraphQL request: {e} (expected {{\"query\": \"...\", \"variables\": {{...}}}})"
            )))
            .into_response()
        }
    };
    // Each root field is charged as one request of its kind: aliases multiply the work, so
    // they multiply the charge.
    let (mutating, fields) = operation_cost(&mut req);
    if mutating && fields > MAX_MUTATION_FIELDS {
        return ApiError::from(invalid(format!(
            "{fields} mutations in one request: at most {MAX_MUTATION_FIELDS} (send more requests)"
        )))
        .into_response();
    }
    if let Some(Extension(gate)) = gate {
        if let Some(refused) = gate.charge_n(mutating, fields) {
            return refused;
        }
    }
    let caller = Caller {
        engine,
        who,
        source: peer.map(|Extension(Peer(ip))| ip),
    };
    let req = req.data(caller).data(VolumeCache::default());
    let run = schema().execute(req);
    let answer = if mutating {
        // A client that hangs up cancels neither the mutations nor their audit rows.
        match tokio::spawn(run).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("graphql mutation task: {e}");
                return ApiError::from(EngineError::Internal("the request failed".into()))
                    .into_response();
            }
        }
    } else {
        run.await
    };
    Json(answer).into_response()
}

type Upgrade = Result<
    axum::extract::ws::WebSocketUpgrade,
    axum::extract::ws::rejection::WebSocketUpgradeRejection,
>;

/// `GET /graphql`: a WebSocket for subscriptions, graphql-transport-ws (or the older
/// graphql-ws) as the client's `Sec-WebSocket-Protocol` asks. The key comes with the upgrade
/// (`x-api-key`) or in `connection_init`'s payload (`{"x-api-key": "..."}`, for browsers).
pub async fn websocket(
    State(engine): State<Arc<Engine>>,
    who: Option<Extension<Principal>>,
    gate: Option<Extension<RateGate>>,
    peer: Option<Extension<Peer>>,
    hold: Option<Extension<ConnectionHold>>,
    ws: Upgrade,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(r) => {
            return ApiError::from(invalid(format!(
                "GET {PATH} is for subscriptions over a WebSocket (graphql-transport-ws); send queries and mutations as POST {PATH}: {}",
                r.body_text()
            )))
            .into_response()
        }
    };
    let gate = gate.map(|Extension(g)| g);
    // The upgrade is a read of the key it came with (a key given later is charged per
    // operation only).
    if let (Some(gate), Some(_)) = (&gate, &who) {
        if let Some(refused) = gate.charge(false) {
            return refused;
        }
    }
    let protocol = ws
        .requested_protocols()
        .filter_map(|p| p.to_str().ok())
        .flat_map(|p| p.split(','))
        .find_map(|p| p.trim().parse::<WebSocketProtocols>().ok());
    let Some(protocol) = protocol else {
        return ApiError::from(invalid(
            "ask for the graphql-transport-ws subprotocol (Sec-WebSocket-Protocol)",
        ))
        .into_response();
    };
    let who = who.map(|Extension(p)| p);
    let source = peer.map(|Extension(Peer(ip))| ip);
    ws.protocols([protocol.sec_websocket_protocol()])
        .max_message_size(WS_MAX_MESSAGE)
        .max_frame_size(WS_MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            pump(socket, (engine, who, source, gate), protocol).await;
            drop(hold);
        })
}

/// Who opened a WebSocket: the engine, the upgrade's principal (if its key came with it),
/// the address, the rate allowance.
type WsOpener = (
    Arc<Engine>,
    Option<Principal>,
    Option<std::net::IpAddr>,
    Option<RateGate>,
);

/// The caller of a WebSocket: the upgrade's key, else the one in `connection_init`. Its rate
/// allowance goes to `gate` for the operations to come.
async fn ws_caller(
    (engine, who, source, rates): WsOpener,
    gate: Arc<std::sync::OnceLock<RateGate>>,
    live: Arc<std::sync::OnceLock<(Arc<Engine>, String)>>,
    payload: serde_json::Value,
) -> async_graphql::Result<Data> {
    let who = match who {
        Some(p) => p,
        None => {
            let key = ["x-api-key", "apiKey", "Authorization"]
                .iter()
                .find_map(|k| payload.get(k).and_then(|v| v.as_str()))
                .map(|k| k.strip_prefix("Bearer ").unwrap_or(k).to_string());
            if key
                .as_deref()
                .is_some_and(|k| k.starts_with(gpuvisor_wire::SESSION_TOKEN_PREFIX))
            {
                // Console sessions are the REST API's (see api::limit_request).
                return Err(gql(EngineError::Forbidden(
                    "a console session is not accepted on /graphql: send an API key".into(),
                )));
            }
            // Wrong keys here count against the address like REST's (brute force).
            let limits = rates.as_ref().zip(source);
            if let Some((r, ip)) = limits {
                if let Some(e) = r.auth_blocked(ip) {
                    return Err(gql(e));
                }
            }
            match engine.authenticate(key.as_deref()).await {
                Ok(p) => p,
                Err(e) => {
                    if let (EngineError::Unauthorized(_), Some((r, ip))) = (&e, limits) {
                        r.auth_failed(ip);
                    }
                    return Err(gql(e));
                }
            }
        }
    };
    if let Some(r) = rates {
        let _ = gate.set(r.for_key(&who.key_id));
    }
    let _ = live.set((engine.clone(), who.key_id.clone()));
    let mut data = Data::default();
    data.insert(Caller {
        engine,
        who,
        source,
    });
    Ok(data)
}

/// The schema as a WebSocket runs it: each operation is charged to the caller's read
/// allowance; mutations are refused (they go over `POST /graphql`, where a client hanging up
/// cancels neither the mutation nor its audit row).
#[derive(Clone)]
struct WsExecutor {
    gate: Arc<std::sync::OnceLock<RateGate>>,
    /// The engine and the socket's key, set at `connection_init`: each operation checks the
    /// key is still live (a socket outlives a revocation otherwise).
    key: Arc<std::sync::OnceLock<(Arc<Engine>, String)>>,
}

fn refusal(e: EngineError) -> futures_util::stream::BoxStream<'static, async_graphql::Response> {
    let err = gql(e).into_server_error(async_graphql::Pos::default());
    futures_util::stream::once(std::future::ready(async_graphql::Response::from_errors(
        vec![err],
    )))
    .boxed()
}

impl async_graphql::Executor for WsExecutor {
    fn execute(
        &self,
        request: async_graphql::Request,
    ) -> impl std::future::Future<Output = async_graphql::Response> + Send {
        schema().execute(request)
    }

    fn execute_stream(
        &self,
        mut request: async_graphql::Request,
        data: Option<Arc<Data>>,
    ) -> futures_util::stream::BoxStream<'static, async_graphql::Response> {
        let (mutating, fields) = operation_cost(&mut request);
        if mutating {
            return refusal(invalid(format!(
                "mutations go over POST {PATH}, not the WebSocket (subscriptions and queries)"
            )));
        }
        if let Some(gate) = self.gate.get() {
            if let Some(e) = (0..fields.max(1)).find_map(|_| gate.check(false).err()) {
                return refusal(e);
            }
        }
        let run = schema().execute_stream_with_session_data(request, data.unwrap_or_default());
        let Some((engine, key)) = self.key.get().cloned() else {
            return run;
        };
        let mut run = Some(run);
        futures_util::stream::once(async move { engine.key_active(&key).await })
            .flat_map(move |live| match (live, run.take()) {
                (true, Some(r)) => r,
                _ => refusal(EngineError::Unauthorized(
                    "the API key is unknown or revoked".into(),
                )),
            })
            .boxed()
    }
}

/// Moves messages between the socket and async-graphql's protocol machine until either ends.
async fn pump(
    socket: axum::extract::ws::WebSocket,
    opener: WsOpener,
    protocol: WebSocketProtocols,
) {
    use axum::extract::ws::{CloseFrame, Message};
    let (mut sink, stream) = socket.split();
    let input = stream
        .take_while(|m| std::future::ready(matches!(m, Ok(m) if !matches!(m, Message::Close(_)))))
        .filter_map(|m| {
            std::future::ready(match m {
                Ok(Message::Text(t)) => Some(t.as_str().as_bytes().to_vec()),
                Ok(Message::Binary(b)) => Some(b.to_vec()),
                _ => None,
            })
        });
    let gate = Arc::new(std::sync::OnceLock::new());
    let live = Arc::new(std::sync::OnceLock::new());
    let executor = WsExecutor {
        gate: gate.clone(),
        key: live.clone(),
    };
    let mut gql = async_graphql::http::WebSocket::new(executor, input, protocol)
        .on_connection_init(move |payload| ws_caller(opener, gate, live, payload));
    while let Some(out) = gql.next().await {
        let msg = match out {
            WsMessage::Text(t) => Message::Text(t.into()),
            WsMessage::Close(code, reason) => Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })),
        };
        if sink.send(msg).await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_root_field_has_a_row_in_the_operation_table() {
        let q = "{ __schema { queryType { fields { name } } mutationType { fields { name } } subscriptionType { fields { name } } } }";
        let r = schema().execute(async_graphql::Request::new(q)).await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let v = r.data.into_json().unwrap();
        let mut fields = Vec::new();
        for (kind, ty) in [
            ("query", "queryType"),
            ("mutation", "mutationType"),
            ("subscription", "subscriptionType"),
        ] {
            for f in v["__schema"][ty]["fields"].as_array().unwrap() {
                fields.push((kind.to_string(), f["name"].as_str().unwrap().to_string()));
            }
        }
        let mut table: Vec<(String, String)> = FIELDS
            .iter()
            .map(|(k, f, _)| (k.to_string(), f.to_string()))
            .collect();
        fields.sort();
        table.sort();
        assert_eq!(
            fields, table,
            "the schema's root fields and graphql::FIELDS differ"
        );
    }

    /// docs/api/schema.graphql is the code's schema (CI runs this).
    #[test]
    fn the_committed_sdl_is_the_codes() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api/schema.graphql");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == sdl(),
            "docs/api/schema.graphql differs from the code's schema: regenerate it with `cargo run -p gpuvisor -- graphql-schema > docs/api/schema.graphql`"
        );
    }

    #[tokio::test]
    async fn introspection_fits_the_limits_and_a_deep_or_wide_query_does_not() {
        let intro = async_graphql::Request::new(INTROSPECTION);
        let r = schema().execute(intro).await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let mut deep = String::from("{ __schema { types { fields { type ");
        for _ in 0..MAX_DEPTH {
            deep.push_str("{ ofType ");
        }
        deep.push_str("{ name }");
        deep.push_str(&"}".repeat(MAX_DEPTH + 4));
        let r = schema().execute(async_graphql::Request::new(deep)).await;
        assert!(
            r.errors
                .iter()
                .any(|e| e.message.contains("nested too deep")),
            "{:?}",
            r.errors
        );
        let wide: String = (0..MAX_COMPLEXITY / 2 + 1)
            .map(|i| format!("a{i}: myself {{ role }} "))
            .collect();
        let r = schema()
            .execute(async_graphql::Request::new(format!("{{ {wide} }}")))
            .await;
        assert!(
            r.errors.iter().any(|e| e.message.contains("too complex")),
            "{:?}",
            r.errors
        );
    }

    #[test]
    fn a_request_is_charged_by_the_operation_it_runs_and_its_root_fields() {
        let cost = |q: &str, name: Option<&str>| {
            let mut r = async_graphql::Request::new(q);
            if let Some(n) = name {
                r = r.operation_name(n);
            }
            operation_cost(&mut r)
        };
        assert_eq!(cost("query A { myself { role } }", None), (false, 1));
        assert_eq!(
            cost("mutation { clusterStop(id: \"x\") { id } }", None),
            (true, 1)
        );
        let two = "query A { myself { role } } mutation B { clusterStop(id: \"x\") { id } }";
        assert_eq!(cost(two, Some("A")), (false, 1));
        assert_eq!(cost(two, Some("B")), (true, 1));
        assert!(
            cost(two, None).0,
            "unnamed among several: charged as the mutation"
        );
        // Aliases and fragments: each root field is charged.
        let aliased =
            "mutation { a: clusterStop(id: \"x\") { id } b: clusterStop(id: \"y\") { id } \
                       c: clusterTerminate(id: \"z\") { id } }";
        assert_eq!(cost(aliased, None), (true, 3));
        let fragment = "query { ...F ... on Query { gpus { uuid } } } \
                        fragment F on Query { a: usage { totalCost } b: usage { totalCost } }";
        assert_eq!(cost(fragment, None), (false, 3));
    }

    #[test]
    fn deploy_input_becomes_the_engines_request() {
        let d = DeployInput {
            image_name: Some("busybox".into()),
            shape: ShapeInput {
                gpu_count: Some(1),
                vcpu_count: Some(2),
                memory_in_gb: Some(0.5),
                container_disk_in_gb: Some(1.0),
                ports: Some("8888/http,22/tcp".into()),
                env: Some(vec![EnvInput {
                    key: "A".into(),
                    value: "b".into(),
                }]),
                volume_name: Some("data".into()),
                volume_in_gb: Some(1.0),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = create_request(&d, true).unwrap();
        assert_eq!((r.gpus, r.vcpus, r.memory), (Some(1), 2, 512 << 20));
        assert_eq!(r.env, vec!["A=b".to_string()]);
        assert_eq!(r.ports.len(), 2);
        assert_eq!(r.volumes[0].path, "/workspace");
        assert_eq!(r.volumes[0].size, Some(1 << 30));
        assert!(r.interruptible && r.priority == wire::PriorityClass::Normal);
        // Left out: 0, the template's or the daemon's default (engine::templates::merge).
        let bare = create_request(
            &DeployInput {
                template_id: Some("t".into()),
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert_eq!((bare.vcpus, bare.memory, bare.container_disk), (0, 0, 0));
        assert_eq!(bare.template.as_deref(), Some("t"));
        assert!(bare.image.is_empty() && bare.runtime.is_none());
        let bad = DeployInput {
            shape: ShapeInput {
                volume_name: None,
                ..d.shape.clone()
            },
            ..d
        };
        assert!(create_request(&bad, false).is_err());
    }

    /// The introspection query GraphiQL sends.
    const INTROSPECTION: &str = r#"
    query IntrospectionQuery {
      __schema {
        queryType { name } mutationType { name } subscriptionType { name }
        types { ...FullType }
        directives { name description locations args { ...InputValue } }
      }
    }
    fragment FullType on __Type {
      kind name description
      fields(includeDeprecated: true) {
        name description args { ...InputValue } type { ...TypeRef } isDeprecated deprecationReason
      }
      inputFields { ...InputValue }
      interfaces { ...TypeRef }
      enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason }
      possibleTypes { ...TypeRef }
    }
    fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue }
    fragment TypeRef on __Type {
      kind name
      ofType { kind name ofType { kind name ofType { kind name ofType { kind name
        ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } } }
    }
    "#;
}
