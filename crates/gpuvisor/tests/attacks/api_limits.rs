//! Attacks on the daemon's own resources through the API: exec output without end, execs that
//! never end, more execs than a tenant may run (and a storm of 1000), an instance that floods
//! its log, oversized bodies, slow-loris headers and more requests in flight than a key may
//! have. Each test asserts the limit held *and* that the daemon kept working.

use crate::common::{serial, Daemon, SMALL};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn create_sleeper(d: &Daemon, key: &str) -> String {
    d.create_as(key, &crate::common::sleeper())
}

/// A tenant and a user key for it.
fn tenant(d: &Daemon, name: &str) -> String {
    d.json(&["tenant", "create", name]);
    d.json(&["key", "create", "--tenant", name])["secret"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Pids of processes whose command line contains `needle` (a marker argument no other process
/// on the host uses).
fn pids_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
        {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Pids of processes inside instance `id` (its cgroup) whose command line contains `needle`:
/// the exec'd commands themselves, not the clients or `runc exec` that name them too.
fn instance_pids_with(id: &str, needle: &str) -> Vec<u32> {
    pids_with(needle)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cgroup"))
                .is_ok_and(|cg| cg.contains(&format!("/gpuvisor/{id}")))
        })
        .collect()
}

/// Waits (bounded: a liveness check, not a timing assertion) until `f` holds.
fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("never happened: {what}");
}

/// `runc exec` processes of our daemon's runtime for container `id`.
fn runc_execs(d: &Daemon, id: &str) -> Vec<u32> {
    let root = d.data().join("run/runc");
    pids_with(&format!("{} exec", root.display()))
        .into_iter()
        .filter(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains(id)
        })
        .collect()
}

/// A raw HTTP/1.1 request; returns (status, body) or None if the connection closed first.
fn raw_request(port: u16, req: &[u8]) -> Option<(u16, String)> {
    let mut s = crate::common::connect(port);
    s.tcp()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    s.write_all(req).ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1.to_string())?;
    Some((status, body))
}

/// Like [`raw_request`], but reads while it writes (one thread, a non-blocking socket): a
/// server that answers before reading the whole body (and then closes) is heard before its
/// reset.
fn raw_request_reading(port: u16, req: Vec<u8>) -> Option<(u16, String)> {
    let mut s = crate::common::connect(port);
    s.tcp().set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut sent, mut writing) = (0usize, true);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let pending = |e: &std::io::Error| e.kind() == std::io::ErrorKind::WouldBlock;
    while Instant::now() < deadline {
        let mut progress = false;
        if writing {
            let w = if sent < req.len() {
                s.write(&req[sent..])
            } else {
                s.flush().map(|()| 0)
            };
            match w {
                Ok(n) => {
                    sent += n;
                    progress |= n > 0;
                    if sent == req.len() && s.flush().is_ok() {
                        writing = false;
                    }
                }
                Err(e) if pending(&e) => {}
                Err(_) => writing = false,
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                progress = true;
            }
            Err(e) if pending(&e) => {}
            Err(_) => break,
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    drop(s);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1.to_string())?;
    Some((status, body))
}

fn exec_request(id: &str, key: &str, cmd: &[&str]) -> Vec<u8> {
    let body = serde_json::json!({ "command": cmd }).to_string();
    format!(
        "POST /v1/instances/{id}/exec HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn error_code(body: &str) -> String {
    // The body may be chunked: find the JSON object.
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map_or(body.len(), |e| e + 1);
    serde_json::from_str::<Value>(&body[start..end]).map_or_else(
        |_| format!("<not JSON: {body}>"),
        |v| v["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn exec_output_without_end_is_cut_at_the_cap() {
    let _s = serial();
    let d = Daemon::start(&["--exec-max-output", "1MiB"]);
    d.import_busybox();
    let id = create_sleeper(&d, &d.key);
    let out = d.cli(&["instance", "exec", &id, "--", "yes", "gv-flood-1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.stdout.len(),
        1 << 20,
        "output not cut at the 1 MiB cap; stderr: {stderr}"
    );
    assert!(
        stderr.contains("exec_max_output"),
        "no clear message: {stderr}"
    );
    assert_eq!(out.status.code(), Some(137), "{stderr}");
    eventually(
        "the flooding command is killed",
        Duration::from_secs(30),
        || pids_with("gv-flood-1").is_empty() && runc_execs(&d, &id).is_empty(),
    );
    // The instance and the daemon still work.
    assert_eq!(d.exec(&id, "echo ok").1.trim(), "ok");
}

#[test]
fn exec_that_sleeps_forever_is_killed_at_the_deadline() {
    let _s = serial();
    let d = Daemon::start(&["--exec-max-timeout", "1h"]);
    d.import_busybox();
    let id = create_sleeper(&d, &d.key);
    let out = d.cli(&[
        "instance",
        "exec",
        "--timeout",
        "2s",
        &id,
        "--",
        "sh",
        "-c",
        "echo started; sleep 1000001",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "stderr: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "started\n");
    assert!(stderr.contains("deadline"), "no clear message: {stderr}");
    eventually(
        "the sleeping command is killed",
        Duration::from_secs(30),
        || pids_with("sleep 1000001").is_empty() && runc_execs(&d, &id).is_empty(),
    );
    // A deadline past the server's maximum is refused up front.
    let out = d.cli(&["instance", "exec", "--timeout", "2h", &id, "--", "true"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exec_max_timeout"));
}

/// Starts `instance exec` clients that hang (`sleep <marker>`), and waits for their commands
/// to run.
fn hanging_execs(d: &Daemon, key: &str, id: &str, n: usize, marker: &str) -> Vec<Child> {
    let clients: Vec<Child> = (0..n)
        .map(|_| {
            d.command_as(key, ["instance", "exec", id, "--", "sleep", marker])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    eventually(
        &format!("{n} hanging execs running"),
        Duration::from_secs(60),
        || instance_pids_with(id, &format!("sleep {marker}")).len() >= n,
    );
    clients
}

#[test]
fn execs_over_the_tenant_limit_are_refused_while_another_tenant_gets_one() {
    let _s = serial();
    let d = Daemon::start(&["--exec-per-tenant", "2"]);
    d.import_busybox();
    let ka = tenant(&d, "alpha");
    let kb = tenant(&d, "beta");
    let a = create_sleeper(&d, &ka);
    let b = create_sleeper(&d, &kb);
    let mut clients = hanging_execs(&d, &ka, &a, 2, "1000002");
    let out = d.cli_as(&ka, &["instance", "exec", &a, "--", "echo", "third"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(10),
        "third exec not refused: {stderr}"
    );
    assert!(stderr.contains("resource_exhausted"), "{stderr}");
    assert!(stderr.contains("exec_per_tenant"), "{stderr}");
    // Another tenant is not held up by alpha's execs.
    let out = d.cli_as(&kb, &["instance", "exec", &b, "--", "echo", "beta-ok"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "beta-ok");
    // Clients that go away take their commands with them, and free the slots.
    for c in &mut clients {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    eventually("hanging execs killed", Duration::from_secs(60), || {
        pids_with("sleep 1000002").is_empty() && runc_execs(&d, &a).is_empty()
    });
    let out = d.cli_as(&ka, &["instance", "exec", &a, "--", "echo", "again"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", out);
}

#[test]
fn a_thousand_hanging_execs_do_not_stall_the_reconciler_or_telemetry_and_leak_nothing() {
    let _s = serial();
    let d = Daemon::start(&[]);
    d.import_busybox();
    // The storm comes from one tenant; the admin's work goes on beside it.
    let key = tenant(&d, "storm");
    let id = create_sleeper(&d, &key);
    let port = d.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 50 threads × 20 attempts; accepted execs keep their connection open (hanging).
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let (id, key, stop) = (id.clone(), key.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut held = Vec::new();
                let (mut ok, mut refused, mut other) = (0usize, 0usize, Vec::new());
                for _ in 0..20 {
                    let mut s = crate::common::connect(port);
                    s.tcp()
                        .set_read_timeout(Some(Duration::from_secs(60)))
                        .unwrap();
                    s.write_all(&exec_request(&id, &key, &["sleep", "1000003"]))
                        .unwrap();
                    let mut head = [0u8; 12];
                    if s.read_exact(&mut head).is_err() {
                        other.push("connection closed".to_string());
                        continue;
                    }
                    match &head[9..12] {
                        b"200" => {
                            ok += 1;
                            held.push(s);
                        }
                        b"429" => {
                            let mut rest = Vec::new();
                            let _ = s.read_to_end(&mut rest);
                            let body = String::from_utf8_lossy(&rest).into_owned();
                            if error_code(&body) == "resource_exhausted" {
                                refused += 1;
                            } else {
                                other.push(body);
                            }
                        }
                        st => other.push(String::from_utf8_lossy(st).into_owned()),
                    }
                }
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                // How many of the accepted ones still hang now: an exec that ended (its
                // command failed or was cut, under a loaded host) gave its place back, and a
                // later request may have had it.
                let open = held.iter_mut().map(still_open).filter(|o| *o).count();
                drop(held);
                (ok, refused, other, open)
            })
        })
        .collect();
    // Meanwhile: the reconciler provisions a new instance and telemetry keeps sampling.
    let stats_at = || -> i64 {
        let (st, _, body) =
            crate::common::http_get(port, "/v1/gpus/stats", &[("x-api-key", &d.key)]);
        assert_eq!(st, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v[0]["at"].as_i64().unwrap()
    };
    let mut seen = vec![stats_at()];
    // The execs running at once, sampled throughout: never more than the tenant's limit.
    let mut most = 0usize;
    create_sleeper(&d, &d.key);
    eventually("telemetry samples advance", Duration::from_secs(60), || {
        most = most.max(instance_pids_with(&id, "sleep 1000003").len());
        let at = stats_at();
        if at > *seen.last().unwrap() {
            seen.push(at);
        }
        seen.len() >= 4
    });
    most = most.max(instance_pids_with(&id, "sleep 1000003").len());
    // Hanging execs are really there while this happened.
    assert!(
        !instance_pids_with(&id, "sleep 1000003").is_empty(),
        "no exec was accepted"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut refused, mut other, mut open) = (0, 0, Vec::new(), 0);
    for t in threads {
        let (o, r, x, h) = t.join().unwrap();
        ok += o;
        refused += r;
        other.extend(x);
        open += h;
    }
    assert!(
        other.is_empty(),
        "unexpected answers: {:?}",
        &other[..other.len().min(5)]
    );
    assert_eq!(ok + refused, 1000);
    // The limit is on execs at once: accepted ones that ended before the storm did freed
    // their places (`ok` counts those too, and is printed only).
    assert!(
        open <= 8 && most <= 8,
        "{open} accepted execs hang at once, {most} seen running at once, for one tenant \
         (limit 8; {ok} accepted in all)"
    );
    assert!(open > 0, "no accepted exec hangs: the storm tested nothing");
    eventually(
        "every hanging exec is killed",
        Duration::from_secs(90),
        || pids_with("sleep 1000003").is_empty() && runc_execs(&d, &id).is_empty(),
    );
    let out = d.cli_as(&key, &["instance", "exec", &id, "--", "echo", "alive"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alive");
}

/// Whether an accepted exec's stream still hangs: no end of stream, no end frame, within
/// 200 ms (the hanging command prints nothing).
fn still_open(s: &mut crate::common::ApiStream) -> bool {
    s.tcp()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + Duration::from_secs(2);
    loop {
        match s.read(&mut buf) {
            Ok(0) => return false,
            // Bytes: the rest of the head, or frames of an exec that ends; read on (a stream
            // that keeps sending for 2 s is one that runs).
            Ok(_) if Instant::now() < end => continue,
            Ok(_) => return true,
            // Silence: read on until the 2 s are up (a loaded host may close an ended exec's
            // stream a while after its place was given back); silent for 2 s is open.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= end {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
}

/// Bytes of the instance's log files on disk.
fn log_bytes(d: &Daemon, id: &str) -> u64 {
    let dir = d.data().join("logs").join(id);
    std::fs::read_dir(&dir)
        .map(|rd| rd.flatten().map(|e| e.metadata().unwrap().len()).sum())
        .unwrap_or(0)
}

#[test]
fn instance_log_flood_stays_within_the_cap() {
    let _s = serial();
    let d = Daemon::start(&["--log-max-bytes", "1MiB"]);
    d.import_busybox();
    let mut a: Vec<&str> = SMALL.to_vec();
    a.extend([
        "--",
        "sh",
        "-c",
        "yes gv-log-flood | head -c 20000000; echo gv-log-end; sleep 1000000",
    ]);
    let id = d.create(&a);
    eventually(
        "the flood ends in the log",
        Duration::from_secs(120),
        || {
            let out = d.cli(&["instance", "logs", &id]);
            String::from_utf8_lossy(&out.stdout).contains("gv-log-end")
        },
    );
    let on_disk = log_bytes(&d, &id);
    assert!(
        on_disk <= (1 << 20) + (64 << 10),
        "{on_disk} bytes of log on disk"
    );
    let out = d.cli(&["instance", "logs", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("gv-log-end\n"), "newest output missing");
    assert!(text.len() as u64 <= on_disk);
    // `-o json` says where the kept part starts: far past 0.
    let v = d.json(&["instance", "logs", &id]);
    assert!(v["next"].as_u64().unwrap() > 20_000_000, "{}", v["next"]);
    let relay = format!("log-relay --dir {}", d.data().join("logs").display());
    assert_eq!(pids_with(&relay).len(), 1, "one relay per instance");
    d.json(&["instance", "terminate", &id, "--wait"]);
    assert!(pids_with(&relay).is_empty(), "log relay left behind");
    assert!(!d.data().join("logs").join(&id).exists(), "log left behind");
    assert!(
        d.leaks(std::slice::from_ref(&id)).is_empty(),
        "{:?}",
        d.leaks(&[id])
    );
}

#[test]
fn oversized_request_body_is_refused_with_413() {
    let _s = serial();
    let d = Daemon::start(&[]);
    let body = format!("{{\"name\":\"{}\"}}", "x".repeat(3 << 20));
    let req = format!(
        "POST /v1/tenants HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        d.key,
        body.len()
    );
    // The daemon answers before the body is in and closes: a reset reaching this side before
    // the answer is read throws the answer away (a TCP race, not the property): tried again.
    let (status, answer) = (0..3)
        .find_map(|_| raw_request_reading(d.port, req.clone().into_bytes()))
        .expect("no answer in 3 tries");
    assert_eq!(status, 413, "{}", &answer[..answer.len().min(300)]);
    assert_eq!(error_code(&answer), "payload_too_large");
    // Without a declared length (chunked), the body is cut at the limit too.
    let chunk = "y".repeat(64 << 10);
    let mut req = format!(
        "POST /v1/tenants HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        d.key
    );
    for _ in 0..48 {
        req.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    req.push_str("0\r\n\r\n");
    let (status, answer) = (0..3)
        .find_map(|_| raw_request_reading(d.port, req.clone().into_bytes()))
        .expect("no answer in 3 tries");
    assert_eq!(status, 413, "{}", &answer[..answer.len().min(300)]);
    assert_eq!(error_code(&answer), "payload_too_large");
}

#[test]
fn slow_loris_headers_are_disconnected() {
    let _s = serial();
    let d = Daemon::start(&[]);
    let mut s = crate::common::connect(d.port);
    s.tcp()
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    // 40 s of one byte every half second: well past the default header timeout (10 s).
    let mut disconnected = false;
    for _ in 0..80 {
        if s.write_all(b"a").is_err() {
            disconnected = true;
            break;
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(_) => {
                // Closed (0) or an error answer (408) before the headers were complete.
                disconnected = true;
                break;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                disconnected = true;
                break;
            }
        }
    }
    assert!(
        disconnected,
        "a client sending headers byte by byte kept its connection"
    );
    // Others are served meanwhile and after.
    assert_eq!(crate::common::http_get(d.port, "/v1/health", &[]).0, 200);
}

/// One client address opens connections and keeps them open, to hold every connection slot of
/// the daemon (no key needed). Past `max_connections_per_ip` its connections are closed at
/// once, while a client from another address and the liveness probe are still answered.
#[test]
fn one_client_cannot_hold_every_connection() {
    let _s = serial();
    let d = Daemon::start(&["--max-connections-per-ip", "8"]);
    // Eight connections the daemon has surely accepted (each answered one request and is kept
    // alive, holding its place): on a loaded machine a pause before the ninth is not enough.
    let held: Vec<crate::common::ApiStream> = (0..8)
        .map(|_| {
            let mut c = crate::common::connect(d.port);
            c.tcp()
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            c.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut got = [0u8; 12];
            c.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"HTTP/1.1 200", "a held connection was not served");
            c
        })
        .collect();
    // Closed at once: the TLS handshake does not complete (or, over plain HTTP, nothing
    // comes back).
    if let Some(mut ninth) = crate::common::try_connect(d.port) {
        ninth
            .tcp()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = ninth.write_all(b"GET /v1/health HTTP/1.0\r\nHost: x\r\n\r\n");
        let mut buf = [0u8; 64];
        let n = ninth.read(&mut buf);
        assert!(
            matches!(n, Ok(0))
                || n.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "a ninth connection from one address was served: {n:?} {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    // Another client address (any 127/8 source reaches loopback) is served meanwhile.
    let status = {
        let mut s = connect_from([127, 0, 0, 2], d.port);
        s.write_all(b"GET /v1/health HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(
        status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200"),
        "{status}"
    );
    drop(held);
}

/// A connection to the daemon on 127.0.0.1:`port` from the loopback address `src` (any 127/8
/// source reaches loopback): another client address on one host. TLS as the daemon serves.
fn connect_from(src: [u8; 4], port: u16) -> crate::common::ApiStream {
    use std::os::fd::FromRawFd;
    // SAFETY: a fresh socket fd from libc::socket, owned by the TcpStream from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    // SAFETY: fd is a valid, unowned socket.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    let addr = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    let (from, to) = (addr(src, 0), addr([127, 0, 0, 1], port));
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: from is a valid sockaddr_in of the given length.
    let rc = unsafe { libc::bind(fd, (&from as *const libc::sockaddr_in).cast(), len) };
    assert_eq!(rc, 0, "bind to {src:?}");
    // SAFETY: to is a valid sockaddr_in of the given length.
    let rc = unsafe { libc::connect(fd, (&to as *const libc::sockaddr_in).cast(), len) };
    assert_eq!(rc, 0, "connect from {src:?}");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    crate::common::wrap(port, s).expect("TLS handshake")
}

/// One HTTP/1.0 request from `src`: (status, Retry-After, body).
fn request_from(
    src: [u8; 4],
    port: u16,
    method: &str,
    path: &str,
    key: &str,
    body: &str,
) -> (u16, Option<u64>, String) {
    let mut s = connect_from(src, port);
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: x\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.get(9..12).and_then(|x| x.parse().ok()).unwrap_or(0);
    let retry = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("retry-after: ")
            .and_then(|v| v.trim().parse().ok())
    });
    (status, retry, body.to_string())
}

/// Per-key token buckets, reads and mutations apart; a key over its allowance gets 429 with
/// Retry-After and gets through again once it has waited; its other bucket and other keys are
/// untouched. An address that guesses keys is refused, valid key or not, while another address
/// is served.
#[test]
fn rate_limits_per_key_and_failed_logins_per_address() {
    let _s = serial();
    let d = Daemon::start(&[
        "--mutations-per-second",
        "1",
        "--mutation-burst",
        "3",
        "--reads-per-second",
        "1",
        "--read-burst",
        "4",
        "--auth-failures-per-minute",
        "2",
        "--auth-failure-burst",
        "3",
    ]);
    // The admin's key is limited too: its four setup mutations are spread out.
    let a = tenant(&d, "alpha");
    std::thread::sleep(Duration::from_secs(2));
    let b = tenant(&d, "beta");
    let src = [127, 0, 0, 3];
    let vol = |n: usize| format!(r#"{{"name":"v{n}","size":16777216}}"#);
    let mut statuses = Vec::new();
    for n in 0..4 {
        statuses.push(request_from(
            src,
            d.port,
            "POST",
            "/v1/volumes",
            &a,
            &vol(n),
        ));
    }
    assert!(statuses[..3].iter().all(|s| s.0 == 200), "{statuses:?}");
    let (status, retry, body) = &statuses[3];
    assert_eq!(*status, 429, "{body}");
    assert!(
        body.contains("mutations per key") && body.contains("resource_exhausted"),
        "{body}"
    );
    let retry = retry.expect("429 without Retry-After");
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // The same key's reads, and the other tenant's mutations, go on.
    assert_eq!(
        request_from(src, d.port, "GET", "/v1/volumes", &a, "").0,
        200
    );
    assert_eq!(
        request_from(src, d.port, "POST", "/v1/volumes", &b, &vol(9)).0,
        200
    );
    // After the wait it says, the key gets through again.
    std::thread::sleep(Duration::from_secs(retry));
    assert_eq!(
        request_from(src, d.port, "POST", "/v1/volumes", &a, &vol(5)).0,
        200
    );
    // Reads have their own allowance (four at once; one was spent above).
    let reads: Vec<u16> = (0..6)
        .map(|_| request_from(src, d.port, "GET", "/v1/instances", &b, "").0)
        .collect();
    assert!(reads.contains(&429) && reads[0] == 200, "{reads:?}");

    // Guessing keys from 127.0.0.4: its failures pass as 401 until the allowance (a burst of
    // three) is used up, then its wrong keys get 429 (not even looked at), while a valid key
    // from the same address is served: a neighbour behind one address cannot lock others out.
    let guesser = [127, 0, 0, 4];
    let guess = || request_from(guesser, d.port, "GET", "/v1/instances", "gv_wrong", "");
    let first: Vec<u16> = (0..4).map(|_| guess().0).collect();
    assert_eq!(first, [401, 401, 401, 401], "{first:?}");
    let (st, retry, body) = guess();
    assert_eq!(st, 429, "a guessing address was let on guessing: {body}");
    assert!(body.contains("failed authentications"), "{body}");
    assert!(retry.is_some_and(|r| (1..=60).contains(&r)), "{retry:?}");
    assert_eq!(
        request_from(guesser, d.port, "GET", "/v1/volumes", &a, "").0,
        200
    );
    assert_eq!(
        request_from([127, 0, 0, 5], d.port, "GET", "/v1/volumes", &a, "").0,
        200
    );
}

#[test]
fn requests_over_the_per_key_limit_are_refused() {
    let _s = serial();
    let d = Daemon::start(&[]);
    let kb = tenant(&d, "beta");
    // 33 slow requests with one key (the default allowance is 32): headers sent, the body
    // never finished. Exactly one is answered at once, with 429; the others wait for their body.
    let mut slow: Vec<crate::common::ApiStream> = (0..33)
        .map(|_| {
            let mut s = crate::common::connect(d.port);
            s.write_all(
                format!(
                    "POST /v1/tenants HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\n\
                     content-type: application/json\r\ncontent-length: 100\r\n\r\n{{",
                    d.key
                )
                .as_bytes(),
            )
            .unwrap();
            s.tcp()
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            s
        })
        .collect();
    let mut answered: Vec<(usize, String)> = Vec::new();
    let start = Instant::now();
    // Look for answers for 5 s (the body timeout is 30 s): one should come at once.
    while start.elapsed() < Duration::from_secs(5) {
        for (i, s) in slow.iter_mut().enumerate() {
            if answered.iter().any(|(j, _)| *j == i) {
                continue;
            }
            let mut buf = [0u8; 4096];
            if let Ok(n) = s.read(&mut buf) {
                answered.push((i, String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        }
    }
    assert_eq!(
        answered.len(),
        1,
        "expected exactly the 33rd request refused, got answers: {answered:?}"
    );
    let answer = &answered[0].1;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert_eq!(error_code(answer), "resource_exhausted", "{answer}");
    // Another tenant is not affected.
    let other = format!(
        "GET /v1/instances HTTP/1.1\r\nHost: x\r\nx-api-key: {kb}\r\nconnection: close\r\n\r\n"
    );
    assert_eq!(raw_request(d.port, other.as_bytes()).unwrap().0, 200);
    drop(slow);
    let list = format!(
        "GET /v1/instances HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\nconnection: close\r\n\r\n",
        d.key
    );
    eventually("the key is served again", Duration::from_secs(30), || {
        raw_request(d.port, list.as_bytes()).unwrap().0 == 200
    });
}
