//! TCP maps: one listener per mapped host port, in line with the daemon's list.

use crate::gate::Gate;
use crate::{ProxyConfig, TcpMap};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

/// Every `cfg.tcp_sync_every`: opens the listeners of new maps, closes those of maps gone
/// (their open connections go on until either end closes or they idle out).
pub async fn run(
    cfg: Arc<ProxyConfig>,
    gate: Arc<Gate>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut open: HashMap<TcpMap, tokio::task::JoinHandle<()>> = HashMap::new();
    // Host ports that could not be bound: said once, tried again each turn.
    let mut failed: HashSet<u16> = HashSet::new();
    loop {
        match gate.routes.tcp_maps().await {
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
                            failed.remove(&m.host_port);
                            tracing::info!(instance = %m.instance, port = m.port, %addr, "proxy: TCP map open");
                            let task =
                                tokio::spawn(accept(cfg.clone(), gate.clone(), m.clone(), l));
                            open.insert(m, task);
                        }
                        // Tried again at the next turn (another program's port).
                        Err(e) => {
                            if failed.insert(m.host_port) {
                                tracing::warn!(%addr, "proxy: cannot open a TCP map: {e}");
                            }
                        }
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

async fn accept(cfg: Arc<ProxyConfig>, gate: Arc<Gate>, m: TcpMap, l: tokio::net::TcpListener) {
    loop {
        let (client, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("proxy: TCP accept on {}: {e}", m.host_port);
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // No place under the caps (a map waiting for clients holds none): closed at once.
        let Some(permit) = gate.upstream() else {
            continue;
        };
        let Some(slot) = gate.admit(peer.ip(), permit) else {
            continue;
        };
        let (cfg, gate, m) = (cfg.clone(), gate.clone(), m.clone());
        tokio::spawn(async move {
            let _slot = slot;
            // Asked each time (cached 1 s): the instance may have stopped since the map opened.
            let target = match gate.target(&m.instance, m.port).await {
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
            let _in_use = crate::InUse::new(&gate.routes, &m.instance);
            let (up, down) = crate::pump::pump(client, upstream, cfg.idle_timeout).await;
            tracing::debug!(%peer, instance = %m.instance, up, down, "proxy: TCP connection closed");
        });
    }
}
