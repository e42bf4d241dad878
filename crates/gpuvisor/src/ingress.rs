//! The daemon's side of the instance proxy (crates/proxy): its certificate, its settings in
//! the engine, and the answers to its questions, computed on the API's runtime.

use crate::config::proxy::ProxySection;
use anyhow::Context;
use gpuvisor_control::engine::ingress::IngressSettings;
use gpuvisor_control::engine::Engine;
use gpuvisor_control::EngineError;
use gpuvisor_proxy::{BoxFuture, RouteError, Routes, Target, TcpMap};
use std::path::Path;
use std::sync::Arc;

/// The engine, asked on the runtime that owns the store's connections: the proxy's own
/// runtime only waits for the answer.
struct EngineRoutes {
    engine: Arc<Engine>,
    main: tokio::runtime::Handle,
    /// Lookups running on the API's runtime at most: more are answered "busy" (503) rather
    /// than queued behind the API's work.
    lookups: Arc<tokio::sync::Semaphore>,
    /// Keys seen lately: (SHA-256 of the key, tenant) → (when, allowed), 1 s.
    keys: std::sync::Mutex<std::collections::HashMap<(String, String), (std::time::Instant, bool)>>,
}

/// Lookups on the API's runtime at once.
const MAX_LOOKUPS: usize = 64;
/// How long a key's answer is reused.
const KEY_TTL: std::time::Duration = std::time::Duration::from_secs(1);

fn route_error(e: EngineError) -> RouteError {
    match e {
        EngineError::NotFound(m) => RouteError::NotFound(m),
        EngineError::Unavailable(m) | EngineError::InvalidState(m) => RouteError::Unavailable(m),
        other => RouteError::Internal(other.to_string()),
    }
}

impl EngineRoutes {
    fn on_main<T, F>(&self, f: F) -> BoxFuture<'_, Result<T, RouteError>>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, EngineError>> + Send + 'static,
    {
        let Ok(permit) = self.lookups.clone().try_acquire_owned() else {
            return Box::pin(async {
                Err(RouteError::Unavailable(
                    "the proxy is busy: try again".into(),
                ))
            });
        };
        let job = self.main.spawn(async move {
            let _permit = permit;
            f.await
        });
        Box::pin(async move {
            job.await
                .map_err(|e| RouteError::Internal(format!("lookup failed: {e}")))?
                .map_err(route_error)
        })
    }
}

impl Routes for EngineRoutes {
    fn target(&self, instance: &str, port: u16) -> BoxFuture<'_, Result<Target, RouteError>> {
        let (e, id) = (self.engine.clone(), instance.to_string());
        let job = self.on_main(async move { e.ingress_target(&id, port).await });
        Box::pin(async move {
            job.await.map(|t| Target {
                tenant: t.tenant_id,
                addr: t.addr,
                public: t.public,
                protocol: t.protocol,
            })
        })
    }

    fn key_allows(&self, secret: &str, tenant: &str) -> BoxFuture<'_, bool> {
        let cache_key = (
            gpuvisor_control::engine::hash_key(secret),
            tenant.to_string(),
        );
        if let Some((at, allowed)) = self
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cache_key)
        {
            if at.elapsed() < KEY_TTL {
                return Box::pin(std::future::ready(*allowed));
            }
        }
        let (e, secret, tenant) = (self.engine.clone(), secret.to_string(), tenant.to_string());
        let job = self.on_main(async move { Ok(e.ingress_key_allows(&secret, &tenant).await) });
        Box::pin(async move {
            // Unanswered (busy, failed): refused, and not remembered.
            let Ok(allowed) = job.await else {
                return false;
            };
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            if keys.len() >= 10_000 {
                keys.retain(|_, (at, _)| at.elapsed() < KEY_TTL);
            }
            if keys.len() < 10_000 {
                keys.insert(cache_key, (std::time::Instant::now(), allowed));
            }
            allowed
        })
    }

    fn activity(&self, instance: &str, change: gpuvisor_proxy::Activity) {
        use gpuvisor_control::engine::ingress::Activity;
        self.engine.ingress_activity(
            instance,
            match change {
                gpuvisor_proxy::Activity::Opened => Activity::Opened,
                gpuvisor_proxy::Activity::Closed => Activity::Closed,
            },
        );
    }

    fn link_valid(&self, instance: &str, port: u16, token: &str) -> Option<i64> {
        self.engine.verify_link(instance, port, token)
    }

    fn tcp_maps(&self) -> BoxFuture<'_, Result<Vec<TcpMap>, RouteError>> {
        let e = self.engine.clone();
        let job = self.on_main(async move { e.ingress_tcp_maps().await });
        Box::pin(async move {
            job.await.map(|maps| {
                maps.into_iter()
                    .map(|m| TcpMap {
                        host_port: m.host_port,
                        instance: m.instance,
                        port: m.port,
                    })
                    .collect()
            })
        })
    }
}

/// Starts the proxy when `[proxy] listen` is set: its certificate (the operator's for
/// `*.<domain>`, else one the daemon's CA signs), its settings in the engine (URLs, TCP
/// maps, links) and its runtime. `None` when it is off.
pub fn start(
    p: &ProxySection,
    data_dir: &Path,
    hostname: &str,
    min_tls: crate::tls::MinVersion,
    engine: Arc<Engine>,
    header_timeout: std::time::Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<gpuvisor_proxy::ProxyHandle>> {
    let Some(listen) = p.listen else {
        tracing::info!("instance proxy: off");
        return Ok(None);
    };
    crate::tls::install_default_provider();
    let source = match (&p.cert, &p.key) {
        (Some(cert), Some(key)) => crate::tls::CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => crate::tls::CertSource::Generated {
            data_dir: data_dir.to_path_buf(),
            names: vec![format!("*.{}", p.domain), p.domain.clone()],
            leaf: crate::tls::Leaf::Proxy,
        },
    };
    let tls = Arc::new(
        crate::tls::ServerTls::new(source, min_tls)
            .context("cannot set up the instance proxy's TLS")?,
    );
    tokio::spawn(tls.clone().watch(std::time::Duration::from_secs(60)));
    let mut config = (*tls.config).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let link_key = gpuvisor_node::keys::key_file(data_dir, "proxy-link.key")
        .context("cannot prepare the proxy's link key")?;
    // Each proxied connection holds two descriptors (the client's, the instance's): the cap
    // stays under half the open-file limit, so the proxy cannot take the API's and the
    // store's descriptors.
    let fd_room = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| (soft / 2) as usize)
        .unwrap_or(512);
    let max_connections = p.max_connections.min(fd_room.max(16));
    if max_connections < p.max_connections {
        tracing::warn!(
            "proxy.max_connections {} is over half the open-file limit: {max_connections}",
            p.max_connections
        );
    }
    let routes = Arc::new(EngineRoutes {
        engine: engine.clone(),
        main: tokio::runtime::Handle::current(),
        lookups: Arc::new(tokio::sync::Semaphore::new(MAX_LOOKUPS)),
        keys: Default::default(),
    });
    let handle = gpuvisor_proxy::spawn(
        gpuvisor_proxy::ProxyConfig {
            listen,
            domain: p.domain.clone(),
            tcp_listen: p.tcp_listen,
            request_timeout: p.request_timeout,
            idle_timeout: p.idle_timeout,
            connect_timeout: p.connect_timeout,
            header_timeout,
            max_connections,
            max_connections_per_ip: p.max_connections_per_ip,
            threads: p.threads,
            route_ttl: std::time::Duration::from_secs(1),
            tcp_sync_every: std::time::Duration::from_secs(1),
        },
        Arc::new(config),
        routes,
        stop,
    )
    .with_context(|| format!("cannot start the instance proxy on {listen}"))?;
    engine.set_ingress(
        IngressSettings {
            domain: p.domain.clone(),
            https_port: p.public_port.unwrap_or(handle.local_addr.port()),
            public_host: p
                .public_host
                .clone()
                .unwrap_or_else(|| hostname.to_string()),
            tcp_ports: p.tcp_ports,
        },
        &link_key[..],
    );
    tracing::info!(
        "instance proxy on https://{} for https://<instance-id>-<port>.{}/; TCP maps {}-{}",
        handle.local_addr,
        p.domain,
        p.tcp_ports.0,
        p.tcp_ports.1
    );
    Ok(Some(handle))
}
