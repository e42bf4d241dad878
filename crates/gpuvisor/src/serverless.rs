//! The serverless worker API: what RunPod's worker SDK (`runpod.serverless.start`) calls from
//! inside a worker instance, at the URLs the engine put in its environment
//! (`RUNPOD_WEBHOOK_*`). Plain HTTP on the host's port that the instance filter opens to
//! instances (`[proxy] worker_port`), on every tenant bridge's gateway: it answers only
//! instance addresses, and each call carries the worker's own credential
//! (`Authorization: <token>`, RunPod's form), which names one worker of one endpoint and
//! works only from that worker's own address. The credential is checked before a body is
//! read; bodies are read within a deadline and a cap.
//!
//! - `GET  /v2/{ep}/job-take/{pod}`, `/job-take-batch/{pod}?batch_size=N`: a job (or a list),
//!   held up to [`TAKE_WAIT`] while the queue is empty (the SDK asks again at once on a 204);
//! - `GET  /v2/{ep}/job-stop/{pod}`: `{"jobsToStop": [...]}` (cancelled, timed out), held up
//!   to [`TAKE_WAIT`];
//! - `POST /v2/{ep}/job-done/{pod}/{job}`: a result, or `{"status":"IN_PROGRESS",...}`
//!   progress; the body is JSON whatever its content type says (the SDK labels it a form);
//! - `POST /v2/{ep}/job-stream/{pod}/{job}`: one partial output;
//! - `GET  /v2/{ep}/ping/{pod}?job_id=a,b`: alive, and renews those jobs' leases.

use crate::api::{ApiError, Peer};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gpuvisor_control::{Engine, EngineError};
use gpuvisor_node::ipam::Cidr;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long `job-take` and `job-stop` hold an empty answer (the SDK waits 90 s at most).
pub const TAKE_WAIT: Duration = Duration::from_secs(20);
/// Most jobs one batch take hands out.
const MAX_BATCH: usize = 64;
/// Most job ids one ping renews (a worker holding more renews them over several pings).
const MAX_PING_JOBS: usize = 1024;
/// A result's or chunk's body must arrive within this (after its headers).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Open connections to the worker API in all, and from one instance address (the SDK holds
/// a take, a stop poll and a ping, and posts the results of the jobs it runs at once, each on
/// a connection of its own: a worker running 64 jobs holds about 70).
pub const MAX_CONNECTIONS: usize = 8192;
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 128;
/// A tenant's instances together (by their subnet), so no tenant fills the listener.
pub const MAX_CONNECTIONS_PER_TENANT: usize = 1024;
/// Bodies being read or handled at once, in MiB (each charged its declared length, rounded
/// up, or its cap): what the worker API may hold in memory, in all and per tenant. A tenant
/// waits for its own share first, so its slow bodies queue behind each other and hold at
/// most a quarter of the whole: one tenant alone never makes another's result wait (four
/// tenants each holding their whole share at once would).
const BODY_BUDGET_MIB: u32 = 256;
const TENANT_BODY_BUDGET_MIB: u32 = 64;

type Budget = Arc<tokio::sync::Semaphore>;

fn body_budget() -> &'static Budget {
    static B: std::sync::OnceLock<Budget> = std::sync::OnceLock::new();
    B.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(BODY_BUDGET_MIB as usize)))
}

/// The tenant's share of the body budget (made when first needed, dropped when unused).
fn tenant_budget(tenant: &str) -> Budget {
    static M: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Budget>>> =
        std::sync::OnceLock::new();
    let mut m = M
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    m.retain(|_, b| Arc::strong_count(b) > 1);
    m.entry(tenant.to_string())
        .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(TENANT_BODY_BUDGET_MIB as usize)))
        .clone()
}

/// Room for a body of `mib` MiB: the tenant's share first, then the whole (both held by the
/// answer until the body is handled).
async fn reserve_body(
    tenant: &str,
    mib: u32,
) -> Result<
    (
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    ),
    EngineError,
> {
    let closed = |_| EngineError::Internal("the body budget is closed".into());
    let own = tenant_budget(tenant)
        .acquire_many_owned(mib)
        .await
        .map_err(closed)?;
    let all = body_budget()
        .clone()
        .acquire_many_owned(mib)
        .await
        .map_err(closed)?;
    Ok((own, all))
}

#[derive(Clone)]
struct WorkerApi {
    engine: Arc<Engine>,
    pool: Cidr,
}

pub fn worker_router(engine: Arc<Engine>, pool: Cidr) -> Router {
    let st = WorkerApi { engine, pool };
    Router::new()
        .route("/v2/{ep}/job-take/{pod}", get(take))
        .route("/v2/{ep}/job-take-batch/{pod}", get(take_batch))
        .route("/v2/{ep}/job-stop/{pod}", get(stops))
        .route("/v2/{ep}/job-done/{pod}/{job}", post(done))
        .route("/v2/{ep}/job-stream/{pod}/{job}", post(stream))
        .route("/v2/{ep}/ping/{pod}", get(ping))
        .layer(axum::extract::DefaultBodyLimit::max(
            gpuvisor_control::engine::serverless::MAX_OUTPUT_BYTES + 4096,
        ))
        .layer(axum::middleware::from_fn_with_state(
            st.clone(),
            only_instances,
        ))
        .with_state(st)
}

/// Anything not from an instance address is refused before a handler runs.
async fn only_instances(
    State(st): State<WorkerApi>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let from_instance = match req.extensions().get::<Peer>().map(|p| p.0) {
        Some(std::net::IpAddr::V4(ip)) => st.pool.contains(ip),
        Some(std::net::IpAddr::V6(ip)) => {
            ip.to_ipv4_mapped().is_some_and(|v4| st.pool.contains(v4))
        }
        None => false,
    };
    if !from_instance {
        return ApiError::from(EngineError::Forbidden(
            "the worker API answers instances only".into(),
        ))
        .into_response();
    }
    next.run(req).await
}

fn token(h: &HeaderMap) -> Option<&str> {
    h.get("authorization").and_then(|v| v.to_str().ok())
}

fn peer(p: &Option<axum::Extension<Peer>>) -> Option<std::net::IpAddr> {
    p.as_ref().map(|axum::Extension(Peer(ip))| *ip)
}

#[derive(Deserialize)]
struct TakeQuery {
    #[serde(default)]
    batch_size: Option<usize>,
}

async fn take_n(
    st: &WorkerApi,
    h: &HeaderMap,
    from: Option<std::net::IpAddr>,
    (ep, pod): (&str, &str),
    n: usize,
    list: bool,
) -> Response {
    let w = match st.engine.worker_auth(token(h), ep, pod, from).await {
        Ok(w) => w,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match st.engine.worker_take(&w, n, TAKE_WAIT).await {
        Ok(jobs) if jobs.is_empty() => StatusCode::NO_CONTENT.into_response(),
        Ok(mut jobs) if !list => Json(jobs.swap_remove(0)).into_response(),
        Ok(jobs) => Json(jobs).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn take(
    State(st): State<WorkerApi>,
    h: HeaderMap,
    p: Option<axum::Extension<Peer>>,
    Path((ep, pod)): Path<(String, String)>,
) -> Response {
    take_n(&st, &h, peer(&p), (&ep, &pod), 1, false).await
}

async fn take_batch(
    State(st): State<WorkerApi>,
    h: HeaderMap,
    p: Option<axum::Extension<Peer>>,
    Path((ep, pod)): Path<(String, String)>,
    uri: axum::http::Uri,
) -> Response {
    let n = Query::<TakeQuery>::try_from_uri(&uri)
        .ok()
        .and_then(|Query(q)| q.batch_size)
        .unwrap_or(1)
        .clamp(1, MAX_BATCH);
    take_n(&st, &h, peer(&p), (&ep, &pod), n, true).await
}

async fn stops(
    State(st): State<WorkerApi>,
    h: HeaderMap,
    p: Option<axum::Extension<Peer>>,
    Path((ep, pod)): Path<(String, String)>,
) -> Response {
    let w = match st.engine.worker_auth(token(&h), &ep, &pod, peer(&p)).await {
        Ok(w) => w,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let ids = st.engine.worker_stops(&w, TAKE_WAIT).await;
    if ids.is_empty() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        Json(serde_json::json!({ "jobsToStop": ids })).into_response()
    }
}

async fn done(
    State(st): State<WorkerApi>,
    h: HeaderMap,
    p: Option<axum::Extension<Peer>>,
    Path((ep, pod, job)): Path<(String, String, String)>,
    body: Body,
) -> Response {
    post_result(&st, &h, peer(&p), (&ep, &pod, &job), body, false).await
}

async fn stream(
    State(st): State<WorkerApi>,
    h: HeaderMap,
    p: Option<axum::Extension<Peer>>,
    Path((ep, pod, job)): Path<(String, String, String)>,
    body: Body,
) -> Response {
    post_result(&st, &h, peer(&p), (&ep, &pod, &job), body, true).await
}

/// A job's result (`job-done`) or one partial output (`job-stream`): the credential is
/// checked before a byte of the body is read, which is then read within [`BODY_TIMEOUT`]
/// and its cap (a result 20 MiB, a chunk 1 MiB).
async fn post_result(
    st: &WorkerApi,
    h: &HeaderMap,
    from: Option<std::net::IpAddr>,
    (ep, pod, job): (&str, &str, &str),
    body: Body,
    partial: bool,
) -> Response {
    use gpuvisor_control::engine::serverless::{MAX_CHUNK_BYTES, MAX_OUTPUT_BYTES};
    let r = async {
        let (w, tenant) = st
            .engine
            .worker_auth_tenant(token(h), ep, pod, from)
            .await?;
        let cap = if partial {
            MAX_CHUNK_BYTES
        } else {
            MAX_OUTPUT_BYTES
        };
        let declared = h
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(cap)
            .min(cap);
        let mib = u32::try_from(declared.div_ceil(1 << 20).max(1))
            .unwrap_or(TENANT_BODY_BUDGET_MIB)
            .min(TENANT_BODY_BUDGET_MIB);
        // Waits its turn (the SDK does not retry a refused result; connections are capped):
        // behind its own tenant's bodies first, then for room in the whole.
        let _room = reserve_body(&tenant, mib).await?;
        let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, cap)).await
        {
            Ok(Ok(b)) => b,
            Ok(Err(_)) => {
                return Err(EngineError::PayloadTooLarge(format!(
                    "the body is over {} MiB or was cut",
                    cap >> 20
                )))
            }
            Err(_) => {
                return Err(EngineError::DeadlineExceeded(format!(
                    "the body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                )))
            }
        };
        if partial {
            st.engine.worker_stream(&w, &tenant, job, &bytes).await
        } else {
            st.engine.worker_done(&w, &tenant, job, &bytes).await
        }
    }
    .await;
    answer(r)
}

async fn ping(
    State(st): State<WorkerApi>,
    h: HeaderMap,
    p: Option<axum::Extension<Peer>>,
    Path((ep, pod)): Path<(String, String)>,
    uri: axum::http::Uri,
) -> Response {
    let q = Query::<HashMap<String, String>>::try_from_uri(&uri)
        .map(|Query(q)| q)
        .unwrap_or_default();
    let jobs: Vec<String> = q
        .get("job_id")
        .map(|s| {
            s.split(',')
                .filter(|j| !j.is_empty())
                .take(MAX_PING_JOBS)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let r = async {
        let w = st
            .engine
            .worker_auth(token(&h), &ep, &pod, peer(&p))
            .await?;
        st.engine.worker_ping(&w, &jobs).await
    }
    .await;
    answer(r)
}

fn answer(r: Result<(), EngineError>) -> Response {
    match r {
        Ok(()) => Json(serde_json::json!({})).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant holding its whole share waits for its next body, while another tenant's body
    /// gets room at once; the first tenant's turn comes when its own share is given back.
    #[tokio::test]
    async fn a_tenants_bodies_wait_behind_its_own_share_only() {
        let held = reserve_body("t-greedy", TENANT_BODY_BUDGET_MIB)
            .await
            .unwrap();
        let next = tokio::spawn(async { reserve_body("t-greedy", 1).await.map(|_| ()) });
        let other = tokio::time::timeout(Duration::from_secs(5), reserve_body("t-other", 20))
            .await
            .expect("another tenant's body waited behind the greedy tenant's");
        assert!(other.is_ok());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !next.is_finished(),
            "the greedy tenant got more than its share"
        );
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("its turn never came")
            .unwrap()
            .unwrap();
    }
}
