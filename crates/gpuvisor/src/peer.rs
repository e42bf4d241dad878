//! Another gpuvisor daemon as a live migration's source reaches it (`[[peer]]`): its HTTPS
//! API with an admin key of it, for the engine's [`Peer`] seam. The calls are the client's
//! (blocking, from the migration's blocking task); a byte channel is an HTTP/1.1 connection
//! upgraded to raw bytes (`Upgrade: gpuvisor-migration`) over the same TLS, relayed on the
//! daemon's runtime to a socket pair whose other end goes to QEMU.

use crate::client::Client;
use crate::config::PeerConfig;
use anyhow::Context;
use gpuvisor_control::engine::remote::{Peer, Peers};
use gpuvisor_wire::{self as wire, MigrationChannel, MigrationPhase};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest a peer may take to answer an upgrade.
const UPGRADE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest a peer may take to answer a call (`run` waits for the rest of the state, up to a
/// minute, there).
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// Longest a peer may take to accept an offer.
const OFFER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// Largest answer head read before the upgrade.
const MAX_HEAD: usize = 16 * 1024;

pub struct HttpPeer {
    node: String,
    /// Every call but the offer: bounded by [`CALL_TIMEOUT`].
    client: Client,
    /// The offer (the destination may build the image's VM template first).
    offers: Client,
    tls: Arc<rustls::ClientConfig>,
    runtime: tokio::runtime::Handle,
}

/// The peers of the config, by node id; refused at start when one's key or CA cannot be read.
pub fn peers(configs: &[PeerConfig]) -> anyhow::Result<Peers> {
    let mut out = Peers::new();
    for c in configs {
        let key = std::fs::read_to_string(&c.key_file)
            .with_context(|| {
                format!(
                    "[[peer]] {}: cannot read key_file {}",
                    c.node,
                    c.key_file.display()
                )
            })?
            .trim()
            .to_string();
        let client = |timeout| {
            Client::with_timeout(
                &c.endpoint,
                Some(key.clone()),
                c.ca.as_deref(),
                Some(timeout),
            )
            .map_err(|e| anyhow::anyhow!("[[peer]] {}: {e}", c.node))
        };
        let (offers, client) = (client(OFFER_TIMEOUT)?, client(CALL_TIMEOUT)?);
        let tls = crate::tls::ClientTrust::choose(c.ca.as_deref())
            .client_config()
            .with_context(|| format!("[[peer]] {}: its CA", c.node))?;
        out.insert(
            c.node.clone(),
            Arc::new(HttpPeer {
                node: c.node.clone(),
                client,
                offers,
                tls,
                runtime: tokio::runtime::Handle::current(),
            }) as Arc<dyn Peer>,
        );
    }
    Ok(out)
}

impl HttpPeer {
    /// Opens `path` upgraded to raw bytes: the TLS stream, ready for the channel's bytes.
    async fn upgraded(
        &self,
        path: &str,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
        let authority = self.client.authority();
        let tcp = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| format!("connecting to {authority}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority.as_str(),
        }
        .trim_matches(['[', ']']);
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host:?} is no TLS server name: {e}"))?;
        let mut s = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {authority}: {e}"))?;
        let key = self.client.key().unwrap_or_default();
        let head = format!(
            "GET {}{path} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\nUpgrade: {}\r\n{}: {key}\r\nUser-Agent: gpuvisor/{}\r\n\r\n",
            wire::API_PREFIX,
            wire::MIGRATION_UPGRADE,
            wire::API_KEY_HEADER,
            env!("CARGO_PKG_VERSION")
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("asking {authority}: {e}"))?;
        // The answer's head, a byte at a time: what follows it is the channel's.
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n\r\n") {
            if got.len() > MAX_HEAD {
                return Err(format!("{authority} answered a head over {MAX_HEAD} bytes"));
            }
            let b = s
                .read_u8()
                .await
                .map_err(|e| format!("reading {authority}'s answer: {e}"))?;
            got.push(b);
        }
        let head = String::from_utf8_lossy(&got);
        let status = head.split_whitespace().nth(1).unwrap_or_default();
        if status == "101" {
            return Ok(s);
        }
        // An error answer: its body says why (JSON with a message).
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0)
            .min(MAX_HEAD);
        let mut body = vec![0; len];
        let _ = s.read_exact(&mut body).await;
        Err(format!(
            "{authority} refused the channel ({status}): {}",
            String::from_utf8_lossy(&body)
        ))
    }
}

impl Peer for HttpPeer {
    fn offer(&self, offer: &wire::MigrationOffer) -> Result<wire::MigrationAccepted, String> {
        self.offers
            .offer_migration(offer)
            .map_err(|e| e.to_string())
    }

    fn channel(&self, id: &str, channel: MigrationChannel) -> Result<OwnedFd, String> {
        let path = format!("/migrations/{id}/channels/{}", channel.as_str());
        let remote = self.runtime.block_on(async {
            tokio::time::timeout(UPGRADE_TIMEOUT, self.upgraded(&path))
                .await
                .map_err(|_| {
                    format!(
                        "node {} did not answer within {UPGRADE_TIMEOUT:?}",
                        self.node
                    )
                })?
        })?;
        let (ours, qemus) =
            std::os::unix::net::UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        ours.set_nonblocking(true)
            .map_err(|e| format!("socketpair: {e}"))?;
        let _entered = self.runtime.enter();
        let local =
            tokio::net::UnixStream::from_std(ours).map_err(|e| format!("socketpair: {e}"))?;
        let node = self.node.clone();
        self.runtime.spawn(async move {
            relay(local, remote, &format!("to node {node}")).await;
        });
        Ok(qemus.into())
    }

    fn run(&self, id: &str) -> Result<(), String> {
        self.client
            .run_migration(id)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn drop_migration(&self, id: &str, lost: bool) -> Result<(), String> {
        match self.client.drop_migration(id, lost) {
            Ok(s) if s.phase == MigrationPhase::Gone => Ok(()),
            Ok(s) => Err(format!("it answered {:?}", s.phase)),
            Err(e) => Err(e.to_string()),
        }
    }

    fn phase(&self, id: &str) -> Result<MigrationPhase, String> {
        self.client
            .migration_status(id)
            .map(|s| s.phase)
            .map_err(|e| e.to_string())
    }
}

/// Relays a migration channel's bytes both ways between `a` and `b` (a QEMU's socket and the
/// peer's connection) until both directions ended: each direction ends at its reader's end by
/// shutting its writer down, and the relay at either's first error (QEMU's own protocol says
/// when a migration is over: a post-copy source completes only once the destination said it
/// has read everything). Logs the bytes carried each way.
pub async fn relay<A, B>(mut a: A, mut b: B, what: &str)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut a, &mut b).await {
        Ok((out, back)) => tracing::info!(out, back, "migration channel {what} ended"),
        Err(e) => tracing::info!("migration channel {what} ended: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways at once, each ended by its own side: everything arrives, in order, and
    /// each side reads the other's end.
    #[tokio::test]
    async fn both_ways_carry_everything() {
        let (a, a_end) = tokio::io::duplex(4 << 10);
        let (b_end, b) = tokio::io::duplex(4 << 10);
        let relayed = tokio::spawn(relay(a_end, b_end, "test"));
        let one: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let two: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
        let (mut ar, mut aw) = tokio::io::split(a);
        let (mut br, mut bw) = tokio::io::split(b);
        let (mut at_a, mut at_b) = (Vec::new(), Vec::new());
        let (w1, w2, r1, r2) = tokio::join!(
            async {
                aw.write_all(&one).await?;
                aw.shutdown().await
            },
            async {
                bw.write_all(&two).await?;
                bw.shutdown().await
            },
            br.read_to_end(&mut at_b),
            ar.read_to_end(&mut at_a),
        );
        w1.unwrap();
        w2.unwrap();
        r1.unwrap();
        r2.unwrap();
        assert!(at_b == one && at_a == two);
        relayed.await.unwrap();
    }
}
