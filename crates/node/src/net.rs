//! Instance networks: one bridge and subnet (a /24 by default, `ipam::AddressPlan`) per tenant, one network namespace and veth per instance,
//! and the filter that lets an instance reach its own tenant and the internet, nothing else.
//!
//! Why: tenants must not reach each other, the host, the host's LAN or the cloud's metadata
//! service, while one tenant's instances on a host talk freely and every instance reaches the
//! outside through the host. A bridge per tenant makes the tenant an L2 segment of its own;
//! everything else has to go through the host's IP stack, where iptables decides.
//!
//! Host objects, all named from the daemon's prefix `P` (default `gv`; each carries the tenant
//! slot or the instance id, for orphan sweeps):
//!
//! ```text
//! Pb<slot>           bridge of a tenant, <a>.<b>.<slot>.1/24 (pool a.b.0.0/16), IPv6 off
//! P-<id>             netns of an instance, /var/run/netns/P-<id> (`ip netns add`)
//! Ph<id[..n]>        host end of the instance's veth (n = 14 - len(P): 12 for `gv`), a port of
//!                    the tenant bridge; its peer is `eth0` in the netns, <a>.<b>.<slot>.<host>/24,
//!                    default route via .1
//! GPUVISOR-FWD       filter chain, jumped to from FORWARD   (`GPUVISOR-<P>-FWD` for P != gv)
//! GPUVISOR-IN        filter chain, jumped to from INPUT for traffic from our bridges
//! GPUVISOR-NAT       nat chain, jumped to from POSTROUTING
//! ```
//!
//! The policy (filter, first match wins):
//!
//! ```text
//! FWD  -i Pb<n> -o Pb<n>                 ACCEPT   one per bridge: a tenant's own subnet
//!      ctstate RELATED,ESTABLISHED       ACCEPT   replies
//!      -i Pb+ -o Pb+                     DROP     tenant to tenant
//!      -i Pb+ -d <allow>[:port]          ACCEPT   operator allow-list (`[network] allow`)
//!      -i Pb+ -d <resolver> dport 53     ACCEPT   the resolvers instances are given
//!      -i Pb+ -d <deny>                  REJECT   operator deny-list (`[network] deny`)
//!      -i Pb+ -d <reserved>              REJECT   RFC 1918, CGNAT, link-local (metadata), ...
//!      -i Pb+                            ACCEPT   the internet (masqueraded when NAT is on)
//!      -o Pb+                            DROP     unsolicited traffic towards instances
//! IN   ctstate RELATED,ESTABLISHED       ACCEPT   replies to the host's own connections
//!      -d <allow> / <resolver>           ACCEPT   as above, when the host itself is the target
//!      -p tcp --dport <host port>        ACCEPT   the daemon's serverless worker API
//!                                        REJECT   the host (gateway, other tenants' gateways,
//!                                                 every host address): the daemon serves
//!                                                 neither DHCP nor DNS to instances
//! ```
//!
//! Key decisions:
//! - Refusals towards instances are REJECT (icmp-admin-prohibited), so a tenant's connection
//!   fails at once instead of hanging; unsolicited traffic from outside towards instances is
//!   DROPped, as a firewall does for strangers.
//! - No spoofing: the first rule of our FWD and IN chains for each tenant bridge drops packets
//!   whose source is outside that tenant's /24 (before the established accept, so a forged
//!   packet cannot ride another instance's connection). The bridge's strict `rp_filter=1` is
//!   set too, as a second layer, but the kernel honours the looser of it and the host's `all`.
//! - Instances get no IPv6: the bridge has IPv6 disabled, so the kernel drops every IPv6 packet
//!   an instance sends to the host or through it (link-local included); the instance's own
//!   link-local address only reaches its tenant's segment.
//! - The chains are ours and rebuilt whole on every start with one `iptables-restore --noflush`
//!   (one atomic commit: no window without isolation, no duplicate, no rule of an old config
//!   left behind), and again by [`Network::repair_host`] (the reconciler's 30 s sweep) when
//!   they or their jumps were flushed while the daemon runs. Per-bridge accepts are then added and removed one by one as tenants come and
//!   go (checked with `-C` first). When the daemon stops, [`Network::release_host`] removes
//!   its bridges that no instance uses, and with the last one the jumps and chains.
//! - Same-bridge traffic is switched at L2 and never routed, but when `br_netfilter` is loaded
//!   (Docker loads it) bridged frames traverse FORWARD too, hence the per-bridge accepts first.
//! - The prefix is 1-4 characters, a lowercase letter then letters or digits, and every name
//!   puts a fixed letter after it that cannot continue a parsed id (`b` then decimal, `h` then
//!   hex, `-`): so no daemon ever takes another prefix's object for its own, and two daemons
//!   with different prefixes (and pools) can share a host or its mount namespace.
//! - The veth is created with its peer directly inside the netns (`peer name eth0 netns ...`), so
//!   no temporary name can collide on the host.
//! - A new instance's network (no netns file, no veth: every create) costs no process: the
//!   netns is made as `ip netns add` makes it (a shared `/var/run/netns`, an empty file, a new
//!   namespace bind-mounted on it from a short-lived thread that `unshare`s), then over
//!   rtnetlink (`rtnl`, `netlink-packet-route` messages on `netlink-sys` sockets): one
//!   `RTM_NEWLINK` makes the veth with its peer directly in the netns as `eth0`, on the bridge
//!   and up; a socket opened inside the netns adds the address, brings `lo` and `eth0` up and
//!   replaces the default route; then it waits for the bridge port to forward (the carrier
//!   comes on asynchronously). A few ms instead of two `ip` runs (≈ 6-9 ms). On error what it
//!   made is removed.
//! - Bridges, iptables, repairs of a half-made instance and teardown shell out to `ip` and
//!   `iptables` through [`crate::cmd`]: they are on every host, their errors are what an
//!   operator would see running the same command, and none of them runs per create (a tenant's
//!   bridge and rules are set up once per daemon). A repair looks at the current state first
//!   (the netns file, `/sys/class/net`, one `ip -n NS addr show`), then does what is missing or
//!   wrong in one `ip -batch -` on the host and one `ip -n NS -batch -` inside the netns. A
//!   batch stops at its first failing line (no `-force`), and every line is one that the state
//!   seen before calls for.
//! - Teardown never trusts an error message: after a failed delete it looks whether the object is
//!   gone, and only reports an error if it is still there.

use std::collections::BTreeSet;
use std::fmt;
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use thiserror::Error;

use crate::cmd::{self, CmdError};
use crate::ipam::{AddressPlan, PlanError};

/// Where `ip netns` keeps named network namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";
/// The default prefix of host-wide objects.
pub const DEFAULT_PREFIX: &str = "gv";
/// A container's `eth0` MAC: locally administered, unicast, `02:42:` and its IPv4 address
/// (Docker's scheme). An address reused by a new instance keeps its MAC, so the host's and the
/// neighbours' ARP entries for it stay right: with a random MAC, traffic from the host (the
/// instance proxy) to a reused address went to the old instance's MAC until the entry expired.
pub fn instance_mac(addr: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = addr.octets();
    [0x02, 0x42, a, b, c, d]
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Longest prefix: the veth keeps at least 10 characters of the instance id.
pub const MAX_PREFIX_LEN: usize = 4;
/// The kernel's limit on interface names.
const IFNAME_MAX: usize = 15;

/// Destinations no instance reaches unless allow-listed: private, shared, loopback,
/// link-local (cloud metadata), IETF protocol, benchmarking, multicast and reserved space. The
/// documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) are left alone: they
/// are not routed on the internet anyway, and the tests use them as "public".
pub const RESERVED: [&str; 12] = [
    "0.0.0.0/8",
    // Azure's platform endpoint (WireServer): the VM's goal state and extension settings.
    "168.63.129.16/32",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Serialises check-then-create sequences (iptables rules, bridges) within this process.
static HOST_LOCK: Mutex<()> = Mutex::new(());

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
    #[error("{0}")]
    Invalid(String),
    #[error("netlink: {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A tenant's network on this host: its bridge and subnet.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantNet {
    /// Index of the tenant's subnet inside the pool (`0..AddressPlan::tenants()`).
    pub slot: u32,
}

/// One entry of the operator's allow- or deny-list: `a.b.c.d[/len][:port]`. With a port, TCP
/// and UDP to that port only; without, everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRule {
    pub addr: Ipv4Addr,
    pub len: u8,
    pub port: Option<u16>,
}

impl NetRule {
    /// `a.b.c.d/len`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.addr, self.len)
    }

    /// Whether `ip` is inside the rule's network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr)
    }

    /// The iptables matches of the rule (one per protocol when it has a port).
    fn matches(&self) -> Vec<Vec<String>> {
        let d = vec!["-d".to_string(), self.cidr()];
        match self.port {
            None => vec![d],
            Some(p) => ["tcp", "udp"]
                .iter()
                .map(|proto| {
                    let mut m = d.clone();
                    m.extend(["-p", proto, "--dport"].map(String::from));
                    m.push(p.to_string());
                    m
                })
                .collect(),
        }
    }
}

impl fmt::Display for NetRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.cidr())?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl FromStr for NetRule {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = |why: &str| {
            NetError::Invalid(format!(
                "{s:?} {why}: use an IPv4 address or network with an optional port, like \
                 10.1.2.0/24:443 or 192.168.5.7"
            ))
        };
        if s.contains('[') || s.matches(':').count() > 1 {
            return Err(bad("is IPv6, and instances have no IPv6"));
        }
        let (net, port) = match s.split_once(':') {
            Some((n, p)) => {
                let port: u16 = p
                    .parse()
                    .map_err(|_| bad("has a port that is not 1-65535"))?;
                if port == 0 {
                    return Err(bad("has a port that is not 1-65535"));
                }
                (n, Some(port))
            }
            None => (s, None),
        };
        let (addr, len) = match net.split_once('/') {
            Some((a, l)) => (
                a,
                l.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= 32)
                    .ok_or_else(|| bad("has a prefix length that is not 0-32"))?,
            ),
            None => (net, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("is not an IPv4 address"))?;
        let rule = NetRule { addr, len, port };
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        if u32::from(addr) & mask != u32::from(addr) {
            let base = Ipv4Addr::from(u32::from(addr) & mask);
            return Err(bad(&format!(
                "has host bits set (the network is {base}/{len})"
            )));
        }
        Ok(rule)
    }
}

/// What the operator decides about instance traffic, and the names of our host objects.
#[derive(Debug, Clone, PartialEq)]
pub struct NetPolicy {
    /// Prefix of every host-wide object (see the module docs); checked by [`check_prefix`].
    pub prefix: String,
    /// Destinations instances may reach although they are reserved (or the host).
    pub allow: Vec<NetRule>,
    /// Further destinations no instance reaches (e.g. the host's LAN when it is public space).
    pub deny: Vec<NetRule>,
    /// Host TCP ports instances may reach on the host (the daemon's serverless worker API,
    /// which itself answers only instance addresses and worker credentials).
    pub host_ports: Vec<u16>,
}

impl Default for NetPolicy {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_string(),
            allow: Vec::new(),
            deny: Vec::new(),
            host_ports: Vec::new(),
        }
    }
}

/// Checks a prefix: 1-4 characters, a lowercase letter then lowercase letters or digits.
pub fn check_prefix(p: &str) -> Result<(), NetError> {
    let mut chars = p.chars();
    let ok = (1..=MAX_PREFIX_LEN).contains(&p.len())
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(NetError::Invalid(format!(
            "network prefix {p:?} must be 1-{MAX_PREFIX_LEN} characters: a lowercase letter, \
             then lowercase letters or digits (like gv)"
        )))
    }
}

#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The address pool and each tenant's subnet size.
    pub plan: AddressPlan,
    /// Masquerade egress traffic.
    pub nat: bool,
    pub policy: NetPolicy,
    /// The resolvers instances are given in /etc/resolv.conf: DNS to them stays open even when
    /// they are in reserved space (a cloud's resolver usually is).
    pub dns: Vec<Ipv4Addr>,
}

pub struct Network {
    pub cfg: NetConfig,
    /// Bridges whose address and accept rule this network has fully set up.
    ensured: Mutex<BTreeSet<String>>,
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn check_id(id: &str) -> Result<(), NetError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(NetError::Invalid(format!(
            "invalid instance id {id:?}: use 1-64 lowercase letters, digits, '-' or '_'"
        )))
    }
}

impl From<PlanError> for NetError {
    fn from(e: PlanError) -> Self {
        NetError::Invalid(e.0)
    }
}

fn ip<I, S>(args: I) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    cmd::run("ip", args)
}

/// Runs `lines` as one `ip [-n NS] -batch -`; it stops at the first line that fails. No lines,
/// no run.
fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<(), CmdError> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut args = Vec::with_capacity(4);
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let mut input = lines.join("\n");
    input.push('\n');
    cmd::run_with_input("ip", args, &input)?;
    Ok(())
}

fn iptables<S: AsRef<str>>(table: &str, args: &[S]) -> Result<String, CmdError> {
    let mut all = vec!["-w", "-t", table];
    all.extend(args.iter().map(AsRef::as_ref));
    cmd::run("iptables", all)
}

fn chain_exists(table: &str, chain: &str) -> bool {
    iptables(table, &["-S", chain]).is_ok()
}

fn rule_exists<S: AsRef<str>>(table: &str, chain: &str, rule: &[S]) -> bool {
    let mut args = vec!["-C", chain];
    args.extend(rule.iter().map(AsRef::as_ref));
    iptables(table, &args).is_ok()
}

/// Adds `rule` to `chain` unless it is there; `insert` puts it first, otherwise last.
fn ensure_rule<S: AsRef<str>>(
    table: &str,
    chain: &str,
    rule: &[S],
    insert: bool,
) -> Result<(), NetError> {
    if rule_exists(table, chain, rule) {
        return Ok(());
    }
    let mut args = if insert {
        vec!["-I", chain, "1"]
    } else {
        vec!["-A", chain]
    };
    args.extend(rule.iter().map(AsRef::as_ref));
    iptables(table, &args)?;
    Ok(())
}

/// Deletes every copy of `rule` from `chain`; a missing chain or rule is fine.
fn remove_rule<S: AsRef<str>>(table: &str, chain: &str, rule: &[S]) -> Result<(), NetError> {
    for _ in 0..16 {
        if !rule_exists(table, chain, rule) {
            return Ok(());
        }
        let mut args = vec!["-D", chain];
        args.extend(rule.iter().map(AsRef::as_ref));
        iptables(table, &args)?;
    }
    Ok(())
}

/// Removes a chain of ours: its jump (`jump`, from `from`), its rules, the chain itself.
fn remove_chain(table: &str, from: &str, jump: &[String], chain: &str) -> Result<(), NetError> {
    remove_rule(table, from, jump)?;
    if chain_exists(table, chain) {
        iptables(table, &["-F", chain])?;
        if let Err(e) = iptables(table, &["-X", chain]) {
            if chain_exists(table, chain) {
                return Err(e.into());
            }
        }
    }
    Ok(())
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The IPv4 nameservers of a resolv.conf text.
pub fn nameservers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next()?.parse().ok())
                .flatten()
        })
        .collect()
}

impl Network {
    /// Checks the prefix and the pool; touches nothing on the host.
    pub fn new(cfg: NetConfig) -> Result<Self, NetError> {
        check_prefix(&cfg.policy.prefix)?;
        Ok(Self {
            cfg,
            ensured: Mutex::new(BTreeSet::new()),
        })
    }

    fn prefix(&self) -> &str {
        &self.cfg.policy.prefix
    }

    /// The tenant's bridge, `<P>b<slot>`.
    pub fn bridge(&self, net: &TenantNet) -> String {
        format!("{}b{}", self.prefix(), net.slot)
    }

    /// `<P>b+`: every bridge of ours, as iptables matches interfaces.
    fn bridges_match(&self) -> String {
        format!("{}b+", self.prefix())
    }

    /// `<P>-<id>`, the instance's netns.
    pub fn netns_name(&self, id: &str) -> String {
        format!("{}-{id}", self.prefix())
    }

    /// `/var/run/netns/<P>-<id>`, what the OCI runtime joins.
    pub fn netns_path(&self, id: &str) -> PathBuf {
        Path::new(NETNS_DIR).join(self.netns_name(id))
    }

    /// Characters of the instance id the veth carries (12 for the default prefix).
    pub fn veth_id_len(&self) -> usize {
        IFNAME_MAX - self.prefix().len() - 1
    }

    /// `<P>h<id[..n]>`, the host end of an instance's veth.
    pub fn veth_name(&self, id: &str) -> String {
        let short: String = id.chars().take(self.veth_id_len()).collect();
        format!("{}h{short}", self.prefix())
    }

    /// A filter or nat chain of ours: `GPUVISOR-<what>` for the default prefix, else
    /// `GPUVISOR-<P>-<what>`.
    pub fn chain(&self, what: &str) -> String {
        if self.prefix() == DEFAULT_PREFIX {
            format!("GPUVISOR-{what}")
        } else {
            format!("GPUVISOR-{}-{what}", self.prefix().to_ascii_uppercase())
        }
    }

    /// The filter chain jumped to from FORWARD.
    pub fn fwd_chain(&self) -> String {
        self.chain("FWD")
    }

    /// The filter chain jumped to from INPUT for traffic from our bridges.
    pub fn input_chain(&self) -> String {
        self.chain("IN")
    }

    /// The nat chain jumped to from POSTROUTING.
    pub fn nat_chain(&self) -> String {
        self.chain("NAT")
    }

    fn fwd_jump(&self) -> Vec<String> {
        vec!["-j".into(), self.fwd_chain()]
    }

    fn input_jump(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.bridges_match(),
            "-j".into(),
            self.input_chain(),
        ]
    }

    fn nat_jump(&self) -> Vec<String> {
        vec!["-j".into(), self.nat_chain()]
    }

    fn bridge_accept_rule(&self, bridge: &str) -> Vec<String> {
        strings(&["-i", bridge, "-o", bridge, "-j", "ACCEPT"])
    }

    /// Anti-spoofing in our own rules, first in the FWD and IN chains (before the established
    /// accept, so a forged packet cannot ride another instance's connection): from a tenant's
    /// bridge only sources in that tenant's /24. The bridge's `rp_filter` does the same only while
    /// the host's `all` setting is not loose (Ubuntu sets 2) and udev does not rewrite it.
    fn bridge_spoof_rule(&self, bridge: &str) -> Option<Vec<String>> {
        let slot = self.bridge_slot(bridge)?;
        // A bridge whose slot is outside the plan (the plan changed) carries no traffic at all.
        Some(match self.cfg.plan.subnet(slot) {
            Ok(subnet) => strings(&["-i", bridge, "!", "-s", &subnet.to_string(), "-j", "DROP"]),
            Err(_) => strings(&["-i", bridge, "-j", "DROP"]),
        })
    }

    /// The address of host number `host` (2..=254 in a /24) in a tenant's subnet.
    pub fn address(&self, net: &TenantNet, host: u8) -> Result<Ipv4Addr, NetError> {
        Ok(self.cfg.plan.address(net.slot, host)?)
    }

    /// `address/len` of host number `host` in the tenant's subnet (what an interface gets).
    fn address_cidr(&self, net: &TenantNet, host: u8) -> Result<String, NetError> {
        Ok(format!(
            "{}/{}",
            self.address(net, host)?,
            self.cfg.plan.tenant_len()
        ))
    }

    /// The tenant's gateway, host 1 of its subnet, on its bridge.
    pub fn gateway(&self, net: &TenantNet) -> Result<Ipv4Addr, NetError> {
        self.address(net, 1)
    }

    /// The pool as CIDR (`10.88.0.0/16`).
    pub fn pool_cidr(&self) -> String {
        self.cfg.plan.pool().to_string()
    }

    /// The rules of our filter chains, in order, without the per-bridge accepts:
    /// (FWD rules, IN rules), each rule as iptables arguments after `-A CHAIN`.
    pub fn policy_rules(&self) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
        let br = self.bridges_match();
        let from_br = || strings(&["-i", &br]);
        let with = |base: Vec<String>, m: &[String], target: &[&str]| {
            let mut r = base;
            r.extend_from_slice(m);
            r.push("-j".into());
            r.extend(strings(target));
            r
        };
        let reject = ["REJECT", "--reject-with", "icmp-admin-prohibited"];
        let established = strings(&[
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-j",
            "ACCEPT",
        ]);
        let mut opened: Vec<Vec<String>> = Vec::new();
        for r in &self.cfg.policy.allow {
            opened.extend(r.matches());
        }
        for ns in &self.cfg.dns {
            for proto in ["udp", "tcp"] {
                opened.push(strings(&[
                    "-d",
                    &format!("{ns}/32"),
                    "-p",
                    proto,
                    "--dport",
                    "53",
                ]));
            }
        }

        let mut fwd = vec![
            established.clone(),
            strings(&["-i", &br, "-o", &br, "-j", "DROP"]),
        ];
        for m in &opened {
            fwd.push(with(from_br(), m, &["ACCEPT"]));
        }
        for r in &self.cfg.policy.deny {
            for m in r.matches() {
                fwd.push(with(from_br(), &m, &reject));
            }
        }
        for cidr in RESERVED {
            fwd.push(with(from_br(), &strings(&["-d", cidr]), &reject));
        }
        fwd.push(strings(&["-i", &br, "-j", "ACCEPT"]));
        fwd.push(strings(&["-o", &br, "-j", "DROP"]));

        let mut input = vec![established];
        for m in &opened {
            input.push(with(Vec::new(), m, &["ACCEPT"]));
        }
        for port in &self.cfg.policy.host_ports {
            input.push(strings(&[
                "-p",
                "tcp",
                "--dport",
                &port.to_string(),
                "-j",
                "ACCEPT",
            ]));
        }
        input.push(with(Vec::new(), &[], &reject));
        (fwd, input)
    }

    /// The `iptables-restore --noflush` input that replaces our chains' contents.
    fn restore_input(&self, bridges: &[String]) -> String {
        let (fwd, input) = self.policy_rules();
        let (fc, ic, nc) = (self.fwd_chain(), self.input_chain(), self.nat_chain());
        let mut s = format!("*filter\n:{fc} - [0:0]\n:{ic} - [0:0]\n");
        let line = |s: &mut String, chain: &str, rule: &[String]| {
            s.push_str(&format!("-A {chain} {}\n", rule.join(" ")));
        };
        for b in bridges {
            if let Some(r) = self.bridge_spoof_rule(b) {
                line(&mut s, &fc, &r);
                line(&mut s, &ic, &r);
            }
            line(&mut s, &fc, &self.bridge_accept_rule(b));
        }
        for r in &fwd {
            line(&mut s, &fc, r);
        }
        for r in &input {
            line(&mut s, &ic, r);
        }
        s.push_str("COMMIT\n*nat\n");
        s.push_str(&format!(":{nc} - [0:0]\n"));
        if self.cfg.nat {
            let pool = self.pool_cidr();
            line(
                &mut s,
                &nc,
                &strings(&["-s", &pool, "!", "-d", &pool, "-j", "MASQUERADE"]),
            );
        }
        s.push_str("COMMIT\n");
        s
    }

    /// Refuses a pool that an interface which is not one of our bridges already uses (another
    /// daemon, the LAN): instances would shadow it or be shadowed.
    fn check_pool_free(&self) -> Result<(), NetError> {
        let pool = self.cfg.plan.pool();
        let out = ip(["-4", "-o", "addr", "show"])?;
        for l in out.lines() {
            let mut w = l.split_whitespace();
            let (Some(dev), Some(addr)) = (w.nth(1), w.nth(1)) else {
                continue;
            };
            let Some(ip) = addr.split('/').next().and_then(|a| a.parse().ok()) else {
                continue;
            };
            if pool.contains(ip) && self.bridge_slot(dev).is_none() {
                return Err(NetError::Invalid(format!(
                    "the instance pool {} is already in use on {dev} ({addr}): give this daemon \
                     another net_pool (and prefix) than any other gpuvisor or network on the host",
                    self.pool_cidr()
                )));
            }
        }
        Ok(())
    }

    /// The slot of `name` if it is one of our bridges (`<P>b<decimal>`).
    fn bridge_slot(&self, name: &str) -> Option<u32> {
        let rest = name.strip_prefix(self.prefix())?.strip_prefix('b')?;
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        rest.parse().ok()
    }

    /// Prepares the host once per daemon start: IP forwarding, our chains (rebuilt whole, in one
    /// atomic commit) and the jumps to them. Idempotent.
    /// Rebuilds our chains (as at start) when they are not whole any more: someone flushed or
    /// deleted them, or the jumps to them, while the daemon runs. Cheap when they are intact
    /// (three `iptables -C`); the reconciler's sweep calls it every 30 s. Returns whether it
    /// rebuilt.
    pub fn repair_host(&self) -> Result<bool, NetError> {
        let (fwd, _) = self.policy_rules();
        let intact = rule_exists("filter", "FORWARD", &self.fwd_jump())
            && rule_exists("filter", "INPUT", &self.input_jump())
            && fwd
                .last()
                .is_some_and(|last| rule_exists("filter", &self.fwd_chain(), last));
        if intact {
            return Ok(false);
        }
        tracing::warn!("our iptables chains were changed outside gpuvisor: rebuilding them");
        self.init_host()?;
        Ok(true)
    }

    pub fn init_host(&self) -> Result<(), NetError> {
        let fwd = Path::new("/proc/sys/net/ipv4/ip_forward");
        let on = std::fs::read_to_string(fwd)
            .map(|s| s.trim() == "1")
            .unwrap_or(false);
        if !on {
            std::fs::write(fwd, "1").map_err(|source| NetError::Io {
                path: fwd.to_path_buf(),
                source,
            })?;
        }

        let _guard = HOST_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        self.check_pool_free()?;
        let bridges: Vec<String> = self
            .tenant_bridges()?
            .into_iter()
            .map(|slot| self.bridge(&TenantNet { slot }))
            .collect();
        let input = self.restore_input(&bridges);
        cmd::run_with_input("iptables-restore", ["-w", "--noflush"], &input)?;
        // Jumps last: the chains are complete before any traffic is sent to them.
        ensure_rule("filter", "FORWARD", &self.fwd_jump(), true)?;
        ensure_rule("filter", "INPUT", &self.input_jump(), true)?;
        ensure_rule("nat", "POSTROUTING", &self.nat_jump(), true)?;
        self.ensured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        tracing::info!(
            pool = self.pool_cidr(),
            nat = self.cfg.nat,
            prefix = self.prefix(),
            allow = self.cfg.policy.allow.len(),
            "host network prepared"
        );
        Ok(())
    }

    /// Removes our bridges that no instance uses any more, then our jumps and chains if no
    /// bridge of ours is left. Returns whether the chains are gone. Idempotent. For a daemon
    /// that stops: a bridge whose last instance goes while the daemon runs is kept (a create
    /// for the same tenant may be attaching to it) and goes here.
    pub fn release_host(&self) -> Result<bool, NetError> {
        for slot in self.tenant_bridges()? {
            self.teardown_tenant(&TenantNet { slot })?;
        }
        let _guard = HOST_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        if !self.tenant_bridges()?.is_empty() {
            return Ok(false);
        }
        remove_chain("filter", "FORWARD", &self.fwd_jump(), &self.fwd_chain())?;
        remove_chain("filter", "INPUT", &self.input_jump(), &self.input_chain())?;
        remove_chain("nat", "POSTROUTING", &self.nat_jump(), &self.nat_chain())?;
        // The VM taps' anti-spoofing table (empty once no tap is left).
        let table = self.tap_table();
        if bridge_table_exists(&table) {
            cmd::run("nft", ["delete", "table", "bridge", &table])?;
        }
        Ok(true)
    }

    /// Makes sure the tenant's bridge exists, has the gateway address, no IPv6, and is up, and
    /// that its instances may talk to each other. Idempotent.
    pub fn ensure_tenant(&self, net: &TenantNet) -> Result<(), NetError> {
        let subnet = self.cfg.plan.subnet(net.slot)?;
        let bridge = self.bridge(net);
        {
            let _guard = HOST_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            // Fast path: this network already set the bridge and its rule up and the bridge is
            // still there; saves five tool runs per instance create.
            let ensured = self.ensured.lock().unwrap_or_else(|p| p.into_inner());
            if ensured.contains(&bridge) && link_exists(&bridge) {
                return Ok(());
            }
        }
        // Our chains must be there before a bridge is used (someone may have flushed iptables
        // since the start): rebuilt whole if not, never created empty.
        if !chain_exists("filter", &self.fwd_chain())
            || !chain_exists("filter", &self.input_chain())
        {
            self.init_host()?;
        }
        let _guard = HOST_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let mut ensured = self.ensured.lock().unwrap_or_else(|p| p.into_inner());
        if !link_exists(&bridge) {
            // A fixed address: a bridge otherwise takes the lowest port's, which changes as
            // instances come and go and makes neighbours' ARP entries for the gateway stale.
            let mac = self.cfg.plan.bridge_mac(net.slot);
            if let Err(e) = ip([
                "link", "add", "name", &bridge, "address", &mac, "type", "bridge",
            ]) {
                if !link_exists(&bridge) {
                    return Err(e.into());
                }
            }
        }
        // No IPv6 on the bridge: the kernel then drops every IPv6 packet instances send to the
        // host or through it. The file is missing only where the kernel has no IPv6 at all.
        let v6 = PathBuf::from(format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6"));
        if v6.exists() {
            std::fs::write(&v6, "1").map_err(|source| NetError::Io { path: v6, source })?;
        }
        // Strict reverse-path filter: a packet from this bridge whose source is not routed back
        // through it (another tenant's address, anything outside the tenant's /24) is dropped,
        // so an instance with CAP_NET_RAW cannot speak with another instance's address.
        let rp = PathBuf::from(format!("/proc/sys/net/ipv4/conf/{bridge}/rp_filter"));
        std::fs::write(&rp, "1").map_err(|source| NetError::Io { path: rp, source })?;
        let gw = self.address_cidr(net, 1)?;
        debug_assert!(subnet.contains(self.gateway(net)?));
        ip(["addr", "replace", &gw, "dev", &bridge])?;
        // Any other address (left by an older address plan) would route another tenant's
        // subnet, or part of it, onto this bridge.
        let shown = ip(["-4", "-o", "addr", "show", "dev", &bridge])?;
        for stale in parse_inet_addrs(&shown).into_iter().filter(|a| *a != gw) {
            ip(["addr", "del", &stale, "dev", &bridge])?;
        }
        ip(["link", "set", &bridge, "up"])?;
        ensure_rule(
            "filter",
            &self.fwd_chain(),
            &self.bridge_accept_rule(&bridge),
            true,
        )?;
        // Inserted after the accept, so it is the first rule of each chain.
        if let Some(r) = self.bridge_spoof_rule(&bridge) {
            ensure_rule("filter", &self.fwd_chain(), &r, true)?;
            ensure_rule("filter", &self.input_chain(), &r, true)?;
        }
        ensured.insert(bridge);
        Ok(())
    }

    /// Removes the tenant's bridge and its rule if no instance is attached to it any more.
    /// Returns whether it is gone. Idempotent.
    pub fn teardown_tenant(&self, net: &TenantNet) -> Result<bool, NetError> {
        let bridge = self.bridge(net);
        let _guard = HOST_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let ports = Path::new("/sys/class/net").join(&bridge).join("brif");
        match std::fs::read_dir(&ports) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => {
                return Err(NetError::Io {
                    path: ports,
                    source,
                })
            }
        }
        if link_exists(&bridge) {
            if let Err(e) = ip(["link", "del", &bridge]) {
                if link_exists(&bridge) {
                    return Err(e.into());
                }
            }
        }
        self.ensured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&bridge);
        let fc = self.fwd_chain();
        if chain_exists("filter", &fc) {
            remove_rule("filter", &fc, &self.bridge_accept_rule(&bridge))?;
        }
        if let Some(r) = self.bridge_spoof_rule(&bridge) {
            for chain in [fc, self.input_chain()] {
                if chain_exists("filter", &chain) {
                    remove_rule("filter", &chain, &r)?;
                }
            }
        }
        Ok(true)
    }

    /// Forgets the connection-tracking entries of a deleted tenant's subnet, so that a new
    /// tenant given the slot (and the same addresses) never receives a late reply meant for
    /// the old one. Best effort: without the `conntrack` tool it only warns.
    pub fn forget_tenant_connections(&self, net: &TenantNet) -> Result<(), NetError> {
        let subnet = self.cfg.plan.subnet(net.slot)?;
        let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(subnet.len))).to_string();
        let addr = subnet.addr.to_string();
        for (dir, mask_flag) in [("--orig-src", "--mask-src"), ("--orig-dst", "--mask-dst")] {
            match cmd::run("conntrack", ["-D", dir, &addr, mask_flag, &mask]) {
                Ok(_) => {}
                // Exit 1 with "0 flow entries have been deleted": nothing to forget.
                Err(CmdError::Failed { stderr, .. }) if stderr.contains(" 0 flow entries") => {}
                Err(e) => {
                    tracing::warn!(subnet = %subnet, "cannot flush the tenant's connections: {e}");
                    break;
                }
            }
        }
        Ok(())
    }

    /// Slots of the tenant bridges of ours on this host.
    pub fn tenant_bridges(&self) -> Result<Vec<u32>, NetError> {
        let mut out: Vec<u32> = list_dir("/sys/class/net")?
            .iter()
            .filter_map(|n| self.bridge_slot(n))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Creates `netns <P>-<id>` with a veth to the tenant bridge and the address; returns the
    /// netns path. Idempotent; also repairs a half-made setup (netns without veth, veth without
    /// peer) and moves the instance to another tenant or address if asked.
    pub fn setup(&self, id: &str, net: &TenantNet, host: u8) -> Result<PathBuf, NetError> {
        check_id(id)?;
        let hosts = self.cfg.plan.hosts();
        if !hosts.contains(&host) {
            return Err(NetError::Invalid(format!(
                "host number {host} is outside {}..={} of a /{}",
                hosts.start(),
                hosts.end(),
                self.cfg.plan.tenant_len()
            )));
        }
        self.ensure_tenant(net)?;
        let ns = self.netns_name(id);
        let path = self.netns_path(id);
        let veth = self.veth_name(id);
        let want = self.address_cidr(net, host)?;
        let gw = self.gateway(net)?.to_string();
        // A new instance (the common case, every create): made through rtnetlink in-process.
        if !path.exists() && !link_exists(&veth) {
            self.setup_fresh(id, &path, &veth, net, &want, self.gateway(net)?)?;
            tracing::info!(id, slot = net.slot, address = %want, "instance network set up");
            return Ok(path);
        }
        // Lines for `ip -batch -` on the host and `ip -n NS -batch -`, in the order of the steps.
        let mut host_cmds: Vec<String> = Vec::new();
        let mut ns_cmds: Vec<String> = Vec::new();

        // The links in the netns and their IPv4 addresses; None when it cannot be entered. A
        // netns file can exist without a namespace mounted on it after a crash; without a file
        // there is nothing to ask `ip`.
        let links = if path.exists() {
            ip(["-n", &ns, "addr", "show"])
                .ok()
                .map(|out| parse_addr_show(&out))
                .filter(|links| links.iter().any(|(name, _)| name == "lo"))
        } else {
            None
        };
        let eth0_addrs = match &links {
            Some(links) => links
                .iter()
                .find(|(name, _)| name == "eth0")
                .map(|(_, addrs)| addrs.clone()),
            None => {
                if path.exists() {
                    let _ = ip(["netns", "delete", &ns]);
                }
                host_cmds.push(format!("netns add {ns}"));
                None
            }
        };

        let host_end = link_exists(&veth);
        let peer = eth0_addrs.is_some();
        let recreate = host_end != peer || !host_end;
        if recreate {
            if host_end {
                host_cmds.push(format!("link del {veth}"));
            }
            if peer {
                // Inside the netns, before the host batch makes the new pair.
                ip(["-n", &ns, "link", "del", "eth0"])?;
            }
            let mac = want
                .split_once('/')
                .and_then(|(a, _)| a.parse::<Ipv4Addr>().ok())
                .map(|a| mac_text(instance_mac(a)))
                .ok_or_else(|| NetError::Invalid(format!("instance address {want:?}")))?;
            host_cmds.push(format!(
                "link add name {veth} type veth peer name eth0 address {mac} netns {ns}"
            ));
        }
        host_cmds.push(format!("link set {veth} master {} up", self.bridge(net)));

        match eth0_addrs {
            // A new eth0 has no address yet.
            _ if recreate => ns_cmds.push(format!("addr add {want} dev eth0")),
            Some(addrs) if addrs.as_slice() == std::slice::from_ref(&want) => {}
            _ => {
                ns_cmds.push("addr flush dev eth0".to_string());
                ns_cmds.push(format!("addr add {want} dev eth0"));
            }
        }
        ns_cmds.push("link set lo up".to_string());
        ns_cmds.push("link set eth0 up".to_string());
        ns_cmds.push(format!("route replace default via {gw} dev eth0"));

        ip_batch(None, &host_cmds)?;
        ip_batch(Some(&ns), &ns_cmds)?;
        tracing::info!(id, slot = net.slot, address = %want, "instance network set up");
        Ok(path)
    }

    /// A new instance's network with no tool run: the netns made and bind-mounted from a
    /// short-lived thread (as `ip netns add` does), then over rtnetlink the veth with its peer
    /// created directly inside the netns as `eth0`, on the bridge and up (one message), and in
    /// the netns: the address, `lo` and `eth0` up, the default route. On error nothing is left
    /// (the netns and veth are removed again).
    fn setup_fresh(
        &self,
        id: &str,
        path: &Path,
        veth: &str,
        net: &TenantNet,
        want: &str,
        gw: Ipv4Addr,
    ) -> Result<(), NetError> {
        let nl = |what: &str| {
            let what = what.to_string();
            move |source: std::io::Error| NetError::Netlink { what, source }
        };
        // `want` is the `a.b.c.d/len` the `ip` path would add: one source for both.
        let (addr, len) = want
            .split_once('/')
            .and_then(|(a, l)| Some((a.parse::<Ipv4Addr>().ok()?, l.parse::<u8>().ok()?)))
            .ok_or_else(|| NetError::Invalid(format!("instance address {want:?}")))?;
        let bridge = self.bridge(net);
        let mut host = rtnl::Rtnl::new().map_err(nl("socket"))?;
        let bridge_index = host
            .link_index(&bridge)
            .map_err(nl(&format!("bridge {bridge}")))?;
        let mut in_ns = rtnl::new_netns(path).map_err(nl(&format!("netns {}", path.display())))?;
        let made = (|| {
            let ns_file =
                std::fs::File::open(path).map_err(nl(&format!("open {}", path.display())))?;
            host.add_veth(veth, bridge_index, "eth0", instance_mac(addr), &ns_file)
                .map_err(nl(&format!("create veth {veth} (peer eth0 in the netns)")))?;
            let eth0 = in_ns.link_index("eth0").map_err(nl("eth0 in the netns"))?;
            in_ns
                .add_address(eth0, addr, len)
                .map_err(nl(&format!("address {want} on eth0")))?;
            in_ns.set_up(1).map_err(nl("lo up"))?;
            in_ns.set_up(eth0).map_err(nl("eth0 up"))?;
            in_ns
                .default_route(eth0, gw)
                .map_err(nl(&format!("default route via {gw}")))
        })();
        if made.is_err() {
            let _ = self.teardown(id);
            return made;
        }
        // The kernel turns the carrier on asynchronously (link watch): until then `eth0` and
        // the host end transmit nothing (no qdisc yet) and the bridge does not forward through
        // the new port. Wait for that, so the instance's first packets (or a peer's first SYN,
        // retried only after 1 s) are not dropped; `ip` was slow enough to hide this.
        wait_link_ready(veth, &mut in_ns);
        made
    }

    /// Removes the instance's netns and veth. Idempotent.
    pub fn teardown(&self, id: &str) -> Result<(), NetError> {
        check_id(id)?;
        self.teardown_tap(id)?;
        let veth = self.veth_name(id);
        let ns = self.netns_name(id);
        let path = self.netns_path(id);
        let mut cmds = Vec::new();
        if link_exists(&veth) {
            cmds.push(format!("link del {veth}"));
        }
        if path.exists() {
            cmds.push(format!("netns delete {ns}"));
        }
        if ip_batch(None, &cmds).is_ok() {
            return Ok(());
        }
        // Something failed (or was already gone): one object at a time, and an error only for
        // one that is still there.
        if link_exists(&veth) {
            if let Err(e) = ip(["link", "del", &veth]) {
                if link_exists(&veth) {
                    return Err(e.into());
                }
            }
        }
        if path.exists() {
            if let Err(e) = ip(["netns", "delete", &ns]) {
                if path.exists() {
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// `<P>t<id[..n]>`, a VM's tap on the tenant bridge (as long as a veth's name).
    pub fn tap_name(&self, id: &str) -> String {
        let short: String = id.chars().take(self.veth_id_len()).collect();
        format!("{}t{short}", self.prefix())
    }

    /// The MAC address a VM's NIC is given: locally administered, unicast, from the id.
    pub fn vm_mac(id: &str) -> String {
        use sha2::Digest;
        let h = sha2::Sha256::digest(id.as_bytes());
        format!(
            "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            h[0], h[1], h[2], h[3], h[4]
        )
    }

    /// A VM's network: a tap `<P>t<id>` opened here (the fd goes to QEMU; the tap is not
    /// persistent, so it vanishes with the last process holding it), on the tenant's bridge,
    /// up, with the same address plan and filter as a container's veth. A guest controls its
    /// own addresses, so what it sends is filtered at the bridge (nftables, family `bridge`,
    /// table `gpuvisor_<P>`, one base chain per tap named like it, hook prerouting): only IPv4
    /// from the assigned MAC and address, and ARP that claims exactly them, pass; every other
    /// frame (another source MAC or IP, IPv6, VLAN tags, anything else) is dropped, before the
    /// bridge forwards it anywhere. Returns the tap fd and the MAC. On error nothing is left.
    pub fn setup_tap(
        &self,
        id: &str,
        net: &TenantNet,
        host: u8,
    ) -> Result<(std::os::fd::OwnedFd, String), NetError> {
        check_id(id)?;
        let hosts = self.cfg.plan.hosts();
        if !hosts.contains(&host) {
            return Err(NetError::Invalid(format!(
                "host number {host} is outside {}..={} of a /{}",
                hosts.start(),
                hosts.end(),
                self.cfg.plan.tenant_len()
            )));
        }
        self.ensure_tenant(net)?;
        let tap = self.tap_name(id);
        // Left from an earlier run (a process still holds it): replaced.
        self.teardown_tap(id)?;
        let fd = open_tap(&tap).map_err(|source| NetError::Io {
            path: PathBuf::from(format!("/dev/net/tun ({tap})")),
            source,
        })?;
        let mac = Self::vm_mac(id);
        let addr = self.address(net, host)?;
        let bridge = self.bridge(net);
        let made = (|| {
            let v6 = PathBuf::from(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"));
            if v6.exists() {
                std::fs::write(&v6, "1").map_err(|source| NetError::Io { path: v6, source })?;
            }
            ip(["link", "set", &tap, "master", &bridge, "up"])?;
            cmd::run_with_input("nft", ["-f", "-"], &self.tap_rules(&tap, &mac, addr))?;
            Ok::<(), NetError>(())
        })();
        if let Err(e) = made {
            drop(fd);
            let _ = self.teardown_tap(id);
            return Err(e);
        }
        tracing::info!(id, slot = net.slot, address = %addr, tap, "VM network set up");
        Ok((fd, mac))
    }

    /// The nftables table (family bridge) of our taps' anti-spoofing chains.
    pub fn tap_table(&self) -> String {
        format!("gpuvisor_{}", self.prefix())
    }

    /// The rules a tap's anti-spoofing chain must hold, one transaction (`nft -f`): the table
    /// and chain made if missing, the chain emptied, its rules added. Applying it to an intact
    /// or a damaged chain gives the same chain.
    fn tap_rules(&self, tap: &str, mac: &str, addr: Ipv4Addr) -> String {
        let table = self.tap_table();
        format!(
            "add table bridge {table}\n\
             add chain bridge {table} {tap} {{ type filter hook prerouting priority -200; policy accept; }}\n\
             flush chain bridge {table} {tap}\n\
             add rule bridge {table} {tap} iifname \"{tap}\" ether saddr != {mac} drop\n\
             add rule bridge {table} {tap} iifname \"{tap}\" ether type ip ip saddr != {addr} drop\n\
             add rule bridge {table} {tap} iifname \"{tap}\" ether type arp arp saddr ether != {mac} drop\n\
             add rule bridge {table} {tap} iifname \"{tap}\" ether type arp arp saddr ip != {addr} drop\n\
             add rule bridge {table} {tap} iifname \"{tap}\" ether type != {{ ip, arp }} drop\n"
        )
    }

    /// Our tap table as `nft list table` prints it; empty when it does not exist.
    fn tap_table_listing(&self) -> String {
        cmd::run("nft", ["list", "table", "bridge", &self.tap_table()]).unwrap_or_default()
    }

    /// Puts back the anti-spoofing chain of every VM in `vms` (id, tenant network, host number)
    /// whose tap exists (the VM runs) but whose chain is missing or lost rules: someone ran
    /// `nft flush ruleset` (as `systemctl restart nftables` does), deleted our table, or edited
    /// the chain. One `nft list table` for all of them; cheap when all are intact. The
    /// reconciler's sweep calls it every 30 s for the running VMs, and adoption after a daemon
    /// restart for the VM it adopts. Returns the ids whose chain was rebuilt.
    pub fn repair_taps(&self, vms: &[(String, TenantNet, u8)]) -> Result<Vec<String>, NetError> {
        let listing = self.tap_table_listing();
        let mut repaired = Vec::new();
        for (id, net, host) in vms {
            check_id(id)?;
            let tap = self.tap_name(id);
            let (mac, addr) = (Self::vm_mac(id), self.address(net, *host)?);
            if !link_exists(&tap) || tap_chain_intact(&listing, &tap, &mac, addr) {
                continue;
            }
            let _guard = HOST_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            // Torn down meanwhile: nothing to protect, and no chain to leave behind.
            if !link_exists(&tap) {
                continue;
            }
            let rules = self.tap_rules(&tap, &mac, addr);
            cmd::run_with_input("nft", ["-f", "-"], &rules)?;
            tracing::warn!(
                id,
                tap,
                "a VM's anti-spoofing rules were removed outside gpuvisor: put back"
            );
            repaired.push(id.clone());
        }
        Ok(repaired)
    }

    /// [`Network::repair_taps`] for one VM (adoption of a running VM after a daemon restart).
    /// Returns whether its chain was rebuilt.
    pub fn repair_tap(&self, id: &str, net: &TenantNet, host: u8) -> Result<bool, NetError> {
        Ok(!self
            .repair_taps(&[(id.to_string(), net.clone(), host)])?
            .is_empty())
    }

    /// Removes a VM's tap (normally gone with QEMU already) and its filter chain. Idempotent.
    pub fn teardown_tap(&self, id: &str) -> Result<(), NetError> {
        let tap = self.tap_name(id);
        let table = self.tap_table();
        if tap_chain(&self.tap_table_listing(), &tap).is_some() {
            let del =
                format!("flush chain bridge {table} {tap}\ndelete chain bridge {table} {tap}\n");
            if let Err(e) = cmd::run_with_input("nft", ["-f", "-"], &del) {
                if tap_chain(&self.tap_table_listing(), &tap).is_some() {
                    return Err(e.into());
                }
            }
        }
        if link_exists(&tap) {
            if let Err(e) = ip(["link", "del", &tap]) {
                if link_exists(&tap) {
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// Instance ids that have a netns or veth of ours on this host. Ids found only through a
    /// veth are the id's first [`Network::veth_id_len`] characters (the whole id for
    /// 12-character ids and the default prefix).
    pub fn instances_with_objects(&self) -> Result<Vec<String>, NetError> {
        let mut ids = BTreeSet::new();
        let ns_prefix = format!("{}-", self.prefix());
        for name in list_dir(NETNS_DIR)? {
            if let Some(id) = name.strip_prefix(&ns_prefix) {
                if check_id(id).is_ok() {
                    ids.insert(id.to_string());
                }
            }
        }
        let veth_prefix = format!("{}h", self.prefix());
        let tap_prefix = format!("{}t", self.prefix());
        for name in list_dir("/sys/class/net")? {
            if let Some(id) = name
                .strip_prefix(&veth_prefix)
                .or_else(|| name.strip_prefix(&tap_prefix))
            {
                // Instance ids are hex; anything else is not a veth of this prefix.
                if !id.is_empty()
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    ids.insert(id.to_string());
                }
            }
        }
        Ok(ids.into_iter().collect())
    }
}

/// Whether nftables has table `name` in family bridge: `nft list tables bridge` compared line by
/// line and name by name, so that `gpuvisor_g` is not taken for `gpuvisor_gv`.
fn bridge_table_exists(name: &str) -> bool {
    cmd::run("nft", ["list", "tables", "bridge"]).is_ok_and(|t| has_bridge_table(&t, name))
}

/// Whether `nft list tables bridge` output `listing` names table `name` exactly.
fn has_bridge_table(listing: &str, name: &str) -> bool {
    listing.lines().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w.len() == 3 && w[0] == "table" && w[1] == "bridge" && w[2] == name
    })
}

/// The body of chain `tap` in an `nft list table` listing (the lines between `chain <tap> {`
/// and its closing brace), if it is there.
fn tap_chain<'a>(listing: &'a str, tap: &str) -> Option<Vec<&'a str>> {
    let mut lines = listing.lines().map(str::trim);
    lines.find(|l| l.split_whitespace().collect::<Vec<_>>() == ["chain", tap, "{"])?;
    Some(lines.take_while(|l| *l != "}").collect())
}

/// Whether chain `tap` in `listing` is exactly ours: hooked, and nothing in it but the five
/// drops on the tap for this VM's `mac` and `addr` (a rule someone added — an accept before
/// them — or a drop for another address makes it not intact, and it is rebuilt).
fn tap_chain_intact(listing: &str, tap: &str, mac: &str, addr: Ipv4Addr) -> bool {
    let Some(body) = tap_chain(listing, tap) else {
        return false;
    };
    let on_tap = format!("iifname \"{tap}\"");
    let (hook, rules): (Vec<&str>, Vec<&str>) = body
        .iter()
        .filter(|l| !l.is_empty())
        .partition(|l| l.contains("hook prerouting"));
    let addr = addr.to_string();
    let with = |needle: &str| rules.iter().filter(|l| l.contains(needle)).count();
    hook.len() == 1
        && rules.len() == 5
        && rules
            .iter()
            .all(|l| l.starts_with(&on_tap) && l.ends_with(" drop"))
        && with(mac) == 2
        && with(&addr) == 2
}

/// Opens a (non-persistent) tap `name` on `/dev/net/tun`: no packet information header, no
/// virtio-net header.
fn open_tap(name: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    if name.len() > IFNAME_MAX {
        return Err(std::io::Error::other(format!("tap name {name:?} too long")));
    }
    // struct ifreq: the name (16 bytes), then the flags (a short) in the union.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes on x86_64), which `ifr` is,
    // on an fd we own for the duration of the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f.into())
}

/// Just enough rtnetlink for a new instance's network, over `netlink-sys` sockets with
/// `netlink-packet-route` messages; every request waits for the kernel's answer.
mod rtnl {
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
        NLM_F_REPLACE, NLM_F_REQUEST,
    };
    use netlink_packet_route::address::{AddressAttribute, AddressMessage};
    use netlink_packet_route::link::{
        InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, State,
    };
    use netlink_packet_route::route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    };
    use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
    use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
    use std::io;
    use std::net::{IpAddr, Ipv4Addr};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;

    /// An rtnetlink socket of the network namespace it was made in.
    pub struct Rtnl {
        sock: Socket,
        seq: u32,
    }

    impl Rtnl {
        pub fn new() -> io::Result<Self> {
            let mut sock = Socket::new(NETLINK_ROUTE)?;
            sock.bind_auto()?;
            sock.connect(&SocketAddr::new(0, 0))?;
            Ok(Self { sock, seq: 0 })
        }

        /// Sends `msg` and reads until its acknowledgement: the replies before it, or the
        /// kernel's error.
        fn request(
            &mut self,
            msg: RouteNetlinkMessage,
            flags: u16,
        ) -> io::Result<Vec<RouteNetlinkMessage>> {
            self.seq = self.seq.wrapping_add(1);
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
            header.sequence_number = self.seq;
            let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
            m.finalize();
            let mut out = vec![0u8; m.buffer_len()];
            m.serialize(&mut out);
            self.sock.send(&out, 0)?;
            let mut replies = Vec::new();
            let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
            loop {
                buf.clear();
                let n = self.sock.recv(&mut buf, 0)?;
                let mut off = 0;
                while off < n {
                    let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..n])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                    let len = m.header.length as usize;
                    if m.header.sequence_number == self.seq {
                        match m.payload {
                            NetlinkPayload::Error(e) => {
                                return match e.code {
                                    None => Ok(replies),
                                    Some(c) => Err(io::Error::from_raw_os_error(-c.get())),
                                }
                            }
                            NetlinkPayload::Done(_) => return Ok(replies),
                            NetlinkPayload::InnerMessage(r) => replies.push(r),
                            _ => {}
                        }
                    }
                    if len == 0 {
                        break;
                    }
                    off += (len + 3) & !3;
                }
            }
        }

        /// A veth `name` on bridge `master`, up, whose peer `peer` (MAC `peer_mac`) is made
        /// directly in the netns of `netns`.
        pub fn add_veth(
            &mut self,
            name: &str,
            master: u32,
            peer: &str,
            peer_mac: [u8; 6],
            netns: &std::fs::File,
        ) -> io::Result<()> {
            let mut p = LinkMessage::default();
            p.attributes.push(LinkAttribute::IfName(peer.to_string()));
            p.attributes.push(LinkAttribute::Address(peer_mac.to_vec()));
            p.attributes.push(LinkAttribute::NetNsFd(netns.as_raw_fd()));
            let mut m = LinkMessage::default();
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
            m.attributes.push(LinkAttribute::IfName(name.to_string()));
            m.attributes.push(LinkAttribute::Controller(master));
            m.attributes.push(LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
            ]));
            self.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)?;
            Ok(())
        }

        /// The index of link `name`.
        pub fn link_index(&mut self, name: &str) -> io::Result<u32> {
            let mut m = LinkMessage::default();
            m.attributes.push(LinkAttribute::IfName(name.to_string()));
            let replies = self.request(RouteNetlinkMessage::GetLink(m), 0)?;
            replies
                .into_iter()
                .find_map(|r| match r {
                    RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                    _ => None,
                })
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))
        }

        /// Whether link `name` is operationally up.
        pub fn oper_up(&mut self, name: &str) -> io::Result<bool> {
            let mut m = LinkMessage::default();
            m.attributes.push(LinkAttribute::IfName(name.to_string()));
            let replies = self.request(RouteNetlinkMessage::GetLink(m), 0)?;
            Ok(replies.iter().any(|r| match r {
                RouteNetlinkMessage::NewLink(l) => l
                    .attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::OperState(State::Up))),
                _ => false,
            }))
        }

        pub fn set_up(&mut self, index: u32) -> io::Result<()> {
            let mut m = LinkMessage::default();
            m.header.index = index;
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
            self.request(RouteNetlinkMessage::SetLink(m), 0)?;
            Ok(())
        }

        pub fn add_address(&mut self, index: u32, addr: Ipv4Addr, len: u8) -> io::Result<()> {
            let mut m = AddressMessage::default();
            m.header.family = AddressFamily::Inet;
            m.header.prefix_len = len;
            m.header.index = index;
            m.attributes.push(AddressAttribute::Local(IpAddr::V4(addr)));
            m.attributes
                .push(AddressAttribute::Address(IpAddr::V4(addr)));
            self.request(
                RouteNetlinkMessage::NewAddress(m),
                NLM_F_CREATE | NLM_F_EXCL,
            )?;
            Ok(())
        }

        /// `route replace default via gw dev <index>`.
        pub fn default_route(&mut self, index: u32, gw: Ipv4Addr) -> io::Result<()> {
            let mut m = RouteMessage::default();
            m.header.address_family = AddressFamily::Inet;
            m.header.table = RouteHeader::RT_TABLE_MAIN;
            m.header.protocol = RouteProtocol::Boot;
            m.header.scope = RouteScope::Universe;
            m.header.kind = RouteType::Unicast;
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
            m.attributes.push(RouteAttribute::Oif(index));
            self.request(
                RouteNetlinkMessage::NewRoute(m),
                NLM_F_CREATE | NLM_F_REPLACE,
            )?;
            Ok(())
        }
    }

    /// Makes the network namespace file `path` (under [`super::NETNS_DIR`]) as `ip netns add`
    /// does: the dir a shared mount point, an empty file, a new namespace bind-mounted on it.
    /// The namespace is made by a short-lived thread (`unshare` moves only the calling thread),
    /// which also opens the returned socket there. On error nothing is left.
    pub fn new_netns(path: &Path) -> io::Result<Rtnl> {
        shared_netns_dir()?;
        // Mode 0, as `ip netns add` makes it: only root (with CAP_DAC_OVERRIDE) opens it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o000)
            .open(path)?;
        drop(file);
        let made = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<Rtnl> {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
                nix::mount::mount(
                    Some("/proc/thread-self/ns/net"),
                    path,
                    None::<&str>,
                    nix::mount::MsFlags::MS_BIND,
                    None::<&str>,
                )?;
                Rtnl::new()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
        });
        if made.is_err() {
            let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(path);
        }
        made
    }

    /// `ip netns add`'s set-up of its dir, once per process: a mount point of its own, shared,
    /// so namespaces mounted there are seen in every mount namespace that has the dir.
    fn shared_netns_dir() -> io::Result<()> {
        use nix::mount::{mount, MsFlags};
        static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
        if DONE.get().is_some() {
            return Ok(());
        }
        let dir = Path::new(super::NETNS_DIR);
        std::fs::create_dir_all(dir)?;
        let shared = |d: &Path| {
            mount(
                None::<&str>,
                d,
                None::<&str>,
                MsFlags::MS_SHARED | MsFlags::MS_REC,
                None::<&str>,
            )
        };
        match shared(dir) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINVAL) => {
                mount(
                    Some(dir),
                    dir,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )?;
                shared(dir)?;
            }
            Err(e) => return Err(e.into()),
        }
        let _ = DONE.set(());
        Ok(())
    }
}

/// Waits (at most 1 s) until host link `port` is operationally up and forwards as a bridge
/// port (`brport/state` 3), and `eth0` in the netns of `in_ns` is operationally up.
fn wait_link_ready(port: &str, in_ns: &mut rtnl::Rtnl) {
    let dir = PathBuf::from(format!("/sys/class/net/{port}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let mut eth0_up = false;
    loop {
        let host_up = std::fs::read_to_string(dir.join("operstate"))
            .is_ok_and(|s| s.trim() == "up")
            && std::fs::read_to_string(dir.join("brport/state")).is_ok_and(|s| s.trim() == "3");
        eth0_up = eth0_up || in_ns.oper_up("eth0").unwrap_or(false);
        if host_up && eth0_up {
            return;
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!(port, eth0_up, "instance link not up after 1 s");
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

fn list_dir(dir: &str) -> Result<Vec<String>, NetError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(vec![]),
        Err(source) => Err(NetError::Io {
            path: PathBuf::from(dir),
            source,
        }),
    }
}

/// The links of `ip addr show` output (without `-o`), each with its `a.b.c.d/n` addresses.
fn parse_addr_show(out: &str) -> Vec<(String, Vec<String>)> {
    let mut links: Vec<(String, Vec<String>)> = Vec::new();
    for line in out.lines() {
        if line.starts_with(|c: char| c.is_ascii_digit()) {
            // `2: eth0@if1399: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 ...`
            if let Some(name) = line.split(": ").nth(1) {
                let name = name.split('@').next().unwrap_or(name);
                links.push((name.to_string(), Vec::new()));
            }
        } else if let Some((_, addrs)) = links.last_mut() {
            let mut words = line.split_whitespace();
            if words.next() == Some("inet") {
                if let Some(addr) = words.next() {
                    addrs.push(addr.to_string());
                }
            }
        }
    }
    links
}

/// `a.b.c.d/n` entries of `ip -4 -o addr show` output.
fn parse_inet_addrs(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next().map(str::to_string)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;

    fn random_id() -> String {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).unwrap();
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// `10.<b>.0.0/16` with a /24 per tenant.
    fn plan16(b: u8) -> AddressPlan {
        AddressPlan::new(format!("10.{b}.0.0/16").parse().unwrap(), 24).unwrap()
    }

    fn network() -> Network {
        Network::new(NetConfig {
            plan: plan16(88),
            nat: true,
            policy: NetPolicy::default(),
            dns: vec![],
        })
        .unwrap()
    }

    fn netns_name(id: &str) -> String {
        network().netns_name(id)
    }

    fn netns_path(id: &str) -> PathBuf {
        network().netns_path(id)
    }

    fn veth_name(id: &str) -> String {
        network().veth_name(id)
    }

    /// Instances and tenants torn down on drop, even when the test fails.
    struct Fixture {
        net: Network,
        ids: Vec<String>,
        tenants: Vec<TenantNet>,
    }

    impl Fixture {
        fn new() -> Self {
            let net = network();
            net.init_host().unwrap();
            Self {
                net,
                ids: vec![],
                tenants: vec![],
            }
        }
        fn instance(&mut self, tenant: &TenantNet, host: u8) -> String {
            let id = random_id();
            self.ids.push(id.clone());
            if !self.tenants.contains(tenant) {
                self.tenants.push(tenant.clone());
            }
            let path = self.net.setup(&id, tenant, host).unwrap();
            assert_eq!(path, PathBuf::from(format!("/var/run/netns/gv-{id}")));
            id
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            for id in &self.ids {
                let _ = self.net.teardown(id);
            }
            for t in &self.tenants {
                let _ = self.net.teardown_tenant(t);
            }
        }
    }

    /// Runs `f` on a fresh thread inside the instance's network namespace (`setns` only moves
    /// the calling thread; sockets stay in the namespace they were made in).
    fn in_netns<T: Send>(id: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = netns_path(id);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap();
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }

    fn listen_in(id: &str) -> TcpListener {
        in_netns(id, || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap()
        })
    }

    fn connects(addr: SocketAddr) -> bool {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
    }

    /// A connection that must work: a few tries, since a first SYN the kernel drops while a
    /// new link comes up is only sent again after 1 s (on a loaded host, past one try's
    /// timeout). Never used where a connection must fail.
    fn connects_eventually(addr: SocketAddr) -> bool {
        (0..5).any(|_| connects(addr))
    }

    /// Connectivity is checked with TCP from inside the namespaces (the hosts have no `ping`).
    fn reachable(from: &str, to: &str, to_ip: Ipv4Addr) -> bool {
        let listener = listen_in(to);
        let port = listener.local_addr().unwrap().port();
        in_netns(from, || connects(SocketAddr::from((to_ip, port))))
    }

    #[test]
    fn naming_and_addresses() {
        let n = network();
        let t = TenantNet { slot: 3 };
        assert_eq!(n.bridge(&t), "gvb3");
        assert_eq!(n.address(&t, 7).unwrap(), Ipv4Addr::new(10, 88, 3, 7));
        assert_eq!(n.gateway(&t).unwrap(), Ipv4Addr::new(10, 88, 3, 1));
        assert_eq!(n.pool_cidr(), "10.88.0.0/16");
        assert_eq!(veth_name("0123456789ab"), "gvh0123456789ab");
        assert_eq!(veth_name("0123456789abcdef"), "gvh0123456789ab");
        assert!(veth_name("0123456789abcdef").len() <= 15);
        assert_eq!(netns_name("abc"), "gv-abc");
        assert!(matches!(n.setup("../x", &t, 2), Err(NetError::Invalid(_))));
        assert!(matches!(n.setup("abc", &t, 1), Err(NetError::Invalid(_))));
        assert!(matches!(
            n.setup("abc", &TenantNet { slot: 256 }, 2),
            Err(NetError::Invalid(_))
        ));
        assert!(matches!(n.teardown("A B"), Err(NetError::Invalid(_))));
        let out = "5: eth0    inet 10.88.3.7/24 brd 10.88.3.255 scope global eth0\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(parse_inet_addrs(out), vec!["10.88.3.7/24".to_string()]);
        let out = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN group default qlen 1000
    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00
    inet 127.0.0.1/8 scope host lo
       valid_lft forever preferred_lft forever
    inet6 ::1/128 scope host
       valid_lft forever preferred_lft forever
2: eth0@if1399: <BROADCAST,MULTICAST> mtu 1500 qdisc noop state DOWN group default qlen 1000
    link/ether 5e:8d:44:a6:97:e0 brd ff:ff:ff:ff:ff:ff link-netnsid 0
    inet 10.9.9.9/24 scope global eth0
       valid_lft forever preferred_lft forever
    inet 10.9.9.10/24 scope global secondary eth0
       valid_lft forever preferred_lft forever
3: eth1: <BROADCAST,MULTICAST> mtu 1500 qdisc noop state DOWN group default qlen 1000
    link/ether 5e:8d:44:a6:97:e1 brd ff:ff:ff:ff:ff:ff
";
        assert_eq!(
            parse_addr_show(out),
            vec![
                ("lo".to_string(), vec!["127.0.0.1/8".to_string()]),
                (
                    "eth0".to_string(),
                    vec!["10.9.9.9/24".to_string(), "10.9.9.10/24".to_string()]
                ),
                ("eth1".to_string(), vec![]),
            ]
        );
    }

    #[test]
    fn allow_and_deny_entries_parse_strictly() {
        let r: NetRule = "10.1.2.0/24:443".parse().unwrap();
        assert_eq!(r.to_string(), "10.1.2.0/24:443");
        assert!(r.contains(Ipv4Addr::new(10, 1, 2, 200)));
        assert!(!r.contains(Ipv4Addr::new(10, 1, 3, 1)));
        assert_eq!(
            "192.168.5.7".parse::<NetRule>().unwrap().cidr(),
            "192.168.5.7/32"
        );
        assert_eq!("0.0.0.0/0".parse::<NetRule>().unwrap().len, 0);
        assert!("0.0.0.0/0"
            .parse::<NetRule>()
            .unwrap()
            .contains(Ipv4Addr::new(8, 8, 8, 8)));
        for bad in [
            "10.1.2.5/24",
            "10.1.2.0/33",
            "10.1.2.0/24:0",
            "10.1.2.0/24:65536",
            "10.1.2.0/24:https",
            "fd00::/8",
            "[fd00::1]:443",
            "example.com",
            "",
        ] {
            assert!(
                matches!(bad.parse::<NetRule>(), Err(NetError::Invalid(_))),
                "{bad:?} accepted"
            );
        }
        assert_eq!(
            nameservers("# x\nnameserver 10.255.255.53\nnameserver ::1\nsearch a\n"),
            vec![Ipv4Addr::new(10, 255, 255, 53)]
        );
    }

    #[test]
    fn names_follow_the_prefix_and_never_match_another_prefix() {
        let with = |p: &str| {
            Network::new(NetConfig {
                plan: plan16(87),
                nat: true,
                policy: NetPolicy {
                    prefix: p.into(),
                    ..Default::default()
                },
                dns: vec![],
            })
        };
        let gv = with("gv").unwrap();
        assert_eq!(gv.fwd_chain(), "GPUVISOR-FWD");
        assert_eq!(gv.nat_chain(), "GPUVISOR-NAT");
        assert_eq!(gv.input_chain(), "GPUVISOR-IN");
        let ga = with("ga1").unwrap();
        assert_eq!(ga.bridge(&TenantNet { slot: 7 }), "ga1b7");
        assert_eq!(ga.veth_name("0123456789ab"), "ga1h0123456789a");
        assert_eq!(ga.netns_name("0123456789ab"), "ga1-0123456789ab");
        assert_eq!(ga.fwd_chain(), "GPUVISOR-GA1-FWD");
        let long = with("abcd").unwrap();
        assert_eq!(long.veth_name("0123456789ab").len(), 15);
        for bad in ["", "GV", "1a", "g-v", "abcde"] {
            assert!(with(bad).is_err(), "{bad:?}");
        }
        // A name of one prefix is never one of another's: bridges, veths.
        let g = with("g").unwrap();
        let gvh = with("gvh").unwrap();
        assert_eq!(g.bridge_slot("gb3"), Some(3));
        assert_eq!(g.bridge_slot("gvb3"), None);
        assert_eq!(gv.bridge_slot("gvbb3"), None);
        assert_eq!(gv.bridge_slot(&gvh.bridge(&TenantNet { slot: 3 })), None);
        assert_eq!(with("gvb").unwrap().bridge_slot("gvb3"), None);
        assert!(gvh.veth_name("0123456789ab").starts_with("gvhh"));
    }

    #[test]
    fn policy_rules_order_and_contents() {
        let n = Network::new(NetConfig {
            plan: plan16(88),
            nat: true,
            policy: NetPolicy {
                prefix: "gv".into(),
                allow: vec!["10.1.2.0/24:443".parse().unwrap()],
                deny: vec!["192.0.2.0/24".parse().unwrap()],
                host_ports: vec![8444],
            },
            dns: vec![Ipv4Addr::new(10, 255, 255, 53)],
        })
        .unwrap();
        let (fwd, input) = n.policy_rules();
        let fwd: Vec<String> = fwd.iter().map(|r| r.join(" ")).collect();
        let pos = |needle: &str| {
            fwd.iter()
                .position(|r| r.contains(needle))
                .unwrap_or_else(|| panic!("{needle} missing: {fwd:#?}"))
        };
        assert_eq!(pos("RELATED,ESTABLISHED"), 0);
        assert_eq!(fwd[1], "-i gvb+ -o gvb+ -j DROP");
        assert!(pos("-d 10.1.2.0/24 -p tcp --dport 443 -j ACCEPT") < pos("-d 10.0.0.0/8"));
        assert!(pos("-d 10.1.2.0/24 -p udp --dport 443 -j ACCEPT") < pos("-d 10.0.0.0/8"));
        assert!(pos("-d 10.255.255.53/32 -p udp --dport 53 -j ACCEPT") < pos("-d 10.0.0.0/8"));
        assert!(pos("-d 192.0.2.0/24 -j REJECT") < pos("-i gvb+ -j ACCEPT"));
        for cidr in RESERVED {
            assert!(pos(&format!("-i gvb+ -d {cidr} -j REJECT")) < pos("-i gvb+ -j ACCEPT"));
        }
        assert_eq!(fwd[fwd.len() - 2], "-i gvb+ -j ACCEPT");
        assert_eq!(fwd[fwd.len() - 1], "-o gvb+ -j DROP");
        let input: Vec<String> = input.iter().map(|r| r.join(" ")).collect();
        assert!(input[0].contains("RELATED,ESTABLISHED"));
        assert_eq!(
            input.last().unwrap(),
            "-j REJECT --reject-with icmp-admin-prohibited"
        );
        assert!(input.contains(&"-d 10.255.255.53/32 -p tcp --dport 53 -j ACCEPT".to_string()));
        // The worker API's port, before the final reject; never opened in FWD.
        let open = input
            .iter()
            .position(|r| r == "-p tcp --dport 8444 -j ACCEPT")
            .expect("the host port is opened");
        assert!(open < input.len() - 1);
        assert!(!fwd.iter().any(|r| r.contains("8444")));
    }

    /// The rules of one of our chains as `iptables -S` prints them.
    fn chain_rules(table: &str, chain: &str) -> Vec<String> {
        iptables(table, &["-S", chain])
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn chains_are_rebuilt_whole_and_released_with_the_last_bridge() {
        // A prefix of its own: the default one's chains are shared with running daemons.
        let with = |allow: &[&str]| {
            Network::new(NetConfig {
                plan: plan16(82),
                nat: true,
                policy: NetPolicy {
                    prefix: "gu".into(),
                    allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
                    deny: vec![],
                    host_ports: vec![],
                },
                dns: vec![],
            })
            .unwrap()
        };
        let n = with(&["10.1.2.0/24:443"]);
        n.init_host().unwrap();
        let t = TenantNet { slot: 9 };
        n.ensure_tenant(&t).unwrap();
        let first = chain_rules("filter", "GPUVISOR-GU-FWD");
        // Idempotent: the same rules, once each, the bridge's anti-spoofing drop first, then
        // its accept.
        n.init_host().unwrap();
        assert_eq!(chain_rules("filter", "GPUVISOR-GU-FWD"), first);
        assert_eq!(
            first[1],
            "-A GPUVISOR-GU-FWD ! -s 10.82.9.0/24 -i gub9 -j DROP"
        );
        assert_eq!(first[2], "-A GPUVISOR-GU-FWD -i gub9 -o gub9 -j ACCEPT");
        assert_eq!(
            chain_rules("filter", "GPUVISOR-GU-IN")[1],
            "-A GPUVISOR-GU-IN ! -s 10.82.9.0/24 -i gub9 -j DROP"
        );
        // A flush while running is seen and repaired; an intact host is left alone.
        assert!(!n.repair_host().unwrap());
        iptables("filter", &["-F", "GPUVISOR-GU-FWD"]).unwrap();
        assert!(n.repair_host().unwrap());
        assert_eq!(chain_rules("filter", "GPUVISOR-GU-FWD"), first);
        assert!(first.iter().any(|r| r.contains("10.1.2.0/24")));
        let jumps = iptables("filter", &["-S", "FORWARD"]).unwrap();
        assert_eq!(jumps.matches("-j GPUVISOR-GU-FWD").count(), 1);
        let input = iptables("filter", &["-S", "INPUT"]).unwrap();
        assert_eq!(input.matches("-i gub+ -j GPUVISOR-GU-IN").count(), 1);
        // No IPv6 on the bridge.
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv6/conf/gub9/disable_ipv6")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "1".into()),
            "1"
        );
        // A restart with another allow-list leaves nothing of the old one.
        let n2 = with(&[]);
        n2.init_host().unwrap();
        let after = chain_rules("filter", "GPUVISOR-GU-FWD");
        assert!(
            !after.iter().any(|r| r.contains("10.1.2.0/24")),
            "{after:#?}"
        );
        assert_eq!(after[2], "-A GPUVISOR-GU-FWD -i gub9 -o gub9 -j ACCEPT");
        // Chains removed behind our back are rebuilt whole before a new tenant's bridge is used.
        remove_chain("filter", "FORWARD", &n2.fwd_jump(), "GPUVISOR-GU-FWD").unwrap();
        let t2 = TenantNet { slot: 10 };
        n2.ensure_tenant(&t2).unwrap();
        let rebuilt = chain_rules("filter", "GPUVISOR-GU-FWD");
        assert!(
            rebuilt.iter().any(|r| r.contains("-d 10.0.0.0/8")),
            "{rebuilt:#?}"
        );
        assert!(
            rebuilt.iter().any(|r| r.contains("-i gub10 -o gub10")),
            "{rebuilt:#?}"
        );
        assert!(n2.teardown_tenant(&t2).unwrap());
        // Its rules went with it, in both chains.
        for chain in ["GPUVISOR-GU-FWD", "GPUVISOR-GU-IN"] {
            let left = chain_rules("filter", chain);
            assert!(!left.iter().any(|r| r.contains("gub10")), "{left:#?}");
        }
        // Chains and bridge stay while the bridge has a port, go with it.
        let port = format!("gvtq{}", &random_id()[..6]);
        ip([
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{port}p"),
        ])
        .unwrap();
        ip(["link", "set", &port, "master", "gub9"]).unwrap();
        let kept = n2.release_host();
        ip(["link", "del", &port]).unwrap();
        assert!(!kept.unwrap());
        assert!(n2.tenant_bridges().unwrap().contains(&9));
        assert!(n2.release_host().unwrap());
        assert!(!n2.tenant_bridges().unwrap().contains(&9));
        for (table, chain, from) in [
            ("filter", "GPUVISOR-GU-FWD", "FORWARD"),
            ("filter", "GPUVISOR-GU-IN", "INPUT"),
            ("nat", "GPUVISOR-GU-NAT", "POSTROUTING"),
        ] {
            assert!(!chain_exists(table, chain), "{chain} left behind");
            assert!(!iptables(table, &["-S", from]).unwrap().contains(chain));
        }
        assert!(n2.release_host().unwrap());
    }

    #[test]
    fn tap_filters_are_put_back_after_a_flush_and_tables_are_matched_exactly() {
        // Prefixes of their own, one a prefix of the other: table gpuvisor_gr is a substring
        // of gpuvisor_gr9.
        let with = |prefix: &str, b: u8| {
            Network::new(NetConfig {
                plan: plan16(b),
                nat: true,
                policy: NetPolicy {
                    prefix: prefix.into(),
                    ..Default::default()
                },
                dns: vec![],
            })
            .unwrap()
        };
        let n = with("gr", 76);
        n.init_host().unwrap();
        let t = TenantNet { slot: 4 };
        let id = random_id();
        let (fd, _) = n.setup_tap(&id, &t, 2).unwrap();
        let tap = n.tap_name(&id);
        let table = n.tap_table();
        let (mac, addr) = (Network::vm_mac(&id), n.address(&t, 2).unwrap());
        let intact = |n: &Network| tap_chain_intact(&n.tap_table_listing(), &tap, &mac, addr);
        assert!(intact(&n));
        // Intact: left alone.
        assert!(!n.repair_tap(&id, &t, 2).unwrap());
        // `nft flush ruleset` (or `systemctl restart nftables`) takes our table with it.
        cmd::run("nft", ["delete", "table", "bridge", &table]).unwrap();
        assert!(!intact(&n));
        let running = [(id.clone(), t.clone(), 2)];
        assert_eq!(n.repair_taps(&running).unwrap(), vec![id.clone()]);
        let listing = n.tap_table_listing();
        assert!(intact(&n), "{listing}");
        assert!(listing.contains(&Network::vm_mac(&id)), "{listing}");
        assert!(listing.contains("10.76.4.2"), "{listing}");
        // A chain that lost its rules is rebuilt whole, with each rule once.
        cmd::run("nft", ["flush", "chain", "bridge", &table, &tap]).unwrap();
        assert!(n.repair_tap(&id, &t, 2).unwrap());
        assert!(intact(&n));
        assert!(!n.repair_tap(&id, &t, 2).unwrap());
        // An accept slipped in before the drops opens the tap: the chain is rebuilt without it.
        cmd::run(
            "nft",
            [
                "insert", "rule", "bridge", &table, &tap, "iifname", &tap, "accept",
            ],
        )
        .unwrap();
        assert!(!intact(&n));
        assert!(n.repair_tap(&id, &t, 2).unwrap());
        assert!(intact(&n));
        assert!(!n.tap_table_listing().contains(" accept\n"));
        // A VM whose tap is gone (stopped) gets no chain.
        let stopped = random_id();
        assert!(!n.repair_tap(&stopped, &t, 3).unwrap());
        assert!(tap_chain(&n.tap_table_listing(), &n.tap_name(&stopped)).is_none());

        // Another daemon's table whose name our table's is a prefix of: not ours to delete, and
        // not taken for ours.
        let other = with("gr9", 77);
        let other_table = other.tap_table();
        cmd::run_with_input(
            "nft",
            ["-f", "-"],
            &format!("add table bridge {other_table}\n"),
        )
        .unwrap();
        drop(fd);
        n.teardown_tap(&id).unwrap();
        assert!(tap_chain(&n.tap_table_listing(), &tap).is_none());
        n.teardown_tenant(&t).unwrap();
        let released = n.release_host();
        let ours_left = bridge_table_exists(&table);
        let theirs_left = bridge_table_exists(&other_table);
        let _ = cmd::run("nft", ["delete", "table", "bridge", &other_table]);
        assert!(released.unwrap());
        assert!(!ours_left);
        assert!(theirs_left);
        // Once ours is gone, the other's name does not make us try to delete ours again.
        cmd::run_with_input(
            "nft",
            ["-f", "-"],
            &format!("add table bridge {other_table}\n"),
        )
        .unwrap();
        let again = n.release_host();
        let _ = cmd::run("nft", ["delete", "table", "bridge", &other_table]);
        assert!(again.unwrap());
        assert!(has_bridge_table(
            "table bridge gpuvisor_gr\n",
            "gpuvisor_gr"
        ));
        assert!(!has_bridge_table(
            "table bridge gpuvisor_gr9\n",
            "gpuvisor_gr"
        ));
    }

    #[test]
    fn a_pool_used_by_another_interface_is_refused() {
        let n = Network::new(NetConfig {
            plan: plan16(85),
            nat: true,
            policy: NetPolicy {
                prefix: "gw".into(),
                ..Default::default()
            },
            dns: vec![],
        })
        .unwrap();
        let other = "gvtp".to_string() + &random_id()[..6];
        ip(["link", "add", &other, "type", "bridge"]).unwrap();
        let res = ip(["addr", "add", "10.85.3.1/24", "dev", &other]).map(|_| n.init_host());
        ip(["link", "del", &other]).unwrap();
        match res.unwrap() {
            Err(NetError::Invalid(m)) => assert!(m.contains(&other), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn same_tenant_instances_reach_each_other() {
        let mut f = Fixture::new();
        let t = TenantNet { slot: 231 };
        let a = f.instance(&t, 2);
        let b = f.instance(&t, 3);
        // Idempotent setup changes nothing.
        f.net.setup(&a, &t, 2).unwrap();
        assert!(reachable(&a, &b, f.net.address(&t, 3).unwrap()));
        assert!(reachable(&b, &a, f.net.address(&t, 2).unwrap()));
        // The host's end of the bridge does not: instances get no host service (INPUT).
        let listener = TcpListener::bind((f.net.gateway(&t).unwrap(), 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(
            connects_eventually(addr),
            "the host's own connect is not filtered"
        );
        assert!(!in_netns(&a, || connects(addr)));
        let ids = f.net.instances_with_objects().unwrap();
        assert!(ids.contains(&a) && ids.contains(&b));
    }

    #[test]
    fn different_tenants_cannot_reach_each_other() {
        let mut f = Fixture::new();
        let t1 = TenantNet { slot: 232 };
        let t2 = TenantNet { slot: 233 };
        let a = f.instance(&t1, 2);
        let b = f.instance(&t2, 2);
        // The host routes to both (so the drop below is the isolation rule, not a broken route).
        let listener = listen_in(&b);
        let port = listener.local_addr().unwrap().port();
        assert!(connects_eventually(SocketAddr::from((
            f.net.address(&t2, 2).unwrap(),
            port
        ))));
        assert!(!reachable(&a, &b, f.net.address(&t2, 2).unwrap()));
        assert!(!reachable(&b, &a, f.net.address(&t1, 2).unwrap()));
    }

    #[test]
    fn teardown_removes_netns_and_veth_and_is_idempotent() {
        let mut f = Fixture::new();
        let t = TenantNet { slot: 234 };
        let id = f.instance(&t, 9);
        assert!(netns_path(&id).exists());
        assert!(link_exists(&veth_name(&id)));
        f.net.teardown(&id).unwrap();
        assert!(!netns_path(&id).exists());
        assert!(!link_exists(&veth_name(&id)));
        assert!(!f.net.instances_with_objects().unwrap().contains(&id));
        f.net.teardown(&id).unwrap();

        // Half-made: a netns without its veth, then a veth whose netns is gone.
        let half = random_id();
        f.ids.push(half.clone());
        ip(["netns", "add", &netns_name(&half)]).unwrap();
        assert!(f.net.instances_with_objects().unwrap().contains(&half));
        f.net.teardown(&half).unwrap();
        assert!(!netns_path(&half).exists());
        ip([
            "link",
            "add",
            "name",
            &veth_name(&half),
            "type",
            "veth",
            "peer",
            "name",
            &format!("gvx{}", &half[..8]),
        ])
        .unwrap();
        assert!(f.net.instances_with_objects().unwrap().contains(&half));
        f.net.teardown(&half).unwrap();
        assert!(!link_exists(&veth_name(&half)));
        assert!(!f.net.instances_with_objects().unwrap().contains(&half));

        // The empty bridge goes with the tenant.
        assert!(f.net.tenant_bridges().unwrap().contains(&234));
        assert!(f.net.teardown_tenant(&t).unwrap());
        assert!(!f.net.tenant_bridges().unwrap().contains(&234));
        assert!(!rule_exists(
            "filter",
            "GPUVISOR-FWD",
            &f.net.bridge_accept_rule("gvb234")
        ));
        assert!(f.net.teardown_tenant(&t).unwrap());
    }

    #[test]
    fn setup_repairs_a_half_made_instance_and_bridge_is_kept_while_in_use() {
        let mut f = Fixture::new();
        let t = TenantNet { slot: 235 };
        let id = random_id();
        f.ids.push(id.clone());
        f.tenants.push(t.clone());
        ip(["netns", "add", &netns_name(&id)]).unwrap();
        f.net.setup(&id, &t, 4).unwrap();
        // Moving to another address replaces the old one.
        f.net.setup(&id, &t, 5).unwrap();
        let shown = ip([
            "-n",
            &netns_name(&id),
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
            "eth0",
        ])
        .unwrap();
        assert_eq!(parse_inet_addrs(&shown), vec!["10.88.235.5/24".to_string()]);
        assert!(!f.net.teardown_tenant(&t).unwrap());
        f.net.teardown(&id).unwrap();
        assert!(f.net.teardown_tenant(&t).unwrap());
    }

    /// `eth0`'s MAC inside the instance's netns.
    fn eth0_mac(id: &str) -> String {
        let shown = ip(["-n", &netns_name(id), "-o", "link", "show", "eth0"]).unwrap();
        shown
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_default()
            .to_string()
    }

    fn eth0_addrs(id: &str) -> Vec<String> {
        let shown = ip([
            "-n",
            &netns_name(id),
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
            "eth0",
        ])
        .unwrap();
        parse_inet_addrs(&shown)
    }

    #[test]
    fn setup_repairs_crash_leftovers() {
        let mut f = Fixture::new();
        let t = TenantNet { slot: 236 };
        let other = f.instance(&t, 2);

        // A netns file with no namespace mounted on it (crash between create and mount).
        let stale = random_id();
        f.ids.push(stale.clone());
        std::fs::create_dir_all(NETNS_DIR).unwrap();
        std::fs::write(netns_path(&stale), b"").unwrap();
        f.net.setup(&stale, &t, 3).unwrap();
        assert_eq!(eth0_addrs(&stale), vec!["10.88.236.3/24".to_string()]);
        assert!(reachable(&stale, &other, f.net.address(&t, 2).unwrap()));
        // The MAC follows the address (the fresh path made `other`, the repair path `stale`).
        assert_eq!(eth0_mac(&other), "02:42:0a:58:ec:02");
        assert_eq!(eth0_mac(&stale), "02:42:0a:58:ec:03");

        // An eth0 in the netns that is not the peer of our veth (and no host end at all), plus
        // extra addresses: replaced by a fresh pair with exactly the one address.
        let odd = random_id();
        f.ids.push(odd.clone());
        let ns = netns_name(&odd);
        ip(["netns", "add", &ns]).unwrap();
        ip([
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ])
        .unwrap();
        ip(["-n", &ns, "addr", "add", "10.99.0.1/24", "dev", "eth0"]).unwrap();
        f.net.setup(&odd, &t, 4).unwrap();
        assert_eq!(eth0_addrs(&odd), vec!["10.88.236.4/24".to_string()]);
        assert_eq!(eth0_mac(&odd), "02:42:0a:58:ec:04");
        assert!(reachable(&odd, &other, f.net.address(&t, 2).unwrap()));

        // Intact but with a wrong extra address and eth0 down: fixed in place.
        ip(["-n", &ns, "addr", "add", "10.99.0.2/24", "dev", "eth0"]).unwrap();
        ip(["-n", &ns, "link", "set", "eth0", "down"]).unwrap();
        let index_before = ip(["-n", &ns, "-o", "link", "show", "eth0"]).unwrap();
        f.net.setup(&odd, &t, 4).unwrap();
        assert_eq!(eth0_addrs(&odd), vec!["10.88.236.4/24".to_string()]);
        let index_after = ip(["-n", &ns, "-o", "link", "show", "eth0"]).unwrap();
        assert_eq!(
            index_before.split(':').next(),
            index_after.split(':').next(),
            "the intact pair is kept"
        );
        assert!(reachable(&odd, &other, f.net.address(&t, 2).unwrap()));

        // Only the host end is left (its peer's netns file was removed): recreated.
        f.net.teardown(&stale).unwrap();
        ip([
            "link",
            "add",
            "name",
            &veth_name(&stale),
            "type",
            "veth",
            "peer",
            "name",
            &format!("gvx{}", &stale[..8]),
        ])
        .unwrap();
        f.net.setup(&stale, &t, 3).unwrap();
        assert!(reachable(&stale, &other, f.net.address(&t, 2).unwrap()));

        // Teardown with one of the two objects already gone, then with both gone.
        ip(["link", "del", &veth_name(&stale)]).unwrap();
        f.net.teardown(&stale).unwrap();
        assert!(!netns_path(&stale).exists());
        f.net.teardown(&stale).unwrap();
        // An object that cannot be removed is an error, after the others are gone.
        let stuck = random_id();
        std::fs::create_dir(netns_path(&stuck)).unwrap();
        let res = f.net.teardown(&stuck);
        std::fs::remove_dir(netns_path(&stuck)).unwrap();
        match res {
            Err(NetError::Cmd(CmdError::Failed { command, .. })) => {
                assert_eq!(command, format!("ip netns delete gv-{stuck}"))
            }
            other => panic!("unexpected {other:?}"),
        }
        for id in [&stale, &odd, &other] {
            f.net.teardown(id).unwrap();
            assert!(!netns_path(id).exists());
            assert!(!link_exists(&veth_name(id)));
        }
    }
}
