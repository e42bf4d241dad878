//! What every connection of the proxy goes through, HTTPS or TCP map: one cap on open
//! connections (tunnels and TCP relays included), one per client address, and the target
//! cache in front of the daemon.

use crate::{ProxyConfig, RouteError, Routes, Target};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Targets remembered at most. Hosts are the client's choice: when full, expired entries go
/// and a new one is not kept if none had expired (the daemon is asked again next time).
const CACHE_MAX: usize = 10_000;

/// (instance, port) → when asked, and the answer.
type TargetCache = HashMap<(String, u16), (Instant, Result<Target, RouteError>)>;

pub struct Gate {
    cfg: Arc<ProxyConfig>,
    pub routes: Arc<dyn Routes>,
    /// Open client connections and upstream requests together: each holds descriptors.
    slots: Arc<tokio::sync::Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    cache: Mutex<TargetCache>,
    /// When expired targets were last swept out of a full cache.
    swept: Mutex<Instant>,
}

/// The address a client's share is counted under: an IPv6 client by its /64 (one host owns
/// the whole prefix), an IPv4-mapped one as IPv4.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & (!0u128 << 64)).into()),
        },
        v4 => v4,
    }
}

/// One open connection's places in both caps; given back when the last clone is dropped
/// (a tunnel keeps its connection's).
pub struct Slot {
    gate: Arc<Gate>,
    ip: IpAddr,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.gate.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Gate {
    pub fn new(cfg: Arc<ProxyConfig>, routes: Arc<dyn Routes>) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_connections)),
            cfg,
            routes,
            per_ip: Mutex::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
            swept: Mutex::new(Instant::now()),
        })
    }

    /// A place for a request to an instance (a descriptor to it), if one is free now.
    pub fn upstream(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Waits for a place under the global cap (more connections wait in the backlog).
    pub async fn permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }

    /// Takes `ip`'s place; `None` when that address holds its share already (the connection
    /// is closed at once).
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Option<Arc<Slot>> {
        let ip = client_key(ip);
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= self.cfg.max_connections_per_ip {
            return None;
        }
        *n += 1;
        Some(Arc::new(Slot {
            gate: self.clone(),
            ip,
            _permit: permit,
        }))
    }

    /// Port `port` of instance `id`, from the cache while it is fresh.
    pub async fn target(&self, id: &str, port: u16) -> Result<Target, RouteError> {
        let key = (id.to_string(), port);
        if let Some((at, t)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            if at.elapsed() < self.cfg.route_ttl {
                return t.clone();
            }
        }
        let t = self.routes.target(id, port).await;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            // At most once per TTL: a full cache of fresh entries is not walked at every miss.
            let mut swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
            let ttl = self.cfg.route_ttl;
            if swept.elapsed() >= ttl {
                *swept = Instant::now();
                cache.retain(|_, (at, _)| at.elapsed() < ttl);
            }
        }
        if cache.len() < CACHE_MAX {
            cache.insert(key, (Instant::now(), t.clone()));
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::client_key;
    use std::net::IpAddr;

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1"
            .parse()
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let b: IpAddr = "2001:db8:1:2:bbbb::9"
            .parse()
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let c: IpAddr = "2001:db8:1:3::1"
            .parse()
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:10.1.2.3"
            .parse()
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert_eq!(client_key(mapped), IpAddr::from([10, 1, 2, 3]));
    }
}
