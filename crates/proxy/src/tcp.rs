//! TCP maps: one listener per mapped host port, in line with the daemon's list.

use crate::{ProxyConfig, Routes, TcpMap};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// Every `cfg.tcp_sync_every`: opens the listeners of new maps, closes those of maps gone
/// (their open connections go on until either end closes or they idle out).
pub async fn run(
    cfg: Arc<ProxyConfig>,
    routes: Arc<dyn Routes>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut open: HashMap<TcpMap, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        match routes.tcp_maps().await {
            Ok(maps) => {
                open.retain(|m, task| {
                    let keep = maps.contains(m) && !task.is_finished();
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for m in maps {
                    if open.contains_key(&m) {
                        continue;
                    }
                    let addr = SocketAddr::new(cfg.tcp_listen, m.host_port);
                    match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => {
                            tracing::info!(instance = %m.instance, port = m.port, %addr, "proxy: TCP map open");
                            let task =
                                tokio::spawn(accept(cfg.clone(), routes.clone(), m.clone(), l));
                            open.insert(m, task);
                        }
                        // Tried again at the next turn (a previous listener's port in
                        // TIME_WAIT, or another program's).
                        Err(e) => tracing::warn!(%addr, "proxy: cannot open a TCP map: {e}"),
                    }
                }
            }
            Err(e) => tracing::warn!("proxy: TCP maps: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.tcp_sync_every) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    for (_, task) in open {
        task.abort();
    }
}

async fn accept(
    cfg: Arc<ProxyConfig>,
    routes: Arc<dyn Routes>,
    m: TcpMap,
    l: tokio::net::TcpListener,
) {
    loop {
        let (client, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("proxy: TCP accept on {}: {e}", m.host_port);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (cfg, routes, m) = (cfg.clone(), routes.clone(), m.clone());
        tokio::spawn(async move {
            // Asked each time: the instance may have stopped or moved since the map opened.
            let target = match routes.target(&m.instance, m.port).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, "proxy: TCP map {}: {e}", m.host_port);
                    return;
                }
            };
            let upstream = match tokio::time::timeout(
                cfg.connect_timeout,
                tokio::net::TcpStream::connect(target.addr),
            )
            .await
            {
                Ok(Ok(s)) => s,
                _ => {
                    tracing::debug!(%peer, "proxy: TCP map {}: instance unreachable", m.host_port);
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (up, down) = crate::pump::pump(client, upstream, cfg.idle_timeout).await;
            tracing::debug!(%peer, instance = %m.instance, up, down, "proxy: TCP connection closed");
        });
    }
}
