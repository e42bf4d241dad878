//! The HTTPS side: TLS with ALPN (h2, http/1.1), routing by host, access, forwarding.

use crate::body::{text, IdleBody, ProxyBody};
use crate::gate::{Gate, Slot};
use crate::{ProxyConfig, RouteError};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The query parameter of a signed link.
const LINK: &str = "gv_link";
/// Its cookie: `__Host-` makes browsers refuse one set with a `Domain` (another instance
/// under the same domain cannot plant or overwrite it).
const LINK_COOKIE: &str = "__Host-gv_link";

type Upstream = Client<HttpConnector, IdleBody<Incoming>>;

struct Ctx {
    cfg: Arc<ProxyConfig>,
    gate: Arc<Gate>,
    client: Upstream,
}

/// Serves HTTPS on `listener` until `stop`.
pub async fn serve(
    cfg: Arc<ProxyConfig>,
    tls: Arc<rustls::ServerConfig>,
    gate: Arc<Gate>,
    listener: tokio::net::TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(cfg.connect_timeout));
    connector.set_nodelay(true);
    connector.enforce_http(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        // Enough for a busy client's concurrency to reuse connections (8 halved the rate at
        // 16 connections: docs/bench/ingress.md); idle sockets are not in the cap.
        .pool_max_idle_per_host(32)
        .pool_timer(TokioTimer::new())
        .build(connector);
    let ctx = Arc::new(Ctx {
        cfg: cfg.clone(),
        gate: gate.clone(),
        client,
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let permit = tokio::select! {
            p = gate.permit() => match p {
                Some(p) => p,
                None => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("proxy accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let Some(slot) = gate.admit(peer.ip(), permit) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(ctx.cfg.header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!("proxy: TLS handshake with {peer}: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            serve_connection(ctx, peer, slot, tls).await;
        });
    }
}

/// One client connection. The protocol is the one ALPN agreed (no sniffing). Every write to
/// the client fails after `idle_timeout` without progress (`pump::Counted`: a client that stops
/// reading cannot hold its connection). HTTP/1.1: at most `header_timeout` to send each
/// request's head, idle keep-alive included. HTTP/2: at most 32 streams at a time; closed when
/// no byte moved for `header_timeout` before its first request, for `idle_timeout` after
/// (pings every 30 s find dead peers), and dropped if it has not closed `header_timeout` after
/// being asked to.
async fn serve_connection(
    ctx: Arc<Ctx>,
    peer: SocketAddr,
    slot: Arc<Slot>,
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let served = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let svc_ctx = ctx.clone();
    let svc_slot = slot.clone();
    let svc_served = served.clone();
    let svc = hyper::service::service_fn(move |req| {
        svc_served.store(true, Ordering::Relaxed);
        let (ctx, slot) = (svc_ctx.clone(), svc_slot.clone());
        async move { Ok::<_, Infallible>(handle(ctx, peer, slot, req).await) }
    });
    let seen = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(crate::pump::Counted::new(
        tls,
        seen.clone(),
        ctx.cfg.idle_timeout,
    ));
    let result = if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(32)
            .keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_timeout(std::time::Duration::from_secs(20))
            .serve_connection(io, svc);
        tokio::pin!(conn);
        let mut last = seen.load(Ordering::Relaxed);
        let mut quiet_since = tokio::time::Instant::now();
        loop {
            tokio::select! {
                r = conn.as_mut() => break r.map_err(|e| e.to_string()),
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                    let now = seen.load(Ordering::Relaxed);
                    let limit = if served.load(Ordering::Relaxed) {
                        ctx.cfg.idle_timeout
                    } else {
                        ctx.cfg.header_timeout
                    };
                    if now != last {
                        last = now;
                        quiet_since = tokio::time::Instant::now();
                    } else if quiet_since.elapsed() >= limit {
                        conn.as_mut().graceful_shutdown();
                        break match tokio::time::timeout(ctx.cfg.header_timeout, conn.as_mut()).await {
                            Ok(r) => r.map_err(|e| e.to_string()),
                            Err(_) => Err("idle: closed".to_string()),
                        };
                    }
                }
            }
        }
    } else {
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(ctx.cfg.header_timeout)
            .serve_connection(io, svc)
            .with_upgrades()
            .await
            .map_err(|e| e.to_string())
    };
    if let Err(e) = result {
        tracing::debug!("proxy: connection from {peer}: {e}");
    }
}

/// Why a request gets the proxy's own answer.
#[derive(Debug)]
enum Refusal {
    NoRoute(String),
    Unavailable(String),
    Unauthorized,
    BadGateway(String),
    Timeout,
    Busy,
}

impl Refusal {
    fn response(self) -> Response<ProxyBody> {
        let (status, msg) = match self {
            Self::NoRoute(m) => (StatusCode::NOT_FOUND, m),
            Self::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "this port is private: send an API key of its tenant (x-api-key or \
                 Authorization: Bearer) or open a link from `gpuvisor instance link`"
                    .to_string(),
            ),
            Self::BadGateway(m) => (StatusCode::BAD_GATEWAY, m),
            Self::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "the instance did not answer in time".to_string(),
            ),
            Self::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the proxy is at its connection limit: try again".to_string(),
            ),
        };
        let mut r = Response::new(text(format!("{msg}\n")));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

async fn handle(
    ctx: Arc<Ctx>,
    peer: SocketAddr,
    slot: Arc<Slot>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    match forward(&ctx, peer, slot, req).await {
        Ok(r) => r,
        Err(refusal) => refusal.response(),
    }
}

/// The name the client asked for: HTTP/2's `:authority`, else the Host header.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
}

/// Every value of cookie `name` in the request's Cookie headers.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .filter_map(|kv| kv.trim().split_once('='))
        .filter(move |(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The Cookie headers without cookie `name` (left as they are when it is not there; bytes
/// that are not UTF-8 are kept).
fn drop_cookie(headers: &mut HeaderMap, name: &str) {
    let is_it = |kv: &[u8]| {
        let kv = kv.trim_ascii_start();
        kv.starts_with(name.as_bytes()) && kv.get(name.len()) == Some(&b'=')
    };
    let present = headers
        .get_all(header::COOKIE)
        .iter()
        .any(|v| v.as_bytes().split(|b| *b == b';').any(is_it));
    if !present {
        return;
    }
    let values: Vec<HeaderValue> = headers.get_all(header::COOKIE).iter().cloned().collect();
    headers.remove(header::COOKIE);
    for v in values {
        let kept: Vec<&[u8]> = v
            .as_bytes()
            .split(|b| *b == b';')
            .filter(|kv| !is_it(kv) && !kv.trim_ascii().is_empty())
            .map(|kv| kv.trim_ascii())
            .collect();
        if !kept.is_empty() {
            if let Ok(v) = HeaderValue::from_bytes(&kept.join(&b"; "[..])) {
                headers.append(header::COOKIE, v);
            }
        }
    }
}

/// The query without parameter `name`, and that parameter's value.
fn split_query(query: &str, name: &str) -> (String, Option<String>) {
    let mut found = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.split_once('=') {
            Some((k, v)) if k == name => {
                found = Some(v.to_string());
                false
            }
            _ => !kv.is_empty(),
        })
        .collect();
    (rest.join("&"), found)
}

/// Whether a header value is a gpuvisor key: `gv_…` as `x-api-key`, or as a bearer token
/// (scheme in any case).
fn gv_token(name: &HeaderName, value: &HeaderValue) -> Option<String> {
    let v = value.to_str().ok()?.trim();
    let token = if name == header::AUTHORIZATION {
        match v.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            Some(_) => return None,
            // Bare, as RunPod's clients send keys (the API takes them so too).
            None => v,
        }
    } else if name.as_str() == "x-api-key" {
        v
    } else {
        return None;
    };
    token.starts_with("gv_").then(|| token.to_string())
}

/// Every gpuvisor key the client sent (any other `Authorization` or `x-api-key` is the
/// application's).
fn api_keys(headers: &HeaderMap) -> Vec<String> {
    let x_api_key = HeaderName::from_static("x-api-key");
    [header::AUTHORIZATION, x_api_key]
        .iter()
        .flat_map(|n| headers.get_all(n).iter().map(move |v| (n, v)))
        .filter_map(|(n, v)| gv_token(n, v))
        .collect()
}

/// Removes every gpuvisor key (never the instance's to see); the application's own
/// `Authorization` and `x-api-key` values stay.
fn strip_api_keys(headers: &mut HeaderMap) {
    for n in [header::AUTHORIZATION, HeaderName::from_static("x-api-key")] {
        let values: Vec<HeaderValue> = headers.get_all(&n).iter().cloned().collect();
        if values.iter().all(|v| gv_token(&n, v).is_none()) {
            continue;
        }
        headers.remove(&n);
        for v in values {
            if gv_token(&n, &v).is_none() {
                headers.append(n.clone(), v);
            }
        }
    }
}

/// An instance's cookies stay on its own host: a `Domain` attribute (which would plant a
/// cookie on every instance under the proxy's domain, or the operator's parent domain) is
/// removed from each `Set-Cookie` (the attribute's name is matched as browsers do: trimmed, in
/// any case).
fn host_only_cookies(headers: &mut HeaderMap) {
    let is_domain = |attr: &[u8]| {
        let name = attr.split(|b| *b == b'=').next().unwrap_or(attr);
        name.trim_ascii().eq_ignore_ascii_case(b"domain")
    };
    let has_domain = |v: &HeaderValue| v.as_bytes().split(|b| *b == b';').skip(1).any(is_domain);
    if !headers.get_all(header::SET_COOKIE).iter().any(has_domain) {
        return;
    }
    let values: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in values {
        let mut parts = v.as_bytes().split(|b| *b == b';');
        let mut kept: Vec<&[u8]> = parts.next().into_iter().collect();
        kept.extend(parts.filter(|a| !is_domain(a)));
        if let Ok(v) = HeaderValue::from_bytes(&kept.join(&b";"[..])) {
            headers.append(header::SET_COOKIE, v);
        }
    }
}

/// Hop-by-hop headers: never passed on (RFC 9110 §7.6.1), with those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if !(keep_upgrade && n == header::UPGRADE) {
            headers.remove(n);
        }
    }
    for n in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(n);
    }
    headers.remove(header::CONNECTION);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

async fn forward(
    ctx: &Arc<Ctx>,
    peer: SocketAddr,
    slot: Arc<Slot>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Refusal> {
    let host = request_host(&req).unwrap_or_default();
    let (id, port) = crate::parse_host(&host, &ctx.cfg.domain).ok_or_else(|| {
        Refusal::NoRoute(format!(
            "{host:?} is not an instance port: use https://<instance-id>-<port>.{}/",
            ctx.cfg.domain
        ))
    })?;
    let target = ctx.gate.target(&id, port).await.map_err(|e| match e {
        RouteError::NotFound(m) => Refusal::NoRoute(m),
        RouteError::Unavailable(m) => Refusal::Unavailable(m),
        RouteError::Internal(m) => Refusal::BadGateway(m),
    })?;
    if target.protocol != "http" {
        return Err(Refusal::BadGateway(format!(
            "port {port} of instance {id} is {}: the proxy speaks plain HTTP to instances",
            target.protocol
        )));
    }
    // Access. A valid link in the query becomes a cookie of this host, and the client goes
    // to the same URL without it (out of its history and the instance's logs).
    let query = req.uri().query().unwrap_or("").to_string();
    let (rest_query, link) = split_query(&query, LINK);
    if let Some(token) = link {
        let Some(expires) = (!target.public)
            .then(|| ctx.gate.routes.link_valid(&id, port, &token))
            .flatten()
        else {
            return Err(if target.public {
                Refusal::NoRoute("this port is public: it needs no link".into())
            } else {
                Refusal::Unauthorized
            });
        };
        let now = crate::body::now_ms() / 1000;
        let path = req.uri().path();
        let location = if rest_query.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{rest_query}")
        };
        let mut r = Response::new(text(""));
        *r.status_mut() = StatusCode::SEE_OTHER;
        let cookie = format!(
            "{LINK_COOKIE}={token}; Max-Age={}; Path=/; Secure; HttpOnly; SameSite=Lax",
            (expires - now).max(0)
        );
        if let (Ok(l), Ok(c)) = (
            HeaderValue::from_str(&location),
            HeaderValue::from_str(&cookie),
        ) {
            r.headers_mut().insert(header::LOCATION, l);
            r.headers_mut().insert(header::SET_COOKIE, c);
        }
        return Ok(r);
    }
    if !target.public {
        let by_cookie = cookies(req.headers(), LINK_COOKIE)
            .any(|t| ctx.gate.routes.link_valid(&id, port, t).is_some());
        if !by_cookie {
            let mut allowed = false;
            for secret in api_keys(req.headers()).iter().take(4) {
                if ctx.gate.routes.key_allows(secret, &target.tenant).await {
                    allowed = true;
                    break;
                }
            }
            if !allowed {
                return Err(Refusal::Unauthorized);
            }
        }
    }
    // The proxy's credentials are never the instance's to see, public port or not.
    drop_cookie(req.headers_mut(), LINK_COOKIE);
    strip_api_keys(req.headers_mut());

    // A place in the caps for the request to the instance (a descriptor), held with the
    // instance's "in use" until the answer's body is done (or the tunnel closes).
    let permit = ctx.gate.upstream().ok_or(Refusal::Busy)?;
    let in_use = crate::InUse::new(&ctx.gate.routes, &id);
    let upgrade = is_upgrade(&req);
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let uri: Uri = format!("http://{}{path_and_query}", target.addr)
        .parse()
        .map_err(|e| Refusal::BadGateway(format!("bad request URI: {e}")))?;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    for n in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "forwarded",
        "x-real-ip",
    ] {
        parts.headers.remove(n);
    }
    let set = |h: &mut HeaderMap, n: &'static str, v: &str| {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(HeaderName::from_static(n), v);
        }
    };
    let client_ip = peer.ip().to_string();
    set(&mut parts.headers, "x-forwarded-for", &client_ip);
    set(&mut parts.headers, "x-forwarded-proto", "https");
    set(&mut parts.headers, "x-forwarded-host", &host);
    set(&mut parts.headers, "x-real-ip", &client_ip);
    let fwd_for = if peer.is_ipv6() {
        format!("\"[{client_ip}]\"")
    } else {
        client_ip.clone()
    };
    set(
        &mut parts.headers,
        "forwarded",
        &format!("for={fwd_for};proto=https;host=\"{host}\""),
    );
    if let Ok(h) = HeaderValue::from_str(&host) {
        parts.headers.insert(header::HOST, h);
    }
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    let sent = Arc::new(tokio::sync::Notify::new());
    let progress = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let out = Request::from_parts(
        parts,
        IdleBody::new(body, ctx.cfg.idle_timeout)
            .notify_end(sent.clone())
            .progress(progress.clone()),
    );

    // The response head is awaited for `request_timeout` once the request's body is all sent
    // (a long upload is not cut), and while it is being sent, for as long as it moves: an
    // instance that stops reading it is given up on after `idle_timeout` without progress.
    let answer = ctx.client.request(out);
    let idle_ms = ctx.cfg.idle_timeout.as_millis() as i64;
    let deadline = async {
        let stalled = async {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                if crate::body::now_ms() - progress.load(Ordering::Relaxed) >= idle_ms {
                    break;
                }
            }
        };
        tokio::select! {
            _ = sent.notified() => tokio::time::sleep(ctx.cfg.request_timeout).await,
            _ = stalled => {}
        }
    };
    let resp = match tokio::select! {
        r = answer => Some(r),
        _ = deadline => None,
    } {
        None => return Err(Refusal::Timeout),
        Some(Err(e)) => {
            return Err(Refusal::BadGateway(format!(
                "cannot reach port {port} of instance {id}: {}",
                error_chain(&e)
            )))
        }
        Some(Ok(r)) => r,
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(Refusal::BadGateway(
                "the instance switched protocols unasked".into(),
            ));
        };
        return Ok(tunnel(
            ctx,
            id,
            client_upgrade,
            resp,
            (in_use, permit, slot),
        ));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    host_only_cookies(&mut parts.headers);
    let body = IdleBody::new(body, ctx.cfg.idle_timeout)
        .holding((in_use, permit))
        .boxed();
    Ok(Response::from_parts(parts, body))
}

/// A 101 from the instance: the client gets it, and both upgraded connections are joined.
fn tunnel(
    ctx: &Arc<Ctx>,
    id: String,
    client: hyper::upgrade::OnUpgrade,
    mut resp: Response<Incoming>,
    held: (crate::InUse, tokio::sync::OwnedSemaphorePermit, Arc<Slot>),
) -> Response<ProxyBody> {
    let upstream = hyper::upgrade::on(&mut resp);
    let idle = ctx.cfg.idle_timeout;
    tokio::spawn(async move {
        // The tunnel keeps its connection's places in the caps until it closes.
        let _held = held;
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let (up, down) = crate::pump::pump(TokioIo::new(c), TokioIo::new(u), idle).await;
                tracing::debug!(instance = %id, up, down, "proxy: tunnel closed");
            }
            Err(e) => tracing::debug!(instance = %id, "proxy: upgrade failed: {e}"),
        }
    });
    let (mut parts, _) = resp.into_parts();
    host_only_cookies(&mut parts.headers);
    Response::from_parts(parts, text(""))
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_parameter_and_cookie_are_taken_out() {
        assert_eq!(
            split_query("a=1&gv_link=t.x&b=2", LINK),
            ("a=1&b=2".to_string(), Some("t.x".to_string()))
        );
        assert_eq!(split_query("", LINK), (String::new(), None));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; gv_link=tok; b=2"),
        );
        assert_eq!(cookies(&h, LINK).collect::<Vec<_>>(), ["tok"]);
        drop_cookie(&mut h, LINK);
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2");
        let mut only = HeaderMap::new();
        only.insert(header::COOKIE, HeaderValue::from_static("gv_link=tok"));
        drop_cookie(&mut only, LINK);
        assert!(only.get(header::COOKIE).is_none());
    }

    #[test]
    fn gpuvisor_keys_are_found_and_stripped_wherever_they_are() {
        let mut h = HeaderMap::new();
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YTpi"),
        );
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer gv_abc"),
        );
        // Bare, as RunPod's clients send it.
        h.append(header::AUTHORIZATION, HeaderValue::from_static("gv_bare"));
        h.append(header::AUTHORIZATION, HeaderValue::from_static("app-bare"));
        h.append("x-api-key", HeaderValue::from_static("app-key"));
        h.append("x-api-key", HeaderValue::from_static("gv_k"));
        assert_eq!(api_keys(&h), ["gv_abc", "gv_bare", "gv_k"]);
        strip_api_keys(&mut h);
        let auth: Vec<_> = h.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(auth, ["Basic YTpi", "app-bare"]);
        let keys: Vec<_> = h.get_all("x-api-key").iter().collect();
        assert_eq!(keys, ["app-key"]);
        let mut app = HeaderMap::new();
        app.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer app-token"),
        );
        assert!(api_keys(&app).is_empty());
        strip_api_keys(&mut app);
        assert_eq!(app.get(header::AUTHORIZATION).unwrap(), "Bearer app-token");
    }

    #[test]
    fn instance_cookies_lose_their_domain_however_it_is_written() {
        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("a=1; Domain=gv.test; Path=/"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("b=2; domain =gv.test"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("c=3;\tDOMAIN\t= .gv.test; Secure"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("Domain=kept; Path=/"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_bytes(b"d=caf\xc3\xa9; Domain=gv.test").unwrap(),
        );
        host_only_cookies(&mut h);
        let got: Vec<&[u8]> = h
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        assert_eq!(
            got,
            [
                &b"a=1; Path=/"[..],
                b"b=2",
                b"c=3; Secure",
                b"Domain=kept; Path=/",
                b"d=caf\xc3\xa9",
            ]
        );
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-app"));
    }
}
