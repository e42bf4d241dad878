//! `[proxy]`: the HTTPS proxy to instance ports and the TCP port maps.

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The `[proxy]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxySection {
    /// Where the proxy listens; `None`: off (no URLs, no TCP maps) [default: 0.0.0.0:8443].
    pub listen: Option<SocketAddr>,
    /// `https://<instance-id>-<port>.<domain>/` [default: gpuvisor.localhost].
    pub domain: String,
    /// The HTTPS port in the URLs shown (a port forward or load balancer in front)
    /// [default: the listen port].
    pub public_port: Option<u16>,
    /// The host name in `tcp://HOST:PORT` URLs [default: this host's name].
    pub public_host: Option<String>,
    /// The operator's certificate for `*.<domain>` (PEM chain and key); default: one signed by
    /// the daemon's CA.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Host ports for TCP maps, inclusive [default: 30000-30999].
    pub tcp_ports: (u16, u16),
    /// Where the TCP maps listen [default: 0.0.0.0].
    pub tcp_listen: IpAddr,
    /// Longest wait for an instance's response head [default: 100s].
    pub request_timeout: Duration,
    /// A body, WebSocket or TCP connection with no byte either way this long is closed
    /// [default: 10m].
    pub idle_timeout: Duration,
    /// Longest connect to an instance [default: 5s].
    pub connect_timeout: Duration,
    /// Open connections, HTTPS, WebSocket tunnels and TCP relays together (each also holds
    /// one to the instance) [default: 10000; at most half the daemon's open-file limit].
    pub max_connections: usize,
    /// Open connections per client address [default: 256].
    pub max_connections_per_ip: usize,
    /// The proxy's own worker threads, apart from the API's [default: 2].
    pub threads: usize,
    /// The serverless worker API (plain HTTP, only from instance addresses, each worker with
    /// its own credential): this port on every tenant bridge's gateway; `None`: off, and no
    /// serverless endpoints [default: 8444].
    pub worker_port: Option<u16>,
    /// Addresses serverless webhooks may reach although they are not public (loopback,
    /// private, link-local) [default: none].
    pub webhook_allow: Vec<IpAddr>,
    /// What the jobs of one tenant's serverless endpoints may keep in the store: inputs,
    /// results and stream chunks until their retention ends [default: 1GiB].
    pub job_storage_per_tenant: u64,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 8443))),
            domain: "gpuvisor.localhost".into(),
            public_port: None,
            public_host: None,
            cert: None,
            key: None,
            tcp_ports: (30000, 30999),
            tcp_listen: IpAddr::from([0, 0, 0, 0]),
            request_timeout: Duration::from_secs(100),
            idle_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(5),
            max_connections: 10_000,
            max_connections_per_ip: 256,
            threads: 2,
            worker_port: Some(8444),
            webhook_allow: Vec::new(),
            job_storage_per_tenant: 1 << 30,
        }
    }
}

/// `[proxy]` in the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProxyFile {
    listen: Option<String>,
    domain: Option<String>,
    public_port: Option<u16>,
    public_host: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    tcp_ports: Option<String>,
    tcp_listen: Option<IpAddr>,
    request_timeout: Option<String>,
    idle_timeout: Option<String>,
    connect_timeout: Option<String>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    threads: Option<usize>,
    worker_port: Option<String>,
    webhook_allow: Option<Vec<IpAddr>>,
    job_storage_per_tenant: Option<String>,
}

/// Flags for `[proxy]`.
#[derive(Debug, Default, Clone, Args)]
pub struct ProxyOverrides {
    /// Where the HTTPS proxy to instance ports listens, or `off` [proxy.listen].
    #[arg(
        long = "proxy-listen",
        env = "GPUVISOR_PROXY_LISTEN",
        value_name = "ADDR|off"
    )]
    pub proxy_listen: Option<String>,
    /// Instance ports are `https://<id>-<port>.<DOMAIN>/` [proxy.domain].
    #[arg(long = "proxy-domain", value_name = "DOMAIN")]
    pub proxy_domain: Option<String>,
    /// Host ports for TCP maps, e.g. 30000-30999 [proxy.tcp_ports].
    #[arg(long = "proxy-tcp-ports", value_name = "LO-HI")]
    pub proxy_tcp_ports: Option<String>,
    /// Where the TCP maps listen [proxy.tcp_listen].
    #[arg(long = "proxy-tcp-listen", value_name = "IP")]
    pub proxy_tcp_listen: Option<IpAddr>,
    /// The serverless worker API's port on the tenant bridges, or `off` [proxy.worker_port].
    #[arg(
        long = "worker-port",
        env = "GPUVISOR_WORKER_PORT",
        value_name = "PORT|off"
    )]
    pub worker_port: Option<String>,
    /// An address serverless webhooks may reach although not public (repeatable)
    /// [proxy.webhook_allow].
    #[arg(long = "webhook-allow", value_name = "IP")]
    pub webhook_allow: Vec<IpAddr>,
    /// What the jobs of one tenant's endpoints may keep in the store, e.g. 1GiB
    /// [proxy.job_storage_per_tenant].
    #[arg(long = "job-storage-per-tenant", value_name = "SIZE")]
    pub job_storage_per_tenant: Option<String>,
}

fn job_storage(v: &str) -> anyhow::Result<u64> {
    match gpuvisor_wire::parse_size(v) {
        Ok(n) if n >= 1 << 20 => Ok(n),
        _ => {
            bail!("proxy.job_storage_per_tenant {v:?}: expected a size of at least 1MiB, like 1GiB")
        }
    }
}

fn worker_port(v: &str) -> anyhow::Result<Option<u16>> {
    if v == "off" {
        return Ok(None);
    }
    match v.parse::<u16>() {
        Ok(p) if p > 0 => Ok(Some(p)),
        _ => bail!("proxy.worker_port {v:?} is not a port (1-65535) or off"),
    }
}

fn listen(v: &str) -> anyhow::Result<Option<SocketAddr>> {
    if v == "off" {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .with_context(|| format!("proxy.listen {v:?} is not ADDR:PORT or off"))
}

fn port_range(v: &str) -> anyhow::Result<(u16, u16)> {
    let (lo, hi) = v.split_once('-').unwrap_or((v, v));
    let (Ok(lo), Ok(hi)) = (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) else {
        bail!("proxy.tcp_ports {v:?} is not a range like 30000-30999");
    };
    if lo == 0 || lo > hi {
        bail!("proxy.tcp_ports {v:?}: the range must be from 1 up, low to high");
    }
    Ok((lo, hi))
}

fn duration(name: &str, v: &str) -> anyhow::Result<Duration> {
    match humantime::parse_duration(v) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => bail!("proxy.{name} {v:?} is not a duration like 30s"),
    }
}

/// A DNS name of lowercase labels: what the certificate and the Host match.
fn domain(v: &str) -> anyhow::Result<String> {
    let d = v.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if d.is_empty() || d.len() > 200 || !d.split('.').all(label_ok) {
        bail!("proxy.domain {v:?} is not a DNS name like proxy.example.com");
    }
    Ok(d)
}

impl ProxySection {
    pub(super) fn apply_file(&mut self, f: ProxyFile) -> anyhow::Result<()> {
        if let Some(v) = f.listen {
            self.listen = listen(&v)?;
        }
        if let Some(v) = f.domain {
            self.domain = domain(&v)?;
        }
        if f.public_port.is_some() {
            self.public_port = f.public_port;
        }
        if f.public_host.is_some() {
            self.public_host = f.public_host;
        }
        if f.cert.is_some() || f.key.is_some() {
            self.cert = f.cert;
            self.key = f.key;
        }
        if let Some(v) = f.tcp_ports {
            self.tcp_ports = port_range(&v)?;
        }
        if let Some(v) = f.tcp_listen {
            self.tcp_listen = v;
        }
        if let Some(v) = f.request_timeout {
            self.request_timeout = duration("request_timeout", &v)?;
        }
        if let Some(v) = f.idle_timeout {
            self.idle_timeout = duration("idle_timeout", &v)?;
        }
        if let Some(v) = f.connect_timeout {
            self.connect_timeout = duration("connect_timeout", &v)?;
        }
        if let Some(v) = f.max_connections {
            self.max_connections = v;
        }
        if let Some(v) = f.max_connections_per_ip {
            self.max_connections_per_ip = v;
        }
        if let Some(v) = f.threads {
            self.threads = v;
        }
        if let Some(v) = &f.worker_port {
            self.worker_port = worker_port(v)?;
        }
        if let Some(v) = f.webhook_allow {
            self.webhook_allow = v;
        }
        if let Some(v) = &f.job_storage_per_tenant {
            self.job_storage_per_tenant = job_storage(v)?;
        }
        Ok(())
    }

    pub(super) fn apply_flags(&mut self, o: &ProxyOverrides) -> anyhow::Result<()> {
        if let Some(v) = &o.proxy_listen {
            self.listen = listen(v)?;
        }
        if let Some(v) = &o.proxy_domain {
            self.domain = domain(v)?;
        }
        if let Some(v) = &o.proxy_tcp_ports {
            self.tcp_ports = port_range(v)?;
        }
        if let Some(v) = o.proxy_tcp_listen {
            self.tcp_listen = v;
        }
        if let Some(v) = &o.worker_port {
            self.worker_port = worker_port(v)?;
        }
        if !o.webhook_allow.is_empty() {
            self.webhook_allow = o.webhook_allow.clone();
        }
        if let Some(v) = &o.job_storage_per_tenant {
            self.job_storage_per_tenant = job_storage(v)?;
        }
        self.check()
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.cert.is_some() != self.key.is_some() {
            bail!("proxy.cert and proxy.key go together");
        }
        if self.max_connections == 0
            || self.max_connections_per_ip == 0
            || self.threads == 0
            || self.threads > 64
        {
            bail!(
                "proxy.max_connections and proxy.max_connections_per_ip must be at least 1 and \
                 proxy.threads 1 to 64"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked() {
        assert_eq!(port_range("30000-30010").unwrap(), (30000, 30010));
        assert_eq!(port_range("2222").unwrap(), (2222, 2222));
        assert!(port_range("10-5").is_err());
        assert!(port_range("0-5").is_err());
        assert!(port_range("a-b").is_err());
        assert_eq!(listen("off").unwrap(), None);
        assert_eq!(worker_port("off").unwrap(), None);
        assert_eq!(worker_port("8444").unwrap(), Some(8444));
        assert!(worker_port("0").is_err() && worker_port("x").is_err());
        assert!(listen("8443").is_err());
        assert_eq!(domain("Proxy.Example.COM.").unwrap(), "proxy.example.com");
        assert!(domain("a..b").is_err());
        assert!(domain("-a.b").is_err());
        assert!(domain("a_b.c").is_err());
        assert!(duration("x", "0s").is_err());
    }
}
