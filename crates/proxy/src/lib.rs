//! The HTTPS proxy to instance ports, and the TCP port maps.
//!
//! `https://<instance-id>-<port>.<domain>/` is routed (by the Host header, or HTTP/2's
//! `:authority`) to that port of the instance over its tenant's bridge: HTTP/1.1 and HTTP/2
//! to the client (ALPN), HTTP/1.1 to the instance, WebSocket upgrades tunnelled, bodies
//! streamed both ways with hyper's back-pressure (nothing is buffered whole), a deadline for
//! the response head and an idle deadline on bodies and tunnels. `X-Forwarded-For`, `-Proto`,
//! `-Host` and `Forwarded` are set by the proxy (a client's own are dropped). Private ports
//! need an API key of the instance's tenant (`x-api-key`, or `Authorization: Bearer gv_…`,
//! removed before the request goes on) or a signed link (`?gv_link=`, kept as a host-only
//! cookie); public ports are open.
//!
//! TCP maps: a host port from a pool per TCP port of an instance, relayed byte for byte.
//!
//! The proxy faces the internet, so it runs on its own tokio runtime and threads
//! ([`spawn`]): its load cannot starve the API's workers. It knows nothing of the store: the
//! daemon answers its questions through [`Routes`].

mod body;
mod gate;
mod host;
mod http;
mod pump;
mod tcp;

pub use host::parse_host;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A boxed future, for the [`Routes`] trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a port is.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The instance's tenant (the one whose keys open a private port).
    pub tenant: String,
    pub addr: SocketAddr,
    pub public: bool,
    /// `http`, `https` or `tcp`: what the instance speaks on the port.
    pub protocol: String,
}

/// A host port mapped to an instance's TCP port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpMap {
    pub host_port: u16,
    pub instance: String,
    pub port: u16,
}

/// Why there is no target.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    /// No such live instance, or no such port: 404.
    #[error("{0}")]
    NotFound(String),
    /// Not running: 503.
    #[error("{0}")]
    Unavailable(String),
    /// The daemon could not answer: 502.
    #[error("{0}")]
    Internal(String),
}

/// What the proxy asks the daemon.
pub trait Routes: Send + Sync + 'static {
    /// Port `port` of instance `instance` (an id).
    fn target(&self, instance: &str, port: u16) -> BoxFuture<'_, Result<Target, RouteError>>;
    /// Whether API key `secret` opens a private port of `tenant`'s instances.
    fn key_allows(&self, secret: &str, tenant: &str) -> BoxFuture<'_, bool>;
    /// The expiry (unix seconds) of `token` if it is a valid link to this port.
    fn link_valid(&self, instance: &str, port: u16, token: &str) -> Option<i64>;
    /// Every TCP map there should be.
    fn tcp_maps(&self) -> BoxFuture<'_, Result<Vec<TcpMap>, RouteError>>;
    /// Traffic of an instance (for its idle timeout): a connection or request began or
    /// ended. Called on the proxy's threads: it must not block.
    fn activity(&self, instance: &str, change: Activity);
}

/// What [`Routes::activity`] is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// A request, a tunnel or a TCP connection began: the instance is in use until the
    /// matching `Closed`.
    Opened,
    Closed,
}

/// An instance in use while this lives ([`Activity::Opened`] now, `Closed` when dropped).
pub(crate) struct InUse {
    routes: Arc<dyn Routes>,
    instance: String,
}

impl InUse {
    pub(crate) fn new(routes: &Arc<dyn Routes>, instance: &str) -> Self {
        routes.activity(instance, Activity::Opened);
        Self {
            routes: routes.clone(),
            instance: instance.to_string(),
        }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.routes.activity(&self.instance, Activity::Closed);
    }
}

/// The proxy's settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// `<instance-id>-<port>.<domain>`.
    pub domain: String,
    pub tcp_listen: IpAddr,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// A client that has not sent a request's headers (or finished its TLS handshake) in this
    /// long is disconnected.
    pub header_timeout: Duration,
    /// Open connections (HTTPS, tunnels, TCP relays together) at most, and per client address.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub threads: usize,
    /// How long a target (or its absence) is reused before the daemon is asked again.
    pub route_ttl: Duration,
    /// How often the TCP maps are brought in line with the daemon's.
    pub tcp_sync_every: Duration,
}

/// The running proxy: its thread ends when `stop` is dropped or set.
pub struct ProxyHandle {
    pub thread: std::thread::JoinHandle<()>,
    pub local_addr: SocketAddr,
}

/// Binds the listener now (an address in use is an error at start, not later) and runs the
/// proxy on its own runtime of `cfg.threads` workers on a new thread.
pub fn spawn(
    cfg: ProxyConfig,
    tls: Arc<rustls::ServerConfig>,
    routes: Arc<dyn Routes>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<ProxyHandle> {
    let listener = std::net::TcpListener::bind(cfg.listen)?;
    listener.set_nonblocking(true)?;
    let local_addr = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads)
        .thread_name("gv-proxy")
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("gv-proxy-main".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("proxy: cannot use the listener: {e}");
                        return;
                    }
                };
                let cfg = Arc::new(cfg);
                let gate = gate::Gate::new(cfg.clone(), routes);
                let tcp = tokio::spawn(tcp::run(cfg.clone(), gate.clone(), stop.clone()));
                let http = http::serve(cfg, tls, gate, listener, stop.clone());
                tokio::select! {
                    _ = http => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
                tcp.abort();
            });
            rt.shutdown_timeout(Duration::from_secs(5));
        })?;
    Ok(ProxyHandle { thread, local_addr })
}
