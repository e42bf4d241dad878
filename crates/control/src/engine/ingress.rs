//! What the HTTPS proxy and the TCP port maps ask of the engine: where an instance's port is,
//! who may reach it, the host ports of TCP maps, the signed links to private ports, and the
//! URLs an instance shows. The proxy itself (crates/proxy) knows nothing of the store.

use super::{Engine, EngineError, Op, Principal, Result};
use crate::store::InstanceRow;
use gpuvisor_wire::{self as wire, InstanceState, PortSpec};
use std::net::SocketAddr;

/// The proxy's settings as the engine needs them (from `[proxy]` in the config file).
#[derive(Debug, Clone)]
pub struct IngressSettings {
    /// `<instance-id>-<port>.<domain>` names an instance's HTTP port.
    pub domain: String,
    /// The proxy's public HTTPS port, in URLs (443 is left out).
    pub https_port: u16,
    /// The host name or address in TCP URLs.
    pub public_host: String,
    /// Host ports for TCP maps, inclusive; empty (`start > end`) maps none.
    pub tcp_ports: (u16, u16),
}

/// Where the proxy sends a request for an instance's port.
#[derive(Debug, Clone, PartialEq)]
pub struct IngressTarget {
    pub instance: String,
    pub tenant_id: String,
    pub addr: SocketAddr,
    pub public: bool,
    pub protocol: String,
}

/// A host port mapped to an instance's TCP port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TcpMap {
    pub host_port: u16,
    pub instance: String,
    pub port: u16,
}

/// The proxy's settings, the key that signs links (HMAC-SHA256), set at start, and what the
/// proxy saw of each instance's use.
#[derive(Default)]
pub(crate) struct IngressState {
    /// Shared, not copied: every instance's URLs are made from it on each list.
    settings: std::sync::RwLock<Option<std::sync::Arc<IngressSettings>>>,
    link_key: std::sync::RwLock<Option<ring::hmac::Key>>,
    activity: Activities,
}

/// Each instance's use, shared with the [`InUse`] guards.
type Activities = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Use>>>;

/// Instance `id` in use (an exec, a console) while this lives: an open connection for its idle
/// timeout.
pub(crate) struct InUse {
    activity: Activities,
    id: String,
}

impl Drop for InUse {
    fn drop(&mut self) {
        note(&self.activity, &self.id, Activity::Closed);
    }
}

/// Records a connection of `id` opening or closing.
fn note(activity: &Activities, id: &str, change: Activity) {
    let now = super::now_ms();
    let mut map = activity.lock().unwrap_or_else(|p| p.into_inner());
    let u = map.entry(id.to_string()).or_default();
    u.last = now;
    match change {
        Activity::Opened => u.open = u.open.saturating_add(1),
        Activity::Closed => u.open = u.open.saturating_sub(1),
    }
}

/// An instance's use as the proxy and the GPU readings report it (in memory: after a daemon
/// restart an instance counts as used at the restart).
#[derive(Debug, Default, Clone, Copy)]
struct Use {
    /// Unix ms of the last request, connection or busy GPU reading.
    last: i64,
    /// Requests, tunnels and TCP connections open now.
    open: u32,
}

/// A GPU at or above this utilisation (percent of the GPU; of its share for a fraction) is
/// in use.
pub const IDLE_GPU_PERCENT: f64 = 5.0;

/// A traffic report of the proxy ([`Engine::ingress_activity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    Opened,
    Closed,
}

/// How often idle timeouts are checked.
const IDLE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Longest life of a signed link.
pub const MAX_LINK_TTL_SECS: u64 = 7 * 86_400;

fn link_message(instance: &str, port: u16, expires: i64) -> String {
    format!("gpuvisor-link\n{instance}\n{port}\n{expires}")
}

impl Engine {
    /// Turns the proxy on for URLs, TCP maps and links. `link_key`: the secret that signs
    /// links (at least 32 bytes).
    pub fn set_ingress(&self, s: IngressSettings, link_key: &[u8]) {
        *self
            .ingress
            .settings
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(std::sync::Arc::new(s));
        *self
            .ingress
            .link_key
            .write()
            .unwrap_or_else(|p| p.into_inner()) =
            Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, link_key));
    }

    fn ingress_settings(&self) -> Option<std::sync::Arc<IngressSettings>> {
        self.ingress
            .settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The proxy URL of an instance's HTTP port.
    fn port_url(s: &IngressSettings, id: &str, port: u16) -> String {
        let at = if s.https_port == 443 {
            String::new()
        } else {
            format!(":{}", s.https_port)
        };
        format!("https://{id}-{port}.{}{at}/", s.domain)
    }

    /// Where an instance's ports are reached (none while the proxy is off).
    pub(crate) fn instance_urls(&self, i: &InstanceRow) -> Vec<String> {
        let Some(s) = self.ingress_settings() else {
            return Vec::new();
        };
        i.spec
            .ports
            .iter()
            .filter_map(|p| {
                if p.is_http() {
                    Some(Self::port_url(&s, &i.id, p.port))
                } else {
                    p.host_port
                        .map(|h| format!("{}://{}:{h}", p.protocol, s.public_host))
                }
            })
            .collect()
    }

    /// Gives each TCP port of a new instance a free host port from the pool (the caller holds
    /// the placement lock, so `live` is every other claim); HTTP ports get none. A host port
    /// in a request is ignored. Fails when the pool is used up.
    pub(crate) fn assign_host_ports(
        &self,
        ports: &mut [PortSpec],
        live: &[InstanceRow],
    ) -> Result<()> {
        for p in ports.iter_mut() {
            p.host_port = None;
        }
        let Some(s) = self.ingress_settings() else {
            return Ok(());
        };
        let (lo, hi) = s.tcp_ports;
        let mut used: std::collections::BTreeSet<u16> = live
            .iter()
            .filter(|i| i.state != InstanceState::Terminated)
            .flat_map(|i| i.spec.ports.iter().filter_map(|p| p.host_port))
            .collect();
        for p in ports.iter_mut().filter(|p| p.protocol == "tcp") {
            let free = (lo..=hi).find(|h| !used.contains(h)).ok_or_else(|| {
                EngineError::Unavailable(format!(
                    "no host port is free for {}/tcp: the proxy's TCP pool {lo}-{hi} is used up",
                    p.port
                ))
            })?;
            used.insert(free);
            p.host_port = Some(free);
        }
        Ok(())
    }

    /// Where the proxy sends traffic for port `port` of instance `id` (an id, not a name:
    /// names are per tenant and the proxy has no tenant). Not found: no such live instance
    /// or no such port; unavailable: not running, or it has no address here.
    pub async fn ingress_target(&self, id: &str, port: u16) -> Result<IngressTarget> {
        let not_found = || EngineError::NotFound(format!("no instance port {id}-{port}"));
        let row = self
            .store
            .instance(id)
            .await?
            .filter(|r| r.state != InstanceState::Terminated)
            .ok_or_else(not_found)?;
        let spec = row
            .spec
            .ports
            .iter()
            .find(|p| p.port == port)
            .ok_or_else(not_found)?
            .clone();
        if row.state != InstanceState::Running || self.is_simulated(&row) {
            return Err(EngineError::Unavailable(format!(
                "instance {id} is {}",
                row.state
            )));
        }
        let tenant = self.key_tenant(&row.tenant_id).await?;
        let ip = self
            .address_in(&tenant, &row)
            .map_err(|e| EngineError::Unavailable(format!("instance {id} has no address: {e}")))?;
        Ok(IngressTarget {
            instance: row.id,
            tenant_id: row.tenant_id,
            addr: SocketAddr::new(ip.into(), port),
            public: spec.public,
            protocol: spec.protocol,
        })
    }

    /// Every TCP map of a live instance of this host.
    pub async fn ingress_tcp_maps(&self) -> Result<Vec<TcpMap>> {
        Ok(self
            .store
            .live_instances(None)
            .await?
            .iter()
            .filter(|i| !self.is_simulated(i))
            .flat_map(|i| {
                i.spec.ports.iter().filter_map(|p| {
                    p.host_port.map(|h| TcpMap {
                        host_port: h,
                        instance: i.id.clone(),
                        port: p.port,
                    })
                })
            })
            .collect())
    }

    /// Whether API key `secret` may reach a private port of tenant `tenant_id`'s instance:
    /// a key of that tenant that may operate its instances (a read-only key may not: a port
    /// is often a shell, a notebook), or an admin's. An unknown or revoked key may not.
    pub async fn ingress_key_allows(&self, secret: &str, tenant_id: &str) -> bool {
        match self.authenticate(Some(secret)).await {
            Ok(p) => (p.is_admin() || p.tenant_id == tenant_id) && p.allow(Op::CreateLink).is_ok(),
            Err(_) => false,
        }
    }

    /// A link that opens private port `port` of instance `id` in a browser until it expires.
    pub async fn create_link(
        &self,
        who: &Principal,
        id: &str,
        port: u16,
        ttl_secs: u64,
    ) -> Result<wire::Link> {
        who.allow(Op::CreateLink)?;
        let row = self.find(who, id).await?;
        let s = self.ingress_settings().ok_or_else(|| {
            EngineError::Unavailable("the HTTPS proxy is off on this daemon".into())
        })?;
        if !row.spec.ports.iter().any(|p| p.port == port && p.is_http()) {
            return Err(EngineError::InvalidArgument(format!(
                "instance {} has no HTTP port {port}",
                row.id
            )));
        }
        if ttl_secs == 0 || ttl_secs > MAX_LINK_TTL_SECS {
            return Err(EngineError::InvalidArgument(format!(
                "a link lives from 1 s to {} days",
                MAX_LINK_TTL_SECS / 86_400
            )));
        }
        let expires = super::now_ms() / 1000 + ttl_secs as i64;
        let token = self.sign_link(&row.id, port, expires)?;
        Ok(wire::Link {
            url: format!("{}?gv_link={token}", Self::port_url(&s, &row.id, port)),
            expires_at: expires * 1000,
        })
    }

    fn sign_link(&self, id: &str, port: u16, expires: i64) -> Result<String> {
        let key = self
            .ingress
            .link_key
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let key = key.as_ref().ok_or_else(|| {
            EngineError::Unavailable("the HTTPS proxy is off on this daemon".into())
        })?;
        let tag = ring::hmac::sign(key, link_message(id, port, expires).as_bytes());
        Ok(format!("{expires}.{}", super::hex(tag.as_ref())))
    }

    /// Whether `token` is a link to port `port` of instance `id` that has not expired;
    /// returns its expiry (unix seconds).
    pub fn verify_link(&self, id: &str, port: u16, token: &str) -> Option<i64> {
        let (expires, tag) = token.split_once('.')?;
        let expires: i64 = expires.parse().ok()?;
        if expires <= super::now_ms() / 1000 || tag.len() != 64 {
            return None;
        }
        let tag: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(tag.get(2 * i..2 * i + 2)?, 16).ok())
            .collect::<Option<_>>()?;
        let key = self
            .ingress
            .link_key
            .read()
            .unwrap_or_else(|p| p.into_inner());
        ring::hmac::verify(
            key.as_ref()?,
            link_message(id, port, expires).as_bytes(),
            &tag,
        )
        .ok()
        .map(|()| expires)
    }

    /// The proxy began or ended a request, tunnel or TCP connection of instance `id`.
    pub fn ingress_activity(&self, id: &str, change: Activity) {
        note(&self.ingress.activity, id, change);
    }

    /// Instance `id` in use until the guard is dropped (an exec or console session).
    pub(crate) fn in_use(&self, id: &str) -> InUse {
        note(&self.ingress.activity, id, Activity::Opened);
        InUse {
            activity: self.ingress.activity.clone(),
            id: id.to_string(),
        }
    }

    /// When instance `i` was last in use: now while a connection is open, else the newest of
    /// its last traffic, its start and this daemon's start.
    pub(crate) fn last_activity(&self, i: &InstanceRow) -> i64 {
        let seen = self
            .ingress
            .activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&i.id)
            .copied()
            .unwrap_or_default();
        if seen.open > 0 {
            return super::now_ms();
        }
        seen.last.max(i.restart.started_at).max(self.started_ms)
    }

    /// Whether `i`'s GPUs may be busy: a share's utilisation from the limiter at
    /// [`IDLE_GPU_PERCENT`] of its share or more, a whole GPU's from telemetry (`stats`) at that
    /// percent. What cannot be measured (no reading, a MIG slice, a GPU passed through to a VM)
    /// counts as busy: an idle timeout never stops a job it cannot see.
    fn gpu_busy(&self, i: &InstanceRow, stats: &[wire::GpuStats]) -> bool {
        if i.gpus.is_empty() {
            return false;
        }
        if let Some(usage) = self.node.limiters.usage(&i.id) {
            return usage.iter().any(|u| {
                // Both in basis points of the whole GPU.
                u.share_bp == 0 || u.util_bp as f64 * 100.0 >= IDLE_GPU_PERCENT * u.share_bp as f64
            });
        }
        if i.runtime == gpuvisor_wire::RuntimeKind::Vm {
            return true;
        }
        i.gpus
            .iter()
            .any(|b| match stats.iter().find(|g| g.uuid == b.uuid) {
                Some(g) => g.util_percent.is_none_or(|u| u >= IDLE_GPU_PERCENT),
                None => true,
            })
    }

    /// Stops (volumes kept) each running instance with an idle timeout that saw no traffic,
    /// no open connection and no busy GPU for that long; checked every second, forever.
    pub async fn run_idle(self: std::sync::Arc<Self>) {
        loop {
            tokio::time::sleep(IDLE_CHECK_EVERY).await;
            if let Err(e) = self.idle_pass().await {
                tracing::warn!("idle timeouts: {e}");
            }
        }
    }

    /// One look at every instance with an idle timeout; returns the ids it stopped.
    pub async fn idle_pass(&self) -> Result<Vec<String>> {
        let now = super::now_ms();
        let live = self.store.live_instances(None).await?;
        // Forget instances that are gone.
        {
            let ids: std::collections::HashSet<&str> = live.iter().map(|i| i.id.as_str()).collect();
            self.ingress
                .activity
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|id, u| ids.contains(id.as_str()) || u.open > 0);
        }
        let watched: Vec<(&InstanceRow, u64)> = live
            .iter()
            .filter_map(|i| i.spec.idle_timeout_secs.map(|t| (i, t)))
            .filter(|(i, _)| {
                i.state == InstanceState::Running
                    && i.desired == InstanceState::Running
                    && !self.is_simulated(i)
            })
            .collect();
        if watched.is_empty() {
            return Ok(Vec::new());
        }
        let stats = self.telemetry.gpu_stats();
        let mut stopped = Vec::new();
        for (i, timeout) in watched {
            if self.gpu_busy(i, &stats) {
                let mut map = self
                    .ingress
                    .activity
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                map.entry(i.id.clone()).or_default().last = now;
                continue;
            }
            let idle_ms = now - self.last_activity(i);
            if idle_ms < (timeout as i64).saturating_mul(1000) {
                continue;
            }
            if self.stop_if_desired_running(&i.id).await? {
                self.event(
                    &i.id,
                    "idle",
                    format!(
                        "stopped after {} s unused (idle timeout {timeout} s): no traffic, no open \
                         connection, GPUs below {IDLE_GPU_PERCENT}%",
                        idle_ms / 1000
                    ),
                )
                .await;
                self.wake.notify_one();
                stopped.push(i.id.clone());
            }
        }
        Ok(stopped)
    }
}

impl Engine {
    /// Instance `row`'s address in its tenant's network on this host.
    pub(crate) fn address_in(
        &self,
        tenant: &crate::store::TenantRow,
        row: &crate::store::InstanceRow,
    ) -> std::result::Result<std::net::Ipv4Addr, gpuvisor_node::net::NetError> {
        self.node.net.address(
            &gpuvisor_node::net::TenantNet {
                slot: tenant.net_slot,
            },
            row.ip_host,
        )
    }
}
