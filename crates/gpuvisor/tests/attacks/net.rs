//! Attacks from and on the network: an instance reaches the internet (through NAT) and its own
//! tenant, nothing else; a neighbour on the host's LAN cannot reach instances.
//!
//! The LAN is simulated by [`Lan`]: a network namespace joined to the host by a veth, holding
//! one address per destination class (RFC 1918, CGNAT, link-local, the cloud metadata address,
//! a "public" documentation address) with a TCP server on each. Only traffic *from the instance
//! pool* is routed to it (a policy rule), so the host's own routes (its real metadata service, its
//! resolver) are left alone. Every "cannot reach" test first proves, from the same instance and
//! with the same probe, that the public server answers: a refusal is then the filter's doing,
//! not a broken probe, network or `nc`.
//!
//! Every namespace, interface, route, rule and server is removed by a guard's `Drop`, also when
//! the test fails.

use crate::common::{serial, sleeper, Daemon, SMALL};
use crate::probe;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The daemons' instance pool: the default, or `GPUVISOR_NET_POOL` (inherited by the harness's
/// daemons, with `GPUVISOR_NET_PREFIX`, so that suites can run side by side on one host).
fn pool() -> String {
    let base = std::env::var("GPUVISOR_NET_POOL").unwrap_or_else(|_| "10.88.0.0".into());
    format!("{base}/16")
}

/// The daemons' network prefix: the default, or `GPUVISOR_NET_PREFIX`.
fn prefix() -> String {
    std::env::var("GPUVISOR_NET_PREFIX").unwrap_or_else(|_| "gv".into())
}
/// The host end of the LAN link and the LAN end (a /30 of plumbing).
const LAN_HOST: &str = "172.30.255.1";
const LAN_PEER: &str = "172.30.255.2";
/// The "internet": a documentation range our rules deliberately leave routable.
const PUBLIC: &str = "203.0.113.10";

/// Runs a host command that must succeed.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a host command whose failure does not matter (cleanup).
fn quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

/// Runs `f` on a thread inside the named network namespace (`None`: the host's).
fn in_netns<T: Send + 'static>(ns: Option<String>, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        }
        f()
    })
    .join()
    .unwrap()
}

/// A TCP server that answers every connection with `hi <peer address>` and closes it. Stopped
/// and joined on drop.
struct Server {
    ns: Option<String>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on `ip` (port `port`, 0 for any) inside `ns` (`None`: on the host).
    fn start(ns: Option<&str>, ip: IpAddr, port: u16) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let stop2 = stop.clone();
        let ns2 = ns.map(str::to_string);
        let thread = std::thread::spawn(move || {
            if let Some(ns) = ns2 {
                let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            }
            let l = TcpListener::bind(SocketAddr::new(ip, port)).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            while !stop2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = writeln!(s, "hi {}", peer.ip());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        let addr = rx.recv().unwrap();
        let s = Server {
            ns: ns.map(str::to_string),
            addr,
            stop,
            thread: Some(thread),
        };
        // It answers where it lives: a later refusal is not a dead server.
        let (ns, target) = (s.ns.clone(), s.addr);
        let hello = in_netns(ns, move || {
            let mut c = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
            let mut buf = String::new();
            c.read_to_string(&mut buf).unwrap();
            buf
        });
        assert!(hello.starts_with("hi "), "{hello}");
        s
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The simulated LAN: netns `gvt-lan-<pid>`, veth `gvtl<pid>` on the host, the addresses on
/// the LAN side's `lo`, routes to them in a table of their own that only the instance pool
/// looks up.
struct Lan {
    ns: String,
    veth: String,
    table: String,
    pool: String,
}

impl Lan {
    fn new(pool: &str, addrs: &[&str]) -> Lan {
        let pid = std::process::id();
        let lan = Lan {
            ns: format!("gvt-lan-{pid}"),
            veth: format!("gvtl{pid}"),
            table: (40_000 + pid % 20_000).to_string(),
            pool: pool.to_string(),
        };
        lan.remove();
        let ns = lan.ns.as_str();
        sh(&["ip", "netns", "add", ns]);
        sh(&[
            "ip", "link", "add", &lan.veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{LAN_HOST}/30"),
            "dev",
            &lan.veth,
        ]);
        sh(&["ip", "link", "set", &lan.veth, "up"]);
        sh(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{LAN_PEER}/30"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", ns, "route", "add", "default", "via", LAN_HOST]);
        for a in addrs {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{a}/32"),
                "dev",
                "lo",
            ]);
            sh(&[
                "ip",
                "route",
                "add",
                &format!("{a}/32"),
                "via",
                LAN_PEER,
                "dev",
                &lan.veth,
                "table",
                &lan.table,
            ]);
        }
        sh(&[
            "ip", "rule", "add", "from", pool, "lookup", &lan.table, "pref", "4242",
        ]);
        lan
    }

    fn server(&self, ip: &str) -> Server {
        Server::start(Some(&self.ns), ip.parse().unwrap(), 0)
    }

    fn remove(&self) {
        quiet(&[
            "ip",
            "rule",
            "del",
            "from",
            &self.pool,
            "lookup",
            &self.table,
            "pref",
            "4242",
        ]);
        quiet(&["ip", "route", "flush", "table", &self.table]);
        quiet(&["ip", "link", "del", &self.veth]);
        quiet(&["ip", "netns", "del", &self.ns]);
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.remove();
    }
}

/// An extra interface on the host with one address, removed on drop. A veth pair with both
/// ends on the host: some kernels have no `dummy` driver.
struct Dummy(String);

impl Dummy {
    fn new(cidr: &str) -> Dummy {
        let pid = std::process::id();
        let d = Dummy(format!("gvtd{pid}"));
        quiet(&["ip", "link", "del", &d.0]);
        sh(&[
            "ip",
            "link",
            "add",
            &d.0,
            "type",
            "veth",
            "peer",
            "name",
            &format!("gvte{pid}"),
        ]);
        sh(&["ip", "addr", "add", cidr, "dev", &d.0]);
        sh(&["ip", "link", "set", &d.0, "up"]);
        d
    }
}

impl Drop for Dummy {
    fn drop(&mut self) {
        quiet(&["ip", "link", "del", &self.0]);
    }
}

fn daemon(extra: &[&str]) -> Daemon {
    let d = Daemon::start(extra);
    d.import_busybox();
    d
}

/// A small instance that greets every TCP connection on port 8080 with `hi peer`.
fn peer_server() -> Vec<&'static str> {
    let mut a = SMALL.to_vec();
    a.extend(["--", "sh", "-c", "nc -ll -p 8080 -e echo hi peer"]);
    a
}

fn ip_of(d: &Daemon, id: &str) -> String {
    d.json(&["instance", "get", id])["ip"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The instance's gateway: `.1` of its /24.
fn gateway_of(d: &Daemon, id: &str) -> String {
    let ip = ip_of(d, id);
    let (net, _) = ip.rsplit_once('.').unwrap();
    format!("{net}.1")
}

/// A probe script: connect to `host` `port` with `nc`, succeed only on the server's greeting.
/// A missing `nc` ends the script before the probe's sentinel, which fails the test whatever
/// it asserts (see [`probe::run`]).
fn connect_script(host: &str, port: u16) -> String {
    format!(
        "command -v nc >/dev/null 2>&1 || {{ echo 'probe: nc is missing' >&2; exit 97; }}\n\
         r=$(nc -w 2 {host} {port} </dev/null); rc=$?; echo \"nc exit $rc: $r\"\n\
         case \"$r\" in 'hi '*) true ;; *) false ;; esac"
    )
}

fn reaches(d: &Daemon, id: &str, what: &str, host: &str, port: u16) -> probe::Probe {
    probe::allowed(d, id, what, &connect_script(host, port))
}

fn cannot_reach(d: &Daemon, id: &str, what: &str, host: &str, port: u16) {
    probe::refused(d, id, what, &connect_script(host, port));
}

/// One instance, the LAN with `dest` and the public server; asserts the public server answers
/// and `dest` does not.
fn assert_lan_destination_blocked(what: &str, dest: &str) {
    let lan = Lan::new(&pool(), &[PUBLIC, dest]);
    let public = lan.server(PUBLIC);
    let target = lan.server(dest);
    let d = daemon(&[]);
    let id = d.create(&sleeper());
    reaches(&d, &id, "the public control server", PUBLIC, public.port());
    cannot_reach(&d, &id, what, dest, target.port());
}

#[test]
fn instance_cannot_reach_rfc1918_10_8() {
    let _s = serial();
    assert_lan_destination_blocked("a 10.0.0.0/8 server on the LAN", "10.20.30.40");
}

#[test]
fn instance_cannot_reach_rfc1918_172_16_12() {
    let _s = serial();
    assert_lan_destination_blocked("a 172.16.0.0/12 server on the LAN", "172.16.5.5");
}

#[test]
fn instance_cannot_reach_rfc1918_192_168_16() {
    let _s = serial();
    assert_lan_destination_blocked("a 192.168.0.0/16 server on the LAN", "192.168.77.7");
}

#[test]
fn instance_cannot_reach_cgnat_100_64_10() {
    let _s = serial();
    assert_lan_destination_blocked("a 100.64.0.0/10 (CGNAT) server", "100.64.5.5");
}

#[test]
fn instance_cannot_reach_link_local_169_254_16() {
    let _s = serial();
    assert_lan_destination_blocked("a link-local 169.254.0.0/16 server", "169.254.7.7");
}

#[test]
fn instance_cannot_reach_cloud_metadata() {
    let _s = serial();
    assert_lan_destination_blocked("the cloud metadata address", "169.254.169.254");
}

#[test]
fn instance_reaches_a_public_address_through_nat() {
    let _s = serial();
    let lan = Lan::new(&pool(), &[PUBLIC]);
    let public = lan.server(PUBLIC);
    let d = daemon(&[]);
    let id = d.create(&sleeper());
    let p = reaches(&d, &id, "the public server", PUBLIC, public.port());
    // The server saw the host's address on the LAN, not the instance's: masqueraded.
    assert!(p.out.contains(&format!("hi {LAN_HOST}")), "{}", p.out);
}

#[test]
fn instance_cannot_reach_the_host_through_its_gateway() {
    let _s = serial();
    let lan = Lan::new(&pool(), &[PUBLIC]);
    let public = lan.server(PUBLIC);
    let host = Server::start(None, IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
    let d = daemon(&[]);
    let id = d.create(&sleeper());
    reaches(&d, &id, "the public control server", PUBLIC, public.port());
    let gw = gateway_of(&d, &id);
    cannot_reach(&d, &id, "a host service on the gateway", &gw, host.port());
}

#[test]
fn instance_cannot_reach_the_host_on_its_uplink_address() {
    let _s = serial();
    let lan = Lan::new(&pool(), &[PUBLIC]);
    let public = lan.server(PUBLIC);
    let host = Server::start(None, IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
    // The address the host uses towards the outside.
    let route = sh(&["ip", "-4", "-o", "route", "get", "1.1.1.1"]);
    let uplink = route
        .split_whitespace()
        .skip_while(|w| *w != "src")
        .nth(1)
        .unwrap()
        .to_string();
    let d = daemon(&[]);
    let id = d.create(&sleeper());
    reaches(&d, &id, "the public control server", PUBLIC, public.port());
    cannot_reach(
        &d,
        &id,
        "a host service on the uplink",
        &uplink,
        host.port(),
    );
}

#[test]
fn instance_cannot_reach_the_host_on_a_public_address() {
    let _s = serial();
    let lan = Lan::new(&pool(), &[PUBLIC]);
    let public = lan.server(PUBLIC);
    let _dummy = Dummy::new("198.51.100.77/32");
    let host = Server::start(None, "198.51.100.77".parse().unwrap(), 0);
    let d = daemon(&[]);
    let id = d.create(&sleeper());
    reaches(&d, &id, "the public control server", PUBLIC, public.port());
    cannot_reach(
        &d,
        &id,
        "a host service on a public address",
        "198.51.100.77",
        host.port(),
    );
}

#[test]
fn instance_cannot_reach_another_tenants_gateway() {
    let _s = serial();
    let lan = Lan::new(&pool(), &[PUBLIC]);
    let public = lan.server(PUBLIC);
    let host = Server::start(None, IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
    let d = daemon(&[]);
    d.json(&["tenant", "create", "beta"]);
    let kb = d.json(&["key", "create", "--tenant", "beta"])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let mine = d.create(&sleeper());
    let theirs = d.create_as(&kb, &sleeper());
    let their_gw = gateway_of(&d, &theirs);
    assert_ne!(their_gw, gateway_of(&d, &mine));
    reaches(
        &d,
        &mine,
        "the public control server",
        PUBLIC,
        public.port(),
    );
    cannot_reach(
        &d,
        &mine,
        "the host on another tenant's gateway",
        &their_gw,
        host.port(),
    );
}

#[test]
fn instance_cannot_reach_the_host_over_ipv6_link_local() {
    let _s = serial();
    if std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .map(|v| v.trim() != "0")
        .unwrap_or(true)
    {
        crate::common::prerequisite_missing("IPv6 on the host (it is off: nothing to reach)");
        return;
    }
    let lan = Lan::new(&pool(), &[PUBLIC]);
    let public = lan.server(PUBLIC);
    let host = Server::start(None, "::".parse().unwrap(), 0);
    let d = daemon(&[]);
    let id = d.create(&sleeper());
    reaches(&d, &id, "the public control server", PUBLIC, public.port());
    // The bridge that holds the instance's gateway, and its link-local address: the kernel's
    // if it has one, else the EUI-64 one its MAC would give.
    let gw = gateway_of(&d, &id);
    let addrs = sh(&["ip", "-o", "-4", "addr", "show"]);
    let bridge = addrs
        .lines()
        .find(|l| l.contains(&format!(" {gw}/")))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .to_string();
    let v6 = sh(&[
        "ip", "-o", "-6", "addr", "show", "dev", &bridge, "scope", "link",
    ]);
    let ll = match v6.split_whitespace().skip_while(|w| *w != "inet6").nth(1) {
        Some(a) => a.split('/').next().unwrap().to_string(),
        None => {
            let mac = std::fs::read_to_string(format!("/sys/class/net/{bridge}/address")).unwrap();
            let b: Vec<u8> = mac
                .trim()
                .split(':')
                .map(|x| u8::from_str_radix(x, 16).unwrap())
                .collect();
            format!(
                "fe80::{:x}:{:x}:{:x}:{:x}",
                u16::from_be_bytes([b[0] ^ 2, b[1]]),
                u16::from_be_bytes([b[2], 0xff]),
                u16::from_be_bytes([0xfe, b[3]]),
                u16::from_be_bytes([b[4], b[5]])
            )
        }
    };
    // The instance's own link-local address must have passed duplicate address detection,
    // or the probe fails for want of a source address rather than because of the filter.
    let script = format!(
        "i=0; while ip -6 addr show dev eth0 | grep -q tentative && [ $i -lt 100 ]; do \
           sleep 0.1; i=$((i+1)); done\n\
         ip -6 addr show dev eth0 | grep -q 'inet6 fe80' || {{ echo 'probe: no link-local' >&2; exit 97; }}\n{}",
        connect_script(&format!("{ll}%eth0"), host.port())
    );
    probe::refused(&d, &id, "the host over IPv6 link-local", &script);
}

#[test]
fn same_tenant_instances_reach_each_other() {
    let _s = serial();
    let d = daemon(&[]);
    let server = d.create(&peer_server());
    let client = d.create(&sleeper());
    let ip = ip_of(&d, &server);
    reaches(&d, &client, "an instance of the same tenant", &ip, 8080);
}

#[test]
fn allow_listed_address_becomes_reachable() {
    let _s = serial();
    let lan = Lan::new(&pool(), &[PUBLIC, "10.77.0.5", "10.78.0.9"]);
    let public = lan.server(PUBLIC);
    let allowed = lan.server("10.77.0.5");
    let other_port = lan.server("10.77.0.5");
    let whole = lan.server("10.78.0.9");
    let d = daemon(&[
        "--net-allow",
        &format!("10.77.0.5:{}", allowed.port()),
        "--net-allow",
        "10.78.0.0/24",
    ]);
    let id = d.create(&sleeper());
    reaches(&d, &id, "the public control server", PUBLIC, public.port());
    reaches(
        &d,
        &id,
        "an allow-listed address and port",
        "10.77.0.5",
        allowed.port(),
    );
    reaches(
        &d,
        &id,
        "an allow-listed network",
        "10.78.0.9",
        whole.port(),
    );
    cannot_reach(
        &d,
        &id,
        "another port of an allow-listed address",
        "10.77.0.5",
        other_port.port(),
    );
}

#[test]
fn lan_neighbour_cannot_reach_instances() {
    let _s = serial();
    let lan = Lan::new(&pool(), &[PUBLIC]);
    let d = daemon(&[]);
    let id = d.create(&[
        "--vcpus",
        "1",
        "--memory",
        "64MiB",
        "--container-disk",
        "64MiB",
        "--",
        "sh",
        "-c",
        "nc -ll -p 8080 -e echo hi lan",
    ]);
    let target: SocketAddr = format!("{}:8080", ip_of(&d, &id)).parse().unwrap();
    // The host itself reaches the instance (its server runs) ...
    let hello = (0..100)
        .find_map(|_| {
            let answer = TcpStream::connect_timeout(&target, Duration::from_secs(2))
                .ok()
                .and_then(|mut s| {
                    let mut buf = String::new();
                    s.read_to_string(&mut buf).ok()?;
                    Some(buf).filter(|b| b.starts_with("hi"))
                });
            if answer.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            answer
        })
        .expect("the instance's server never answered the host");
    assert!(hello.starts_with("hi lan"), "{hello}");
    // ... a neighbour on the LAN, routed through the host, does not.
    let reached = in_netns(Some(lan.ns.clone()), move || {
        TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_ok()
    });
    assert!(!reached, "a LAN neighbour reached an instance");
}

// --- one daemon per data dir and per prefix; node identity -------------------------------------

/// A `gpuvisor serve` started by the test itself (optionally through a wrapper such as
/// `unshare --uts`), killed on drop.
struct Serve {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Serve {
    /// Starts `[wrapper...] gpuvisor serve` on `data` and `port` with the harness's settings.
    fn spawn(data: &std::path::Path, port: u16, wrapper: &[&str], extra: &[&str]) -> Serve {
        let log = data.join(format!("serve-{port}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut args: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        args.push(crate::common::BIN.to_string());
        args.extend(
            [
                "serve",
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--simulate-gpus",
                "2xA100-80GB,1xH100-80GB",
                "--stop-grace",
                "1s",
                "--cpu-oversubscription",
                "16",
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(&args[0])
            .args(&args[1..])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        // Its clients trust the CA of its data dir (made at its first start).
        crate::common::trust(port, &data.join("ca.pem"));
        Serve { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the daemon answers on `port` (true) or exits (false).
    fn wait_serving_or_exit(&mut self, port: u16) -> bool {
        loop {
            if let Some(_st) = self.child.try_wait().unwrap() {
                return false;
            }
            if healthy(port) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn healthy(port: u16) -> bool {
    let Some(mut s) = crate::common::try_connect(port) else {
        return false;
    };
    let _ = s.tcp().set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /v1/health HTTP/1.0\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && &buf[9..12] == b"200"
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn second_daemon_on_the_same_data_dir_is_refused() {
    let _s = serial();
    let d = Daemon::start(&[]);
    let port = free_port();
    // The data dir lock is taken before anything else, the prefix's included.
    let mut second = Serve::spawn(&d.data(), port, &[], &[]);
    assert!(
        !second.wait_serving_or_exit(port),
        "a second daemon serves the same data dir: {}",
        second.log()
    );
    let log = second.log();
    assert!(!second.child.wait().unwrap().success());
    assert!(
        log.contains(&format!("data dir {} is in use", d.data().display()))
            && log.contains(&format!("pid {}", d.pid())),
        "{log}"
    );
    // The first one is untouched.
    assert!(healthy(d.port));
}

#[test]
fn second_daemon_with_the_same_prefix_is_refused() {
    let _s = serial();
    let d = Daemon::start(&[]);
    let other = tempfile::Builder::new()
        .prefix("gvtest")
        .tempdir_in("/var/tmp")
        .unwrap();
    let port = free_port();
    let mut second = Serve::spawn(other.path(), port, &[], &["--net-pool", "10.84.0.0"]);
    assert!(
        !second.wait_serving_or_exit(port),
        "a second daemon shares the network prefix: {}",
        second.log()
    );
    let log = second.log();
    assert!(
        log.contains(&format!("network prefix {:?} is in use", prefix()))
            && log.contains(&format!("pid {}", d.pid())),
        "{log}"
    );
    assert!(healthy(d.port));
}

/// Host objects whose name contains `needle`: links, netns, iptables rules (filter and nat).
fn host_objects(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for l in sh(&["ip", "-o", "link"]).lines() {
        if let Some(name) = l.split(": ").nth(1) {
            if name.split('@').next().unwrap().starts_with(needle) {
                out.push(format!("link {name}"));
            }
        }
    }
    for l in sh(&["ip", "netns", "list"]).lines() {
        if l.starts_with(needle) {
            out.push(format!("netns {l}"));
        }
    }
    for table in ["filter", "nat"] {
        for l in sh(&["iptables", "-w", "-t", table, "-S"]).lines() {
            // Words that are ours: `gab+`, `gah1234`, `GPUVISOR-GA-FWD` (never `rgab+`).
            let chain = format!("GPUVISOR-{}-", needle.to_ascii_uppercase());
            if l.split_whitespace()
                .any(|w| w.starts_with(needle) || w.starts_with(&chain))
            {
                out.push(format!("{table}: {l}"));
            }
        }
    }
    out
}

#[test]
fn two_daemons_with_different_prefixes_do_not_collide() {
    let _s = serial();
    let mut a = daemon(&["--net-prefix", "ga", "--net-pool", "10.86.0.0"]);
    let mut b = daemon(&["--net-prefix", "gb", "--net-pool", "10.87.0.0"]);
    let ia = a.create(&sleeper());
    let ib = b.create(&[
        "--vcpus",
        "1",
        "--memory",
        "64MiB",
        "--container-disk",
        "64MiB",
        "--",
        "sh",
        "-c",
        "nc -ll -p 8080 -e echo hi b",
    ]);
    assert!(ip_of(&a, &ia).starts_with("10.86."));
    let ip_b = ip_of(&b, &ib);
    assert!(ip_b.starts_with("10.87."));
    // Each daemon's objects carry its own prefix.
    let objs_a = host_objects("ga");
    let objs_b = host_objects("gb");
    for (objs, id, p) in [(&objs_a, &ia, "ga"), (&objs_b, &ib, "gb")] {
        assert!(
            objs.iter()
                .any(|o| o == &format!("netns {p}-{id}")
                    || o.starts_with(&format!("netns {p}-{id} "))),
            "{objs:#?}"
        );
        assert!(
            objs.iter()
                .any(|o| o.starts_with(&format!("link {p}h{}", &id[..10]))),
            "{objs:#?}"
        );
        assert!(
            objs.iter().any(|o| o.starts_with(&format!("link {p}b"))),
            "{objs:#?}"
        );
        let chain = format!("GPUVISOR-{}-FWD", p.to_ascii_uppercase());
        assert!(
            objs.iter()
                .any(|o| o.contains(&format!("-A FORWARD -j {chain}"))),
            "{objs:#?}"
        );
    }
    // Nothing of one is the other's: A's instance does not reach B's.
    let target: SocketAddr = format!("{ip_b}:8080").parse().unwrap();
    let answered = (0..100).any(|_| {
        let ok = TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_ok();
        if !ok {
            std::thread::sleep(Duration::from_millis(100));
        }
        ok
    });
    assert!(answered, "B's instance server never answered the host");
    cannot_reach(&a, &ia, "the other daemon's instance", &ip_b, 8080);

    // Terminating A's instance and stopping A leave B's objects exactly as they were.
    a.json(&["instance", "terminate", &ia, "--wait"]);
    stop_gracefully(&mut a);
    assert_eq!(
        host_objects("ga"),
        Vec::<String>::new(),
        "A left objects behind"
    );
    assert_eq!(host_objects("gb"), objs_b, "B's objects changed");
    probe::allowed(&b, &ib, "B's instance still runs", "true");
    b.terminate_all();
    stop_gracefully(&mut b);
    assert_eq!(
        host_objects("gb"),
        Vec::<String>::new(),
        "B left objects behind"
    );
}

/// SIGTERM, then waits until the process has exited (a zombie of the harness's child).
fn stop_gracefully(d: &mut Daemon) {
    let pid = d.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stat = format!("/proc/{pid}/stat");
    while std::fs::read_to_string(&stat)
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Reaps it; the harness then has no daemon left to clean up after.
    d.kill9();
}

/// Runs the daemon of `d` again, in a UTS namespace with another hostname.
fn restart_renamed(d: &mut Daemon, hostname: &str) -> Serve {
    d.kill9();
    let script = format!("hostname {hostname} && exec \"$0\" \"$@\"");
    let mut s = Serve::spawn(
        &d.data(),
        d.port,
        &["unshare", "--uts", "sh", "-c", &script],
        &[],
    );
    assert!(
        s.wait_serving_or_exit(d.port),
        "daemon did not start: {}",
        s.log()
    );
    s
}

#[test]
fn renaming_the_host_keeps_its_instances_local() {
    let _s = serial();
    let mut d = daemon(&[]);
    let id = d.create(&sleeper());
    let before = d.json(&["instance", "get", &id]);
    let renamed = restart_renamed(&mut d, "gv-renamed-host");
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let after = d.json(&["instance", "get", &id]);
        assert_eq!(after["node"], before["node"], "{after}");
        assert_eq!(after["state"], "running", "{after}");
        assert_eq!(after["ip"], before["ip"], "{after}");
        probe::allowed(&d, &id, "exec in a local instance after a rename", "true");
    }));
    // Back to the harness's own daemon, which terminates everything on drop.
    drop(renamed);
    d.restart();
    if let Err(e) = checked {
        std::panic::resume_unwind(e);
    }
}

/// Runs `sql` on the daemon's SQLite store (the daemon must be stopped).
fn sqlite(d: &Daemon, sql: &str) {
    sh(&[
        "sqlite3",
        d.data().join("gpuvisor.db").to_str().unwrap(),
        sql,
    ]);
}

#[test]
fn instance_of_another_node_id_is_not_taken_for_simulated() {
    let _s = serial();
    let mut d = daemon(&[]);
    let id = d.create(&sleeper());
    d.kill9();
    // A row written under a node id that is not ours (a renamed host, an older daemon) but
    // of no simulated node either.
    sqlite(
        &d,
        &format!("UPDATE instances SET node_id = 'old-hostname' WHERE id = '{id}'"),
    );
    d.restart();
    let got = d.json(&["instance", "get", &id]);
    assert_eq!(got["state"], "running", "{got}");
    assert!(
        got["ip"].is_string(),
        "a local instance has an address: {got}"
    );
    probe::allowed(&d, &id, "exec in the instance", "true");
}

#[test]
fn old_store_keyed_by_hostname_keeps_its_instances() {
    let _s = serial();
    let mut d = daemon(&[]);
    let id = d.create(&sleeper());
    d.kill9();
    // What a daemon from before node-id files left: every row under the hostname, no file.
    sqlite(
        &d,
        "UPDATE instances SET node_id = 'old-hostname'; UPDATE gpus SET node_id = 'old-hostname'; \
         UPDATE nodes SET id = 'old-hostname';",
    );
    let _ = std::fs::remove_file(d.data().join("node-id"));
    d.restart();
    let got = d.json(&["instance", "get", &id]);
    assert_eq!(got["node"], "old-hostname", "{got}");
    assert_eq!(got["state"], "running", "{got}");
    probe::allowed(&d, &id, "exec in the instance", "true");
    assert_eq!(
        std::fs::read_to_string(d.data().join("node-id"))
            .unwrap()
            .trim(),
        "old-hostname"
    );
    // A fresh data dir gets a random id, not the hostname.
    drop(d);
    let fresh = Daemon::start(&[]);
    let node = std::fs::read_to_string(fresh.data().join("node-id")).unwrap();
    let hostname = nix::unistd::gethostname().unwrap().into_string().unwrap();
    assert!(
        node.trim().starts_with("node-") && node.trim() != hostname,
        "{node}"
    );
}

#[test]
fn deny_listed_address_becomes_unreachable() {
    let _s = serial();
    let other_public = "198.51.100.20";
    let lan = Lan::new(&pool(), &[PUBLIC, other_public]);
    let public = lan.server(PUBLIC);
    let control = lan.server(other_public);
    let d = daemon(&["--net-deny", "203.0.113.0/24"]);
    let id = d.create(&sleeper());
    reaches(
        &d,
        &id,
        "a public server that is not denied",
        other_public,
        control.port(),
    );
    cannot_reach(
        &d,
        &id,
        "a deny-listed public server",
        PUBLIC,
        public.port(),
    );
}

/// A UDP server that keeps every datagram it receives. Stopped on drop.
struct UdpSink {
    got: Arc<std::sync::Mutex<Vec<String>>>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpSink {
    fn start(ns: &str, ip: &str) -> UdpSink {
        let (tx, rx) = mpsc::channel();
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ns2, ip2, got2, stop2) = (ns.to_string(), ip.to_string(), got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(format!("/var/run/netns/{ns2}")).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let s = std::net::UdpSocket::bind((ip2.as_str(), 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            tx.send(s.local_addr().unwrap()).unwrap();
            let mut buf = [0u8; 256];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok(n) = s.recv(&mut buf) {
                    got2.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
        });
        let addr = rx.recv().unwrap();
        UdpSink {
            got,
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn received(&self) -> Vec<String> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn instance_cannot_send_with_another_tenants_address() {
    let _s = serial();
    assert_cannot_send_with_another_tenants_address(&[]);
}

/// With /29 tenant subnets the other tenant's address is in the next /29 (same /24): only an
/// anti-spoofing rule of the tenant's own subnet size stops it.
#[test]
fn instance_cannot_send_with_a_neighbour_tenants_address_in_small_subnets() {
    let _s = serial();
    assert_cannot_send_with_another_tenants_address(&["--net-tenant-prefix", "29"]);
}

/// An instance gives itself another tenant's address and sends from it: nothing leaves the host.
fn assert_cannot_send_with_another_tenants_address(extra: &[&str]) {
    let lan = Lan::new(&pool(), &[PUBLIC]);
    let sink = UdpSink::start(&lan.ns, PUBLIC);
    let d = daemon(extra);
    d.json(&["tenant", "create", "beta"]);
    let kb = d.json(&["key", "create", "--tenant", "beta"])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let mine = d.create(&sleeper());
    let theirs = d.create_as(&kb, &sleeper());
    let (my_ip, their_ip) = (ip_of(&d, &mine), ip_of(&d, &theirs));
    // Stands in for a tenant with CAP_NET_RAW crafting packets: the host gives the instance's
    // eth0 the other tenant's address as a second one, and the datagram is sent from it.
    let ns = format!("{}-{mine}", prefix());
    sh(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{their_ip}/32"),
        "dev",
        "eth0",
    ]);
    // The bridge's strict rp_filter would drop the datagram too, but only on hosts whose own
    // settings are strict (Ubuntu's `all` is 2, udev may rewrite the bridge's): turn it off on
    // this tenant's bridge, as such a host would, so our own anti-spoofing rule is what is tested.
    let bridge = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .find(|e| {
            std::fs::read_dir(e.path().join("brif"))
                .map(|ports| {
                    ports
                        .flatten()
                        .any(|p| p.file_name().to_string_lossy().contains(&mine))
                })
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .expect("no bridge has the instance's veth");
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{bridge}/rp_filter"), "0").unwrap();
    let target = sink.addr;
    let send = |from: String, payload: &'static str| {
        in_netns(Some(ns.clone()), move || {
            let s = std::net::UdpSocket::bind((from.as_str(), 0)).unwrap();
            s.send_to(payload.as_bytes(), target).unwrap();
        })
    };
    send(their_ip, "spoofed");
    // Then the same from the instance's own address, which must arrive: once it has, the
    // spoofed datagram sent before it on the same path had every chance to.
    let mut tries = 0;
    while !sink.received().iter().any(|p| p == "control") {
        assert!(
            tries < 100,
            "the control datagram never arrived: {:?}",
            sink.received()
        );
        send(my_ip.clone(), "control");
        std::thread::sleep(Duration::from_millis(100));
        tries += 1;
    }
    assert!(
        !sink.received().iter().any(|p| p == "spoofed"),
        "a datagram with another tenant's source address left the host"
    );
}

#[test]
fn instance_still_reaches_its_resolver() {
    let _s = serial();
    // The resolvers instances are given: the host's own, unless loopback stubs.
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let resolvers: Vec<Ipv4Addr> = conf
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse().ok())
        .filter(|a: &Ipv4Addr| !a.is_loopback())
        .collect();
    if resolvers.is_empty() {
        crate::common::prerequisite_missing(
            "a non-loopback IPv4 resolver of the host to give instances",
        );
        return;
    }
    let d = daemon(&[]);
    let id = d.create(&sleeper());
    // Any answer (NXDOMAIN included) proves the resolver was reached, even in reserved space
    // (10.255.255.53 on the CI machines) and without internet access.
    let p = probe::allowed(
        &d,
        &id,
        "a DNS query to the instance's resolver",
        "command -v nslookup >/dev/null 2>&1 || { echo 'probe: nslookup is missing' >&2; exit 97; }\n\
         out=$(nslookup example.com 2>&1); echo \"$out\"\n\
         echo \"$out\" | grep -qE \"can't find|^Name:\"",
    );
    assert!(
        resolvers.iter().any(|r| p.out.contains(&r.to_string())),
        "{resolvers:?} not asked: {}",
        p.out
    );
}

/// Someone (an admin's script, a firewall tool) flushes iptables while the daemon runs: the
/// isolation rules are gone until someone notices. The reconciler's sweep (every 30 s) checks
/// our chains and jumps and rebuilds them, so the LAN is unreachable again without a restart.
#[test]
fn flushed_chains_are_rebuilt_by_the_sweep() {
    let _s = serial();
    let lan = Lan::new(&pool(), &[PUBLIC, "10.20.30.40"]);
    let public = lan.server(PUBLIC);
    let target = lan.server("10.20.30.40");
    let d = daemon(&[]);
    let id = d.create(&sleeper());
    cannot_reach(
        &d,
        &id,
        "a 10/8 server before the flush",
        "10.20.30.40",
        target.port(),
    );
    let p = prefix();
    let chain = if p == "gv" {
        "GPUVISOR-FWD".to_string()
    } else {
        format!("GPUVISOR-{}-FWD", p.to_ascii_uppercase())
    };
    sh(&["iptables", "-w", "-F", &chain]);
    // Our FWD chain is empty now: the instance's packets fall through to FORWARD's policy.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rules = sh(&["iptables", "-w", "-S", &chain]);
        if rules.lines().count() > 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the flushed chain was not rebuilt within 60 s: {rules}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    reaches(
        &d,
        &id,
        "the public server after the rebuild",
        PUBLIC,
        public.port(),
    );
    cannot_reach(
        &d,
        &id,
        "a 10/8 server after the rebuild",
        "10.20.30.40",
        target.port(),
    );
}

/// With /29 tenant subnets two tenants' networks are adjacent in the pool (x.0.0/29 and
/// x.0.8/29): a tenant's instance still cannot reach its neighbour's server, while an instance
/// of the server's own tenant can (so the probe works).
#[test]
fn instance_cannot_reach_a_neighbour_tenant_in_the_adjacent_small_subnet() {
    let _s = serial();
    let d = daemon(&["--net-tenant-prefix", "29"]);
    d.json(&["tenant", "create", "beta"]);
    let kb = d.json(&["key", "create", "--tenant", "beta"])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let server = d.create_as(&kb, &peer_server());
    let friend = d.create_as(&kb, &sleeper());
    let mine = d.create(&sleeper());
    let (ip, my_ip) = (ip_of(&d, &server), ip_of(&d, &mine));
    let last = |a: &str| a.rsplit('.').next().unwrap().parse::<u8>().unwrap();
    assert_eq!(
        (last(&my_ip) / 8, last(&ip) / 8),
        (0, 1),
        "adjacent /29s: {my_ip} {ip}"
    );
    reaches(&d, &friend, "an instance of the same tenant", &ip, 8080);
    cannot_reach(
        &d,
        &mine,
        "another tenant's instance in the next /29",
        &ip,
        8080,
    );
}
