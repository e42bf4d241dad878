//! `gpuvisor serve`: the daemon. Reads the config (embedded defaults < TOML file < flags and
//! environment), probes the host, opens the store, prints the admin key on first start, runs
//! the reconciler and serves the REST API until SIGTERM or SIGINT.

use crate::config::{Config, ConfigOverrides};
use anyhow::Context;
use clap::Args;
use gpuvisor_control::placement::Scheduled;
use gpuvisor_control::store::Store;
use gpuvisor_control::{Engine, EngineConfig};
use gpuvisor_node::{HostRoot, Node, NodeConfig};
use std::io::Write;
use std::path::PathBuf;
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
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;

    let node_cfg = NodeConfig {
        data_dir: cfg.data_dir.clone(),
        runtime: cfg.runtime.clone(),
        simulate_gpus: cfg.simulate_gpus.clone(),
        net_pool: cfg.net_pool,
        nat: cfg.nat,
        pids_limit: cfg.pids_limit,
        root: HostRoot::real(),
        limiter_lib: cfg.limiter_lib.clone(),
        limiter_context_bytes: cfg.limiter_context_bytes,
    };
    let log_limits = gpuvisor_node::logs::LogLimits {
        max_bytes: cfg.limits.log_max_bytes,
        reserve: cfg.limits.log_reserve,
        // Instance output goes through this binary's `log-relay` mode.
        relay: std::env::current_exe().ok(),
    };
    let node = tokio::task::spawn_blocking(move || Node::open(node_cfg))
        .await?
        .context("cannot prepare this host")?
        .with_log_limits(log_limits);
    tracing::info!(
        gpus = node.gpus().len(),
        backend = node.backend().as_str(),
        runtime = node.runtime.binary(),
        "host ready"
    );
    let db = cfg
        .database
        .clone()
        .unwrap_or_else(|| Store::sqlite_url(&cfg.data_dir.join("gpuvisor.db")));
    let store = Store::connect(&db)
        .await
        .with_context(|| format!("cannot open the store at {}", redact(&db)))?;
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "localhost".into());
    let engine = Engine::new(
        store,
        Arc::new(node),
        Box::new(Scheduled {
            policy: cfg.placement_policy,
        }),
        EngineConfig {
            node_id: hostname.clone(),
            hostname,
            cpu_ratio: cfg.cpu_oversubscription,
            stop_grace: cfg.stop_grace,
            resync: std::time::Duration::from_secs(1),
            simulated_policy: cfg.placement_policy,
        },
    );
    engine.set_limits(cfg.limits.engine());
    if let Some(secret) = engine.bootstrap().await? {
        println!("admin API key (shown once, store it now): {secret}");
        let _ = std::io::stdout().flush();
        if let Some(path) = &cfg.admin_key_file {
            write_secret(path, &secret)?;
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
    tokio::spawn(engine.clone().run_reconciler());
    tokio::spawn(engine.clone().run_limiter_sampler());
    tokio::spawn(engine.clone().run_retention());
    tokio::spawn(
        engine
            .clone()
            .run_telemetry(gpuvisor_control::telemetry::TelemetryConfig {
                thermal_ceiling_c: cfg.thermal_ceiling_c,
                metrics_token: cfg.metrics_token.clone(),
                ..Default::default()
            }),
    );

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    tracing::info!("listening on http://{}", cfg.listen);
    let app = crate::api::router_with_limits(
        engine,
        crate::api::ApiLimits {
            max_body: cfg.limits.max_body,
            body_timeout: cfg.limits.body_timeout,
            requests_per_key: cfg.limits.requests_per_key,
        },
    );
    serve_http(
        listener,
        app,
        cfg.limits.header_timeout,
        cfg.limits.max_connections,
    )
    .await
}

/// The HTTP/1 accept loop: at most `max_connections` open connections (more wait in the
/// backlog), and a client that has not sent a request's headers within `header_timeout` is
/// disconnected (slow loris; idle keep-alive connections too). On SIGTERM/SIGINT: stop
/// accepting, let requests in flight finish (10 s at most).
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    header_timeout: std::time::Duration,
    max_connections: usize,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let stop = shutdown();
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p?,
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop_rx = stop_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), svc);
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

fn write_secret(path: &std::path::Path, secret: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write the admin key to {}", path.display()))?;
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
