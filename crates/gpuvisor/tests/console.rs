//! The web console (issue 15): the page and its files as the daemon serves them (strict CSP,
//! gzip, nothing from other sites), the login session that stands in for an API key in the
//! browser, the cross-site attacks on that cookie (a foreign page's write, a foreign page's
//! WebSocket, a stolen-then-logged-out or revoked session, another tenant's objects), and the
//! console itself driven end to end in Debian's chromium (web/e2e/console.mjs). Runs as root
//! (CI does); needs node and chromium (scripts/install-deps).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{browser_tools, console_e2e, serial, Daemon};
use serde_json::Value;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// A raw HTTP/1.0 request to the daemon, `Host` set as a browser sets it:
/// (status, head, body).
fn call(
    d: &Daemon,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, Vec<u8>) {
    let mut s = common::connect(d.port);
    s.tcp()
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Length: {}\r\n",
        host(d),
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head[9..12].parse().unwrap();
    (status, head, buf[split + 4..].to_vec())
}

fn host(d: &Daemon) -> String {
    format!("{}:{}", common::api_host(d.port), d.port)
}

fn origin(d: &Daemon) -> String {
    format!("https://{}", host(d))
}

/// The value of header `name` (any case), lower-cased.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name)
            .then(|| v.trim().to_ascii_lowercase())
    })
}

/// The `Set-Cookie` value as sent (case kept).
fn set_cookie(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case("set-cookie")
            .then(|| v.trim().to_string())
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Logs in with `key`: the session cookie (`__Host-gv_session=...`) and the answer.
fn login(d: &Daemon, key: &str) -> (String, Value) {
    let (status, head, body) = call(
        d,
        "POST",
        "/v1/sessions",
        &[],
        &serde_json::json!({ "api_key": key }).to_string(),
    );
    assert_eq!(status, 200, "login: {}", text(&body));
    let set = set_cookie(&head).expect("a session cookie");
    let cookie = set.split(';').next().unwrap().trim().to_string();
    assert!(cookie.starts_with("__Host-gv_session=gvs_"), "{set}");
    (cookie, serde_json::from_slice(&body).unwrap())
}

/// A tenant with a member key.
fn tenant_key(d: &Daemon, name: &str) -> String {
    d.json(&["tenant", "create", name]);
    let k = d.json(&["key", "create", "--tenant", name, "--role", "member"]);
    k["secret"].as_str().unwrap().to_string()
}

fn volume_names(d: &Daemon, cookie: &str) -> Vec<String> {
    let (status, _, body) = call(d, "GET", "/v1/volumes", &[("Cookie", cookie)], "");
    assert_eq!(status, 200, "{}", text(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_console_is_served_with_a_strict_policy_and_nothing_from_elsewhere() {
    let _s = serial();
    let d = Daemon::start(&[]);
    let (status, head, body) = call(&d, "GET", "/", &[], "");
    assert_eq!(status, 200, "{}", text(&body));
    let page = text(&body);
    assert!(header(&head, "content-type")
        .unwrap()
        .starts_with("text/html"));
    let csp = header(&head, "content-security-policy").expect("a CSP");
    let csp = csp.as_str();
    for part in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(part), "CSP {csp:?} lacks {part:?}");
    }
    assert!(
        !csp.contains("unsafe"),
        "CSP allows something unsafe: {csp}"
    );
    assert_eq!(header(&head, "x-frame-options").as_deref(), Some("deny"));
    assert_eq!(
        header(&head, "x-content-type-options").as_deref(),
        Some("nosniff")
    );
    // No inline script, and nothing from another site.
    assert!(
        !page.contains("<script>") && !page.contains("<script type=\"module\">"),
        "an inline script in the page: {page}"
    );
    for attr in ["src=\"http", "href=\"http", "src=\"//", "href=\"//"] {
        assert!(
            !page.contains(attr),
            "the page loads from elsewhere ({attr}): {page}"
        );
    }
    // Every file the page names is served, gzipped when asked, cached for good.
    let mut files = 0;
    for part in page.split(['"', '\'']) {
        if !part.starts_with("/assets/") {
            continue;
        }
        files += 1;
        let (status, head, gz) = call(&d, "GET", part, &[("Accept-Encoding", "gzip")], "");
        assert_eq!(status, 200, "{part}");
        assert_eq!(
            header(&head, "content-encoding").as_deref(),
            Some("gzip"),
            "{part}"
        );
        assert!(header(&head, "cache-control")
            .unwrap()
            .contains("immutable"));
        assert!(header(&head, "content-security-policy").is_some());
        let (_, head, raw) = call(&d, "GET", part, &[], "");
        assert_eq!(header(&head, "content-encoding"), None, "{part}");
        let mut unzipped = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut unzipped)
            .unwrap();
        assert_eq!(unzipped, raw, "{part}: the gzip is not the file");
    }
    assert!(files >= 2, "the page names no script and style: {page}");
    // Unknown files and paths outside the assets are not found, not the page.
    let (status, _, _) = call(&d, "GET", "/assets/../admin.key", &[], "");
    assert_ne!(status, 200);
    let (status, _, _) = call(&d, "GET", "/assets/nosuch.js", &[], "");
    assert_eq!(status, 404);
}

/// The session cookie is an API key a browser attaches by itself: every way another site (or
/// a thief of an ended session, or another tenant) could ride on it is tried here.
#[test]
fn console_sessions_resist_cross_site_use_and_end_with_logout_and_revocation() {
    let _s = serial();
    let d = Daemon::start(&["--exec-session-liveness", "10s"]);
    d.import_busybox();
    let acme = tenant_key(&d, "acme");
    let other = tenant_key(&d, "other");
    let theirs = d.create_as(&other, &common::sleeper());
    let ours = d.create_as(&acme, &common::sleeper());

    // Logging in: a wrong key, a metrics key and a session token are refused.
    let (status, head, _) = call(&d, "POST", "/v1/sessions", &[], r#"{"api_key":"gv_nope"}"#);
    assert_eq!(status, 401);
    assert!(header(&head, "set-cookie").is_none());
    let metrics = d.json(&["key", "create", "--tenant", "acme", "--role", "metrics"]);
    let metrics = metrics["secret"].as_str().unwrap_or_default().to_string();
    assert!(!metrics.is_empty());
    let (status, _, body) = call(
        &d,
        "POST",
        "/v1/sessions",
        &[],
        &serde_json::json!({ "api_key": metrics }).to_string(),
    );
    assert_eq!(status, 403, "a metrics key logged in: {}", text(&body));

    let (cookie, who) = login(&d, &acme);
    assert_eq!(who["tenant"], "acme");
    assert_eq!(who["role"], "member");
    let (_, head, _) = call(
        &d,
        "POST",
        "/v1/sessions",
        &[],
        &serde_json::json!({ "api_key": acme }).to_string(),
    );
    let set = header(&head, "set-cookie").unwrap();
    for attr in [
        "httponly",
        "secure",
        "samesite=strict",
        "path=/",
        "max-age=43200",
    ] {
        assert!(set.contains(attr), "the cookie lacks {attr}: {set}");
    }
    let token = cookie.trim_start_matches("__Host-gv_session=").to_string();
    let (status, _, _) = call(
        &d,
        "POST",
        "/v1/sessions",
        &[],
        &serde_json::json!({ "api_key": token }).to_string(),
    );
    assert_eq!(
        status, 401,
        "a session token was exchanged for another session"
    );

    // The cookie acts as the tenant's key: its instances, not the other tenant's.
    let (status, _, body) = call(&d, "GET", "/v1/instances", &[("Cookie", &cookie)], "");
    assert_eq!(status, 200, "{}", text(&body));
    let listed = text(&body);
    assert!(listed.contains(&ours), "{listed}");
    assert!(
        !listed.contains(&theirs),
        "another tenant's instance: {listed}"
    );
    let (status, _, _) = call(
        &d,
        "GET",
        &format!("/v1/instances/{theirs}"),
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(status, 404);
    let (status, _, body) = call(
        &d,
        "GET",
        "/v1/sessions/current",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(status, 200, "{}", text(&body));

    // A session does not mint lasting keys, in the cookie or as a bearer token, and it is not
    // accepted on GraphQL (whose WebSocket would outlive the login).
    let own = origin(&d);
    let console_write = [
        ("Cookie", cookie.as_str()),
        ("x-gpuvisor-csrf", "1"),
        ("Origin", own.as_str()),
    ];
    let mint = r#"{"tenant":"acme","role":"member"}"#;
    let (status, _, body) = call(&d, "POST", "/v1/keys", &console_write, mint);
    assert_eq!(status, 403, "a session minted a key: {}", text(&body));
    let (status, _, _) = call(&d, "POST", "/v1/keys", &[("x-api-key", &token)], mint);
    assert_eq!(status, 403, "a session token as a key minted a key");
    let (status, _, body) = call(
        &d,
        "POST",
        "/graphql",
        &console_write,
        r#"{"query":"{ instances { id } }"}"#,
    );
    assert_eq!(status, 403, "a session on GraphQL: {}", text(&body));
    let bearer = format!("Bearer {token}");
    let (status, _, _) = call(
        &d,
        "POST",
        "/graphql",
        &[("Authorization", &bearer)],
        r#"{"query":"{ instances { id } }"}"#,
    );
    assert_eq!(status, 403, "a session token as a bearer on GraphQL");
    // Nor does it sign links to the instance's ports (they would outlive it).
    let (status, _, body) = call(
        &d,
        "POST",
        &format!("/v1/instances/{ours}/links"),
        &console_write,
        r#"{"port":8080}"#,
    );
    assert_eq!(status, 403, "a session signed a link: {}", text(&body));
    // A planted cookie without the __Host- prefix (what a sibling host could set) is no
    // credential at all.
    let planted = format!("gv_session={token}");
    let (status, _, _) = call(&d, "GET", "/v1/instances", &[("Cookie", &planted)], "");
    assert_eq!(status, 401, "a gv_session cookie without __Host- was taken");

    // A write without the console's header (a cross-site form or fetch) is refused, and
    // nothing is made; so is one from a foreign origin even with the header.
    let make = r#"{"name":"csrf","size":16777216}"#;
    let (status, _, body) = call(&d, "POST", "/v1/volumes", &[("Cookie", &cookie)], make);
    assert_eq!(
        status,
        403,
        "a cookie write without the CSRF header: {}",
        text(&body)
    );
    let (status, _, _) = call(
        &d,
        "POST",
        "/v1/volumes",
        &[
            ("Cookie", &cookie),
            ("x-gpuvisor-csrf", "1"),
            ("Origin", "https://evil.example"),
        ],
        make,
    );
    assert_eq!(status, 403, "a cookie write from a foreign origin");
    let (status, _, _) = call(
        &d,
        "DELETE",
        &format!("/v1/instances/{ours}"),
        &[("Cookie", &cookie), ("Origin", &origin(&d))],
        "",
    );
    assert_eq!(status, 403, "a cookie DELETE without the CSRF header");
    assert!(
        volume_names(&d, &cookie).is_empty(),
        "a refused write made a volume"
    );
    let (status, _, body) = call(
        &d,
        "POST",
        "/v1/volumes",
        &[
            ("Cookie", &cookie),
            ("x-gpuvisor-csrf", "1"),
            ("Origin", &origin(&d)),
        ],
        make,
    );
    assert_eq!(status, 200, "the console's own write: {}", text(&body));
    assert_eq!(volume_names(&d, &cookie), vec!["csrf".to_string()]);

    // A WebSocket riding on the cookie from a foreign page (or with no Origin) is refused
    // before anything starts; from the console's origin it opens.
    let url = |id: &str| {
        format!(
            "wss://{}/v1/instances/{id}/exec/ws?request=%7B%22command%22%3A%5B%22sleep%22%2C%225151%22%5D%2C%22tty%22%3Atrue%7D",
            host(&d)
        )
    };
    #[allow(clippy::result_large_err)] // tungstenite's own error type
    let open = |origin: Option<&str>| {
        let mut b = tungstenite::ClientRequestBuilder::new(url(&ours).parse().unwrap())
            .with_header("Cookie", cookie.clone());
        if let Some(o) = origin {
            b = b.with_header("Origin", o);
        }
        tungstenite::client::client(b, common::connect(d.port))
    };
    for foreign in [Some("https://evil.example"), None] {
        match open(foreign) {
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                assert_eq!(r.status().as_u16(), 403, "origin {foreign:?}")
            }
            Ok(_) => panic!("a cookie WebSocket from origin {foreign:?} was opened"),
            Err(e) => panic!("origin {foreign:?}: {e}"),
        }
    }
    assert!(common::instance_pids(&ours)
        .iter()
        .all(|p| !cmdline(*p).contains("5151")));
    let (mut ws, _) = open(Some(&origin(&d))).expect("the console's own WebSocket");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !common::instance_pids(&ours)
        .iter()
        .any(|p| cmdline(*p).contains("5151"))
    {
        assert!(Instant::now() < deadline, "the session's command never ran");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The page's metrics stream rides on the cookie too (and ends with the login).
    let metrics_url = format!("wss://{}/v1/instances/{ours}/metrics/ws", host(&d));
    let b = tungstenite::ClientRequestBuilder::new(metrics_url.parse().unwrap())
        .with_header("Cookie", cookie.clone())
        .with_header("Origin", origin(&d));
    let (mut mws, _) =
        tungstenite::client::client(b, common::connect(d.port)).expect("the metrics stream");
    match mws.read() {
        Ok(tungstenite::Message::Text(t)) => assert!(t.contains("\"histories\""), "{t}"),
        other => panic!("the metrics stream's first message: {other:?}"),
    }

    // Logout: the cookie is cleared, the session is dead for whoever copied it, and the
    // terminal it opened is closed.
    let (status, _, _) = call(
        &d,
        "DELETE",
        "/v1/sessions/current",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(
        status, 403,
        "a logout without the CSRF header (a cross-site logout)"
    );
    let (status, head, _) = call(
        &d,
        "DELETE",
        "/v1/sessions/current",
        &[("Cookie", &cookie), ("x-gpuvisor-csrf", "1")],
        "",
    );
    assert_eq!(status, 204);
    assert!(header(&head, "set-cookie").unwrap().contains("max-age=0"));
    let (status, head, _) = call(&d, "GET", "/v1/instances", &[("Cookie", &cookie)], "");
    assert_eq!(status, 401, "a logged-out session still works");
    assert!(
        header(&head, "set-cookie").is_some_and(|c| c.contains("max-age=0")),
        "a dead cookie is not cleared"
    );
    // A browser still holding the dead cookie loads the page and logs in again.
    let (status, _, _) = call(&d, "GET", "/", &[("Cookie", &cookie)], "");
    assert_eq!(status, 200, "the page with a dead cookie");
    let (status, _, body) = call(
        &d,
        "POST",
        "/v1/sessions",
        &[("Cookie", &cookie)],
        &serde_json::json!({ "api_key": acme }).to_string(),
    );
    assert_eq!(status, 200, "a login with a dead cookie: {}", text(&body));
    let closed = closed_reason(&mut ws, Duration::from_secs(8));
    assert!(
        closed.contains("login that opened it ended"),
        "the terminal opened by the session was not closed at logout: {closed:?}"
    );
    let closed = closed_reason(&mut mws, Duration::from_secs(8));
    assert!(
        closed.contains("login that opened it ended"),
        "the metrics stream opened by the session was not closed at logout: {closed:?}"
    );

    // A key holds at most 16 sessions: the 17th login ends the oldest.
    let (first, _) = login(&d, &acme);
    for _ in 0..16 {
        login(&d, &acme);
    }
    let (status, _, _) = call(&d, "GET", "/v1/instances", &[("Cookie", &first)], "");
    assert_eq!(status, 401, "a 17th login left the oldest session alive");

    // Revoking the key ends its sessions.
    let k = d.json(&["key", "create", "--tenant", "acme", "--role", "member"]);
    let (cookie2, who2) = login(&d, k["secret"].as_str().unwrap());
    let (status, _, _) = call(&d, "GET", "/v1/instances", &[("Cookie", &cookie2)], "");
    assert_eq!(status, 200);
    d.json(&["key", "revoke", who2["key_id"].as_str().unwrap()]);
    let (status, _, _) = call(&d, "GET", "/v1/instances", &[("Cookie", &cookie2)], "");
    assert_eq!(status, 401, "a revoked key's session still works");
}

/// The page, its files and the login answer while keyless requests hold every place in flight
/// (a slow body each): they take no place, or one of the address's own logins.
#[test]
fn the_page_and_the_login_answer_while_keyless_requests_fill_their_pool() {
    let _s = serial();
    let d = Daemon::start(&["--requests-per-key", "1"]);
    // One keyless request holds the pool's only place: its body never comes.
    let mut held = common::connect(d.port);
    write!(
        held,
        "POST /v1/volumes HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        host(&d)
    )
    .unwrap();
    held.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _) = call(&d, "GET", "/v1/gpus", &[], "");
        if status == 429 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the keyless pool never filled ({status})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, _, body) = call(&d, "GET", "/", &[], "");
    assert_eq!(
        status,
        200,
        "the page while the pool is full: {}",
        text(&body)
    );
    let key = d.key.clone();
    login(&d, &key);
    // Only GET and HEAD reach the page.
    let (status, _, _) = call(&d, "POST", "/", &[], "");
    assert_ne!(status, 200, "POST / answered the page");
    drop(held);
}

/// Guessing keys through the login is rate limited per address like any wrong key.
#[test]
fn wrong_logins_are_limited_per_address() {
    let _s = serial();
    let d = Daemon::start(&[
        "--auth-failures-per-minute",
        "2",
        "--auth-failure-burst",
        "3",
    ]);
    let mut limited = None;
    for i in 0..20 {
        let (status, head, _) = call(&d, "POST", "/v1/sessions", &[], r#"{"api_key":"gv_guess"}"#);
        if status == 429 {
            assert!(header(&head, "retry-after").is_some());
            limited = Some(i);
            break;
        }
        assert_eq!(status, 401);
    }
    let n = limited.expect("20 wrong logins in a row were all answered");
    assert!(
        n <= 4,
        "the limit (a burst of 3) let {n} wrong logins through"
    );
    // The right key from the same address is still let in.
    let key = d.key.clone();
    login(&d, &key);
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| text(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Reads a WebSocket until the daemon closes it: the close frame's reason ("" for none,
/// "timeout" when nothing came within `within`).
fn closed_reason(ws: &mut tungstenite::WebSocket<common::ApiStream>, within: Duration) -> String {
    ws.get_mut().tcp().set_read_timeout(Some(within)).unwrap();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(tungstenite::Message::Close(f)) => {
                return f.map(|f| f.reason.to_string()).unwrap_or_default()
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return "timeout".into()
            }
            Err(e) => return format!("error: {e}"),
        }
    }
    "timeout".into()
}

/// The console in a real browser: log in, create from a template, watch it run and its GPU
/// graph move, type in its terminal, read the API's error on a bad form, stop and terminate
/// it; axe finds no serious violation on any page; no CSP violation or console error.
/// Screenshots go to docs/console/ when `GPUVISOR_CONSOLE_SHOTS=1`.
#[test]
fn the_console_works_end_to_end_in_chromium() {
    let _s = serial();
    if browser_tools().is_none() {
        return;
    }
    let d = Daemon::start(&[]);
    d.import_busybox();
    let tpl = serde_json::json!({
        "name": "console-small",
        "image": "busybox",
        "gpus": 1,
        "vcpus": 1,
        "memory": 134217728u64,
        "container_disk": 134217728u64,
        "command": ["sleep", "1000000"],
    });
    let (status, _, body) = call(
        &d,
        "POST",
        "/v1/templates",
        &[("x-api-key", &d.key)],
        &tpl.to_string(),
    );
    assert_eq!(status, 200, "template: {}", text(&body));
    // A hot GPU (simulated): its thermal event shows on the GPUs page.
    std::fs::write(d.data().join("dev").join("nvidia0.fault"), "temp=97\n").unwrap();
    console_e2e(
        &d,
        &[
            ("GV_SCENARIO", "container"),
            ("GV_TEMPLATE", "console-small"),
            ("GV_EXPECT_GPU_EVENT", "thermal"),
        ],
    );
}
