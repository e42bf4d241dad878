//! The REST API: the only code that knows HTTP and JSON. Each handler authenticates, calls one
//! engine command and maps the engine's error code to a status. No business rule lives here.

use crate::openapi::{self, ArgDoc, OpDoc, OutDoc};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::{Json, Router};
use gpuvisor_control::engine::audit::AuditEvent;
use gpuvisor_control::engine::authz::Op;
use gpuvisor_control::{Engine, EngineError, Principal};
use gpuvisor_wire::{self as wire, code, API_KEY_HEADER};
use serde::Deserialize;
use std::sync::Arc;

type Eng = Arc<Engine>;

/// An engine error on its way out as `{"error":{"code","message"}}`.
pub struct ApiError(EngineError);

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        Self(e)
    }
}

pub fn status_for(code_: &str) -> StatusCode {
    match code_ {
        code::UNAUTHORIZED => StatusCode::UNAUTHORIZED,
        code::FORBIDDEN => StatusCode::FORBIDDEN,
        code::NOT_FOUND => StatusCode::NOT_FOUND,
        code::INVALID_ARGUMENT => StatusCode::BAD_REQUEST,
        code::ALREADY_EXISTS | code::IN_USE | code::INVALID_STATE => StatusCode::CONFLICT,
        // What this host cannot do (no MIG control, no limiter, no VM runtime) is no server
        // fault and no reason to retry: a 4xx, like a request too big for it.
        code::INSUFFICIENT_RESOURCES | code::QUOTA_EXCEEDED | code::UNAVAILABLE => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        code::RESOURCE_EXHAUSTED => StatusCode::TOO_MANY_REQUESTS,
        code::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
        code::DEADLINE_EXCEEDED => StatusCode::REQUEST_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let c = self.0.code();
        if c == code::INTERNAL {
            tracing::error!("internal error: {}", self.0);
        }
        let body = wire::ErrorBody {
            error: wire::ApiError {
                code: c.to_string(),
                message: self.0.to_string(),
            },
        };
        (status_for(c), Json(body)).into_response()
    }
}

type R<T> = Result<Json<T>, ApiError>;

/// The API key of a request: `x-api-key`, else `Authorization: Bearer`.
fn api_key(h: &HeaderMap) -> Option<&str> {
    h.get(API_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            h.get("authorization")
                .and_then(|v| v.to_str().ok())
                // RunPod's documented curl sends the key bare: `authorization: <key>`; only
                // a value that is one of our keys is taken so (`Basic ...` stays no key).
                .and_then(|v| match v.strip_prefix("Bearer ") {
                    Some(k) => Some(k),
                    None => v.starts_with("gv_").then_some(v),
                })
        })
}

/// A request's credential: an API key from a header, else the web console's session cookie.
struct Credential<'a> {
    secret: &'a str,
    /// From the cookie: the browser sends it by itself, so [`cross_site`] applies.
    cookie: bool,
}

fn credential(h: &HeaderMap) -> Option<Credential<'_>> {
    if let Some(k) = api_key(h) {
        return Some(Credential {
            secret: k,
            cookie: false,
        });
    }
    session_cookie(h).map(|secret| Credential {
        secret,
        cookie: true,
    })
}

/// The console's session token from the `Cookie` header(s), if any.
fn session_cookie(h: &HeaderMap) -> Option<&str> {
    h.get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (name, value) = c.trim().split_once('=')?;
            (name == wire::SESSION_COOKIE && value.starts_with(wire::SESSION_TOKEN_PREFIX))
                .then_some(value)
        })
}

/// Whether `Origin` names the host this request was sent to (the console's own origin).
fn same_origin(h: &HeaderMap) -> bool {
    let header = |n| h.get(n).and_then(|v| v.to_str().ok());
    match (
        header(axum::http::header::ORIGIN),
        header(axum::http::header::HOST),
    ) {
        (Some(origin), Some(host)) => origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"))
            .is_some_and(|o| o.eq_ignore_ascii_case(host)),
        _ => false,
    }
}

/// The cross-site checks of a request authenticated by the session cookie (a browser attaches
/// it by itself, so another site could try to ride on it): a WebSocket must come from the
/// console's own origin (browsers always send `Origin` on one, and SameSite does not cover
/// every case); any other method than GET/HEAD must carry [`wire::CSRF_HEADER`] (which a
/// cross-site page cannot send without a CORS preflight, never granted here) and no foreign
/// `Origin`. Reads need neither: the cookie is SameSite=Strict and the answers are not
/// readable cross-origin.
fn cross_site(method: &axum::http::Method, h: &HeaderMap) -> Result<(), EngineError> {
    let upgrade = h
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if upgrade && !same_origin(h) {
        return Err(EngineError::Forbidden(
            "a WebSocket authenticated by the console's session cookie must come from the \
             console's own origin"
                .into(),
        ));
    }
    if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        return Ok(());
    }
    let marked = h
        .get(wire::CSRF_HEADER)
        .is_some_and(|v| v.as_bytes() == b"1");
    if !marked || (h.contains_key(axum::http::header::ORIGIN) && !same_origin(h)) {
        return Err(EngineError::Forbidden(format!(
            "a {method} authenticated by the console's session cookie must carry {}: 1 and come \
             from the console's own origin (cross-site requests are refused)",
            wire::CSRF_HEADER
        )));
    }
    Ok(())
}

/// The caller of a request, from its credential (key or session cookie, with the cookie's
/// cross-site checks); `Ok(None)` without one.
async fn principal_of(
    e: &Engine,
    method: &axum::http::Method,
    h: &HeaderMap,
) -> Result<Option<Principal>, EngineError> {
    let Some(c) = credential(h) else {
        return Ok(None);
    };
    if c.cookie {
        cross_site(method, h)?;
    }
    e.authenticate(Some(c.secret)).await.map(Some)
}

/// The caller, authenticated once per request: by [`limit_request`] when the limits are in
/// front (it leaves the principal in the request's extensions), else here.
pub struct Who(pub Principal);

impl axum::extract::FromRequestParts<Eng> for Who {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        e: &Eng,
    ) -> Result<Self, Self::Rejection> {
        if let Some(p) = parts.extensions.get::<Principal>() {
            return Ok(Who(p.clone()));
        }
        match principal_of(e, &parts.method, &parts.headers).await? {
            Some(p) => Ok(Who(p)),
            // The engine's own words for a missing key.
            None => Ok(Who(e.authenticate(None).await?)),
        }
    }
}

/// Query parameters whose decoding errors become our `invalid_argument` answer (axum's own
/// rejection is plain text, outside the API's error shape).
pub struct Query<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S>
    for Query<T>
{
    type Rejection = Response;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::try_from_uri(&parts.uri) {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(rej) => Err(ApiError(EngineError::InvalidArgument(format!(
                "bad query: {}",
                rej.body_text()
            )))
            .into_response()),
        }
    }
}

/// A JSON body whose decoding errors become our `invalid_argument` answer.
pub struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = Response;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rej) => Err(ApiError(EngineError::InvalidArgument(format!(
                "bad request body: {}",
                rej.body_text()
            )))
            .into_response()),
        }
    }
}

/// The router and the table of its routes, built by the same calls so they cannot drift: the
/// tenancy test (tests/attacks/tenancy.rs) reads the table (`gpuvisor routes`) and fails on a
/// route it has no row for.
struct Routes {
    router: Router<Eng>,
    table: Vec<(&'static str, &'static str, Option<Op>)>,
    /// Each route described from its handler's types (the OpenAPI document).
    docs: Vec<openapi::RouteDoc>,
    schemas: schemars::SchemaGenerator,
}

impl Routes {
    /// Adds a route of engine operation `op` (`None`: no operation, e.g. the health probe).
    fn add<H, T, D>(
        mut self,
        method: &'static str,
        path: &'static str,
        op: impl Into<Option<Op>>,
        handler: H,
    ) -> Self
    where
        H: axum::handler::Handler<T, Eng> + openapi::Describe<D>,
        T: 'static,
    {
        let op = op.into();
        self.docs.push(openapi::RouteDoc {
            method,
            path,
            op: op.map(Op::name),
            public: path == "/v1/health"
                || path == OPENAPI_PATH
                || (method == "POST" && path == SESSIONS_PATH),
            doc: handler.describe(&mut self.schemas),
        });
        let filter_for = |m| match m {
            "GET" => MethodFilter::GET,
            "POST" => MethodFilter::POST,
            "DELETE" => MethodFilter::DELETE,
            "PUT" => MethodFilter::PUT,
            "PATCH" => MethodFilter::PATCH,
            other => unreachable!("route method {other} is not one of ours"),
        };
        let mut route = on(filter_for(method), handler);
        if path.starts_with("/v2/") {
            // The queue API takes RunPod's payloads (`runsync` up to 20 MiB).
            route = route.layer(axum::extract::DefaultBodyLimit::max(SERVERLESS_MAX_BODY));
        }
        self.router = self.router.route(path, route);
        self.table.push((method, path, op));
        self
    }
}

fn routes() -> Routes {
    Routes {
        router: Router::new(),
        table: Vec::new(),
        docs: Vec::new(),
        schemas: openapi::generator(),
    }
    .add("GET", "/v1/health", None, health)
    .add("GET", OPENAPI_PATH, None, openapi_json)
    .add("GET", "/v1/tenants", Op::ListTenants, list_tenants)
    .add("POST", "/v1/tenants", Op::CreateTenant, create_tenant)
    .add("GET", "/v1/tenants/{name}", Op::GetTenant, get_tenant)
    .add(
        "PUT",
        "/v1/tenants/{name}/policy",
        Op::SetTenantPolicy,
        set_tenant_policy,
    )
    .add(
        "PUT",
        "/v1/tenants/{name}/limits",
        Op::SetTenantLimits,
        set_tenant_limits,
    )
    .add(
        "DELETE",
        "/v1/tenants/{name}",
        Op::DeleteTenant,
        delete_tenant,
    )
    // The web console's login: an API key for a session cookie (no key needed to ask).
    .add("POST", SESSIONS_PATH, None, login)
    .add("GET", "/v1/sessions/current", None, current_session)
    .add("DELETE", "/v1/sessions/current", None, logout)
    .add("GET", "/v1/keys", Op::ListKeys, list_keys)
    .add("POST", "/v1/keys", Op::CreateKey, create_key)
    .add("DELETE", "/v1/keys/{id}", Op::RevokeKey, revoke_key)
    .add("GET", "/v1/gpus", Op::ListGpus, list_gpus)
    .add("GET", "/v1/gpu-types", Op::ListGpuTypes, gpu_types)
    .add("GET", "/v1/usage", Op::Usage, usage)
    .add("POST", "/v1/gpus/{id}/bind-vfio", Op::BindVfio, bind_vfio)
    .add("POST", "/v1/gpus/{id}/release", Op::ReleaseGpu, release_gpu)
    .add("POST", "/v1/gpus/{id}/cordon", Op::CordonGpu, cordon_gpu)
    .add(
        "DELETE",
        "/v1/gpus/{id}/cordon",
        Op::UncordonGpu,
        uncordon_gpu,
    )
    .add("GET", "/v1/gpus/{id}/mig", Op::MigState, mig_state)
    .add("POST", "/v1/gpus/{id}/mig", Op::MigCreate, mig_create)
    .add(
        "DELETE",
        "/v1/gpus/{id}/mig/{gi}",
        Op::MigDestroy,
        mig_destroy,
    )
    .add("GET", "/metrics", Op::ScrapeMetrics, metrics)
    .add("GET", "/v1/gpus/stats", Op::GpuStats, gpu_stats)
    .add("GET", "/v1/host/checks", Op::HostChecks, host_checks)
    .add("GET", "/v1/gpus/events", Op::GpuEvents, gpu_events)
    .add("GET", "/v1/gpus/{id}/metrics", Op::GpuMetrics, gpu_metrics)
    .add(
        "GET",
        "/v1/instances/{id}/metrics",
        Op::InstanceMetrics,
        instance_metrics,
    )
    .add(
        "GET",
        "/v1/instances/{id}/metrics/ws",
        Op::InstanceMetrics,
        metrics_stream,
    )
    .add("GET", "/v1/images", Op::ListImages, list_images)
    .add("POST", "/v1/images", Op::ImportImage, import_image)
    .add("DELETE", "/v1/images/{name}", Op::RemoveImage, remove_image)
    // Registry pulls, uploads, publishing, credentials (handlers below `remove_image`).
    .add("POST", UPLOAD_PATH, Op::UploadImage, upload_image)
    .add(
        "POST",
        "/v1/images/{name}/publish",
        Op::PublishImage,
        publish_image,
    )
    .add("POST", "/v1/images/pulls", Op::StartPull, start_pull)
    .add("GET", "/v1/images/pulls/{id}", Op::GetPull, get_pull)
    .add("GET", "/v1/registries", Op::ListRegistries, list_registries)
    .add("POST", "/v1/registries", Op::RegistryLogin, registry_login)
    .add(
        "DELETE",
        "/v1/registries/{host}",
        Op::RegistryLogout,
        registry_logout,
    )
    .add("GET", "/v1/templates", Op::ListTemplates, list_templates)
    .add("POST", "/v1/templates", Op::CreateTemplate, create_template)
    .add("GET", "/v1/templates/{name}", Op::GetTemplate, get_template)
    .add(
        "DELETE",
        "/v1/templates/{name}",
        Op::RemoveTemplate,
        remove_template,
    )
    .add("GET", "/v1/volumes", Op::ListVolumes, list_volumes)
    .add("POST", "/v1/volumes", Op::CreateVolume, create_volume)
    .add(
        "DELETE",
        "/v1/volumes/{name}",
        Op::RemoveVolume,
        remove_volume,
    )
    .add("GET", "/v1/snapshots", Op::ListSnapshots, list_snapshots)
    .add("GET", "/v1/snapshots/{snap}", Op::GetSnapshot, get_snapshot)
    .add(
        "DELETE",
        "/v1/snapshots/{snap}",
        Op::DeleteSnapshot,
        delete_snapshot,
    )
    .add("GET", "/v1/instances", Op::ListInstances, list_instances)
    .add("POST", "/v1/instances", Op::CreateInstance, create_instance)
    .add("GET", "/v1/instances/{id}", Op::GetInstance, get_instance)
    .add(
        "DELETE",
        "/v1/instances/{id}",
        Op::TerminateInstance,
        terminate_instance,
    )
    .add(
        "POST",
        "/v1/instances/{id}/stop",
        Op::StopInstance,
        stop_instance,
    )
    .add(
        "POST",
        "/v1/instances/{id}/start",
        Op::StartInstance,
        start_instance,
    )
    .add(
        "POST",
        "/v1/instances/{id}/scale",
        Op::ScaleInstance,
        scale_instance,
    )
    .add(
        "POST",
        "/v1/instances/{id}/snapshots",
        Op::SnapshotInstance,
        create_snapshot,
    )
    .add(
        "POST",
        "/v1/instances/{id}/restore",
        Op::RestoreInstance,
        restore_instance,
    )
    .add(
        "POST",
        "/v1/instances/{id}/migrate",
        Op::MigrateInstance,
        migrate_instance,
    )
    .add(
        "POST",
        "/v1/migrations",
        Op::ReceiveMigration,
        accept_migration,
    )
    .add(
        "GET",
        "/v1/migrations/{id}",
        Op::ReceiveMigration,
        migration_status,
    )
    .add(
        "POST",
        "/v1/migrations/{id}/run",
        Op::ReceiveMigration,
        run_migration,
    )
    .add(
        "DELETE",
        "/v1/migrations/{id}",
        Op::ReceiveMigration,
        drop_migration,
    )
    .add(
        "GET",
        "/v1/migrations/{id}/channels/{channel}",
        Op::ReceiveMigration,
        migration_channel,
    )
    .add(
        "POST",
        "/v1/instances/{id}/links",
        Op::CreateLink,
        create_link,
    )
    .add("GET", "/v1/instances/{id}/logs", Op::InstanceLogs, logs)
    .add("POST", "/v1/instances/{id}/exec", Op::Exec, exec)
    .add(
        "GET",
        "/v1/instances/{id}/exec/ws",
        Op::ExecSession,
        exec_session,
    )
    .add(
        "GET",
        "/v1/instances/{id}/console/ws",
        Op::Console,
        console_session,
    )
    .add(
        "GET",
        "/v1/instances/{id}/vnc/ws",
        Op::Display,
        display_session,
    )
    .add(
        "GET",
        "/v1/instances/{id}/events",
        Op::InstanceEvents,
        events,
    )
    .add("GET", "/v1/endpoints", Op::ListEndpoints, list_endpoints)
    .add("POST", "/v1/endpoints", Op::CreateEndpoint, create_endpoint)
    .add("GET", "/v1/endpoints/{id}", Op::GetEndpoint, get_endpoint)
    .add(
        "PATCH",
        "/v1/endpoints/{id}",
        Op::UpdateEndpoint,
        update_endpoint,
    )
    .add(
        "DELETE",
        "/v1/endpoints/{id}",
        Op::RemoveEndpoint,
        remove_endpoint,
    )
    // The queue API, RunPod's paths and shapes (`runpod.Endpoint` with its base URL here).
    .add("POST", "/v2/{endpoint}/run", Op::RunJob, run_job)
    .add("POST", "/v2/{endpoint}/runsync", Op::RunJob, run_sync)
    .add(
        "GET",
        "/v2/{endpoint}/status/{job}",
        Op::JobStatus,
        job_status,
    )
    .add(
        "POST",
        "/v2/{endpoint}/status/{job}",
        Op::JobStatus,
        job_status,
    )
    .add(
        "GET",
        "/v2/{endpoint}/stream/{job}",
        Op::JobStatus,
        job_stream,
    )
    .add(
        "POST",
        "/v2/{endpoint}/stream/{job}",
        Op::JobStatus,
        job_stream,
    )
    .add(
        "POST",
        "/v2/{endpoint}/cancel/{job}",
        Op::CancelJob,
        cancel_job,
    )
    .add(
        "POST",
        "/v2/{endpoint}/retry/{job}",
        Op::RetryJob,
        retry_job,
    )
    .add(
        "POST",
        "/v2/{endpoint}/purge-queue",
        Op::PurgeQueue,
        purge_queue,
    )
    .add(
        "GET",
        "/v2/{endpoint}/health",
        Op::EndpointHealth,
        endpoint_health,
    )
    .add("GET", "/v1/audit", Op::AuditList, audit_list)
    .add("GET", "/v1/audit/verify", Op::AuditVerify, audit_verify)
    // The GraphQL front end: each of its fields names its own operation (`gpuvisor
    // graphql-ops`); the handler charges the rate and records the audit per request.
    .add("POST", crate::graphql::PATH, None, crate::graphql::http)
    .add("GET", crate::graphql::PATH, None, crate::graphql::websocket)
}

pub fn router(engine: Eng) -> Router {
    routes()
        .router
        // The web console: its page and files (not API routes: no key, no operation).
        .route("/", axum::routing::get(crate::console::index))
        .route("/assets/{*file}", axum::routing::get(crate::console::asset))
        .fallback(|| async {
            ApiError(EngineError::NotFound("no such route (see /v1/...)".into())).into_response()
        })
        .with_state(engine)
}

/// Where the OpenAPI document is served (without a key, like the health probe).
pub const OPENAPI_PATH: &str = "/openapi.json";

/// The OpenAPI 3.1 document of every route (built once).
pub fn openapi_document() -> &'static serde_json::Value {
    static DOC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let mut r = routes();
        openapi::document(&r.docs, &mut r.schemas)
    })
}

async fn openapi_json() -> Json<&'static serde_json::Value> {
    Json(openapi_document())
}

/// Every route as (method, path template, operation), in the order the router adds them.
pub fn route_table() -> Vec<(&'static str, &'static str, Option<Op>)> {
    routes().table
}

/// The operation of each (method, path template).
fn route_ops() -> &'static std::collections::HashMap<(&'static str, &'static str), Op> {
    static OPS: std::sync::OnceLock<std::collections::HashMap<(&'static str, &'static str), Op>> =
        std::sync::OnceLock::new();
    OPS.get_or_init(|| {
        route_table()
            .into_iter()
            .filter_map(|(m, p, op)| Some(((m, p), op?)))
            .collect()
    })
}

async fn audit_list(
    State(e): State<Eng>,
    Who(p): Who,
    Query(q): Query<wire::AuditQuery>,
) -> R<Vec<wire::AuditEntry>> {
    Ok(Json(e.audit_list(&p, &q).await?))
}

async fn audit_verify(State(e): State<Eng>, Who(p): Who) -> R<wire::AuditVerification> {
    Ok(Json(e.audit_verify(&p).await?))
}

async fn health(State(e): State<Eng>) -> Json<wire::Health> {
    Json(wire::Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        node: e.node_id().to_string(),
    })
}

/// Where the console logs in (answered without a key, like the health probe).
pub const SESSIONS_PATH: &str = "/v1/sessions";

/// A JSON answer that sets (or clears) the console's session cookie.
pub struct WithCookie<T>(String, StatusCode, T);

impl<T: IntoResponse> IntoResponse for WithCookie<T> {
    fn into_response(self) -> Response {
        (
            self.1,
            [
                (axum::http::header::SET_COOKIE, self.0),
                (axum::http::header::CACHE_CONTROL, "no-store".into()),
            ],
            self.2,
        )
            .into_response()
    }
}

/// The `Set-Cookie` value of a session: the browser sends it back only to this host name
/// (`__Host-`, no Domain; any port of it, as cookies go), only from this site's own pages
/// (SameSite=Strict), never to page scripts (HttpOnly), only over TLS (Secure; browsers also
/// keep it on plain http://127.0.0.1). `None` clears it.
fn session_set_cookie(token: Option<&str>) -> String {
    let (value, max_age) = match token {
        Some(t) => (
            t,
            gpuvisor_control::engine::websession::SESSION_TTL_MS / 1000,
        ),
        None => ("", 0),
    };
    format!(
        "{}={value}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict",
        wire::SESSION_COOKIE
    )
}

/// The session token a request carries (cookie, or a `gvs_` token as its key).
fn session_token(h: &HeaderMap) -> Result<&str, ApiError> {
    credential(h)
        .map(|c| c.secret)
        .filter(|t| t.starts_with(wire::SESSION_TOKEN_PREFIX))
        .ok_or_else(|| {
            ApiError(EngineError::InvalidArgument(
                "this request carries an API key, not a console session".into(),
            ))
        })
}

async fn login(
    State(e): State<Eng>,
    Body(req): Body<wire::LoginRequest>,
) -> Result<WithCookie<Json<wire::WebSession>>, ApiError> {
    let (token, session) = e.login(&req.api_key).await?;
    Ok(WithCookie(
        session_set_cookie(Some(&token)),
        StatusCode::OK,
        Json(session),
    ))
}

async fn current_session(State(e): State<Eng>, Who(_): Who, h: HeaderMap) -> R<wire::WebSession> {
    Ok(Json(e.web_session(session_token(&h)?).await?))
}

async fn logout(
    State(e): State<Eng>,
    Who(_): Who,
    h: HeaderMap,
) -> Result<WithCookie<StatusCode>, ApiError> {
    e.logout(session_token(&h)?).await?;
    Ok(WithCookie(
        session_set_cookie(None),
        StatusCode::NO_CONTENT,
        StatusCode::NO_CONTENT,
    ))
}

async fn list_tenants(State(e): State<Eng>, Who(p): Who) -> R<Vec<wire::Tenant>> {
    Ok(Json(e.list_tenants(&p).await?))
}

/// What a call made or did, beyond its path, for its audit row (a response extension the
/// middleware reads; clients never see it).
#[derive(Clone, Debug)]
pub struct AuditSubject(pub String);

/// `value` answered with `subject` for the audit log.
type Audited<T> = Result<(axum::Extension<AuditSubject>, Json<T>), ApiError>;

fn audited<T>(subject: String, value: T) -> Audited<T> {
    Ok((axum::Extension(AuditSubject(subject)), Json(value)))
}

async fn create_tenant(
    State(e): State<Eng>,
    Who(p): Who,
    Body(b): Body<wire::CreateTenant>,
) -> Audited<wire::Tenant> {
    let t = e.create_tenant(&p, &b).await?;
    audited(format!("tenant {} ({})", t.name, t.id), t)
}

async fn get_tenant(
    State(e): State<Eng>,
    Who(p): Who,
    Path(name): Path<String>,
) -> R<wire::Tenant> {
    Ok(Json(e.get_tenant(&p, &name).await?))
}

#[derive(Deserialize, schemars::JsonSchema)]
struct DeleteTenantQuery {
    #[serde(default)]
    cascade: bool,
}

async fn delete_tenant(
    State(e): State<Eng>,
    Who(p): Who,
    Path(name): Path<String>,
    Query(q): Query<DeleteTenantQuery>,
) -> Audited<wire::TenantRemoval> {
    let r = e.delete_tenant(&p, &name, q.cascade).await?;
    audited(format!("cascade={}", q.cascade), r)
}

async fn set_tenant_policy(
    State(e): State<Eng>,
    Who(p): Who,
    Path(name): Path<String>,
    Body(b): Body<wire::TenantPolicy>,
) -> R<wire::Tenant> {
    Ok(Json(e.set_tenant_policy(&p, &name, &b).await?))
}

async fn set_tenant_limits(
    State(e): State<Eng>,
    Who(p): Who,
    Path(name): Path<String>,
    Body(b): Body<wire::TenantPolicy>,
) -> R<wire::Tenant> {
    Ok(Json(e.set_tenant_limits(&p, &name, &b).await?))
}

async fn list_keys(State(e): State<Eng>, Who(p): Who) -> R<Vec<wire::ApiKey>> {
    Ok(Json(e.list_keys(&p).await?))
}

async fn create_key(
    State(e): State<Eng>,
    Who(p): Who,
    Body(b): Body<wire::CreateKey>,
) -> Audited<wire::CreatedKey> {
    let k = e.create_key(&p, &b).await?;
    let subject = format!(
        "key {} ({}, tenant {})",
        k.key.id,
        k.key.role.as_str(),
        k.key.tenant
    );
    audited(subject, k)
}

async fn revoke_key(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
) -> Audited<wire::ApiKey> {
    let k = e.revoke_key(&p, &id).await?;
    audited(format!("{} key of tenant {}", k.role.as_str(), k.tenant), k)
}

async fn bind_vfio(State(e): State<Eng>, Who(p): Who, Path(id): Path<String>) -> R<wire::Gpu> {
    Ok(Json(e.bind_vfio(&p, &id).await?))
}

async fn release_gpu(State(e): State<Eng>, Who(p): Who, Path(id): Path<String>) -> R<wire::Gpu> {
    Ok(Json(e.release_gpu(&p, &id).await?))
}

async fn cordon_gpu(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    body: Option<Json<wire::CordonGpu>>,
) -> R<wire::Gpu> {
    let reason = body.as_ref().and_then(|b| b.reason.as_deref());
    Ok(Json(e.cordon_gpu(&p, &id, reason).await?))
}

async fn uncordon_gpu(State(e): State<Eng>, Who(p): Who, Path(id): Path<String>) -> R<wire::Gpu> {
    Ok(Json(e.uncordon_gpu(&p, &id).await?))
}

async fn mig_state(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
) -> R<wire::mig::MigState> {
    Ok(Json(e.mig_state(&p, &id).await?))
}

async fn mig_create(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Body(req): Body<wire::mig::CreateMigInstance>,
) -> R<wire::mig::GpuInstance> {
    Ok(Json(e.mig_create(&p, &id, &req.profile).await?))
}

async fn mig_destroy(
    State(e): State<Eng>,
    Who(p): Who,
    Path((id, gi)): Path<(String, u32)>,
) -> R<wire::mig::GpuInstance> {
    Ok(Json(e.mig_destroy(&p, &id, gi).await?))
}

async fn list_gpus(State(e): State<Eng>, Who(p): Who) -> R<Vec<wire::Gpu>> {
    Ok(Json(e.list_gpus(&p).await?))
}

async fn list_templates(State(e): State<Eng>, Who(p): Who) -> R<Vec<wire::Template>> {
    Ok(Json(e.list_templates(&p).await?))
}

async fn create_template(
    State(e): State<Eng>,
    Who(p): Who,
    Body(b): Body<wire::CreateTemplate>,
) -> R<wire::Template> {
    Ok(Json(e.create_template(&p, &b).await?))
}

async fn get_template(
    State(e): State<Eng>,
    Who(p): Who,
    Path(name): Path<String>,
) -> R<wire::Template> {
    Ok(Json(e.get_template(&p, &name).await?))
}

async fn remove_template(
    State(e): State<Eng>,
    Who(p): Who,
    Path(name): Path<String>,
) -> R<wire::Template> {
    Ok(Json(e.remove_template(&p, &name).await?))
}

async fn gpu_types(State(e): State<Eng>, Who(p): Who) -> R<Vec<wire::GpuType>> {
    Ok(Json(e.gpu_types(&p).await?))
}

async fn usage(
    State(e): State<Eng>,
    Who(p): Who,
    Query(q): Query<wire::UsageQuery>,
) -> R<wire::UsageReport> {
    Ok(Json(e.usage(&p, &q).await?))
}

async fn list_images(State(e): State<Eng>, Who(p): Who) -> R<Vec<wire::Image>> {
    Ok(Json(e.list_images(&p).await?))
}

async fn import_image(
    State(e): State<Eng>,
    Who(p): Who,
    Body(b): Body<wire::ImportImage>,
) -> R<wire::Image> {
    Ok(Json(e.import_image(&p, &b).await?))
}

async fn remove_image(
    State(e): State<Eng>,
    Query(q): Query<OwnerQuery>,
    Who(p): Who,
    Path(name): Path<String>,
) -> R<wire::Image> {
    Ok(Json(e.remove_image(&p, &name, q.tenant.as_deref()).await?))
}

// ---- registry pulls, uploads, publishing, credentials -------------------------------------

/// The upload route: its body is streamed (not buffered by [`limit_request`]) and bounded by
/// [`ApiLimits::max_upload`].
pub const UPLOAD_PATH: &str = "/v1/images/upload";

/// `?tenant=` picks among tenants' private images of one name (admin).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct OwnerQuery {
    tenant: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct UploadQuery {
    name: Option<String>,
}

/// The upload bounds, from [`ApiLimits`], for the handler.
#[derive(Clone, Copy)]
struct UploadLimits {
    max: u64,
    idle: std::time::Duration,
}

static UPLOAD_LIMITS: std::sync::OnceLock<UploadLimits> = std::sync::OnceLock::new();

/// `POST /v1/images/upload?name=N`: the body is an image archive (OCI layout or docker save
/// tar, optionally gzip) streamed to the daemon (`gpuvisor image import ./x.tar`).
async fn upload_image(
    State(e): State<Eng>,
    Who(p): Who,
    Query(q): Query<UploadQuery>,
    body: axum::body::Body,
) -> R<wire::Image> {
    use http_body_util::BodyExt;
    let limits = UPLOAD_LIMITS.get().copied().unwrap_or(UploadLimits {
        max: 64 << 30,
        idle: std::time::Duration::from_secs(30),
    });
    let mut up = e.begin_upload(&p, q.name.as_deref()).await?;
    let mut body = body;
    loop {
        let frame = match tokio::time::timeout(limits.idle, body.frame()).await {
            Err(_) => {
                return Err(EngineError::DeadlineExceeded(format!(
                    "the upload stalled: no data for {} s (limits.body_timeout)",
                    limits.idle.as_secs()
                ))
                .into())
            }
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                return Err(EngineError::InvalidArgument(format!("upload body: {err}")).into())
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let written = up.write(data.to_vec()).await?;
        if written > limits.max {
            return Err(EngineError::PayloadTooLarge(format!(
                "the upload is larger than {} bytes (limits.max_upload)",
                limits.max
            ))
            .into());
        }
    }
    Ok(Json(e.finish_upload(up).await?))
}

async fn publish_image(
    State(e): State<Eng>,
    Who(p): Who,
    Path(name): Path<String>,
    Query(q): Query<OwnerQuery>,
) -> R<wire::Image> {
    Ok(Json(e.publish_image(&p, &name, q.tenant.as_deref()).await?))
}

async fn start_pull(
    State(e): State<Eng>,
    Who(p): Who,
    Body(b): Body<wire::PullImage>,
) -> R<wire::ImagePull> {
    Ok(Json(e.start_pull(&p, &b).await?))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct PullQuery {
    since: Option<u64>,
    timeout_ms: Option<u64>,
}

async fn get_pull(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Query(q): Query<PullQuery>,
) -> R<wire::ImagePull> {
    let timeout = std::time::Duration::from_millis(q.timeout_ms.unwrap_or(0));
    Ok(Json(e.get_pull(&p, &id, q.since, timeout).await?))
}

async fn list_registries(State(e): State<Eng>, Who(p): Who) -> R<Vec<wire::RegistryCredential>> {
    Ok(Json(e.registry_list(&p).await?))
}

async fn registry_login(
    State(e): State<Eng>,
    Who(p): Who,
    Body(b): Body<wire::RegistryLogin>,
) -> R<wire::RegistryCredential> {
    Ok(Json(e.registry_login(&p, &b).await?))
}

async fn registry_logout(
    State(e): State<Eng>,
    Who(p): Who,
    Path(host): Path<String>,
) -> R<wire::RegistryCredential> {
    Ok(Json(e.registry_logout(&p, &host).await?))
}

async fn list_volumes(State(e): State<Eng>, Who(p): Who) -> R<Vec<wire::Volume>> {
    Ok(Json(e.list_volumes(&p).await?))
}

async fn create_volume(
    State(e): State<Eng>,
    Who(p): Who,
    Body(b): Body<wire::CreateVolume>,
) -> Audited<wire::Volume> {
    let v = e.create_volume(&p, &b).await?;
    audited(format!("volume {}", v.name), v)
}

async fn remove_volume(
    State(e): State<Eng>,
    Who(p): Who,
    Path(name): Path<String>,
) -> R<wire::Volume> {
    Ok(Json(e.remove_volume(&p, &name).await?))
}

async fn list_snapshots(State(e): State<Eng>, Who(p): Who) -> R<Vec<wire::Snapshot>> {
    Ok(Json(e.list_snapshots(&p).await?))
}

async fn get_snapshot(
    State(e): State<Eng>,
    Who(p): Who,
    Path(snap): Path<String>,
) -> R<wire::Snapshot> {
    Ok(Json(e.get_snapshot(&p, &snap).await?))
}

async fn delete_snapshot(
    State(e): State<Eng>,
    Who(p): Who,
    Path(snap): Path<String>,
) -> Audited<wire::Snapshot> {
    let s = e.delete_snapshot(&p, &snap).await?;
    audited(format!("snapshot {} ({})", s.id, s.name), s)
}

/// Answers once the snapshot is complete (the copy may take a while for large disks).
async fn create_snapshot(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Body(b): Body<wire::CreateSnapshot>,
) -> Result<
    (
        StatusCode,
        axum::Extension<AuditSubject>,
        Json<wire::Snapshot>,
    ),
    ApiError,
> {
    let s = e.create_snapshot(&p, &id, &b).await?;
    let subject = AuditSubject(format!(
        "snapshot {} ({}) of instance {}",
        s.id, s.name, s.instance_id
    ));
    Ok((StatusCode::CREATED, axum::Extension(subject), Json(s)))
}

/// Stops the instance if it runs, rolls its volumes back and starts it from the snapshot;
/// answers the instance, starting (`--wait` follows it).
async fn restore_instance(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Body(b): Body<wire::RestoreInstance>,
) -> Audited<wire::Instance> {
    let i = e.restore_instance(&p, &id, &b).await?;
    audited(
        format!(
            "instance {} ({}) from snapshot {}",
            i.id, i.name, b.snapshot
        ),
        i,
    )
}

/// Moves a running VM to a new QEMU process without stopping it; answers once it runs there,
/// with what the migration measured (a failed one leaves it running where it was).
async fn migrate_instance(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Body(b): Body<wire::MigrateInstance>,
) -> Audited<wire::MigrationReport> {
    // Like every mutating call, it runs on its own task (the audit layer's): a client that
    // goes away does not cut it short.
    let r = e.migrate_instance(&p, &id, &b).await?;
    audited(
        format!(
            "instance {} to node {} (downtime {} ms)",
            r.instance, r.node, r.downtime_ms
        ),
        r,
    )
}

async fn list_instances(State(e): State<Eng>, Who(p): Who) -> R<Vec<wire::Instance>> {
    Ok(Json(e.list_instances(&p).await?))
}

async fn create_instance(
    State(e): State<Eng>,
    Who(p): Who,
    Body(b): Body<wire::CreateInstance>,
) -> Result<
    (
        StatusCode,
        axum::Extension<AuditSubject>,
        Json<wire::Instance>,
    ),
    ApiError,
> {
    let i = e.create_instance(&p, &b).await?;
    let subject = AuditSubject(format!("instance {} ({})", i.id, i.name));
    Ok((StatusCode::CREATED, axum::Extension(subject), Json(i)))
}

/// `?since=<updated_at>&timeout_ms=N` turns the GET into a long poll (what `--wait` uses): the
/// answer comes when the instance changes or at the timeout (capped by the engine).
#[derive(Deserialize, schemars::JsonSchema)]
struct WatchQuery {
    since: Option<i64>,
    timeout_ms: Option<u64>,
}

async fn get_instance(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Query(q): Query<WatchQuery>,
) -> R<wire::Instance> {
    match q.since {
        Some(since) => {
            let timeout = std::time::Duration::from_millis(q.timeout_ms.unwrap_or(30_000));
            Ok(Json(e.watch_instance(&p, &id, since, timeout).await?))
        }
        None => Ok(Json(e.get_instance(&p, &id).await?)),
    }
}

async fn terminate_instance(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
) -> R<wire::Instance> {
    Ok(Json(e.terminate_instance(&p, &id).await?))
}

async fn stop_instance(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
) -> R<wire::Instance> {
    Ok(Json(e.stop_instance(&p, &id).await?))
}

async fn start_instance(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
) -> R<wire::Instance> {
    Ok(Json(e.start_instance(&p, &id).await?))
}

async fn create_link(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Body(b): Body<wire::CreateLink>,
) -> R<wire::Link> {
    Ok(Json(e.create_link(&p, &id, b.port, b.ttl_secs).await?))
}

async fn scale_instance(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Body(b): Body<wire::ScaleInstance>,
) -> R<wire::Instance> {
    Ok(Json(e.scale_instance(&p, &id, &b).await?))
}

#[derive(Deserialize, schemars::JsonSchema)]
struct LogQuery {
    #[serde(default)]
    offset: u64,
}

async fn logs(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> R<wire::Logs> {
    Ok(Json(e.instance_logs(&p, &id, q.offset).await?))
}

/// Streams the command's output as it comes: frames of [`wire::exec`], the last one `END` with
/// the exit status and, when the daemon killed the command, why. Errors before the command
/// starts (not found, not running, too many execs) are ordinary JSON errors.
async fn exec(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Body(b): Body<wire::ExecRequest>,
) -> Result<Response, ApiError> {
    let stream = e.exec(&p, &id, &b).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, wire::exec::CONTENT_TYPE)],
        axum::body::Body::new(FrameBody(stream.frames)),
    )
        .into_response())
}

/// A response body fed by the exec task; dropping it (the client went away) closes the
/// channel, which kills the command.
struct FrameBody(tokio::sync::mpsc::Receiver<Vec<u8>>);

impl http_body::Body for FrameBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|f| f.map(|v| Ok(http_body::Frame::data(bytes::Bytes::from(v)))))
    }
}

// ---- interactive exec (WebSocket) ----------------------------------------------------------

/// `?request=<ExecSessionRequest JSON>`.
#[derive(Deserialize)]
struct SessionQuery {
    request: String,
}

/// Largest WebSocket message a client may send (stdin chunks and control messages are small).
const SESSION_MAX_MESSAGE: usize = 1 << 20;
/// How long the daemon waits for any sign of life from a session's client (a pong, a message)
/// before it takes the client for gone (a dropped network sends no FIN), and the longest one
/// message to the client may take to leave (a client that does not read is gone too). Pings
/// go out four times per period. 60 s unless the hidden `exec_session_liveness` setting says
/// otherwise (tests).
static SESSION_LIVENESS: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
const SESSION_LIVENESS_DEFAULT: std::time::Duration = std::time::Duration::from_secs(60);

fn session_liveness() -> std::time::Duration {
    *SESSION_LIVENESS.get().unwrap_or(&SESSION_LIVENESS_DEFAULT)
}

/// A connection's places in the serve loop's caps (the global connection count and the
/// per-address count), put on each request by the accept loop. A WebSocket session takes it
/// along into the upgrade, so an upgraded connection keeps counting until it closes.
#[derive(Clone)]
pub struct ConnectionHold {
    _held: Arc<dyn std::any::Any + Send + Sync>,
}

impl ConnectionHold {
    /// Holds `places` (dropped when the last clone of the hold goes).
    pub fn new(places: impl std::any::Any + Send + Sync) -> Self {
        Self {
            _held: Arc::new(places),
        }
    }
}

/// The client's address, put on each request by the accept loop (the audit log's `source`).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::IpAddr);

/// An interactive exec over a WebSocket ([`wire::session`]): every check runs before the
/// upgrade (not found, not running, too many execs and a bad request are plain JSON errors),
/// the command starts, then the connection is upgraded and pumped. The command is killed when
/// the client goes away.
async fn exec_session(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    uri: axum::http::Uri,
    h: HeaderMap,
    hold: Option<axum::Extension<ConnectionHold>>,
    ws: WsUpgrade,
) -> Result<Response, ApiError> {
    let parsed = axum::extract::Query::<SessionQuery>::try_from_uri(&uri)
        .map_err(|r| r.body_text())
        .and_then(|axum::extract::Query(q)| {
            serde_json::from_str::<wire::ExecSessionRequest>(&q.request)
                .map_err(|e| format!("bad session request: {e}"))
        });
    let req = match parsed {
        Ok(r) => r,
        Err(msg) => {
            // Tenancy first: another tenant's instance is not found, whatever it asked.
            let any = wire::ExecSessionRequest::default();
            return Err(match e.exec_session(&p, &id, &any).await {
                Err(EngineError::InvalidArgument(_)) | Ok(_) => EngineError::InvalidArgument(
                    format!("{msg} (expected ?{}=<JSON>)", wire::session::QUERY),
                ),
                Err(other) => other,
            }
            .into());
        }
    };
    let ticket = e.exec_session(&p, &id, &req).await?;
    let ws = websocket(ws, "gpuvisor instance exec -it")?;
    Ok(upgrade(
        ws,
        ticket.start().await?,
        hold,
        Liveness::of(&e, &p, &h),
    ))
}

/// Daemon to daemon (the destination's side of `instance migrate --to`): makes the offered
/// VM here and starts its QEMU waiting for the state.
async fn accept_migration(
    State(e): State<Eng>,
    Who(p): Who,
    Body(b): Body<wire::MigrationOffer>,
) -> Audited<wire::MigrationAccepted> {
    let a = e.accept_migration(&p, &b).await?;
    audited(
        format!(
            "migration {} of instance {} from node {}",
            a.migration, a.instance, b.from_node
        ),
        a,
    )
}

async fn migration_status(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
) -> R<wire::MigrationStatus> {
    Ok(Json(e.migration_phase(&p, &id).await?))
}

/// The source is done: the received guest runs here.
async fn run_migration(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
) -> Audited<wire::MigrationStatus> {
    let s = e.run_migration(&p, &id).await?;
    audited(format!("migration {id}"), s)
}

/// The guest stays on the source: what was made here goes.
async fn drop_migration(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Query(q): Query<wire::DropMigration>,
) -> Audited<wire::MigrationStatus> {
    let s = e.drop_migration(&p, &id, q.lost).await?;
    audited(format!("migration {id}"), s)
}

/// A connection that asked to be upgraded to raw bytes (`Upgrade: gpuvisor-migration`),
/// if it did: looked at only once the caller is authorised.
pub struct RawUpgrade(Option<hyper::upgrade::OnUpgrade>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RawUpgrade {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let asked = parts
            .headers
            .get(axum::http::header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case(wire::MIGRATION_UPGRADE));
        Ok(Self(
            parts
                .extensions
                .remove::<hyper::upgrade::OnUpgrade>()
                .filter(|_| asked),
        ))
    }
}

impl ArgDoc for RawUpgrade {
    fn doc(op: &mut OpDoc, _g: &mut schemars::SchemaGenerator) {
        op.raw_upgrade = true;
    }
}

/// One byte channel of a migration this daemon receives: the connection becomes a pipe to
/// the destination QEMU (its NBD server, or its migration stream); it counts against the
/// connection caps until it closes.
async fn migration_channel(
    State(e): State<Eng>,
    Who(p): Who,
    Path((id, channel)): Path<(String, String)>,
    hold: Option<axum::Extension<ConnectionHold>>,
    up: RawUpgrade,
) -> Result<Response, ApiError> {
    p.allow(Op::ReceiveMigration)?;
    let Some(on) = up.0 else {
        return Err(EngineError::InvalidArgument(format!(
            "this route upgrades the connection: ask with `Connection: Upgrade` and `Upgrade: \
             {}` over HTTP/1.1",
            wire::MIGRATION_UPGRADE
        ))
        .into());
    };
    let channel = match channel.as_str() {
        "disk" => wire::MigrationChannel::Disk,
        "state" => wire::MigrationChannel::State,
        other => {
            return Err(EngineError::InvalidArgument(format!(
                "unknown migration channel {other:?} (disk or state)"
            ))
            .into())
        }
    };
    let what = format!("{id} {}", channel.as_str());
    let fd = e.migration_channel(&p, &id, channel).await?;
    let local = std::os::unix::net::UnixStream::from(fd);
    local
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(local))
        .map_err(|err| EngineError::Internal(format!("the migration channel: {err}")))
        .map(|local| {
            tokio::spawn(async move {
                match on.await {
                    Ok(upgraded) => {
                        let remote = hyper_util::rt::TokioIo::new(upgraded);
                        crate::peer::relay(remote, local, &what).await;
                    }
                    Err(err) => tracing::warn!("migration channel upgrade: {err}"),
                }
                drop(hold);
            });
        })?;
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(axum::http::header::CONNECTION, "upgrade")
        .header(axum::http::header::UPGRADE, wire::MIGRATION_UPGRADE)
        .body(axum::body::Body::empty())
        .map_err(|err| EngineError::Internal(format!("upgrade answer: {err}")).into())
}

/// A WebSocket route's upgrade, or why the request was not one (answered as our error).
type WsUpgrade = Result<
    axum::extract::ws::WebSocketUpgrade,
    axum::extract::ws::rejection::WebSocketUpgradeRejection,
>;

/// The upgrade a session route needs, or the error saying how to ask for it (as `client`
/// does).
fn websocket(
    ws: WsUpgrade,
    client: &str,
) -> Result<axum::extract::ws::WebSocketUpgrade, EngineError> {
    ws.map_err(|r| {
        EngineError::InvalidArgument(format!(
            "this route is a WebSocket: connect with `Upgrade: websocket` (as `{client}` does): {}",
            r.body_text()
        ))
    })
}

/// Upgrades to the session's WebSocket and pumps it; the connection counts against the
/// caps (`hold`) until the session ends. `key` (the engine and the key it was opened with):
/// the session ends once that key is revoked.
fn upgrade(
    ws: axum::extract::ws::WebSocketUpgrade,
    session: gpuvisor_control::engine::session::ExecSession,
    hold: Option<axum::Extension<ConnectionHold>>,
    live: Liveness,
) -> Response {
    pumped(ws, hold, move |socket| pump_session(socket, session, live))
}

/// Upgrades with the sessions' message bounds and runs `pump` on the socket; the connection
/// counts against the caps (`hold`) until it returns.
fn pumped<F, Fut>(
    ws: axum::extract::ws::WebSocketUpgrade,
    hold: Option<axum::Extension<ConnectionHold>>,
    pump: F,
) -> Response
where
    F: FnOnce(axum::extract::ws::WebSocket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    ws.max_message_size(SESSION_MAX_MESSAGE)
        .max_frame_size(SESSION_MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            pump(socket).await;
            drop(hold);
        })
}

/// A VM's serial console over a WebSocket ([`wire::session::CONSOLE_PATH`]): checked before
/// the upgrade like an exec session, then pumped by the same code.
async fn console_session(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    h: HeaderMap,
    hold: Option<axum::Extension<ConnectionHold>>,
    ws: WsUpgrade,
) -> Result<Response, ApiError> {
    let ticket = e.console_session(&p, &id).await?;
    let ws = websocket(ws, "gpuvisor instance console")?;
    Ok(upgrade(
        ws,
        ticket.start().await?,
        hold,
        Liveness::of(&e, &p, &h),
    ))
}

/// Most bytes of one stdin chunk handed to a session: a message is cut into chunks of this
/// size, so the session's input channel (16 places) holds at most 512 KiB.
const INPUT_CHUNK: usize = 32 * 1024;

fn stdin_chunks(
    data: &[u8],
) -> impl Iterator<Item = gpuvisor_control::engine::session::SessionInput> + '_ {
    data.chunks(INPUT_CHUNK)
        .map(|c| gpuvisor_control::engine::session::SessionInput::Stdin(c.to_vec()))
}

/// Sends `msg` unless the client takes longer than `within` to make room for it; false when
/// it could not be sent (the client is gone or does not read).
async fn send_within(
    socket: &mut axum::extract::ws::WebSocket,
    msg: axum::extract::ws::Message,
    within: std::time::Duration,
) -> bool {
    matches!(
        tokio::time::timeout(within, socket.send(msg)).await,
        Ok(Ok(()))
    )
}

/// Moves messages between the WebSocket and the session until either ends. Input is taken off
/// the socket only when the session can take it, so a command that does not read its input
/// slows its client down instead of filling the daemon's memory. The client is taken for gone
/// (and the command killed) when a message to it cannot leave within the liveness period (it
/// does not read), or when nothing came from it for that long — judged only while the daemon
/// reads the socket: input waiting for the command to read it leaves pongs unread, and that
/// silence is the command's, not the client's.
async fn pump_session(
    mut socket: axum::extract::ws::WebSocket,
    mut session: gpuvisor_control::engine::session::ExecSession,
    live: Liveness,
) {
    use axum::extract::ws::Message;
    use gpuvisor_control::engine::session::{SessionInput, SessionOutput};
    use wire::session::{self as proto, Control};
    let dead = session_liveness();
    // Input taken off the socket that the session has no room for yet: one message at most,
    // in chunks of at most INPUT_CHUNK bytes.
    let mut pending: std::collections::VecDeque<SessionInput> = Default::default();
    let mut input_open = true;
    let mut last_seen = tokio::time::Instant::now();
    let mut ping = tokio::time::interval(dead / 4);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = socket.recv(), if pending.is_empty() => {
                last_seen = tokio::time::Instant::now();
                match m {
                    Some(Ok(Message::Binary(b))) => {
                        if b.first() == Some(&proto::STDIN) && b.len() > 1 && input_open {
                            pending.extend(stdin_chunks(&b[1..]));
                        }
                    }
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<Control>(t.as_str()) {
                        Ok(Control::Resize(s)) => pending.push_back(SessionInput::Resize(s)),
                        Ok(Control::Eof) => pending.push_back(SessionInput::Eof),
                        // Unknown or daemon-only messages: ignored.
                        _ => {}
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    // Closed, or the connection broke: the client is gone.
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                }
            }
            permit = session.input.reserve(), if !pending.is_empty() => match permit {
                Ok(permit) => {
                    if let Some(i) = pending.pop_front() {
                        permit.send(i);
                    }
                    // The socket is read again from now: the silence so far was ours.
                    last_seen = tokio::time::Instant::now();
                }
                // The session no longer reads input (its command ended): drop what comes.
                Err(_) => {
                    pending.clear();
                    input_open = false;
                    last_seen = tokio::time::Instant::now();
                }
            },
            o = session.output.recv() => {
                let msg = match o {
                    Some(SessionOutput::Stdout(d)) => Message::Binary(proto::data(proto::STDOUT, &d).into()),
                    Some(SessionOutput::Stderr(d)) => Message::Binary(proto::data(proto::STDERR, &d).into()),
                    Some(SessionOutput::End(end)) => {
                        let text = serde_json::to_string(&Control::Exit(end)).unwrap_or_default();
                        if send_within(&mut socket, Message::Text(text.into()), dead).await {
                            let _ = send_within(&mut socket, Message::Close(None), dead).await;
                        }
                        return;
                    }
                    // Ended without a status (the daemon is shutting down): just close.
                    None => {
                        let _ = send_within(&mut socket, Message::Close(None), dead).await;
                        return;
                    }
                };
                if !send_within(&mut socket, msg, dead).await {
                    tracing::debug!("exec session: client took no output for {} s, taken for gone", dead.as_secs());
                    return;
                }
            }
            _ = ping.tick() => {
                // A key revoked (or its tenant removed) ends what it opened.
                if let Some(why) = live.ended().await {
                    tracing::info!(key = live.key_id, "exec session: {why}, ended");
                    let close = axum::extract::ws::CloseFrame {
                        code: axum::extract::ws::close_code::POLICY,
                        reason: why.into(),
                    };
                    let _ = send_within(&mut socket, Message::Close(Some(close)), dead).await;
                    return;
                }
                if !pending.is_empty() {
                    // Not reading the socket: the client's pongs wait behind its input. A
                    // client gone meanwhile is found by the sends, or by the idle bound.
                    last_seen = tokio::time::Instant::now();
                }
                if last_seen.elapsed() > dead {
                    tracing::debug!("exec session: client silent for {} s, taken for gone", dead.as_secs());
                    return;
                }
                if !send_within(&mut socket, Message::Ping(Default::default()), dead).await {
                    return;
                }
            }
        }
    }
}

/// A VM's graphical console over a WebSocket (`/v1/instances/{id}/vnc/ws`): binary messages
/// carry the raw RFB stream of its VNC server both ways (what noVNC speaks). Checked before the
/// upgrade like a console session; ends when either side closes, at the session deadline, or
/// when the credential it was opened with ends.
async fn display_session(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    h: HeaderMap,
    hold: Option<axum::Extension<ConnectionHold>>,
    ws: WsUpgrade,
) -> Result<Response, ApiError> {
    let ticket = e.display_session(&p, &id).await?;
    let ws = websocket(ws, "a VNC viewer such as noVNC")?;
    let total = ticket.total;
    let display = ticket.connect().await?;
    let live = Liveness::of(&e, &p, &h);
    Ok(pumped(ws, hold, move |socket| {
        pump_display(socket, display, total, live)
    }))
}

/// Moves RFB bytes between the WebSocket and the VNC socket (see [`display_session`]).
async fn pump_display(
    mut socket: axum::extract::ws::WebSocket,
    display: gpuvisor_control::engine::console::Display,
    total: std::time::Duration,
    live: Liveness,
) {
    use axum::extract::ws::Message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dead = session_liveness();
    let (mut rd, mut wr) = display.stream.into_split();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::sleep(total);
    tokio::pin!(deadline);
    let mut ping = tokio::time::interval(dead / 4);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = tokio::time::Instant::now();
    loop {
        tokio::select! {
            m = socket.recv() => {
                last_seen = tokio::time::Instant::now();
                match m {
                    Some(Ok(Message::Binary(b))) => {
                        if tokio::time::timeout(dead, wr.write_all(&b)).await.map_or(true, |r| r.is_err()) {
                            break;
                        }
                    }
                    Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                }
            }
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !send_within(&mut socket, Message::Binary(buf[..n].to_vec().into()), dead).await {
                        return;
                    }
                }
            },
            () = &mut deadline => break,
            _ = ping.tick() => {
                if let Some(why) = live.ended().await {
                    let close = axum::extract::ws::CloseFrame {
                        code: axum::extract::ws::close_code::POLICY,
                        reason: why.into(),
                    };
                    let _ = send_within(&mut socket, Message::Close(Some(close)), dead).await;
                    return;
                }
                if last_seen.elapsed() > dead
                    || !send_within(&mut socket, Message::Ping(Default::default()), dead).await
                {
                    return;
                }
            }
        }
    }
    let _ = send_within(&mut socket, Message::Close(None), dead).await;
}

/// An instance's metrics as they are sampled, over a WebSocket
/// (`/v1/instances/{id}/metrics/ws?since=&step=`): a text message of JSON
/// [`wire::MetricsUpdate`] per sample (about one a second), the first with the points since
/// `since` (10 s back by default, at most 10 minutes: older history is the history API's),
/// each later one from the newest point sent before (that bucket again: it may have grown);
/// `step` at most a minute. Checked before the upgrade (tenancy, the query, the streams' gate:
/// [`gpuvisor_control::engine::limits`]). Closed with 1000 when the instance is terminated or
/// gone, with 1008 (policy) when the credential that opened it ends (checked with the pings);
/// a client that takes no message for the liveness period is taken for gone.
async fn metrics_stream(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Query(mut q): Query<wire::MetricsQuery>,
    h: HeaderMap,
    hold: Option<axum::Extension<ConnectionHold>>,
    ws: WsUpgrade,
) -> Result<Response, ApiError> {
    q.since.get_or_insert_with(|| "10s".into());
    let watch = e.watch_metrics(&p, &id, &q).await?;
    let ws = websocket(ws, "a WebSocket client such as the web console")?;
    let live = Liveness::of(&e, &p, &h);
    Ok(pumped(ws, hold, move |socket| {
        pump_metrics(socket, e, watch, live)
    }))
}

/// The newest point of `u` (0 when it has none).
fn newest_point(u: &wire::MetricsUpdate) -> i64 {
    u.histories
        .iter()
        .flat_map(|h| &h.series)
        .filter_map(|s| s.points.last())
        .map(|p| p.t)
        .max()
        .unwrap_or(0)
}

/// Sends an update per sample on one metrics stream (see [`metrics_stream`]).
async fn pump_metrics(
    mut socket: axum::extract::ws::WebSocket,
    e: Eng,
    mut watch: gpuvisor_control::engine::MetricsWatch,
    live: Liveness,
) {
    use axum::extract::ws::{close_code, CloseFrame, Message};
    let dead = session_liveness();
    let mut samples = e.metric_samples();
    let mut ping = tokio::time::interval(dead / 4);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = tokio::time::Instant::now();
    let close = |code, why: &str| {
        Message::Close(Some(CloseFrame {
            code,
            reason: why.into(),
        }))
    };
    let ended = close(close_code::NORMAL, "the instance was terminated");
    // Where the next update starts: the newest point sent (before any, the query's `since`).
    let mut from = watch.since;
    // An update to make: at once, then at each sample.
    let mut due = true;
    let mut first = true;
    loop {
        if due {
            due = false;
            let u = e.metrics_update(&watch, from);
            let newest = newest_point(&u);
            // Only with something new (a stopped instance gets no points), except where a
            // bucket spans several samples and grows in place.
            if first || newest > from || watch.step > 1000 {
                first = false;
                from = from.max(newest);
                let text = serde_json::to_string(&u).unwrap_or_default();
                drop(u);
                if !send_within(&mut socket, Message::Text(text.into()), dead).await {
                    return;
                }
            }
        }
        tokio::select! {
            changed = samples.changed() => {
                if changed.is_err() {
                    let _ = send_within(&mut socket, close(close_code::AWAY, "the daemon is stopping"), dead).await;
                    return;
                }
                match e.watched_alive(&mut watch).await {
                    Ok(true) => due = true,
                    Ok(false) => {
                        // The last points, then the end.
                        let u = e.metrics_update(&watch, from);
                        let text = serde_json::to_string(&u).unwrap_or_default();
                        drop(u);
                        if send_within(&mut socket, Message::Text(text.into()), dead).await {
                            let _ = send_within(&mut socket, ended, dead).await;
                        }
                        return;
                    }
                    // A passing fault of the store: the points (from memory) go all the same;
                    // the next sample asks again.
                    Err(err) => {
                        tracing::debug!(instance = watch.id, "metrics stream: {err}");
                        due = true;
                    }
                }
            }
            m = socket.recv() => {
                last_seen = tokio::time::Instant::now();
                match m {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => {}
                }
            }
            _ = ping.tick() => {
                if let Some(why) = live.ended().await {
                    let _ = send_within(&mut socket, close(close_code::POLICY, why), dead).await;
                    return;
                }
                // Also without samples (the sampler stopped): a terminated instance ends it.
                if matches!(e.watched_alive(&mut watch).await, Ok(false)) {
                    let _ = send_within(&mut socket, ended, dead).await;
                    return;
                }
                if last_seen.elapsed() > dead
                    || !send_within(&mut socket, Message::Ping(Default::default()), dead).await
                {
                    return;
                }
            }
        }
    }
}

/// What keeps a session (exec, console, graphical console, metrics stream) open: the key it was opened with
/// stays active and, when it was opened through the web console, its login session too
/// (a logout or an expiry ends what the page opened).
struct Liveness {
    engine: Eng,
    key_id: String,
    session: Option<String>,
}

impl Liveness {
    fn of(e: &Eng, p: &Principal, h: &HeaderMap) -> Self {
        Self {
            engine: e.clone(),
            key_id: p.key_id.clone(),
            session: session_token(h).ok().map(str::to_string),
        }
    }

    /// Why the session must end now, if it must.
    async fn ended(&self) -> Option<&'static str> {
        if !self.engine.key_active(&self.key_id).await {
            return Some("the session's API key was revoked");
        }
        let t = self.session.as_ref()?;
        // Only a login known to have ended counts (a store hiccup does not cut it).
        matches!(
            self.engine.web_session(t).await,
            Err(EngineError::Unauthorized(_))
        )
        .then_some("the console login that opened it ended (logout or expiry)")
    }
}

async fn events(State(e): State<Eng>, Who(p): Who, Path(id): Path<String>) -> R<Vec<wire::Event>> {
    Ok(Json(e.instance_events(&p, &id).await?))
}

/// Prometheus scrape: text 0.0.4, or OpenMetrics when the `Accept` header asks for it. Needs
/// the metrics token or an admin key (`Authorization: Bearer ...`), since it lists every
/// tenant's instances.
async fn metrics(State(e): State<Eng>, h: HeaderMap) -> Result<Response, ApiError> {
    e.authorize_metrics(api_key(&h)).await?;
    let format = gpuvisor_control::telemetry::prom::Format::from_accept(
        h.get("accept").and_then(|v| v.to_str().ok()),
    );
    let body = e.metrics_text(format);
    Ok((
        [(axum::http::header::CONTENT_TYPE, format.content_type())],
        body,
    )
        .into_response())
}

async fn host_checks(State(e): State<Eng>, Who(p): Who) -> R<Vec<wire::HostCheck>> {
    Ok(Json(e.host_checks(&p).await?))
}

async fn gpu_events(
    State(e): State<Eng>,
    Who(p): Who,
    Query(q): Query<wire::GpuEventsQuery>,
) -> R<Vec<wire::GpuEvent>> {
    Ok(Json(e.gpu_events(&p, &q).await?))
}

async fn gpu_stats(State(e): State<Eng>, Who(p): Who) -> R<Vec<wire::GpuStats>> {
    Ok(Json(e.gpu_stats(&p).await?))
}

async fn gpu_metrics(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Query(q): Query<wire::MetricsQuery>,
) -> R<wire::MetricsHistory> {
    Ok(Json(e.gpu_metrics(&p, &id, &q).await?))
}

async fn instance_metrics(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Query(q): Query<wire::MetricsQuery>,
) -> R<wire::MetricsHistory> {
    Ok(Json(e.instance_metrics(&p, &id, &q).await?))
}

// ---- serverless endpoints ------------------------------------------------------------------

/// The largest body of the queue API (`runsync`'s limit; `run` takes 10 MiB of input).
pub const SERVERLESS_MAX_BODY: usize = 20 << 20;

async fn list_endpoints(State(e): State<Eng>, Who(p): Who) -> R<Vec<wire::Endpoint>> {
    Ok(Json(e.list_endpoints(&p).await?))
}

async fn create_endpoint(
    State(e): State<Eng>,
    Who(p): Who,
    Body(b): Body<wire::CreateEndpoint>,
) -> R<wire::Endpoint> {
    Ok(Json(e.create_endpoint(&p, &b).await?))
}

async fn get_endpoint(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
) -> R<wire::Endpoint> {
    Ok(Json(e.get_endpoint(&p, &id).await?))
}

async fn update_endpoint(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
    Body(b): Body<wire::UpdateEndpoint>,
) -> R<wire::Endpoint> {
    Ok(Json(e.update_endpoint(&p, &id, &b).await?))
}

async fn remove_endpoint(
    State(e): State<Eng>,
    Who(p): Who,
    Path(id): Path<String>,
) -> R<wire::Endpoint> {
    Ok(Json(e.remove_endpoint(&p, &id).await?))
}

async fn run_job(
    State(e): State<Eng>,
    Who(p): Who,
    Path(ep): Path<String>,
    Body(b): Body<wire::RunRequest>,
) -> R<wire::JobStatus> {
    Ok(Json(e.submit_job(&p, &ep, &b, false).await?))
}

#[derive(Deserialize, schemars::JsonSchema)]
struct SyncQuery {
    /// Milliseconds to wait for the result (1000 to 300000; default 90000).
    #[serde(default)]
    wait: Option<u64>,
}

async fn run_sync(
    State(e): State<Eng>,
    Who(p): Who,
    Path(ep): Path<String>,
    Query(q): Query<SyncQuery>,
    Body(b): Body<wire::RunRequest>,
) -> R<wire::JobStatus> {
    Ok(Json(e.run_sync(&p, &ep, &b, q.wait).await?))
}

async fn job_status(
    State(e): State<Eng>,
    Who(p): Who,
    Path((ep, job)): Path<(String, String)>,
) -> R<wire::JobStatus> {
    Ok(Json(e.job_status(&p, &ep, &job).await?))
}

async fn job_stream(
    State(e): State<Eng>,
    Who(p): Who,
    Path((ep, job)): Path<(String, String)>,
) -> R<wire::StreamStatus> {
    Ok(Json(e.job_stream(&p, &ep, &job).await?))
}

async fn cancel_job(
    State(e): State<Eng>,
    Who(p): Who,
    Path((ep, job)): Path<(String, String)>,
) -> R<wire::JobStatus> {
    Ok(Json(e.cancel_job(&p, &ep, &job).await?))
}

async fn retry_job(
    State(e): State<Eng>,
    Who(p): Who,
    Path((ep, job)): Path<(String, String)>,
) -> R<wire::JobStatus> {
    Ok(Json(e.retry_job(&p, &ep, &job).await?))
}

async fn purge_queue(State(e): State<Eng>, Who(p): Who, Path(ep): Path<String>) -> R<wire::Purged> {
    Ok(Json(e.purge_queue(&p, &ep).await?))
}

async fn endpoint_health(
    State(e): State<Eng>,
    Who(p): Who,
    Path(ep): Path<String>,
) -> R<wire::EndpointHealth> {
    Ok(Json(e.endpoint_health(&p, &ep).await?))
}

// ---- request limits ----------------------------------------------------------------------

/// Bounds every request: its body's size and the time to send it, and how many requests one
/// principal has in flight.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    pub max_body: u64,
    /// Largest image upload ([`UPLOAD_PATH`]), streamed to disk rather than buffered.
    pub max_upload: u64,
    pub body_timeout: std::time::Duration,
    pub requests_per_key: usize,
    /// How long an exec session's client may be silent or not read (hidden setting; 60 s).
    pub session_liveness: std::time::Duration,
    /// Request rates per key and failed authentications per address.
    pub rates: crate::ratelimit::Rates,
}

/// The router with [`ApiLimits`] in front of every route.
pub fn router_with_limits(engine: Eng, limits: ApiLimits) -> Router {
    let guard = Arc::new(Guard {
        engine: engine.clone(),
        rates: crate::ratelimit::Limiter::new(limits.rates),
        limits,
        slots: std::sync::Mutex::new(std::collections::HashMap::new()),
    });
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let g = Arc::downgrade(&guard);
        rt.spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                let Some(g) = g.upgrade() else { return };
                g.rates.sweep();
                g.sweep_slots();
            }
        });
    }
    let max_body = usize::try_from(guard.limits.max_body).unwrap_or(usize::MAX);
    let _ = UPLOAD_LIMITS.set(UploadLimits {
        max: guard.limits.max_upload,
        idle: guard.limits.body_timeout,
    });
    let _ = SESSION_LIVENESS.set(guard.limits.session_liveness);
    router(engine)
        // The extractors' own limit (2 MB by default) follows ours.
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(guard, limit_request))
}

struct Guard {
    engine: Eng,
    limits: ApiLimits,
    rates: crate::ratelimit::Limiter,
    /// Requests in flight per principal (tenant id; `""` for requests without a valid key).
    slots: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

/// The prefix of a login's place in flight: its address's own pool (see [`limit_request`]).
const LOGIN_SLOT: &str = "login ";
/// Addresses with login pools of their own at most (the rest share one until the sweep).
const MAX_LOGIN_POOLS: usize = 4096;

impl Guard {
    /// Forgets the login pools no request holds a place of (every minute).
    fn sweep_slots(&self) {
        let full = self.limits.requests_per_key;
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, s| !k.starts_with(LOGIN_SLOT) || s.available_permits() < full);
    }

    /// A place in flight for `principal`, taken under the map's lock (a sweep cannot drop its
    /// pool meanwhile); `None` when its pool is full. Past [`MAX_LOGIN_POOLS`] addresses,
    /// further logins share one pool.
    fn take_place(&self, principal: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let mut m = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut name = principal;
        if principal.starts_with(LOGIN_SLOT)
            && !m.contains_key(principal)
            && m.keys().filter(|k| k.starts_with(LOGIN_SLOT)).count() >= MAX_LOGIN_POOLS
        {
            name = LOGIN_SLOT;
        }
        m.entry(name.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.limits.requests_per_key)))
            .clone()
            .try_acquire_owned()
            .ok()
    }
}

fn error_response(e: EngineError) -> Response {
    ApiError(e).into_response()
}

/// The middleware: a declared length over the limit is refused before anything is read; the
/// key is checked before the body is read (a bad key is answered at once, except on /metrics,
/// which takes its own token); the principal's allowance of requests in flight is taken; the
/// body is read within `max_body` bytes and `body_timeout`; then the route runs.
async fn limit_request(
    State(g): State<Arc<Guard>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // Liveness probes answer whatever else is going on: no key, no slot, no body. So do the
    // console's own files (a page must load whatever cookie the browser still holds).
    if req.uri().path() == "/v1/health"
        || req.uri().path() == OPENAPI_PATH
        || crate::console::is_file(req.method(), req.uri().path())
    {
        return next.run(req).await;
    }
    // Image uploads stream to disk under their own cap (the handler counts the bytes).
    let upload = req.uri().path() == UPLOAD_PATH && req.method() == axum::http::Method::POST;
    let (max, what) = if upload {
        (g.limits.max_upload, "limits.max_upload")
    } else if req.uri().path().starts_with("/v2/") && api_key(req.headers()).is_some() {
        // RunPod's payloads, for a key (checked below, before the body is read); a request
        // without one keeps the ordinary limit.
        (
            g.limits.max_body.max(SERVERLESS_MAX_BODY as u64),
            "the queue API's limit",
        )
    } else {
        (g.limits.max_body, "limits.max_body")
    };
    let too_large = move || {
        error_response(EngineError::PayloadTooLarge(format!(
            "the request body is larger than {max} bytes ({what})"
        )))
    };
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return too_large();
    }
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    // A login is a key checked in the body: a refused one counts as a wrong key (below). It
    // ignores any credential the request carries (a dead cookie must not stop a new login),
    // and logins take places in flight per address, not in the pool of keyless requests.
    let login = req.uri().path() == SESSIONS_PATH && req.method() == axum::http::Method::POST;
    let key = credential(req.headers())
        .filter(|_| !login)
        .map(|c| (c.secret.to_string(), c.cookie));
    let mut caller = None;
    let mut token_attempt = false;
    if let Some((secret, cookie)) = &key {
        let refused = if *cookie {
            cross_site(req.method(), req.headers()).err()
        } else {
            None
        };
        // Console sessions are the REST API's: GraphQL (whose WebSocket outlives a request
        // and checks only its key) takes API keys only.
        let refused = refused.or_else(|| {
            (secret.starts_with(wire::SESSION_TOKEN_PREFIX)
                && req.uri().path() == crate::graphql::PATH)
                .then(|| {
                    EngineError::Forbidden(
                        "a console session is not accepted on /graphql: send an API key".into(),
                    )
                })
        });
        if let Some(e) = refused {
            return error_response(e);
        }
    }
    let principal = match &key {
        None => String::new(),
        Some((k, _)) => match g.engine.authenticate(Some(k)).await {
            Ok(p) => {
                let tenant = p.tenant_id.clone();
                caller = Some(p.clone());
                // The handler's `Who` takes it from here: one key lookup per request.
                req.extensions_mut().insert(p);
                tenant
            }
            // Perhaps the metrics token, which the handler checks: a wrong one is counted
            // below like a wrong key.
            Err(_) if req.uri().path() == "/metrics" => {
                token_attempt = true;
                String::new()
            }
            Err(e) => {
                // A wrong key: counted against its address; past the allowance the address's
                // failed attempts get 429 (a valid key from it is never refused for this).
                if let (EngineError::Unauthorized(_), Some(ip)) = (&e, peer) {
                    if let Some(l) = g.rates.blocked(ip) {
                        return rate_limited(l);
                    }
                    g.rates.auth_failed(ip);
                }
                let ended = matches!(e, EngineError::Unauthorized(_));
                let mut r = error_response(e);
                // (a store hiccup is no reason to log the browser out)
                if ended && key.as_ref().is_some_and(|(_, cookie)| *cookie) {
                    // A dead session cookie is dropped by the browser at once.
                    if let Ok(v) = session_set_cookie(None).parse() {
                        r.headers_mut().insert(axum::http::header::SET_COOKIE, v);
                    }
                }
                return r;
            }
        },
    };
    let principal = match (login, peer) {
        (true, Some(ip)) => format!("{LOGIN_SLOT}{}", crate::ratelimit::address_of(ip)),
        (true, None) => LOGIN_SLOT.to_string(),
        _ => principal,
    };
    let op = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .and_then(|route| {
            route_ops()
                .get(&(req.method().as_str(), route.as_str()))
                .copied()
        });
    // A console session acts as its key, but makes nothing that outlives it: a cookie thief
    // (or a script injected into the page) would otherwise turn a 12-hour session into a
    // lasting key or a signed link (valid for days, whatever becomes of the session).
    if let Some(op) = op.filter(|op| matches!(op, Op::CreateKey | Op::CreateLink)) {
        if key
            .as_ref()
            .is_some_and(|(s, _)| s.starts_with(wire::SESSION_TOKEN_PREFIX))
        {
            return error_response(EngineError::Forbidden(format!(
                "a console session cannot make what outlives it ({}): use an API key",
                op.name()
            )));
        }
    }
    let mutating = op.is_some_and(Op::mutating);
    // Submitting a job is not audited (the tenant's workload), but is rated as a change.
    let rated_as_change = mutating || op == Some(Op::RunJob);
    if req.uri().path() == crate::graphql::PATH {
        // Whether a GraphQL request reads or mutates is in its body: its handler charges
        // the rate once it has parsed the operation (a WebSocket's key may come later, in
        // `connection_init`: `RateGate::for_key`).
        let gate = RateGate {
            guard: g.clone(),
            key: caller
                .as_ref()
                .map(|w| w.key_id.clone())
                .unwrap_or_default(),
        };
        req.extensions_mut().insert(gate);
    } else if let Some(l) = caller
        .as_ref()
        .and_then(|who| g.rates.check_key(&who.key_id, rated_as_change).err())
    {
        // Over its rate: refused before anything runs, and not recorded (a refusal per
        // request would let a key flood the audit log).
        return rate_limited(l);
    }
    // A mutating call by a known key is recorded, whatever its outcome, with a bounded target.
    let audit = caller
        .as_ref()
        .zip(op)
        .filter(|_| mutating)
        .map(|(who, op)| AuditCall {
            who: who.clone(),
            op,
            target: req.uri().path().to_string(),
            source: peer,
        });
    let Some(call) = audit else {
        let response = admit(&g, req, next, principal, upload, max, too_large).await;
        // A wrong metrics token or a refused login counts like a wrong key (a right one is
        // never refused).
        if (token_attempt || login) && response.status() == StatusCode::UNAUTHORIZED {
            if let Some(ip) = peer {
                if let Some(l) = g.rates.blocked(ip) {
                    return rate_limited(l);
                }
                g.rates.auth_failed(ip);
            }
        }
        return response;
    };
    // The call and its record as one task of their own: a client that hangs up while the
    // call runs cancels neither (hyper drops a request's future when its connection goes).
    let op = call.op;
    let task = tokio::spawn(async move {
        let response = admit(&g, req, next, principal, upload, max, too_large).await;
        let subject = response
            .extensions()
            .get::<AuditSubject>()
            .map(|s| s.0.clone());
        call.record(&g.engine, subject.as_deref(), response.status().as_u16())
            .await;
        response
    });
    match task.await {
        Ok(r) => r,
        Err(e) => {
            // A panic's text is the daemon's, not the client's.
            tracing::error!("request task of {}: {e}", op.name());
            error_response(EngineError::Internal("the request failed".into()))
        }
    }
}

/// A mutating call to record in the audit log: by [`limit_request`] for REST routes, by each
/// mutation for GraphQL. One place for what a row holds.
pub struct AuditCall {
    pub who: Principal,
    pub op: Op,
    /// The route's path, or what GraphQL names (`/graphql clusterStop <id>`).
    pub target: String,
    /// The client's address.
    pub source: Option<std::net::IpAddr>,
}

impl AuditCall {
    /// Records the call: its target (cut at [`MAX_AUDIT_TARGET`]), with what it made or did
    /// (`subject`) after it, and its outcome as the HTTP status REST answers for it.
    pub async fn record(self, engine: &Engine, subject: Option<&str>, status: u16) {
        let target = match subject {
            Some(s) => audit_target(&format!("{} → {s}", self.target)),
            None => audit_target(&self.target),
        };
        let event = AuditEvent {
            op: self.op,
            target,
            result: status.to_string(),
            source: self
                .source
                .map_or_else(|| "-".to_string(), |ip| ip.to_string()),
        };
        if let Err(e) = engine.audit(&self.who, event).await {
            tracing::error!(
                key = self.who.key_id,
                op = self.op.name(),
                "the audit log cannot be written: {e}"
            );
        }
    }
}

/// A GraphQL request's allowance: [`limit_request`] leaves it for the handler, which charges
/// a read or a mutation once it knows which the request is.
#[derive(Clone)]
pub struct RateGate {
    guard: Arc<Guard>,
    key: String,
}

impl RateGate {
    /// Takes one request of the key's allowance; `Some(429 answer)` when it is used up.
    pub fn charge(&self, mutating: bool) -> Option<Response> {
        self.guard
            .rates
            .check_key(&self.key, mutating)
            .err()
            .map(rate_limited)
    }

    /// [`RateGate::charge`] `n` times (a GraphQL request's root fields).
    pub fn charge_n(&self, mutating: bool, n: u32) -> Option<Response> {
        (0..n.max(1)).find_map(|_| self.charge(mutating))
    }

    /// [`RateGate::charge`] for an answer that is not HTTP (an operation on a WebSocket).
    pub fn check(&self, mutating: bool) -> Result<(), EngineError> {
        self.guard
            .rates
            .check_key(&self.key, mutating)
            .map_err(|l| limited_error(&l).0)
    }

    /// `Some(the refusal)` when `ip` is past its failed authentications.
    pub fn auth_blocked(&self, ip: std::net::IpAddr) -> Option<EngineError> {
        self.guard.rates.blocked(ip).map(|l| limited_error(&l).0)
    }

    /// Counts a wrong key from `ip` (as the REST middleware does).
    pub fn auth_failed(&self, ip: std::net::IpAddr) {
        self.guard.rates.auth_failed(ip);
    }

    /// The allowance of another key: a WebSocket's key given in `connection_init`.
    pub fn for_key(&self, key: &str) -> RateGate {
        RateGate {
            guard: self.guard.clone(),
            key: key.to_string(),
        }
    }
}

/// Longest target an audit row keeps (the path is the caller's to choose).
const MAX_AUDIT_TARGET: usize = 256;

/// `path`, cut at [`MAX_AUDIT_TARGET`] bytes (on a character boundary) with `…` after it.
fn audit_target(path: &str) -> String {
    if path.len() <= MAX_AUDIT_TARGET {
        return path.to_string();
    }
    let mut end = MAX_AUDIT_TARGET;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &path[..end])
}

/// 429 with `Retry-After` (whole seconds, at least 1).
fn rate_limited(l: crate::ratelimit::Limited) -> Response {
    let (e, secs) = limited_error(&l);
    with_retry_after(error_response(e), secs)
}

/// The refusal of a used-up allowance, and the whole seconds (at least 1) to wait.
fn limited_error(l: &crate::ratelimit::Limited) -> (EngineError, u64) {
    let secs = l.retry_after.as_secs() + u64::from(l.retry_after.subsec_nanos() > 0);
    let secs = secs.max(1);
    let e = EngineError::ResourceExhausted(format!(
        "too many requests: the allowance of {} is used up; retry in {secs} s",
        l.what
    ));
    (e, secs)
}

fn with_retry_after(mut r: Response, secs: u64) -> Response {
    if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
        r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
    }
    r
}

/// The rest of [`limit_request`]: the principal's slot, the body within its bounds, the route.
async fn admit(
    g: &Guard,
    req: axum::extract::Request,
    next: axum::middleware::Next,
    principal: String,
    upload: bool,
    max: u64,
    too_large: impl Fn() -> Response,
) -> Response {
    let Some(_permit) = g.take_place(&principal) else {
        let who = if principal.is_empty() {
            "unauthenticated requests".to_string()
        } else if let Some(ip) = principal.strip_prefix(LOGIN_SLOT) {
            format!("logins from {ip}")
        } else {
            format!("this tenant ({principal})")
        };
        let r = error_response(EngineError::ResourceExhausted(format!(
            "{who} already {} {} requests in flight, the limit (limits.requests_per_key): retry later",
            if principal.is_empty() || principal.starts_with(LOGIN_SLOT) { "have" } else { "has" },
            g.limits.requests_per_key
        )));
        return with_retry_after(r, 1);
    };
    if upload {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let bytes = match tokio::time::timeout(g.limits.body_timeout, axum::body::to_bytes(body, limit))
        .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => return too_large(),
        Err(_) => {
            return error_response(EngineError::DeadlineExceeded(format!(
                "the request body did not arrive within {} s (limits.body_timeout)",
                g.limits.body_timeout.as_secs()
            )))
        }
    };
    let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
    next.run(req).await
}

// --- what each handler's types say in the OpenAPI document (crate::openapi) ---------------

impl ArgDoc for Who {}
impl<S> ArgDoc for State<S> {}
impl<T> ArgDoc for Path<T> {}
impl ArgDoc for HeaderMap {}
impl ArgDoc for axum::http::Uri {}
impl<T> ArgDoc for Option<axum::Extension<T>> {}

impl<E> ArgDoc for Result<axum::extract::ws::WebSocketUpgrade, E> {
    fn doc(op: &mut OpDoc, _: &mut schemars::SchemaGenerator) {
        op.websocket = true;
    }
}

/// A GraphQL request (`POST /graphql`): `{query, variables, operationName}`; its answer is
/// GraphQL's own `{data, errors}` (docs/api/graphql.md, docs/api/schema.graphql).
impl ArgDoc for axum::body::Bytes {
    fn doc(op: &mut OpDoc, _: &mut schemars::SchemaGenerator) {
        op.body = Some((
            "application/json".into(),
            serde_json::json!({
                "type": "object",
                "required": ["query"],
                "properties": {
                    "query": {"type": "string"},
                    "operationName": {"type": ["string", "null"]},
                    "variables": {"type": ["object", "null"]},
                },
            }),
        ));
    }
}

impl ArgDoc for axum::body::Body {
    fn doc(op: &mut OpDoc, _: &mut schemars::SchemaGenerator) {
        op.body = Some((
            "application/octet-stream".into(),
            serde_json::json!({"type": "string", "contentMediaType": "application/octet-stream"}),
        ));
    }
}

impl<T: schemars::JsonSchema> ArgDoc for Query<T> {
    fn doc(op: &mut OpDoc, g: &mut schemars::SchemaGenerator) {
        op.query = Some(openapi::query_of::<T>(g));
    }
}

impl<T: schemars::JsonSchema> ArgDoc for Body<T> {
    fn doc(op: &mut OpDoc, g: &mut schemars::SchemaGenerator) {
        op.body = Some(("application/json".into(), openapi::schema_of::<T>(g)));
    }
}

/// An optional JSON body (`gpu cordon`'s reason).
impl<T: schemars::JsonSchema> ArgDoc for Option<Json<T>> {
    fn doc(op: &mut OpDoc, g: &mut schemars::SchemaGenerator) {
        op.body = Some(("application/json".into(), openapi::schema_of::<T>(g)));
        op.body_optional = true;
    }
}

impl<T: schemars::JsonSchema> OutDoc for Json<T> {
    fn doc(op: &mut OpDoc, g: &mut schemars::SchemaGenerator) {
        op.ok = Some((200, Some(openapi::schema_of::<T>(g))));
    }
}

impl<T: OutDoc> OutDoc for Result<T, ApiError> {
    fn doc(op: &mut OpDoc, g: &mut schemars::SchemaGenerator) {
        T::doc(op, g);
    }
}

impl<T: schemars::JsonSchema> OutDoc for (axum::Extension<AuditSubject>, Json<T>) {
    fn doc(op: &mut OpDoc, g: &mut schemars::SchemaGenerator) {
        Json::<T>::doc(op, g);
    }
}

/// `201 Created` with the new object (what `create_instance` answers).
impl<T: schemars::JsonSchema> OutDoc for (StatusCode, axum::Extension<AuditSubject>, Json<T>) {
    fn doc(op: &mut OpDoc, g: &mut schemars::SchemaGenerator) {
        op.ok = Some((201, Some(openapi::schema_of::<T>(g))));
    }
}

impl<T: schemars::JsonSchema> OutDoc for WithCookie<Json<T>> {
    fn doc(op: &mut OpDoc, g: &mut schemars::SchemaGenerator) {
        Json::<T>::doc(op, g);
    }
}

/// No content (logout).
impl OutDoc for WithCookie<StatusCode> {
    fn doc(op: &mut OpDoc, _: &mut schemars::SchemaGenerator) {
        op.ok = Some((204, None));
    }
}

/// A stream, text or an upgrade: no JSON schema.
impl OutDoc for Response {
    fn doc(op: &mut OpDoc, _: &mut schemars::SchemaGenerator) {
        op.ok = Some((200, None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuvisor_control::engine::session::SessionInput;

    /// A 1 MiB stdin message reaches the session as 32 KiB chunks, every byte in order: the
    /// session's 16-place input channel holds 512 KiB, not 16 MiB.
    #[test]
    fn stdin_messages_are_cut_into_small_chunks() {
        let data: Vec<u8> = (0..SESSION_MAX_MESSAGE).map(|i| (i % 251) as u8).collect();
        let mut back = Vec::new();
        let mut n = 0;
        for c in stdin_chunks(&data) {
            let SessionInput::Stdin(c) = c else {
                panic!("not stdin: {c:?}")
            };
            assert!(c.len() <= INPUT_CHUNK && !c.is_empty());
            back.extend(c);
            n += 1;
        }
        assert_eq!(n, SESSION_MAX_MESSAGE / INPUT_CHUNK);
        assert!(back == data);
    }
}
