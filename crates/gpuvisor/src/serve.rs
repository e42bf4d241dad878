//! `gpuvisor serve`: the daemon. Reads the config (embedded defaults < TOML file < flags and
//! environment), takes its locks (one daemon per data dir, one per network prefix), probes the
//! host, opens the store, finds its node id, prints the admin key on first start, runs the
//! reconciler and serves the REST API until SIGTERM or SIGINT.
//!
//! Node identity: a random id made at the first start and kept in `<data>/node-id`, never the
//! hostname (which an operator may change, and which two daemons on one host share). A data
//! dir from before the id file keeps the id its store already uses for this host.

use crate::config::{Config, ConfigOverrides};
use anyhow::Context;
use clap::Args;
use gpuvisor_control::placement::Scheduled;
use gpuvisor_control::store::Store;
use gpuvisor_control::{Engine, EngineConfig};
use gpuvisor_node::{HostRoot, Node, NodeConfig};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML config file (values there are overridden by flags).
    #[arg(long, env = "GPUVISOR_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: ConfigOverrides,
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GPUVISOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let cfg = Config::load(args.config.as_deref(), &args.overrides)?;
    // 0711, with every subtree that holds tenant data or secrets 0700 (tightened if looser).
    gpuvisor_node::instance::private_data_dir(&cfg.data_dir)
        .with_context(|| format!("cannot prepare data dir {}", cfg.data_dir.display()))?;
    // Held until the daemon exits (the kernel drops them with the process, even on SIGKILL).
    let _data_lock = lock_data_dir(&cfg.data_dir)?;
    let _net_lock = lock_net_prefix(&cfg.network.prefix, &cfg.data_dir)?;

    if let Some(online) = HostRoot::real().online_cpus() {
        check_reserved_cpus(&cfg.reserved_cpus, &online)?;
    }
    let node_cfg = NodeConfig {
        data_dir: cfg.data_dir.clone(),
        runtime: cfg.runtime.clone(),
        simulate_gpus: cfg.simulate_gpus.clone(),
        net_plan: cfg.net_plan,
        nat: cfg.nat,
        pids_limit: cfg.pids_limit,
        root: HostRoot::real().with_cgroup_parent(cfg.cgroup_parent.clone()),
        limiter_lib: cfg.limiter_lib.clone(),
        limiter_context_bytes: cfg.limiter_context_bytes,
        limiter_over_quota: cfg.limiter_over_quota,
        manage_ksm: cfg.manage_ksm,
        reserved_cpus: cfg.reserved_cpus.clone(),
    };
    let policy = gpuvisor_node::net::NetPolicy {
        prefix: cfg.network.prefix.clone(),
        allow: cfg.network.allow.clone(),
        deny: cfg.network.deny.clone(),
        host_ports: cfg.proxy.worker_port.into_iter().collect(),
    };
    // The serverless worker API: bound before the host's filter opens its port to instances.
    let worker_listener = match cfg.proxy.worker_port {
        Some(port) => Some(
            tokio::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port))
                .await
                .with_context(|| format!("cannot listen on the worker API's port {port} (proxy.worker_port; `off` to turn serverless endpoints off)"))?,
        ),
        None => None,
    };
    let log_limits = gpuvisor_node::logs::LogLimits {
        max_bytes: cfg.limits.log_max_bytes,
        reserve: cfg.limits.log_reserve,
        // Instance output goes through this binary's `log-relay` mode.
        relay: std::env::current_exe().ok(),
    };
    let (vm_kernel, vm_initrd, data_dir) = (
        cfg.vm_kernel.clone(),
        cfg.vm_initrd.clone(),
        cfg.data_dir.clone(),
    );
    let vm_qemu = match &cfg.vm_qemu {
        Some(q) if !q.is_file() => anyhow::bail!("vm_qemu {} is not a file", q.display()),
        Some(q) => Some(q.clone()),
        None => gpuvisor_node::vm::find_qemu(),
    };

    let node = tokio::task::spawn_blocking(move || {
        let node = Node::open_with_network(node_cfg, policy)?.with_log_limits(log_limits);
        // Micro-VMs where QEMU is installed; KVM or TCG as the probe says (cached per boot).
        Ok::<_, gpuvisor_node::NodeError>(match vm_qemu {
            Some(qemu) => {
                let accel = gpuvisor_node::vm::qemu::probe_accel(
                    &node.cfg.root,
                    &qemu,
                    vm_kernel.as_deref(),
                );
                let qemu_version = gpuvisor_node::vm::qemu::binary_version(&qemu);
                tracing::info!(qemu = %qemu.display(), version = ?qemu_version, accel = accel.describe(), "micro-VMs available");
                let vm = gpuvisor_node::vm::runtime::VmRuntime::new(
                    gpuvisor_node::vm::VmConfig {
                        qemu,
                        kernel: vm_kernel,
                        initrd: vm_initrd,
                        accel,
                    },
                    &data_dir,
                );
                node.with_runtime(Box::new(vm))
            }
            None => {
                tracing::info!("no qemu-system-x86_64: VM instances are unavailable");
                node
            }
        })
    })
    .await?
    .context("cannot prepare this host")?;
    tracing::info!(
        gpus = node.gpus().len(),
        backend = node.backend().as_str(),
        runtime = node.container.oci.binary(),
        "host ready"
    );
    let db = match cfg.database.clone() {
        Some(url) => url,
        None => {
            let path = cfg.data_dir.join("gpuvisor.db");
            private_sqlite(&path)?;
            Store::sqlite_url(&path)
        }
    };
    let store = Store::connect(&db)
        .await
        .with_context(|| format!("cannot open the store at {}", redact(&db)))?;
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into());
    let node_id = node_id(&cfg.data_dir, &store).await?;
    tracing::info!(node_id, hostname, "node identity");
    let running: Vec<Pinned> = store
        .live_instances(None)
        .await?
        .into_iter()
        .filter(|r| r.node_id == node_id)
        .filter(|r| {
            use gpuvisor_wire::InstanceState as S;
            matches!(r.state, S::Provisioning | S::Running | S::Stopping)
        })
        .map(|r| Pinned {
            vm: r.runtime == gpuvisor_wire::RuntimeKind::Vm,
            id: r.id,
            cpus: r.cpus,
        })
        .collect();
    reserved_cpus_fit(&cfg.data_dir, &cfg.reserved_cpus, &running)?;
    let node = Arc::new(node);
    let engine = Engine::new(
        store,
        node.clone(),
        Box::new(Scheduled::new(cfg.placement_policy)),
        EngineConfig {
            node_id,
            hostname,
            cpu_ratio: cfg.cpu_oversubscription,
            stop_grace: cfg.stop_grace,
            resync: std::time::Duration::from_secs(1),
            sweep_every: cfg.sweep_every,
            simulated_policy: cfg.placement_policy,
        },
    );
    engine.set_limits(cfg.limits.engine());
    engine.set_pricing(cfg.pricing.clone());
    engine.set_peers(crate::peer::peers(&cfg.peers)?);
    // The audit chain's key stays out of the store; its head is noted beside it.
    let audit_key = gpuvisor_node::keys::key_file(&cfg.data_dir, "audit.key")
        .context("cannot prepare the audit log's key")?;
    engine.set_audit_secret(gpuvisor_control::engine::audit::AuditSecret::new(
        &audit_key,
        Some(cfg.data_dir.join("keys").join("audit.head")),
    ));
    engine.configure_registry(gpuvisor_control::engine::images::RegistrySettings {
        tenant_pull: cfg.registry.tenant_pull,
        tenant_hosts: cfg.registry.tenant_hosts.clone(),
        tenant_max_pulls: cfg.registry.tenant_max_pulls,
        registry: gpuvisor_node::registry::RegistryConfig {
            insecure: cfg.registry.insecure.clone(),
            ca_file: cfg.registry.ca_file.clone(),
            trusted: cfg.registry.tenant_hosts.clone(),
            // Pulls never connect to the daemon itself (by a public address either).
            deny: own_addresses(cfg.listen.ip()),
            max_image_size: cfg.registry.max_image_size,
            pull_deadline: cfg.registry.pull_timeout,
        },
    });
    if let Some(secret) = engine.bootstrap().await? {
        // A file only the daemon's user reads; never the log (journald keeps it for everyone
        // who may read the journal). On stdout only when asked for.
        let path = cfg
            .admin_key_file
            .clone()
            .unwrap_or_else(|| cfg.data_dir.join("admin.key"));
        write_secret(&path, &secret)?;
        tracing::info!(file = %path.display(), "first start: the admin API key is in this file (0600)");
        if cfg.print_admin_key {
            println!("admin API key (shown once, store it now): {secret}");
            let _ = std::io::stdout().flush();
        }
    }
    if let Some(path) = &cfg.simulate_nodes {
        let nodes = crate::cli::sim::load_nodes(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let started = std::time::Instant::now();
        let n = engine.register_simulated_nodes(&nodes).await?;
        tracing::info!(
            nodes = n,
            ms = started.elapsed().as_millis() as u64,
            "simulated nodes registered"
        );
    }
    // Pulls a previous daemon left running go on from their partial downloads.
    let resumed = engine.resume_pulls().await?;
    if resumed > 0 {
        tracing::info!(pulls = resumed, "resumed interrupted image pulls");
    }
    tokio::spawn(engine.clone().run_reconciler());
    tokio::spawn(engine.clone().run_departures());
    tokio::spawn(engine.clone().run_limiter_sampler());
    tokio::spawn(engine.clone().run_retention());
    tokio::spawn(engine.clone().run_meter());
    tokio::spawn(engine.clone().run_idle());
    if let Some(port) = cfg.proxy.worker_port {
        engine.set_serverless(gpuvisor_control::engine::serverless::ServerlessSettings {
            worker_port: port,
            webhook_allow: cfg.proxy.webhook_allow.clone(),
            webhook_deny: cfg.network.deny.clone(),
            job_bytes_per_tenant: cfg.proxy.job_storage_per_tenant,
        })?;
    }
    tokio::spawn(engine.clone().run_serverless());
    tokio::spawn(
        engine
            .clone()
            .run_telemetry(gpuvisor_control::telemetry::TelemetryConfig {
                thermal_ceiling_c: cfg.thermal_ceiling_c,
                metrics_token: cfg.metrics_token.clone(),
                ..Default::default()
            }),
    );

    let tls = if cfg.tls.insecure_http {
        None
    } else {
        crate::tls::install_default_provider();
        let mut extra_names = cfg.tls.names.clone();
        extra_names.extend(cfg.tls.acme_domains.iter().cloned());
        let names = crate::tls::default_names(cfg.listen.ip(), &hostname_now(), &extra_names);
        let source = match (&cfg.tls.cert, &cfg.tls.key) {
            (Some(cert), Some(key)) => crate::tls::CertSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ if !cfg.tls.acme_domains.is_empty() => crate::tls::CertSource::Acme {
                data_dir: cfg.data_dir.clone(),
                names,
                acme: crate::tls::acme::AcmeSettings {
                    directory: cfg.tls.acme_directory.clone(),
                    domains: cfg.tls.acme_domains.clone(),
                    email: cfg.tls.acme_email.clone(),
                    directory_ca: cfg.tls.acme_ca.clone(),
                },
            },
            _ => crate::tls::CertSource::Generated {
                data_dir: cfg.data_dir.clone(),
                names,
                leaf: crate::tls::Leaf::Api,
            },
        };
        let tls = Arc::new(
            crate::tls::ServerTls::new(source, cfg.tls.min_version)
                .context("cannot set up the API's TLS")?,
        );
        if let Some(fp) = &tls.ca_fingerprint {
            tracing::info!(
                ca = %crate::tls::ca_path(&cfg.data_dir).display(),
                fingerprint = %fp,
                "TLS: certificate signed by this daemon's CA (clients: --ca or GPUVISOR_CA)"
            );
        }
        tokio::spawn(tls.clone().watch(cfg.tls.poll_every));
        tokio::spawn(tls.clone().run_acme());
        Some(tokio_rustls::TlsAcceptor::from(tls.config.clone()))
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    // Connections (API, proxy) and the store need descriptors: the soft open-file limit goes
    // up to the hard one.
    if let Ok((soft, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        if soft < hard {
            if let Err(e) = nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_NOFILE,
                hard,
                hard,
            ) {
                tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
    }
    // The instance proxy: its own runtime and threads, stopped with the API.
    let (proxy_stop, proxy_stop_rx) = tokio::sync::watch::channel(false);
    let proxy = crate::ingress::start(
        &cfg.proxy,
        &cfg.data_dir,
        &hostname_now(),
        cfg.tls.min_version,
        engine.clone(),
        cfg.limits.header_timeout,
        proxy_stop_rx,
    )?;
    if let Some(l) = worker_listener {
        let pool = cfg.net_plan.pool();
        let tenant_len = cfg.net_plan.tenant_len();
        let app = crate::serverless::worker_router(engine.clone(), pool);
        let header_timeout = cfg.limits.header_timeout;
        tokio::spawn(async move {
            let limits = ConnLimits {
                max: crate::serverless::MAX_CONNECTIONS,
                per_ip: crate::serverless::MAX_CONNECTIONS_PER_ADDRESS,
                // Only instances: anyone else is closed at accept, before a byte is read.
                only_from: Some(OnlyFrom {
                    pool,
                    subnet_len: tenant_len,
                    per_subnet: crate::serverless::MAX_CONNECTIONS_PER_TENANT,
                }),
            };
            if let Err(e) = serve_http(l, None, app, header_timeout, limits).await {
                tracing::error!("the worker API stopped: {e}");
            }
        });
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!("listening on {scheme}://{}", cfg.listen);
    let app = crate::api::router_with_limits(
        engine.clone(),
        crate::api::ApiLimits {
            max_body: cfg.limits.max_body,
            max_upload: cfg.limits.max_upload,
            body_timeout: cfg.limits.body_timeout,
            requests_per_key: cfg.limits.requests_per_key,
            session_liveness: cfg.limits.exec_session_liveness,
            rates: cfg.limits.rates,
        },
    );
    serve_http(
        listener,
        tls,
        app,
        cfg.limits.header_timeout,
        ConnLimits {
            max: cfg.limits.max_connections,
            per_ip: cfg.limits.max_connections_per_ip,
            only_from: None,
        },
    )
    .await?;
    let _ = proxy_stop.send(true);
    if let Some(p) = proxy {
        let _ = tokio::task::spawn_blocking(move || p.thread.join()).await;
    }
    // The meter's last step: metered time ends at the stop, not up to a second before it.
    if let Err(e) = engine.meter_step().await {
        tracing::warn!("usage: last meter step failed: {e}");
    }
    if let Err(e) = engine.settle_ksm().await {
        tracing::warn!("{e}");
    }
    // Our iptables chains go with the last bridge: nothing of ours stays on a host that runs
    // no instance of ours.
    match tokio::task::spawn_blocking(move || node.net.release_host()).await? {
        Ok(true) => tracing::info!("no instance network left: host chains removed"),
        Ok(false) => {}
        Err(e) => tracing::warn!("cannot remove the host chains: {e}"),
    }
    Ok(())
}

/// Open connections per client address.
#[derive(Default)]
struct PerIp(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One open connection of `ip`; given back when dropped.
struct IpSlot {
    map: Arc<PerIp>,
    ip: std::net::IpAddr,
}

impl PerIp {
    fn take(map: &Arc<PerIp>, ip: std::net::IpAddr, max: usize) -> Option<IpSlot> {
        let mut m = map.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.map.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// The HTTP/1 accept loop: at most `max_connections` open connections (more wait in the
/// backlog; an upgraded exec session counts as its connection until it closes), and a client that has not sent a request's headers within `header_timeout` is
/// disconnected (slow loris; idle keep-alive connections too). On SIGTERM/SIGINT: stop
/// accepting, let requests in flight finish (10 s at most).
/// Open connections in all and per client address, and (the worker API) the only client
/// addresses served and a cap per tenant subnet.
struct ConnLimits {
    max: usize,
    per_ip: usize,
    only_from: Option<OnlyFrom>,
}

/// The worker API's admission: instance addresses only, at most `per_subnet` connections per
/// tenant subnet (`subnet_len` bits). A full listener refuses new connections at once instead
/// of leaving them in the backlog, so one tenant holding its share stalls nobody else.
#[derive(Clone, Copy)]
struct OnlyFrom {
    pool: gpuvisor_node::ipam::Cidr,
    subnet_len: u8,
    per_subnet: usize,
}

async fn serve_http(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: axum::Router,
    header_timeout: std::time::Duration,
    limits: ConnLimits,
) -> anyhow::Result<()> {
    let max_per_ip = limits.per_ip;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max));
    let per_ip = Arc::new(PerIp::default());
    let per_subnet = Arc::new(PerIp::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let stop = shutdown();
    tokio::pin!(stop);
    loop {
        // The API waits for a free slot before accepting; the worker API takes one after.
        let waited = if limits.only_from.is_none() {
            Some(tokio::select! {
                p = slots.clone().acquire_owned() => p?,
                _ = &mut stop => break,
            })
        } else {
            None
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => {
                    // Small writes (TLS handshake flights, a response's records) go out at
                    // once: with Nagle on, one waiting for the client's delayed ACK costs 40 ms.
                    let _ = s.set_nodelay(true);
                    (s, peer.ip())
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let mut subnet_slot = None;
        let permit = match (waited, limits.only_from) {
            (Some(p), _) => p,
            (None, None) => continue,
            (None, Some(only)) => {
                let v4 = match peer {
                    std::net::IpAddr::V4(v4) => Some(v4),
                    std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped(),
                };
                let Some(v4) = v4.filter(|a| only.pool.contains(*a)) else {
                    drop(stream);
                    continue;
                };
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(only.subnet_len))
                    .unwrap_or(0);
                let subnet = std::net::IpAddr::V4(std::net::Ipv4Addr::from(u32::from(v4) & mask));
                let Some(slot) = PerIp::take(&per_subnet, subnet, only.per_subnet) else {
                    drop(stream);
                    continue;
                };
                subnet_slot = Some(slot);
                match slots.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        drop(stream);
                        continue;
                    }
                }
            }
        };
        // One client never holds more than its share of the slots: closed at once.
        let Some(ip_slot) = PerIp::take(&per_ip, peer, max_per_ip) else {
            drop(stream);
            continue;
        };
        // The connection's places in both caps, on every request: an exec session takes them
        // into its WebSocket, so an upgraded connection counts until it closes (hyper's
        // connection future ends at the upgrade).
        let hold = crate::api::ConnectionHold::new((permit, ip_slot, subnet_slot));
        let app = app.clone();
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(hold.clone());
                req.extensions_mut().insert(crate::api::Peer(peer));
                hyper::service::Service::call(
                    &hyper_util::service::TowerToHyperService::new(app.clone()),
                    req,
                )
            });
        let stop_rx = stop_rx.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            match tls {
                None => serve_connection(stream, svc, header_timeout, stop_rx).await,
                // The handshake within the header timeout too: a client that opens
                // connections and never finishes a handshake holds no slot for long.
                Some(acceptor) => {
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_connection(tls, svc, header_timeout, stop_rx).await,
                        Ok(Err(e)) => tracing::debug!("TLS handshake with {peer}: {e}"),
                        Err(_) => tracing::debug!("TLS handshake with {peer}: timed out"),
                    }
                }
            }
        });
        while conns.try_join_next().is_some() {}
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

/// One HTTP/1 connection (plain or TLS) until it ends or the daemon stops.
async fn serve_connection<IO, S>(
    io: IO,
    svc: S,
    header_timeout: std::time::Duration,
    mut stop_rx: tokio::sync::watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as http_body::Body>::Data: Send,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), svc)
        // Interactive exec upgrades its connection to a WebSocket.
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("connection: {e}");
            }
        }
        _ = stop_rx.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn hostname_now() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The SQLite store holds key hashes, tenants' env and volumes: 0600, created so before SQLite
/// opens it (SQLite gives its -wal and -shm files the database's mode).
fn private_sqlite(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create the store {}", path.display()))?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = std::path::PathBuf::from(p);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot make {} private", p.display()))?;
        }
    }
    Ok(())
}

/// Takes `path`'s exclusive lock (flock, non-blocking) and writes `owner` into it; if another
/// process holds it, says who from what it wrote.
fn lock_file(
    path: &Path,
    owner: &str,
    busy: impl FnOnce(&str) -> String,
) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            let mut f: &std::fs::File = &lock;
            f.set_len(0)?;
            f.rewind()?;
            writeln!(f, "{owner}")?;
            Ok(lock)
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            anyhow::bail!("{}", busy(holder.trim()))
        }
        Err((_, e)) => Err(anyhow::anyhow!("cannot lock {}: {e}", path.display())),
    }
}

/// One daemon per data dir: `<data>/gpuvisor.lock`.
fn lock_data_dir(data: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    // A daemon started right after the previous one was killed can find the lock still held
    // for a moment (a child forked by the dead daemon that has not reached exec yet): retry
    // briefly before calling the data dir taken.
    for _ in 0..50 {
        if let Ok(lock) = try_lock_data_dir(data) {
            return Ok(lock);
        }
        std::thread::sleep(std::time::Duration::from_millis(40));
    }
    try_lock_data_dir(data)
}

fn try_lock_data_dir(data: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let pid = std::process::id();
    lock_file(
        &data.join("gpuvisor.lock"),
        &format!("pid {pid}"),
        |holder| {
            format!(
                "data dir {} is in use by another gpuvisor daemon ({holder}): one daemon per data \
             dir; stop that one or give this one another --data-dir",
                data.display()
            )
        },
    )
}

/// One daemon per network prefix in this mount namespace: its netns names live in the shared
/// /var/run/netns, its bridges and chains in the network namespace. `/run/gpuvisor/net-<P>.lock`.
fn lock_net_prefix(prefix: &str, data: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let dir = Path::new("/run/gpuvisor");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let owner = format!("pid {}, data dir {}", std::process::id(), data.display());
    lock_file(&dir.join(format!("net-{prefix}.lock")), &owner, |holder| {
        format!(
            "network prefix {prefix:?} is in use by another gpuvisor daemon on this host \
             ({holder}): give each daemon its own --net-prefix and --net-pool"
        )
    })
}

/// This host's node id: `<data>/node-id`, made on the first start (random, not the hostname).
/// A data dir from before the file adopts the one non-simulated node its store already has, so
/// its instances stay this host's.
async fn node_id(data: &Path, store: &Store) -> anyhow::Result<String> {
    let file = data.join("node-id");
    match std::fs::read_to_string(&file) {
        Ok(s) if valid_node_id(s.trim()) => return Ok(s.trim().to_string()),
        Ok(s) => anyhow::bail!(
            "{} holds {:?}, not a node id: restore it or remove it to adopt the store's",
            file.display(),
            s.trim()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    }
    let gpus = store.gpus().await?;
    let simulated = |node: &str| {
        gpus.iter().any(|g| {
            g.node_id == node && g.backend == gpuvisor_control::engine::SIMULATED_NODE_BACKEND
        })
    };
    let hosts: Vec<String> = store
        .nodes()
        .await?
        .into_iter()
        .map(|n| n.id)
        .filter(|id| !simulated(id) && valid_node_id(id))
        .collect();
    let id = match hosts.as_slice() {
        [one] => {
            tracing::info!(
                node_id = one,
                "adopting the node id of this data dir's store"
            );
            one.clone()
        }
        _ => {
            let mut b = [0u8; 8];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut b))
                .context("cannot read /dev/urandom for a node id")?;
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!("node-{hex}")
        }
    };
    let tmp = data.join("node-id.tmp");
    std::fs::write(&tmp, format!("{id}\n"))
        .and_then(|_| std::fs::rename(&tmp, &file))
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(id)
}

/// Node ids are printable, short and without spaces (they were hostnames before).
fn valid_node_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn write_secret(path: &std::path::Path, secret: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write the admin key to {}", path.display()))?;
    // An existing file keeps its mode on open: make it 0600 before the key goes in.
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make {} private", path.display()))?;
    }
    writeln!(f, "{secret}")?;
    Ok(())
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_string(),
    }
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down; instances keep running");
}

/// The addresses the daemon answers on: its listen address, or every local address when it
/// listens on all of them.
fn own_addresses(listen: std::net::IpAddr) -> Vec<std::net::IpAddr> {
    if !listen.is_unspecified() {
        return vec![listen];
    }
    let mut out = vec![listen];
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(sa) = a.address else { continue };
            if let Some(v4) = sa.as_sockaddr_in() {
                out.push(std::net::IpAddr::V4(v4.ip()));
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                out.push(std::net::IpAddr::V6(v6.ip()));
            }
        }
    }
    out
}

/// Refuses reserved CPUs this host does not have online, or that leave instances none.
fn check_reserved_cpus(reserved: &[u32], online: &[u32]) -> anyhow::Result<()> {
    let list = gpuvisor_node::host::format_cpu_list;
    if let Some(c) = reserved.iter().find(|c| !online.contains(c)) {
        anyhow::bail!(
            "reserved_cpus names CPU {c}, which is not online here (online: {})",
            list(online)
        );
    }
    if !reserved.is_empty() && online.iter().all(|c| reserved.contains(c)) {
        anyhow::bail!(
            "reserved_cpus {} leaves no CPU for instances (online: {})",
            list(reserved),
            list(online)
        );
    }
    Ok(())
}

/// An instance that runs on this node, and its CPUs.
struct Pinned {
    id: String,
    vm: bool,
    cpus: Vec<u32>,
}

/// Where the reserved CPUs a daemon last started with are kept: a running VM's QEMU keeps the
/// threads' CPUs it started with.
const RESERVED_CPUS_FILE: &str = "reserved-cpus";

/// Refuses reserved CPUs that instances running on this node are pinned to, or CPUs no longer
/// reserved while VMs run (their QEMU threads stay on the CPUs reserved when they started,
/// which would then be given to instances); then records the set.
fn reserved_cpus_fit(data_dir: &Path, reserved: &[u32], running: &[Pinned]) -> anyhow::Result<()> {
    let list = gpuvisor_node::host::format_cpu_list;
    if let Some(r) = running
        .iter()
        .find(|r| r.cpus.iter().any(|c| reserved.contains(c)))
    {
        anyhow::bail!(
            "reserved_cpus {} holds CPUs {} that instance {} runs on; stop it first, or leave \
             those CPUs out",
            list(reserved),
            list(&r.cpus),
            r.id
        );
    }
    let file = data_dir.join(RESERVED_CPUS_FILE);
    let before = std::fs::read_to_string(&file)
        .ok()
        .and_then(|s| gpuvisor_node::host::parse_cpu_list(s.trim()))
        .unwrap_or_default();
    let vms = running.iter().filter(|r| r.vm).count();
    let freed: Vec<u32> = before
        .iter()
        .copied()
        .filter(|c| !reserved.contains(c))
        .collect();
    if !freed.is_empty() && vms > 0 {
        anyhow::bail!(
            "reserved_cpus no longer holds CPUs {} while {vms} VM(s) run with their QEMU \
             threads there; start with reserved_cpus {:?} and stop or move (`instance migrate`) \
             them first",
            list(&freed),
            list(&before)
        );
    }
    std::fs::write(&file, list(reserved))
        .with_context(|| format!("cannot write {}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::{check_reserved_cpus, reserved_cpus_fit, Pinned};

    #[test]
    fn reserved_cpus_never_hold_a_running_instance_or_a_vms_threads() {
        let d = tempfile::tempdir().unwrap();
        let pinned = |id: &str, vm, cpus: &[u32]| Pinned {
            id: id.into(),
            vm,
            cpus: cpus.to_vec(),
        };
        let running = [pinned("c1", false, &[1]), pinned("v1", true, &[2])];
        // An instance runs on CPU 1: it cannot be reserved.
        let e = reserved_cpus_fit(d.path(), &[0, 1], &running)
            .unwrap_err()
            .to_string();
        assert!(e.contains("CPUs 1 that instance c1 runs on"), "{e}");
        // Reserving more while VMs run is fine, and recorded.
        reserved_cpus_fit(d.path(), &[0], &running).unwrap();
        reserved_cpus_fit(d.path(), &[0, 3], &running).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join(super::RESERVED_CPUS_FILE)).unwrap(),
            "0,3"
        );
        // Giving CPU 3 back while a VM's QEMU threads may be there: refused.
        let e = reserved_cpus_fit(d.path(), &[0], &running)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no longer holds CPUs 3 while 1 VM(s) run"),
            "{e}"
        );
        // With no VM running it may be.
        reserved_cpus_fit(d.path(), &[0], &running[..1]).unwrap();
    }

    #[test]
    fn reserved_cpus_must_be_online_and_leave_some() {
        assert!(check_reserved_cpus(&[], &[0, 1]).is_ok());
        assert!(check_reserved_cpus(&[1], &[0, 1]).is_ok());
        let e = check_reserved_cpus(&[5], &[0, 1]).unwrap_err().to_string();
        assert!(e.contains("CPU 5") && e.contains("online: 0-1"), "{e}");
        let e = check_reserved_cpus(&[0, 1], &[0, 1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("leaves no CPU for instances"), "{e}");
    }
}
