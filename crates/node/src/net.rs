//! Instance networks. CONTRACT (to be implemented).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetError {
    #[error(transparent)]
    Cmd(#[from] crate::cmd::CmdError),
    #[error("io on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A tenant's network on this host: its bridge and /24.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantNet {
    /// Index of the tenant's /24 inside the pool.
    pub slot: u32,
}

#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Base of the address pool, a /16 (`10.88.0.0`).
    pub pool: Ipv4Addr,
    /// Masquerade egress traffic.
    pub nat: bool,
}

pub struct Network {
    pub cfg: NetConfig,
}

impl Network {
    pub fn new(cfg: NetConfig) -> Self {
        Self { cfg }
    }
    /// The address of host number `host` (2..=254) in a tenant's /24.
    pub fn address(&self, net: &TenantNet, host: u8) -> Ipv4Addr {
        let [a, b, _, _] = self.cfg.pool.octets();
        Ipv4Addr::new(a, b, net.slot as u8, host)
    }
    /// Creates `netns gv-<id>` with a veth to the tenant bridge and the address; returns the
    /// netns path. Idempotent.
    pub fn setup(&self, _id: &str, _net: &TenantNet, _host: u8) -> Result<PathBuf, NetError> {
        Ok(PathBuf::new())
    }
    /// Removes the instance's netns and veth. Idempotent.
    pub fn teardown(&self, _id: &str) -> Result<(), NetError> {
        Ok(())
    }
    /// Instance ids that have a netns or veth on this host.
    pub fn instances_with_objects(&self) -> Result<Vec<String>, NetError> {
        Ok(vec![])
    }
}
