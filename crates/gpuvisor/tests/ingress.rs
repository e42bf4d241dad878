//! The instance proxy end to end, with real clients against a real instance: curl over HTTP/2
//! and HTTP/1.1, a WebSocket echo, a 1 GiB streamed upload with the daemon's memory watched,
//! an SSH-like TCP session through a mapped host port, and the access rules attacked with
//! other tenants' keys, a read-only key, forged and expired links, spoofed forwarding headers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{busybox_rootfs, free_port, serial, Daemon};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DOMAIN: &str = "gv.test";

/// The busybox rootfs with `portsrv` (tests/fixtures/portsrv.rs) built static into /bin (once
/// per test binary).
fn portsrv_rootfs() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(build_portsrv_rootfs).clone()
}

fn build_portsrv_rootfs() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gv-ingress-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let st = Command::new("cp")
        .arg("-a")
        .arg(busybox_rootfs())
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/portsrv.rs");
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-o",
        ])
        .arg(dir.join("bin/portsrv"))
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "cannot build portsrv: {out:?}");
    dir
}

struct Proxy {
    port: u16,
    ca: PathBuf,
}

impl Proxy {
    fn host(&self, id: &str, port: u16) -> String {
        format!("{id}-{port}.{DOMAIN}")
    }

    fn url(&self, id: &str, port: u16, path: &str) -> String {
        format!("https://{}:{}{path}", self.host(id, port), self.port)
    }

    /// curl through the proxy: (HTTP status, HTTP version, headers, body).
    fn curl(
        &self,
        id: &str,
        port: u16,
        path: &str,
        args: &[&str],
    ) -> (u16, String, String, String) {
        let host = self.host(id, port);
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "60", "-D", "-", "--cacert"])
            .arg(&self.ca)
            .args(["--resolve", &format!("{host}:{}:127.0.0.1", self.port)])
            .args(["-w", "\n@@%{http_code} %{http_version}"])
            .args(args)
            .arg(self.url(id, port, path))
            .output()
            .unwrap();
        assert!(out.status.success(), "curl {path}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (rest, tail) = text.rsplit_once("\n@@").unwrap();
        let (code, version) = tail.trim().split_once(' ').unwrap();
        let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
        (
            code.parse().unwrap(),
            version.to_string(),
            head.to_ascii_lowercase(),
            body.to_string(),
        )
    }
}

fn secret(d: &Daemon, tenant: &str, role: &str) -> String {
    d.json(&["key", "create", "--tenant", tenant, "--role", role])["secret"]
        .as_str()
        .unwrap()
        .to_string()
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A WebSocket over TLS through the proxy: sends each message and reads its echo.
fn websocket_echo(p: &Proxy, id: &str, port: u16, key: &str, messages: &[&str]) -> Vec<String> {
    use tungstenite::client::IntoClientRequest;
    let host = p.host(id, port);
    let tcp = std::net::TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let name = rustls::pki_types::ServerName::try_from(host.clone()).unwrap();
    let conn = rustls::ClientConnection::new(common::tls_client_config(&p.ca), name).unwrap();
    let tls = rustls::StreamOwned::new(conn, tcp);
    let mut req = format!("wss://{host}:{}/ws", p.port)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("x-api-key", key.parse().unwrap());
    let (mut ws, resp) = tungstenite::client::client(req, tls).unwrap();
    assert_eq!(resp.status(), 101);
    let mut out = Vec::new();
    for m in messages {
        ws.send(tungstenite::Message::text(*m)).unwrap();
        loop {
            match ws.read().unwrap() {
                tungstenite::Message::Text(t) => {
                    out.push(t.to_string());
                    break;
                }
                tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => {}
                other => panic!("unexpected WebSocket message {other:?}"),
            }
        }
    }
    let _ = ws.close(None);
    out
}

/// A daemon with the proxy on a free loopback port and two TCP host ports from a pool of its
/// own (`slot` tells the tests of this binary apart).
fn proxy_daemon(slot: u16) -> (Daemon, Proxy, u16) {
    proxy_daemon_with(slot, &[])
}

fn proxy_daemon_with(slot: u16, extra: &[&str]) -> (Daemon, Proxy, u16) {
    let proxy_port = free_port();
    let tcp_lo = 31000 + (std::process::id() % 300) as u16 * 6 + slot * 2;
    let range = format!("{tcp_lo}-{}", tcp_lo + 1);
    let mut args = extra.to_vec();
    let listen = format!("127.0.0.1:{proxy_port}");
    args.extend([
        "--proxy-listen",
        &listen,
        "--proxy-domain",
        DOMAIN,
        "--proxy-tcp-ports",
        &range,
        "--proxy-tcp-listen",
        "127.0.0.1",
    ]);
    let d = Daemon::start(&args);
    let root = portsrv_rootfs();
    d.json(&[
        "image",
        "import",
        root.to_str().unwrap(),
        "--name",
        "portsrv",
    ]);
    let p = Proxy {
        port: proxy_port,
        ca: d.ca(),
    };
    (d, p, tcp_lo)
}

/// Waits until portsrv answers on public port `port` through the proxy.
fn wait_served(p: &Proxy, id: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, _, _, body) = p.curl(id, port, "/", &[]);
        if code == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "portsrv never answered: {code} {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn idle_timeout_stops_an_unused_instance_and_traffic_keeps_it() {
    let _s = serial();
    let (d, p, _) = proxy_daemon(1);
    let create = |idle: &[&str]| {
        let mut a = vec![
            "instance",
            "create",
            "--image",
            "portsrv",
            "--wait",
            "--vcpus",
            "1",
            "--memory",
            "64MiB",
            "--container-disk",
            "64MiB",
            "--port",
            "8081/http:public",
            "--port",
            "2222/tcp",
        ];
        a.extend(idle);
        a.extend(["--", "/bin/portsrv", "h:8081", "t:2222"]);
        let v = d.json(&a);
        assert_eq!(v["state"], "running", "{v}");
        v
    };
    let v = create(&["--idle-timeout", "3s"]);
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["idle_timeout_secs"], 3, "{v}");
    let keep = create(&[]);
    let keep_id = keep["id"].as_str().unwrap().to_string();
    wait_served(&p, &id, 8081);
    let state = |id: &str| d.json(&["instance", "get", id]);

    // Requests every half second for 6 s (twice the timeout): it stays up.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let (code, ..) = p.curl(&id, 8081, "/", &[]);
        assert_eq!(code, 200);
        std::thread::sleep(Duration::from_millis(500));
    }
    let got = state(&id);
    assert_eq!(got["desired"], "running", "stopped while in use: {got}");
    let last = got["last_activity_at"].as_i64().unwrap();
    assert!(
        (got["updated_at"].as_i64().unwrap_or(0).max(last) - last) < 5_000,
        "last activity not recent: {got}"
    );

    // An open, silent TCP connection (an SSH session at a prompt) keeps it up too.
    let host_port = got["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["port"] == 2222)
        .and_then(|x| x["host_port"].as_u64())
        .unwrap() as u16;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", host_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut banner = [0u8; 17];
    s.read_exact(&mut banner).unwrap();
    std::thread::sleep(Duration::from_secs(6));
    let got = state(&id);
    assert_eq!(
        got["desired"], "running",
        "stopped with a connection open: {got}"
    );
    drop(s);
    // An exec that runs for twice the timeout (someone at a shell) keeps it up as well.
    let out = d.cli(&["instance", "exec", &id, "--", "sleep", "6"]);
    assert!(out.status.success(), "{out:?}");
    let got = state(&id);
    assert_eq!(got["desired"], "running", "stopped during an exec: {got}");

    // Unused: stopped within the timeout and the check's period, with an event saying why.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = state(&id);
        if got["state"] == "stopped" {
            assert_eq!(got["desired"], "stopped", "{got}");
            break;
        }
        assert!(Instant::now() < deadline, "never stopped when idle: {got}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let events = d.cli(&["instance", "events", &id]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(events.contains("idle"), "no idle event: {events}");
    // The one without an idle timeout, unused all along, runs on.
    assert_eq!(state(&keep_id)["state"], "running");
    // Refused: a zero or an absurd timeout.
    for bad in ["0s", "400days"] {
        let out = d.cli(&[
            "instance",
            "create",
            "--image",
            "portsrv",
            "--idle-timeout",
            bad,
            "--",
            "true",
        ]);
        assert!(!out.status.success(), "--idle-timeout {bad} accepted");
    }
}

#[test]
fn proxy_serves_instance_ports_to_whom_they_are_for() {
    let _s = serial();
    let (d, p, tcp_lo) = proxy_daemon(0);
    let proxy_port = p.port;
    d.json(&["tenant", "create", "acme"]);
    d.json(&["tenant", "create", "mallory"]);
    let acme = secret(&d, "acme", "member");
    let acme_viewer = secret(&d, "acme", "viewer");
    let mallory = secret(&d, "mallory", "member");
    let v = d.json_as(
        &acme,
        &[
            "instance",
            "create",
            "--image",
            "portsrv",
            "--wait",
            "--vcpus",
            "1",
            "--memory",
            "128MiB",
            "--container-disk",
            "64MiB",
            "--port",
            "8080/http",
            "--port",
            "8081/http:public",
            "--port",
            "8082/http",
            "--port",
            "2222/tcp",
            "--",
            "/bin/portsrv",
            "h:8080",
            "h:8081",
            "h:8082",
            "t:2222",
        ],
    );
    assert_eq!(v["state"], "running", "{v}");
    let id = v["id"].as_str().unwrap().to_string();

    // `instance get`: the URLs and the mapped host port.
    let got = d.json_as(&acme, &["instance", "get", &id]);
    let urls: Vec<&str> = got["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    assert!(
        urls.contains(&format!("https://{id}-8080.{DOMAIN}:{proxy_port}/").as_str()),
        "{got}"
    );
    let host_port = got["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["port"] == 2222)
        .and_then(|x| x["host_port"].as_u64())
        .unwrap_or_else(|| panic!("no host port for 2222/tcp: {got}")) as u16;
    assert!((tcp_lo..=tcp_lo + 1).contains(&host_port), "{got}");
    assert!(
        urls.iter().any(|u| u.ends_with(&format!(":{host_port}"))),
        "{got}"
    );

    // The server is up inside (the instance may still be starting it).
    wait_served(&p, &id, 8081);

    // HTTP/2 to the client, a public port, no key.
    let (code, version, _, body) = p.curl(&id, 8081, "/", &["--http2"]);
    assert_eq!((code, version.as_str()), (200, "2"), "{body}");
    assert_eq!(body, "hello from portsrv 8081\n");
    // HTTP/1.1 too.
    let (code, version, _, _) = p.curl(&id, 8081, "/", &["--http1.1"]);
    assert_eq!((code, version.as_str()), (200, "1.1"));

    // A private port: no key, another tenant's key, a read-only key, an application's own
    // bearer token: all refused.
    for (who, args) in [
        ("no key", vec![]),
        ("mallory's key", vec!["-H", "x-api-key: MALLORY"]),
        ("acme's viewer key", vec!["-H", "x-api-key: VIEWER"]),
        (
            "an app token",
            vec!["-H", "Authorization: Bearer app-token"],
        ),
        (
            "a made-up gv key",
            vec!["-H", "Authorization: Bearer gv_0000"],
        ),
    ] {
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                a.replace("MALLORY", &mallory)
                    .replace("VIEWER", &acme_viewer)
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, head, body) = p.curl(&id, 8080, "/headers", &args);
        assert_eq!(code, 401, "{who}: {body}");
        assert!(head.contains("www-authenticate: bearer"), "{who}: {head}");
        assert!(
            !body.contains("GET /headers"),
            "{who} reached the instance: {body}"
        );
    }
    // The tenant's key (as a bearer token): through, and the instance never sees the key nor
    // the client's own forwarding headers.
    let (code, version, _, body) = p.curl(
        &id,
        8080,
        "/headers?x=1",
        &[
            "--http2",
            "-H",
            &format!("Authorization: Bearer {acme}"),
            "-H",
            "X-Forwarded-For: 6.6.6.6",
            "-H",
            "Forwarded: for=6.6.6.6",
            "-H",
            "X-Forwarded-Port: 6666",
            "-H",
            "X-Real-IP: 6.6.6.6",
        ],
    );
    assert_eq!((code, version.as_str()), (200, "2"), "{body}");
    let lower = body.to_ascii_lowercase();
    assert!(body.starts_with("GET /headers?x=1 HTTP/1.1\n"), "{body}");
    assert!(
        !body.contains(&acme),
        "the instance saw the API key: {body}"
    );
    assert!(!lower.contains("authorization"), "{body}");
    assert!(
        !body.contains("6.6.6.6"),
        "a spoofed forwarding header went through: {body}"
    );
    assert!(lower.contains("x-forwarded-for: 127.0.0.1"), "{body}");
    assert!(lower.contains("x-forwarded-proto: https"), "{body}");
    assert!(
        lower.contains(&format!(
            "x-forwarded-host: {id}-8080.{DOMAIN}:{proxy_port}"
        )),
        "{body}"
    );
    assert!(
        lower
            .lines()
            .any(|l| l == format!("host: {id}-8080.{DOMAIN}:{proxy_port}")),
        "{body}"
    );
    // An admin's key opens it too; x-api-key works as well.
    let (code, _, _, body) = p.curl(
        &id,
        8080,
        "/headers",
        &["-H", &format!("x-api-key: {}", d.key)],
    );
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains(&d.key), "{body}");
    // A public port passes an application's Authorization on untouched.
    let (code, _, _, body) = p.curl(
        &id,
        8081,
        "/headers",
        &["-H", "Authorization: Bearer app-token"],
    );
    assert_eq!(code, 200);
    assert!(body.contains("Bearer app-token"), "{body}");
    // ... but never a gpuvisor key a client sent along.
    let (code, _, _, body) = p.curl(
        &id,
        8081,
        "/headers",
        &["-H", &format!("x-api-key: {acme}")],
    );
    assert_eq!(code, 200);
    assert!(
        !body.contains(&acme),
        "a public port's instance saw the key: {body}"
    );
    // An instance cannot plant a cookie on its neighbours' hosts: `Domain` goes.
    let (code, _, head, _) = p.curl(&id, 8081, "/setcookie", &[]);
    assert_eq!(code, 200);
    assert!(head.contains("set-cookie: planted=1"), "{head}");
    assert!(!head.contains("domain="), "{head}");

    // Signed links: not for another tenant, not for a port that is not HTTP.
    let refused = d.cli_as(&mallory, &["instance", "link", &id, "8080"]);
    assert!(
        !refused.status.success(),
        "mallory made a link: {refused:?}"
    );
    let refused = d.cli_as(&acme, &["instance", "link", &id, "2222"]);
    assert!(
        !refused.status.success(),
        "a link to a TCP port: {refused:?}"
    );
    let link = d.json_as(&acme, &["instance", "link", &id, "8080", "--ttl", "1h"]);
    let url = link["url"].as_str().unwrap();
    let token = url.split_once("gv_link=").unwrap().1.to_string();
    assert!(url.starts_with(&p.url(&id, 8080, "/?gv_link=")), "{url}");
    // The link sets a host-only cookie and sends the client on without the token.
    let (code, _, head, _) = p.curl(&id, 8080, &format!("/headers?a=b&gv_link={token}"), &[]);
    assert_eq!(code, 303, "{head}");
    assert!(head.contains("location: /headers?a=b\r\n"), "{head}");
    assert!(
        head.contains(&format!("set-cookie: __host-gv_link={token};")),
        "{head}"
    );
    assert!(
        head.contains("httponly") && head.contains("secure"),
        "{head}"
    );
    assert!(
        !head.contains("domain="),
        "the cookie must stay on its host: {head}"
    );
    let (code, _, _, body) = p.curl(
        &id,
        8080,
        "/headers",
        &["-b", &format!("__Host-gv_link={token}; theme=dark")],
    );
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains(&token), "the instance saw the link: {body}");
    assert!(
        body.contains("theme=dark"),
        "the application's cookies go on: {body}"
    );
    // A link opens its own port only: not another private port of the same instance.
    for args in [
        vec!["-b".to_string(), format!("__Host-gv_link={token}")],
        vec![],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, ..) = p.curl(&id, 8082, "/headers", &args);
        assert_eq!(code, 401, "8080's link opened 8082");
    }
    let (code, ..) = p.curl(&id, 8082, &format!("/?gv_link={token}"), &[]);
    assert_eq!(code, 401, "8080's link in 8082's query");
    // Forged: another expiry, a flipped tag; a link of this port on the public one is moot,
    // and one of port 8080 does not open a port it was not made for.
    let (exp, tag) = token.split_once('.').unwrap();
    let later = format!("{}.{tag}", exp.parse::<i64>().unwrap() + 3600);
    let flipped = format!(
        "{exp}.{}{}",
        if tag.starts_with('0') { "1" } else { "0" },
        &tag[1..]
    );
    for bad in [later, flipped, "garbage".to_string(), String::new()] {
        let (code, ..) = p.curl(
            &id,
            8080,
            "/headers",
            &["-b", &format!("__Host-gv_link={bad}")],
        );
        assert_eq!(code, 401, "forged link {bad:?}");
        let (code, ..) = p.curl(&id, 8080, &format!("/?gv_link={bad}"), &[]);
        assert_eq!(code, 401, "forged link {bad:?} in the query");
    }
    // Expired.
    let short = d.json_as(&acme, &["instance", "link", &id, "8080", "--ttl", "1s"]);
    let short = short["url"]
        .as_str()
        .unwrap()
        .split_once("gv_link=")
        .unwrap()
        .1
        .to_string();
    std::thread::sleep(Duration::from_millis(2100));
    let (code, ..) = p.curl(
        &id,
        8080,
        "/headers",
        &["-b", &format!("__Host-gv_link={short}")],
    );
    assert_eq!(code, 401, "an expired link still opens the port");

    // Names that are not an instance port.
    for (host_id, port) in [("000000000000", 8080), (id.as_str(), 9999)] {
        let (code, ..) = p.curl(host_id, port, "/", &[]);
        assert_eq!(code, 404, "{host_id}-{port}");
    }

    // A WebSocket echo through the proxy.
    let echoed = websocket_echo(&p, &id, 8080, &acme, &["one", "two", &"x".repeat(100_000)]);
    assert_eq!(echoed.len(), 3);
    assert_eq!((echoed[0].as_str(), echoed[1].as_str()), ("one", "two"));
    assert_eq!(echoed[2].len(), 100_000);

    // 1 GiB streamed up through the proxy: the daemon's peak memory stays bounded.
    let pid = d.pid();
    let rss_before = status_kib(pid, "VmRSS:");
    let started = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 1073741824 /dev/zero | curl -sS --max-time 300 --cacert {} --resolve {}:{}:127.0.0.1 -H 'x-api-key: {}' -T - {}",
            p.ca.display(),
            p.host(&id, 8080),
            p.port,
            acme,
            p.url(&id, 8080, "/upload")
        ))
        .output()
        .unwrap();
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), "received 1073741824", "{out:?}");
    let peak = status_kib(pid, "VmHWM:");
    eprintln!(
        "1 GiB upload through the proxy in {:.1} s ({:.0} MiB/s); daemon RSS before {} MiB, peak {} MiB",
        took.as_secs_f64(),
        1024.0 / took.as_secs_f64(),
        rss_before / 1024,
        peak / 1024
    );
    assert!(
        peak < rss_before + 64 * 1024,
        "the daemon's peak RSS grew by {} MiB for a streamed upload",
        (peak - rss_before) / 1024
    );

    // An SSH-like session through the mapped TCP port.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", host_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut banner = [0u8; 17];
    s.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"SSH-2.0-portsrv\r\n");
    for line in ["ssh-userauth\n", &"k".repeat(50_000)] {
        s.write_all(line.as_bytes()).unwrap();
        let mut back = vec![0u8; line.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, line.as_bytes());
    }
    drop(s);

    // Stopped: the proxy answers 503, and the TCP map goes.
    d.json_as(&acme, &["instance", "stop", &id, "--wait"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, ..) = p.curl(&id, 8081, "/", &[]);
        let refused = std::net::TcpStream::connect(("127.0.0.1", host_port))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut b = [0u8; 1];
                s.read(&mut b)
            })
            .map_or(true, |n| n == 0);
        if code == 503 && refused {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a stopped instance: proxy {code}, TCP map refused: {refused}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let v: Value = d.json(&["instance", "list"]);
    assert_eq!(v.as_array().unwrap().len(), 1);
}

/// The deadlines that free a connection from a peer that stops moving, with the proxy's idle
/// timeout at 2 s: a client that never reads what it asked for, and an instance that never
/// reads an upload. Each address may hold 2 connections here, so a stuck connection that was
/// not freed would keep a third out.
#[test]
fn stalled_peers_are_cut_at_the_idle_timeout() {
    let _s = serial();
    let conf = std::env::temp_dir().join(format!("gv-ingress-stall-{}.toml", std::process::id()));
    std::fs::write(
        &conf,
        "[proxy]\nidle_timeout = \"2s\"\nrequest_timeout = \"3s\"\nmax_connections_per_ip = 2\n",
    )
    .unwrap();
    let (d, p, _) = proxy_daemon_with(2, &["--config", conf.to_str().unwrap()]);
    let v = d.json(&[
        "instance",
        "create",
        "--image",
        "portsrv",
        "--wait",
        "--vcpus",
        "1",
        "--memory",
        "256MiB",
        "--container-disk",
        "64MiB",
        "--port",
        "8081/http:public",
        "--",
        "/bin/portsrv",
        "h:8081",
    ]);
    let id = v["id"].as_str().unwrap().to_string();
    wait_served(&p, &id, 8081);

    // Two clients ask for 24 MiB each (more than the socket buffers on the way hold; portsrv
    // builds each answer in memory) and read nothing: the address's two places are taken.
    let stuck: Vec<_> = (0..2)
        .map(|_| {
            let host = p.host(&id, 8081);
            let tcp = std::net::TcpStream::connect(("127.0.0.1", p.port)).unwrap();
            let name = rustls::pki_types::ServerName::try_from(host.clone()).unwrap();
            let conn =
                rustls::ClientConnection::new(common::tls_client_config(&p.ca), name).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            write!(
                tls,
                "GET /download?n=25165824 HTTP/1.1\r\nHost: {host}\r\n\r\n"
            )
            .unwrap();
            tls.flush().unwrap();
            // The answer has begun (its head and a first piece): then nothing more is read.
            tls.sock
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut first = [0u8; 4096];
            let n = tls.read(&mut first).unwrap();
            assert!(
                first[..n].starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&first[..n])
            );
            tls
        })
        .collect();
    // A third connection, answered or not (closed at once while the address is full).
    let third = || {
        Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(&p.ca)
            .args([
                "--resolve",
                &format!("{}:{}:127.0.0.1", p.host(&id, 8081), p.port),
            ])
            .arg(p.url(&id, 8081, "/"))
            .output()
            .unwrap()
    };
    let refused = third();
    assert!(
        !refused.status.success(),
        "a third connection got in while two were held: {refused:?}"
    );
    // The writes to them stall; after the idle timeout they are cut and the places freed.
    let deadline = Instant::now() + Duration::from_secs(20);
    let stalled_at = Instant::now();
    loop {
        if third().status.success() {
            eprintln!("stalled downloads cut after {:?}", stalled_at.elapsed());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled connections were never cut"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(stuck);

    // An instance that reads the head of an upload and then nothing: the proxy gives the
    // request up once the upload has not moved for the idle timeout, not never.
    let started = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 268435456 /dev/zero | curl -sS -o /dev/null -w '%{{http_code}}' --max-time 60 --cacert {} --resolve {}:{}:127.0.0.1 -T - -X POST {}",
            p.ca.display(),
            p.host(&id, 8081),
            p.port,
            p.url(&id, 8081, "/stall")
        ))
        .output()
        .unwrap();
    let took = started.elapsed();
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    // Over HTTP/2 the client sees the 504 or, still sending, the stream reset with it; either
    // way the proxy gave the request up, well before curl's own 60 s.
    assert_ne!(code, "200", "{out:?}");
    assert!(
        took < Duration::from_secs(30),
        "a stalled upload was cut only after {took:?}: {out:?}"
    );
    wait_served(&p, &id, 8081);
    let _ = std::fs::remove_file(conf);
}
