//! Tenants' webhooks: a POST of a small JSON body to a URL the tenant chose, from this host.
//!
//! Why here: the destination is a stranger's choice, and the daemon's host sits on networks
//! tenants must not reach (its LAN, the cloud's metadata service, its own API on loopback). So
//! a webhook goes only to public addresses — every address its name resolves to is checked by
//! the resolver the client connects through (no gap between the check and the connect for a
//! name to rebind), an address literal before the request — unless the operator allowed the
//! address (`allow`). http or https only, no redirects followed, no proxy, bounded connect and
//! whole-request time; the answer's body is never read.

use crate::registry::is_public;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum WebhookError {
    #[error("webhook {0}")]
    Refused(String),
    #[error("webhook call: {0}")]
    Http(String),
}

/// Addresses a webhook may reach: the operator's allowed ones; else public ones that are
/// neither this host's own nor in the operator's deny list (`[network] deny`).
#[derive(Clone)]
struct Guard {
    allow: Arc<Vec<IpAddr>>,
    deny: Arc<Vec<crate::net::NetRule>>,
    host: Arc<Vec<IpAddr>>,
}

impl Guard {
    fn ok(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if self.allow.contains(&ip) {
            return true;
        }
        let denied = match ip {
            IpAddr::V4(v4) => self.deny.iter().any(|r| r.contains(v4)),
            IpAddr::V6(_) => false,
        };
        is_public(ip) && !denied && !self.host.contains(&ip)
    }
}

/// Every address of this host's interfaces (a public one included: a webhook must not reach
/// the daemon's own services through it).
fn host_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|sa| {
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

impl reqwest::dns::Resolve for Guard {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        let me = self.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| me.ok(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "{host} resolves to no public address: refused (an operator may allow an address with --webhook-allow)"
                )
                .into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

pub struct Webhooks {
    http: reqwest::Client,
    guard: Guard,
}

impl Webhooks {
    /// A client for webhooks; `allow`: addresses reachable although not public; `deny`: public
    /// networks no webhook reaches (the instances' deny list).
    pub fn new(allow: Vec<IpAddr>, deny: Vec<crate::net::NetRule>) -> Result<Self, WebhookError> {
        // Ring, as for registry pulls (reqwest is built without a default provider).
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let guard = Guard {
            allow: Arc::new(allow),
            deny: Arc::new(deny),
            host: Arc::new(host_addresses()),
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(guard.clone()))
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .user_agent(concat!("gpuvisor-webhook/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| WebhookError::Http(format!("cannot make an HTTP client: {e}")))?;
        Ok(Self { http, guard })
    }

    /// POSTs `body` (JSON) to `url`; the answer's status.
    pub async fn post(&self, url: &str, body: Vec<u8>) -> Result<u16, WebhookError> {
        let u = reqwest::Url::parse(url)
            .map_err(|e| WebhookError::Refused(format!("{url:?}: not a URL ({e})")))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(WebhookError::Refused(format!("{url:?}: not http or https")));
        }
        // An address literal never reaches the resolver.
        let host = u
            .host_str()
            .ok_or_else(|| WebhookError::Refused(format!("{url:?}: no host")))?;
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        if let Some(ip) = literal {
            if !self.guard.ok(ip) {
                return Err(WebhookError::Refused(format!(
                    "to {ip} refused: a loopback, private, link-local or internal address"
                )));
            }
        }
        let r = self
            .http
            .post(u)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| WebhookError::Http(chain(&e.without_url())))?;
        Ok(r.status().as_u16())
    }
}

/// An error with its causes (reqwest's own text says only "error sending request").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deny_list_and_the_hosts_own_addresses_are_refused_the_allow_list_wins() {
        let g = Guard {
            allow: Arc::new(vec!["10.0.0.7".parse().unwrap()]),
            deny: Arc::new(vec!["198.51.100.0/24".parse().unwrap()]),
            host: Arc::new(vec!["203.0.113.9".parse().unwrap()]),
        };
        assert!(g.ok("93.184.216.34".parse().unwrap()));
        assert!(!g.ok("198.51.100.20".parse().unwrap()), "denied network");
        assert!(
            !g.ok("203.0.113.9".parse().unwrap()),
            "the host's own address"
        );
        assert!(!g.ok("10.0.0.8".parse().unwrap()), "private");
        assert!(g.ok("10.0.0.7".parse().unwrap()), "allowed by the operator");
        assert!(
            !host_addresses().is_empty(),
            "the host has addresses (loopback at least)"
        );
    }

    #[tokio::test]
    async fn private_destinations_are_refused_unless_allowed() {
        let w = Webhooks::new(vec![], vec![]).unwrap();
        for url in [
            "http://127.0.0.1:9/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/",
            "http://[::1]:9/",
            "http://[::ffff:127.0.0.1]:9/",
            "http://localhost:9/",
            "file:///etc/passwd",
        ] {
            let r = w.post(url, b"{}".to_vec()).await;
            assert!(r.is_err(), "{url}: {r:?}");
            let why = r.unwrap_err().to_string();
            assert!(
                why.contains("refused") || why.contains("not http"),
                "{url}: {why}"
            );
        }
        // Allowed by the operator: the request is made (nothing listens: a connect error,
        // not a refusal).
        let w = Webhooks::new(vec!["127.0.0.1".parse().unwrap()], vec![]).unwrap();
        let r = w.post("http://127.0.0.1:9/hook", b"{}".to_vec()).await;
        assert!(
            matches!(&r, Err(WebhookError::Http(e)) if !e.contains("refused: a loopback")),
            "{r:?}"
        );
    }
}
