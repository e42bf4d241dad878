//! Instance networks: one bridge and /24 per tenant, one network namespace and veth per instance.
//!
//! Why: tenants must not reach each other, while one tenant's instances on a host talk freely and
//! every instance reaches the outside through the host. A bridge per tenant makes the tenant an L2
//! segment of its own; traffic between tenants has to be routed by the host, where iptables drops
//! it.
//!
//! Host objects (each carries the tenant slot or the instance id, for orphan sweeps):
//!
//! ```text
//! gvb<slot>          bridge of a tenant, <a>.<b>.<slot>.1/24 (pool a.b.0.0/16)
//! gv-<id>            netns of an instance, /var/run/netns/gv-<id> (`ip netns add`)
//! gvh<id[..12]>      host end of the instance's veth, a port of the tenant bridge; its peer is
//!                    `eth0` in the netns, <a>.<b>.<slot>.<host>/24, default route via .1
//! GPUVISOR-FWD       filter chain, jumped to from FORWARD
//! GPUVISOR-NAT       nat chain, jumped to from POSTROUTING
//! ```
//!
//! Key decisions:
//! - Interface names are limited to 15 bytes, so the veth carries the first 12 characters of the
//!   instance id. Instance ids are 12 lowercase hex characters, so in practice the veth carries
//!   the whole id; for longer ids [`Network::instances_with_objects`] reports the 12-character
//!   prefix and the reconciler matches by prefix.
//! - Same-bridge traffic is switched at L2 and never routed, but when `br_netfilter` is loaded
//!   (Docker loads it) bridged frames traverse FORWARD too. So each bridge gets its own
//!   `-i gvbN -o gvbN -j ACCEPT` at the top of GPUVISOR-FWD, ahead of the
//!   `-i gvb+ -o gvb+ -j DROP` that isolates tenants. Rules are checked (`-C`) before they are
//!   added, so nothing is ever duplicated, and every rule lives in our own chains. `init_host`
//!   never flushes the chains (that would open a gap in the isolation); it re-adds the base rules
//!   in order when one is missing.
//! - The veth is created with its peer directly inside the netns (`peer name eth0 netns ...`), so
//!   no temporary name can collide on the host.
//! - Everything shells out to `ip` and `iptables` through [`crate::cmd`]: they are on every
//!   host, and their errors are what an operator would see running the same command.
//! - Each `ip` run costs 2-3 ms of fork+exec, so an instance's network is made with as few as
//!   possible: the current state is looked at first (the netns file, `/sys/class/net`, and for an
//!   existing netns one `ip -n NS addr show`), then what is missing or wrong is done in one
//!   `ip -batch -` on the host (netns, veth, bridge port) and one `ip -n NS -batch -` inside the
//!   netns (address, links up, default route): 2 runs for a new instance, 1 for a teardown. A
//!   batch stops at its first failing line (no `-force`), exactly like the one-command-at-a-time
//!   sequence it replaces, and every line is one that the state seen before calls for, so
//!   setting up again repairs a half-made instance as before.
//! - Teardown never trusts an error message: after a failed delete it looks whether the object is
//!   gone, and only reports an error if it is still there.
//!
//! Instances' access to the host itself (INPUT, e.g. another tenant's gateway address) is not
//! filtered here; services on the host must bind to the addresses they mean to serve.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use thiserror::Error;

use crate::cmd::{self, CmdError};

/// Where `ip netns` keeps named network namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Filter chain holding the forwarding rules, jumped to from FORWARD.
pub const FWD_CHAIN: &str = "GPUVISOR-FWD";
/// Nat chain holding the masquerade rule, jumped to from POSTROUTING.
pub const NAT_CHAIN: &str = "GPUVISOR-NAT";
/// Characters of the instance id carried by the veth name (`gvh` + 12 = 15, the kernel limit).
pub const VETH_ID_LEN: usize = 12;

const BRIDGE_PREFIX: &str = "gvb";
const VETH_PREFIX: &str = "gvh";
const NETNS_PREFIX: &str = "gv-";

/// Serialises check-then-create sequences (iptables rules, bridges) within this process.
static HOST_LOCK: Mutex<()> = Mutex::new(());

/// Tenant slots whose bridge, address and accept rule this process has fully set up.
static ENSURED_TENANTS: Mutex<std::collections::BTreeSet<u32>> =
    Mutex::new(std::collections::BTreeSet::new());

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
}

/// A tenant's network on this host: its bridge and /24.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantNet {
    /// Index of the tenant's /24 inside the pool (0..=255).
    pub slot: u32,
}

impl TenantNet {
    /// The tenant's bridge, `gvb<slot>`.
    pub fn bridge(&self) -> String {
        format!("{BRIDGE_PREFIX}{}", self.slot)
    }
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

/// `gv-<id>`.
pub fn netns_name(id: &str) -> String {
    format!("{NETNS_PREFIX}{id}")
}

/// `/var/run/netns/gv-<id>`, what the OCI runtime joins.
pub fn netns_path(id: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns_name(id))
}

/// `gvh<id[..12]>`, the host end of an instance's veth.
pub fn veth_name(id: &str) -> String {
    let short: String = id.chars().take(VETH_ID_LEN).collect();
    format!("{VETH_PREFIX}{short}")
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

fn check_slot(net: &TenantNet) -> Result<u8, NetError> {
    u8::try_from(net.slot).map_err(|_| {
        NetError::Invalid(format!(
            "tenant slot {} is outside the pool's 256 /24s",
            net.slot
        ))
    })
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

fn iptables(table: &str, args: &[&str]) -> Result<String, CmdError> {
    let mut all = vec!["-w", "-t", table];
    all.extend_from_slice(args);
    cmd::run("iptables", all)
}

fn ensure_chain(table: &str, chain: &str) -> Result<(), NetError> {
    if iptables(table, &["-S", chain]).is_ok() {
        return Ok(());
    }
    if let Err(e) = iptables(table, &["-N", chain]) {
        // Someone else (another daemon, an operator) may have made it meanwhile.
        if iptables(table, &["-S", chain]).is_err() {
            return Err(e.into());
        }
    }
    Ok(())
}

fn rule_exists(table: &str, chain: &str, rule: &[&str]) -> bool {
    let mut args = vec!["-C", chain];
    args.extend_from_slice(rule);
    iptables(table, &args).is_ok()
}

/// Adds `rule` to `chain` unless it is there; `insert` puts it first, otherwise last.
fn ensure_rule(table: &str, chain: &str, rule: &[&str], insert: bool) -> Result<(), NetError> {
    if rule_exists(table, chain, rule) {
        return Ok(());
    }
    let mut args = if insert {
        vec!["-I", chain, "1"]
    } else {
        vec!["-A", chain]
    };
    args.extend_from_slice(rule);
    iptables(table, &args)?;
    Ok(())
}

/// Deletes every copy of `rule` from `chain`; a missing chain or rule is fine.
fn remove_rule(table: &str, chain: &str, rule: &[&str]) -> Result<(), NetError> {
    for _ in 0..16 {
        if !rule_exists(table, chain, rule) {
            return Ok(());
        }
        let mut args = vec!["-D", chain];
        args.extend_from_slice(rule);
        iptables(table, &args)?;
    }
    Ok(())
}

/// The ordered base rules of GPUVISOR-FWD (per-bridge accepts are inserted above them).
const FWD_RULES: [&[&str]; 3] = [
    &[
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    ],
    // Tenant isolation: routed traffic between two tenant bridges.
    &["-i", "gvb+", "-o", "gvb+", "-j", "DROP"],
    // Egress from instances to the outside.
    &["-i", "gvb+", "-j", "ACCEPT"],
];

fn bridge_accept_rule(bridge: &str) -> [&str; 6] {
    ["-i", bridge, "-o", bridge, "-j", "ACCEPT"]
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

    /// The tenant's gateway, `.1` of its /24, on its bridge.
    pub fn gateway(&self, net: &TenantNet) -> Ipv4Addr {
        self.address(net, 1)
    }

    /// The pool as CIDR, `a.b.0.0/16`.
    pub fn pool_cidr(&self) -> String {
        let [a, b, _, _] = self.cfg.pool.octets();
        format!("{a}.{b}.0.0/16")
    }

    /// Prepares the host once per daemon start: IP forwarding, the GPUVISOR-FWD and
    /// GPUVISOR-NAT chains and the jumps to them, masquerading when `cfg.nat`. Idempotent.
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
        ensure_chain("filter", FWD_CHAIN)?;
        if !FWD_RULES
            .iter()
            .all(|r| rule_exists("filter", FWD_CHAIN, r))
        {
            // Re-add all of them so their order holds.
            for r in FWD_RULES {
                remove_rule("filter", FWD_CHAIN, r)?;
            }
            for r in FWD_RULES {
                ensure_rule("filter", FWD_CHAIN, r, false)?;
            }
        }
        ensure_rule("filter", "FORWARD", &["-j", FWD_CHAIN], true)?;

        ensure_chain("nat", NAT_CHAIN)?;
        let pool = self.pool_cidr();
        let masq = [
            "-s",
            pool.as_str(),
            "!",
            "-d",
            pool.as_str(),
            "-j",
            "MASQUERADE",
        ];
        if self.cfg.nat {
            ensure_rule("nat", NAT_CHAIN, &masq, false)?;
        } else {
            remove_rule("nat", NAT_CHAIN, &masq)?;
        }
        ensure_rule("nat", "POSTROUTING", &["-j", NAT_CHAIN], true)?;
        tracing::info!(pool, nat = self.cfg.nat, "host network prepared");
        Ok(())
    }

    /// Makes sure the tenant's bridge exists, has the gateway address and is up, and that its
    /// instances may talk to each other. Idempotent.
    pub fn ensure_tenant(&self, net: &TenantNet) -> Result<(), NetError> {
        let slot = check_slot(net)?;
        let bridge = net.bridge();
        let _guard = HOST_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // Fast path: this process already set the bridge and its rule up and the bridge is
        // still there; saves five tool runs per instance create.
        let mut ensured = ENSURED_TENANTS.lock().unwrap_or_else(|p| p.into_inner());
        if ensured.contains(&u32::from(slot)) && link_exists(&bridge) {
            return Ok(());
        }
        if !link_exists(&bridge) {
            // A fixed address: a bridge otherwise takes the lowest port's, which changes as
            // instances come and go and makes neighbours' ARP entries for the gateway stale.
            let mac = format!("02:67:76:62:00:{slot:02x}");
            if let Err(e) = ip([
                "link", "add", "name", &bridge, "address", &mac, "type", "bridge",
            ]) {
                if !link_exists(&bridge) {
                    return Err(e.into());
                }
            }
        }
        let gw = format!("{}/24", self.gateway(net));
        ip(["addr", "replace", &gw, "dev", &bridge])?;
        ip(["link", "set", &bridge, "up"])?;
        ensure_chain("filter", FWD_CHAIN)?;
        ensure_rule("filter", FWD_CHAIN, &bridge_accept_rule(&bridge), true)?;
        ensured.insert(u32::from(slot));
        Ok(())
    }

    /// Removes the tenant's bridge and its rule if no instance is attached to it any more.
    /// Returns whether it is gone. Idempotent.
    pub fn teardown_tenant(&self, net: &TenantNet) -> Result<bool, NetError> {
        check_slot(net)?;
        let bridge = net.bridge();
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
        if iptables("filter", &["-S", FWD_CHAIN]).is_ok() {
            remove_rule("filter", FWD_CHAIN, &bridge_accept_rule(&bridge))?;
        }
        Ok(true)
    }

    /// Slots of the tenant bridges on this host.
    pub fn tenant_bridges(&self) -> Result<Vec<u32>, NetError> {
        let mut out: Vec<u32> = list_dir("/sys/class/net")?
            .iter()
            .filter_map(|n| n.strip_prefix(BRIDGE_PREFIX)?.parse().ok())
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Creates `netns gv-<id>` with a veth to the tenant bridge and the address; returns the
    /// netns path. Idempotent; also repairs a half-made setup (netns without veth, veth without
    /// peer) and moves the instance to another tenant or address if asked.
    pub fn setup(&self, id: &str, net: &TenantNet, host: u8) -> Result<PathBuf, NetError> {
        check_id(id)?;
        if !(2..=254).contains(&host) {
            return Err(NetError::Invalid(format!(
                "host number {host} is outside 2..=254"
            )));
        }
        self.ensure_tenant(net)?;
        let ns = netns_name(id);
        let path = netns_path(id);
        let veth = veth_name(id);
        let want = format!("{}/24", self.address(net, host));
        let gw = self.gateway(net).to_string();
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
            host_cmds.push(format!(
                "link add name {veth} type veth peer name eth0 netns {ns}"
            ));
        }
        host_cmds.push(format!("link set {veth} master {} up", net.bridge()));

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

    /// Removes the instance's netns and veth. Idempotent.
    pub fn teardown(&self, id: &str) -> Result<(), NetError> {
        check_id(id)?;
        let veth = veth_name(id);
        let ns = netns_name(id);
        let path = netns_path(id);
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

    /// Instance ids that have a netns or veth on this host. Ids found only through a veth are
    /// the id's first [`VETH_ID_LEN`] characters (the whole id for 12-character ids).
    pub fn instances_with_objects(&self) -> Result<Vec<String>, NetError> {
        let mut ids = BTreeSet::new();
        for name in list_dir(NETNS_DIR)? {
            if let Some(id) = name.strip_prefix(NETNS_PREFIX) {
                if !id.is_empty() {
                    ids.insert(id.to_string());
                }
            }
        }
        for name in list_dir("/sys/class/net")? {
            if let Some(id) = name.strip_prefix(VETH_PREFIX) {
                if !id.is_empty() {
                    ids.insert(id.to_string());
                }
            }
        }
        Ok(ids.into_iter().collect())
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
#[cfg(test)]
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

    fn network() -> Network {
        Network::new(NetConfig {
            pool: Ipv4Addr::new(10, 88, 0, 0),
            nat: true,
        })
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
        assert_eq!(t.bridge(), "gvb3");
        assert_eq!(n.address(&t, 7), Ipv4Addr::new(10, 88, 3, 7));
        assert_eq!(n.gateway(&t), Ipv4Addr::new(10, 88, 3, 1));
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
    fn same_tenant_instances_reach_each_other() {
        let mut f = Fixture::new();
        let t = TenantNet { slot: 231 };
        let a = f.instance(&t, 2);
        let b = f.instance(&t, 3);
        // Idempotent setup changes nothing.
        f.net.setup(&a, &t, 2).unwrap();
        assert!(reachable(&a, &b, f.net.address(&t, 3)));
        assert!(reachable(&b, &a, f.net.address(&t, 2)));
        // The gateway answers too (the host end of the bridge).
        let listener = TcpListener::bind((f.net.gateway(&t), 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(in_netns(&a, || connects(addr)));
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
        assert!(connects(SocketAddr::from((f.net.address(&t2, 2), port))));
        assert!(!reachable(&a, &b, f.net.address(&t2, 2)));
        assert!(!reachable(&b, &a, f.net.address(&t1, 2)));
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
            FWD_CHAIN,
            &bridge_accept_rule("gvb234")
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
        assert!(reachable(&stale, &other, f.net.address(&t, 2)));

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
        assert!(reachable(&odd, &other, f.net.address(&t, 2)));

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
        assert!(reachable(&odd, &other, f.net.address(&t, 2)));

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
        assert!(reachable(&stale, &other, f.net.address(&t, 2)));

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
