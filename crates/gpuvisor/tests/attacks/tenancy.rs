//! Attacks through the API with a tenant's key: reading or touching another tenant's objects on
//! any route, exceeding quotas, choosing a priority to take a neighbour's GPU, setting
//! platform-owned environment, and a `--wait` that spins the daemon.

use crate::common::{free_port, serial, Daemon, BIN};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One raw HTTP/1.0 request: (status, body).
fn http(port: u16, method: &str, path: &str, key: &str, body: Option<&str>) -> (u16, String) {
    let mut s = crate::common::connect(port);
    s.tcp()
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: x\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let buf = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// A tenant and a user key for it.
fn tenant(d: &Daemon, name: &str) -> String {
    d.json(&["tenant", "create", name]);
    let k = d.json(&["key", "create", "--tenant", name]);
    k["secret"].as_str().unwrap().to_string()
}

/// The expected status for (owner, other tenant, admin), and the request body.
struct Row {
    owner: u16,
    other: u16,
    admin: u16,
    body: Option<String>,
}

/// A well-formed migration offer the admin's call refuses (its instance id is not one).
const OFFER: &str = r#"{"migration":"m","from_node":"n","instance":"NOT-AN-ID","tenant":"owner","address":"10.88.0.2","create":{"image":"busybox","vcpus":1,"memory":67108864,"container_disk":67108864,"runtime":"vm"},"image_digest":"sha256:00","vm":{}}"#;

fn row(owner: u16, other: u16, admin: u16) -> Row {
    Row {
        owner,
        other,
        admin,
        body: None,
    }
}

fn with(mut r: Row, body: &str) -> Row {
    r.body = Some(body.to_string());
    r
}

/// Fails unless `rows` ("METHOD /path") are exactly the router's routes (`gpuvisor routes`,
/// built with the router): a new route fails the `table` test until it has a row.
fn covers_every_route(rows: &[String], table: &str) {
    let out = Command::new(BIN).arg("routes").output().unwrap();
    assert!(out.status.success());
    let routes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert!(routes.len() > 20, "{routes:?}");
    for r in &routes {
        assert!(
            rows.contains(r),
            "route {r} has no row in the {table} table: add one"
        );
    }
    for r in rows {
        assert!(
            routes.contains(r),
            "row {r} of the {table} table names no route"
        );
    }
}

/// The owner's objects the routes name.
struct Objs {
    /// Its instance.
    id: String,
    /// A key of its tenant.
    key: String,
    gpu: String,
    /// Its serverless endpoint and a job queued there.
    ep: String,
    job: String,
    /// Its snapshot's id.
    snap: String,
}

/// A daemon with the serverless worker API on (its own port), so endpoints can be made.
fn daemon() -> Daemon {
    Daemon::start(&["--worker-port", &free_port().to_string()])
}

/// The owner's endpoint (from its template `ownertpl`) and a job on it.
fn endpoint_and_job(d: &Daemon, owner: &str) -> (String, String) {
    let ep = d.json_as(
        owner,
        &[
            "endpoint",
            "create",
            "ownerep",
            "--template",
            "ownertpl",
            "--workers-max",
            "1",
        ],
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, body) = http(
        d.port,
        "POST",
        &format!("/v2/{ep}/run"),
        owner,
        Some(r#"{"input":{"x":1}}"#),
    );
    assert_eq!(code, 200, "{body}");
    let job: Value = serde_json::from_str(&body).unwrap();
    (ep, job["id"].as_str().unwrap().to_string())
}

/// A route template with the test's objects in it: the owner's instance, a key of the owner's
/// tenant, a GPU, the owner's volume `ownervol`, the tenant `owner`, its endpoint and job, its
/// snapshot (by id).
fn concrete(template: &str, o: &Objs) -> String {
    let (id, key, gpu) = (o.id.as_str(), o.key.as_str(), o.gpu.as_str());
    let p = template.to_string();
    if template.starts_with("/v2/") {
        let p = p.replace("{endpoint}", &o.ep).replace("{job}", &o.job);
        // runsync answers once the job ends or the wait is over: not the default 90 s here.
        return if p.ends_with("/runsync") {
            format!("{p}?wait=1000")
        } else {
            p
        };
    }
    if template.starts_with("/v1/endpoints/") {
        return p.replace("{id}", &o.ep);
    }
    if template.starts_with("/v1/snapshots/") {
        return p.replace("{snap}", &o.snap);
    }
    if template.starts_with("/v1/keys/") {
        p.replace("{id}", key)
    } else if template.starts_with("/v1/gpus/") {
        p.replace("{id}", gpu).replace("{gi}", "1")
    } else if template.starts_with("/v1/images/pulls/") {
        p.replace("{id}", "pull-000000000000")
    } else if template.starts_with("/v1/images/") {
        p.replace("{name}", "busybox")
    } else if template.starts_with("/v1/registries/") {
        p.replace("{host}", "reg.example:5000")
    } else if template.starts_with("/v1/volumes/") {
        p.replace("{name}", "ownervol")
    } else if template.starts_with("/v1/tenants/") {
        p.replace("{name}", "owner")
    } else if template.starts_with("/v1/templates/") {
        p.replace("{name}", "ownertpl")
    } else if template.starts_with("/v1/migrations/") {
        p.replace("{id}", "000000000000")
            .replace("{channel}", "state")
    } else {
        p.replace("{id}", id)
    }
}

/// Every route the router has, asked as the owner of the objects it names, as another tenant
/// and as an admin. The table is checked against `gpuvisor routes` (built with the router), so
/// a new route fails this test until it has a row. The other tenant must also never see the
/// owner's instance id or volume name in any answer.
#[test]
fn every_route_is_scoped_by_tenant() {
    let _s = serial();
    let d = daemon();
    d.import_busybox();
    let owner = tenant(&d, "owner");
    let other = tenant(&d, "other");
    let admin = d.key.clone();
    d.json_as(&owner, &["volume", "create", "ownervol", "--size", "16MiB"]);
    d.json_as(
        &owner,
        &["template", "create", "ownertpl", "--image", "busybox"],
    );
    let id = d.create_as(
        &owner,
        &[
            "--gpu-fraction",
            "0.5",
            "--memory",
            "64MiB",
            "--container-disk",
            "64MiB",
            "--",
            "sleep",
            "1000000",
        ],
    );
    // A key of the owner's tenant that an admin may revoke.
    let spare = d.json(&["key", "create", "--tenant", "owner"]);
    let spare_id = spare["key"]["id"].as_str().unwrap().to_string();
    let gpu = d.json(&["gpu", "list"])[0]["uuid"]
        .as_str()
        .unwrap()
        .to_string();

    let (ep, job) = endpoint_and_job(&d, &owner);
    // Two snapshots of the owner's instance: one read and removed by id, one restored from.
    let snap = d.json_as(&owner, &["instance", "snapshot", &id, "ownersnap"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.json_as(&owner, &["instance", "snapshot", &id, "ownersnap2"]);
    let objs = Objs {
        id: id.clone(),
        key: spare_id.clone(),
        gpu: gpu.clone(),
        ep,
        job,
        snap,
    };

    // Rows in the order they run; each runs as other, then admin, then owner.
    let mut table: Vec<(&str, &str, Row)> = vec![
        ("GET", "/v1/health", row(200, 200, 200)),
        ("GET", "/openapi.json", row(200, 200, 200)),
        // The console's login: a wrong key is refused for everyone; with an API key (not a
        // session cookie) there is no session to show or end.
        (
            "POST",
            "/v1/sessions",
            with(row(401, 401, 401), r#"{"api_key":"gv_wrong"}"#),
        ),
        ("GET", "/v1/sessions/current", row(400, 400, 400)),
        ("DELETE", "/v1/sessions/current", row(400, 400, 400)),
        ("GET", "/v1/tenants", row(200, 200, 200)),
        (
            "POST",
            "/v1/tenants",
            with(row(403, 403, 200), r#"{"name":"made-by-admin"}"#),
        ),
        ("GET", "/v1/tenants/{name}", row(200, 404, 200)),
        (
            "PUT",
            "/v1/tenants/{name}/policy",
            with(row(403, 403, 200), r#"{"max_instances":10}"#),
        ),
        // A member is no tenant admin; the admin may set them (within its own policy).
        (
            "PUT",
            "/v1/tenants/{name}/limits",
            with(row(403, 403, 200), r#"{"max_instances":5}"#),
        ),
        // The owner still owns an instance and a volume: the admin passes authorisation and is
        // refused (409) without --cascade.
        ("DELETE", "/v1/tenants/{name}", row(403, 403, 409)),
        ("GET", "/v1/keys", row(200, 200, 200)),
        (
            "POST",
            "/v1/keys",
            with(row(403, 403, 200), r#"{"tenant":"owner","role":"user"}"#),
        ),
        ("DELETE", "/v1/keys/{id}", row(403, 403, 200)),
        ("GET", "/v1/gpus", row(200, 200, 200)),
        ("GET", "/v1/gpu-types", row(200, 200, 200)),
        ("GET", "/v1/usage", row(200, 200, 200)),
        ("GET", "/v1/templates", row(200, 200, 200)),
        // The owner's template: the other tenant does not find it, nor the admin by name (a
        // name resolves in the caller's tenant, then among the public ones).
        ("GET", "/v1/templates/{name}", row(200, 404, 404)),
        (
            "POST",
            "/v1/templates",
            with(row(200, 200, 200), r#"{"name":"t-new","image":"busybox"}"#),
        ),
        // Serverless: the other tenant cannot tell the owner's endpoint or job exists; a new
        // endpoint is its caller's tenant's, from a template that tenant sees (the owner's
        // private template is not the admin's).
        ("GET", "/v1/endpoints", row(200, 200, 200)),
        (
            "POST",
            "/v1/endpoints",
            with(
                row(200, 404, 404),
                r#"{"name":"ep-new","template":"ownertpl"}"#,
            ),
        ),
        ("GET", "/v1/endpoints/{id}", row(200, 404, 200)),
        (
            "PATCH",
            "/v1/endpoints/{id}",
            with(row(200, 404, 200), r#"{"workers_max":2}"#),
        ),
        (
            "POST",
            "/v2/{endpoint}/run",
            with(row(200, 404, 200), r#"{"input":{"y":2}}"#),
        ),
        (
            "POST",
            "/v2/{endpoint}/runsync",
            with(row(200, 404, 200), r#"{"input":{"y":3}}"#),
        ),
        ("GET", "/v2/{endpoint}/status/{job}", row(200, 404, 200)),
        ("POST", "/v2/{endpoint}/status/{job}", row(200, 404, 200)),
        ("GET", "/v2/{endpoint}/stream/{job}", row(200, 404, 200)),
        ("POST", "/v2/{endpoint}/stream/{job}", row(200, 404, 200)),
        ("GET", "/v2/{endpoint}/health", row(200, 404, 200)),
        // The job is queued or running: cancelled by the admin, then not retried (only a
        // failed or timed-out job is).
        ("POST", "/v2/{endpoint}/cancel/{job}", row(200, 404, 200)),
        ("POST", "/v2/{endpoint}/retry/{job}", row(409, 404, 409)),
        ("POST", "/v2/{endpoint}/purge-queue", row(200, 404, 200)),
        // The admin removes it; the owner then finds nothing.
        ("DELETE", "/v1/endpoints/{id}", row(404, 404, 200)),
        ("DELETE", "/v1/templates/{name}", row(200, 404, 404)),
        // Simulated GPUs cannot be bound: the admin passes authorisation and gets 409.
        ("POST", "/v1/gpus/{id}/bind-vfio", row(403, 403, 409)),
        ("POST", "/v1/gpus/{id}/release", row(403, 403, 409)),
        (
            "POST",
            "/v1/gpus/{id}/cordon",
            with(row(403, 403, 200), r#"{"reason":"test"}"#),
        ),
        ("DELETE", "/v1/gpus/{id}/cordon", row(403, 403, 200)),
        // No MIG control on this host: the admin passes authorisation and gets 422.
        ("GET", "/v1/gpus/{id}/mig", row(403, 403, 422)),
        (
            "POST",
            "/v1/gpus/{id}/mig",
            with(row(403, 403, 422), r#"{"profile":"1g.10gb"}"#),
        ),
        ("DELETE", "/v1/gpus/{id}/mig/{gi}", row(403, 403, 422)),
        ("GET", "/metrics", row(403, 403, 200)),
        ("GET", "/v1/gpus/stats", row(200, 200, 200)),
        // The host's preflight describes the host: the admin's.
        ("GET", "/v1/host/checks", row(403, 403, 200)),
        // The GPUs' XID and thermal events describe the host too (a driver's detail may
        // name a process): the admin's.
        ("GET", "/v1/gpus/events", row(403, 403, 200)),
        ("GET", "/v1/gpus/{id}/metrics", row(200, 200, 200)),
        ("GET", "/v1/instances/{id}/metrics", row(200, 404, 200)),
        ("GET", "/v1/images", row(200, 200, 200)),
        (
            "POST",
            "/v1/images",
            with(row(403, 403, 400), r#"{"path":"/nonexistent","name":"x"}"#),
        ),
        // Tenants remove only their own (pulled) images: the public one is not theirs.
        ("DELETE", "/v1/images/{name}", row(404, 404, 409)),
        // Uploads are an admin's (no name given: refused after authorisation).
        ("POST", "/v1/images/upload", row(403, 403, 400)),
        // busybox is public already.
        ("POST", "/v1/images/{name}/publish", row(403, 403, 409)),
        // Every caller may start a pull (it fails later: nothing listens there).
        (
            "POST",
            "/v1/images/pulls",
            with(
                row(200, 200, 200),
                r#"{"reference":"127.0.0.1:9/none/none:x","name":"nothing"}"#,
            ),
        ),
        ("GET", "/v1/images/pulls/{id}", row(404, 404, 404)),
        ("GET", "/v1/registries", row(200, 200, 200)),
        // Each caller stores its own login; each removes only its own.
        (
            "POST",
            "/v1/registries",
            with(
                row(200, 200, 200),
                r#"{"host":"reg.example:5000","username":"u","password":"p"}"#,
            ),
        ),
        ("DELETE", "/v1/registries/{host}", row(200, 200, 200)),
        ("GET", "/v1/volumes", row(200, 200, 200)),
        // Each caller makes its own volume: names are per tenant.
        (
            "POST",
            "/v1/volumes",
            with(row(200, 200, 200), r#"{"name":"v2","size":16777216}"#),
        ),
        ("GET", "/v1/instances", row(200, 200, 200)),
        // Authorised, then refused for size: nobody is stopped from asking.
        (
            "POST",
            "/v1/instances",
            with(
                row(422, 422, 422),
                r#"{"image":"busybox","vcpus":1,"memory":1099511627776000,"container_disk":67108864}"#,
            ),
        ),
        ("GET", "/v1/instances/{id}", row(200, 404, 200)),
        ("GET", "/v1/instances/{id}/logs", row(200, 404, 200)),
        (
            "POST",
            "/v1/instances/{id}/exec",
            with(row(200, 404, 200), r#"{"command":["true"]}"#),
        ),
        // Interactive exec: a WebSocket, asked here without an upgrade or a request: the
        // owner and the admin get past tenancy to the bad request, the other tenant does not.
        ("GET", "/v1/instances/{id}/exec/ws", row(400, 404, 400)),
        // The console of a container: the owner and the admin are told it has none.
        ("GET", "/v1/instances/{id}/console/ws", row(400, 404, 400)),
        // The graphical console of a container: likewise.
        ("GET", "/v1/instances/{id}/vnc/ws", row(400, 404, 400)),
        // The metrics stream: likewise, without an upgrade.
        ("GET", "/v1/instances/{id}/metrics/ws", row(400, 404, 400)),
        ("GET", "/v1/instances/{id}/events", row(200, 404, 200)),
        // Snapshots: the other tenant cannot tell the owner's exists. The name is taken: the
        // owner and the admin (a snapshot is its instance's tenant's) get past tenancy to the
        // clash.
        ("GET", "/v1/snapshots", row(200, 200, 200)),
        ("GET", "/v1/snapshots/{snap}", row(200, 404, 200)),
        (
            "POST",
            "/v1/instances/{id}/snapshots",
            with(row(409, 404, 409), r#"{"name":"ownersnap"}"#),
        ),
        // The audit log: a tenant admin's or an admin's (the owner's key is a member's).
        ("GET", "/v1/audit", row(403, 403, 200)),
        ("GET", "/v1/audit/verify", row(403, 403, 200)),
        // The owner's volume is not the other tenant's or the admin's to remove.
        ("DELETE", "/v1/volumes/{name}", row(200, 404, 404)),
        // By id: the admin removes it; the owner then finds nothing.
        ("DELETE", "/v1/snapshots/{snap}", row(404, 404, 200)),
        (
            "POST",
            "/v1/instances/{id}/scale",
            with(row(200, 404, 200), r#"{"memory":67108864}"#),
        ),
        // A link to a port: the other tenant cannot tell the instance exists; the owner and
        // the admin get past tenancy to "the proxy is off" (this daemon runs without it).
        (
            "POST",
            "/v1/instances/{id}/links",
            with(row(422, 404, 422), r#"{"port":8080}"#),
        ),
        (
            "POST",
            "/graphql",
            with(
                row(200, 200, 200),
                r#"{"query":"{ instances { id name } }"}"#,
            ),
        ),
        ("GET", "/graphql", row(400, 400, 400)),
        // Stopped, rolled back and started again (by the admin, then by the owner); the
        // snapshot's name resolves in the instance's tenant.
        (
            "POST",
            "/v1/instances/{id}/restore",
            with(row(200, 404, 200), r#"{"snapshot":"ownersnap2"}"#),
        ),
        // Live migration is the admin's (host maintenance): tenants are refused before any
        // lookup; the admin gets past it to "only VMs migrate" (the instance is a container).
        (
            "POST",
            "/v1/instances/{id}/migrate",
            with(row(403, 403, 400), r#"{"max_downtime_ms":300}"#),
        ),
        // Receiving a live migration is a peer daemon's, with an admin key: tenants are refused
        // before anything; the admin gets past it to the refusal of an empty offer, to an
        // unknown migration, and (the channel, asked without an upgrade) to the bad request.
        ("POST", "/v1/migrations", with(row(403, 403, 400), OFFER)),
        ("GET", "/v1/migrations/{id}", row(403, 403, 200)),
        ("POST", "/v1/migrations/{id}/run", row(403, 403, 404)),
        ("DELETE", "/v1/migrations/{id}", row(403, 403, 200)),
        (
            "GET",
            "/v1/migrations/{id}/channels/{channel}",
            row(403, 403, 400),
        ),
        ("POST", "/v1/instances/{id}/start", row(200, 404, 200)),
        ("POST", "/v1/instances/{id}/stop", row(200, 404, 200)),
        ("DELETE", "/v1/instances/{id}", row(200, 404, 200)),
    ];

    // The table covers exactly the router's routes.
    let rows: Vec<String> = table.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
    covers_every_route(&rows, "tenancy");

    let mut failures = Vec::new();
    for (method, template, r) in table.drain(..) {
        let path = || concrete(template, &objs);
        for (who, key, want) in [
            ("other", &other, r.other),
            ("admin", &admin, r.admin),
            ("owner", &owner, r.owner),
        ] {
            let p = path();
            let (got, body) = http(d.port, method, &p, key, r.body.as_deref());
            if got != want {
                failures.push(format!("{method} {p} as {who}: {got}, want {want}: {body}"));
            }
            // A 404 may echo the id the caller sent; anything else must not show it.
            let echoed = p.contains(&id) || p.contains("ownervol");
            if who == "other" && !echoed && (body.contains(&id) || body.contains("ownervol")) {
                failures.push(format!(
                    "{method} {p} as other tenant leaks the owner's objects: {body}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every route × every role, with keys of the owner's tenant (the admin's key is the
/// system's): `Y` must get past authorisation (any answer but 401 and 403), `N` must be refused
/// with 403 and the operation named. The table is checked against the router's routes.
#[test]
fn every_route_by_role() {
    let _s = serial();
    let d = daemon();
    d.import_busybox();
    let member = tenant(&d, "owner");
    let key = |role: &str| {
        let k = d.json(&["key", "create", "--tenant", "owner", "--role", role]);
        assert_eq!(k["key"]["role"], role, "{k}");
        k["secret"].as_str().unwrap().to_string()
    };
    let keys = [
        ("admin", d.key.clone()),
        ("tenant-admin", key("tenant-admin")),
        ("member", member.clone()),
        ("viewer", key("viewer")),
        ("metrics", key("metrics")),
    ];
    d.json_as(
        &member,
        &["volume", "create", "ownervol", "--size", "16MiB"],
    );
    d.json_as(
        &member,
        &["template", "create", "ownertpl", "--image", "busybox"],
    );
    let id = d.create_as(
        &member,
        &[
            "--memory",
            "64MiB",
            "--container-disk",
            "64MiB",
            "--",
            "sleep",
            "1000000",
        ],
    );
    let spare = d.json(&["key", "create", "--tenant", "owner"]);
    let spare_id = spare["key"]["id"].as_str().unwrap().to_string();
    let gpu = d.json(&["gpu", "list"])[0]["uuid"]
        .as_str()
        .unwrap()
        .to_string();
    let (ep, job) = endpoint_and_job(&d, &member);
    let objs = Objs {
        id: id.clone(),
        key: spare_id.clone(),
        gpu: gpu.clone(),
        ep,
        job,
        // No such snapshot: an allowed role gets 404, a refused one 403 before the lookup.
        snap: "0123456789abcdef0123456789abcdef".into(),
    };
    // (method, route, body, [admin, tenant-admin, member, viewer, metrics]); destructive rows
    // last.
    let (y, n) = (true, false);
    let read = [y, y, y, y, n];
    let operate = [y, y, y, n, n];
    let admin = [y, n, n, n, n];
    let table: Vec<(&str, &str, Option<&str>, [bool; 5])> = vec![
        ("GET", "/v1/health", None, [y; 5]),
        ("GET", "/openapi.json", None, [y; 5]),
        // No body: every role reaches the handler's bad request (a login needs no key).
        ("POST", "/v1/sessions", None, [y; 5]),
        ("GET", "/v1/sessions/current", None, [y; 5]),
        ("DELETE", "/v1/sessions/current", None, [y; 5]),
        ("GET", "/v1/tenants", None, read),
        ("POST", "/v1/tenants", Some(r#"{"name":"by-role"}"#), admin),
        ("GET", "/v1/tenants/{name}", None, read),
        (
            "PUT",
            "/v1/tenants/{name}/policy",
            Some(r#"{"max_instances":10}"#),
            admin,
        ),
        (
            "PUT",
            "/v1/tenants/{name}/limits",
            Some(r#"{"max_instances":5}"#),
            [y, y, n, n, n],
        ),
        ("GET", "/v1/keys", None, read),
        (
            "POST",
            "/v1/keys",
            Some(r#"{"tenant":"owner","role":"viewer"}"#),
            [y, y, n, n, n],
        ),
        ("GET", "/v1/gpus", None, read),
        ("GET", "/v1/gpu-types", None, read),
        ("GET", "/v1/usage", None, read),
        ("GET", "/v1/templates", None, read),
        ("GET", "/v1/templates/{name}", None, read),
        (
            "POST",
            "/v1/templates",
            Some(r#"{"name":"role-t","image":"busybox"}"#),
            operate,
        ),
        ("DELETE", "/v1/templates/{name}", None, operate),
        ("POST", "/v1/gpus/{id}/bind-vfio", None, admin),
        ("POST", "/v1/gpus/{id}/release", None, admin),
        (
            "POST",
            "/v1/gpus/{id}/cordon",
            Some(r#"{"reason":"t"}"#),
            admin,
        ),
        ("DELETE", "/v1/gpus/{id}/cordon", None, admin),
        ("GET", "/v1/gpus/{id}/mig", None, admin),
        (
            "POST",
            "/v1/gpus/{id}/mig",
            Some(r#"{"profile":"1g.10gb"}"#),
            admin,
        ),
        ("DELETE", "/v1/gpus/{id}/mig/{gi}", None, admin),
        ("GET", "/metrics", None, [y, n, n, n, y]),
        ("GET", "/v1/gpus/stats", None, read),
        ("GET", "/v1/host/checks", None, admin),
        ("GET", "/v1/gpus/events", None, admin),
        ("GET", "/v1/gpus/{id}/metrics", None, read),
        ("GET", "/v1/instances/{id}/metrics", None, read),
        ("GET", "/v1/images", None, read),
        (
            "POST",
            "/v1/images",
            Some(r#"{"path":"/nonexistent","name":"x"}"#),
            admin,
        ),
        ("POST", "/v1/images/upload", None, admin),
        ("POST", "/v1/images/{name}/publish", None, admin),
        (
            "POST",
            "/v1/images/pulls",
            Some(r#"{"reference":"127.0.0.1:9/none/none:x","name":"nothing"}"#),
            operate,
        ),
        ("GET", "/v1/images/pulls/{id}", None, read),
        ("GET", "/v1/registries", None, read),
        (
            "POST",
            "/v1/registries",
            Some(r#"{"host":"reg.example:5000","username":"u","password":"p"}"#),
            operate,
        ),
        ("DELETE", "/v1/registries/{host}", None, operate),
        ("GET", "/v1/volumes", None, read),
        (
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"v2","size":16777216}"#),
            operate,
        ),
        ("GET", "/v1/instances", None, read),
        (
            "POST",
            "/v1/instances",
            Some(
                r#"{"image":"busybox","vcpus":1,"memory":1099511627776000,"container_disk":67108864}"#,
            ),
            operate,
        ),
        ("GET", "/v1/instances/{id}", None, read),
        ("GET", "/v1/instances/{id}/logs", None, read),
        (
            "POST",
            "/v1/instances/{id}/exec",
            Some(r#"{"command":["true"]}"#),
            operate,
        ),
        ("GET", "/v1/instances/{id}/exec/ws", None, operate),
        ("GET", "/v1/instances/{id}/console/ws", None, operate),
        ("GET", "/v1/instances/{id}/vnc/ws", None, operate),
        ("GET", "/v1/instances/{id}/metrics/ws", None, read),
        ("GET", "/v1/instances/{id}/events", None, read),
        ("GET", "/v1/snapshots", None, read),
        ("GET", "/v1/snapshots/{snap}", None, read),
        // An invalid name and an unknown snapshot: allowed roles get past authorisation to
        // the refusal, and nothing is copied or stopped.
        (
            "POST",
            "/v1/instances/{id}/snapshots",
            Some(r#"{"name":"Not A Name"}"#),
            operate,
        ),
        (
            "POST",
            "/v1/instances/{id}/restore",
            Some(r#"{"snapshot":"nosuch"}"#),
            operate,
        ),
        ("DELETE", "/v1/snapshots/{snap}", None, operate),
        ("POST", "/v1/instances/{id}/migrate", Some(r#"{}"#), admin),
        ("POST", "/v1/migrations", Some(OFFER), admin),
        ("GET", "/v1/migrations/{id}", None, admin),
        ("POST", "/v1/migrations/{id}/run", None, admin),
        ("DELETE", "/v1/migrations/{id}", None, admin),
        ("GET", "/v1/migrations/{id}/channels/{channel}", None, admin),
        (
            "POST",
            "/v1/instances/{id}/scale",
            Some(r#"{"memory":67108864}"#),
            operate,
        ),
        (
            "POST",
            "/v1/instances/{id}/links",
            Some(r#"{"port":8080}"#),
            operate,
        ),
        // Each GraphQL field's roles: tests/graphql.rs, every_graphql_field_by_role.
        (
            "POST",
            "/graphql",
            Some(r#"{"query":"{ __typename }"}"#),
            [y; 5],
        ),
        ("GET", "/graphql", None, [y; 5]),
        ("GET", "/v1/audit", None, [y, y, n, n, n]),
        ("GET", "/v1/audit/verify", None, admin),
        ("GET", "/v1/endpoints", None, read),
        (
            "POST",
            "/v1/endpoints",
            Some(r#"{"name":"ep-role","template":"ownertpl"}"#),
            operate,
        ),
        ("GET", "/v1/endpoints/{id}", None, read),
        (
            "PATCH",
            "/v1/endpoints/{id}",
            Some(r#"{"workers_max":2}"#),
            operate,
        ),
        (
            "POST",
            "/v2/{endpoint}/run",
            Some(r#"{"input":{}}"#),
            operate,
        ),
        (
            "POST",
            "/v2/{endpoint}/runsync",
            Some(r#"{"input":{}}"#),
            operate,
        ),
        ("GET", "/v2/{endpoint}/status/{job}", None, read),
        ("POST", "/v2/{endpoint}/status/{job}", None, read),
        ("GET", "/v2/{endpoint}/stream/{job}", None, read),
        ("POST", "/v2/{endpoint}/stream/{job}", None, read),
        ("GET", "/v2/{endpoint}/health", None, read),
        ("POST", "/v2/{endpoint}/cancel/{job}", None, operate),
        ("POST", "/v2/{endpoint}/retry/{job}", None, operate),
        ("POST", "/v2/{endpoint}/purge-queue", None, operate),
        ("DELETE", "/v1/endpoints/{id}", None, operate),
        ("DELETE", "/v1/images/{name}", None, operate),
        ("DELETE", "/v1/keys/{id}", None, [y, y, n, n, n]),
        ("POST", "/v1/instances/{id}/stop", None, operate),
        ("POST", "/v1/instances/{id}/start", None, operate),
        ("DELETE", "/v1/tenants/{name}", None, admin),
        ("DELETE", "/v1/volumes/{name}", None, operate),
        ("DELETE", "/v1/instances/{id}", None, operate),
    ];
    let rows: Vec<String> = table
        .iter()
        .map(|(m, p, _, _)| format!("{m} {p}"))
        .collect();
    covers_every_route(&rows, "role");
    let mut failures = Vec::new();
    for (method, template, body, want) in &table {
        let path = concrete(template, &objs);
        // Refused roles first: an allowed one may change what the next one finds.
        let mut order: Vec<usize> = (0..5).collect();
        order.sort_by_key(|i| want[*i]);
        for i in order {
            let (role, key) = &keys[i];
            let (got, answer) = http(d.port, method, &path, key, *body);
            // Allowed: any answer of the operation itself (422: no MIG on this host), not a
            // refusal, a limit or a crash.
            let refused = matches!(got, 0 | 401 | 403 | 429 | 500);
            if want[i] && refused {
                failures.push(format!(
                    "{method} {path} as {role}: refused ({got}): {answer}"
                ));
            } else if !want[i] && (got != 403 || !answer.contains("needs")) {
                failures.push(format!(
                    "{method} {path} as {role}: {got}, want 403: {answer}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A tenant admin manages its own tenant's lesser keys and nothing above or beside them.
#[test]
fn a_tenant_admin_cannot_mint_or_revoke_keys_above_it_or_elsewhere() {
    let _s = serial();
    let d = Daemon::start(&[]);
    tenant(&d, "acme");
    let other = tenant(&d, "other");
    let ta = d.json(&[
        "key",
        "create",
        "--tenant",
        "acme",
        "--role",
        "tenant-admin",
    ])["secret"]
        .as_str()
        .unwrap()
        .to_string();
    // Keys the admin gave the tenant above the tenant admin's station: not its to revoke.
    for role in ["admin", "metrics", "tenant-admin"] {
        let k = d.json(&["key", "create", "--tenant", "acme", "--role", role]);
        let out = d.cli_as(&ta, &["key", "revoke", k["key"]["id"].as_str().unwrap()]);
        assert!(
            !out.status.success(),
            "a tenant admin revoked a {role} key of its tenant"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("cannot revoke"),
            "{role}"
        );
    }
    // Its own tenant, lesser roles: yes; and the new key works as what it is.
    let viewer = d.json_as(
        &ta,
        &["key", "create", "--tenant", "acme", "--role", "viewer"],
    );
    assert_eq!(viewer["key"]["role"], "viewer");
    let v = viewer["secret"].as_str().unwrap();
    let out = d.cli_as(v, &["volume", "create", "x", "--size", "16MiB"]);
    assert!(!out.status.success(), "a viewer created a volume");
    assert!(String::from_utf8_lossy(&out.stderr).contains("volume.create needs"));
    // Above it, or a peer: no.
    for role in ["admin", "metrics", "tenant-admin"] {
        let out = d.cli_as(&ta, &["key", "create", "--tenant", "acme", "--role", role]);
        assert!(!out.status.success(), "a tenant admin made a {role} key");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("cannot make"),
            "{role}"
        );
    }
    // Beside it: another tenant is not found, its keys neither.
    let out = d.cli_as(
        &ta,
        &["key", "create", "--tenant", "other", "--role", "member"],
    );
    assert!(
        !out.status.success(),
        "a tenant admin made a key for another tenant"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    let others: Vec<Value> = d
        .json_as(&other, &["key", "list"])
        .as_array()
        .unwrap()
        .clone();
    let other_id = others[0]["id"].as_str().unwrap();
    let out = d.cli_as(&ta, &["key", "revoke", other_id]);
    assert!(
        !out.status.success(),
        "a tenant admin revoked another tenant's key"
    );
    assert_eq!(d.json_as(&other, &["key", "list"])[0]["revoked"], false);
    // The admin's key: not its to revoke.
    let admin_id = d
        .json(&["key", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "admin")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!d
        .cli_as(&ta, &["key", "revoke", &admin_id])
        .status
        .success());
    // Its own tenant's member key: yes.
    let m = d.json(&["key", "create", "--tenant", "acme"]);
    let mid = m["key"]["id"].as_str().unwrap();
    let revoked = d.json_as(&ta, &["key", "revoke", mid]);
    assert_eq!(revoked["revoked"], true, "{revoked}");
    let out = d.cli_as(m["secret"].as_str().unwrap(), &["instance", "list"]);
    assert!(!out.status.success(), "a revoked key still works");
}

/// Keys are not an unbounded resource (each has its own rate allowance): a tenant holds at
/// most 256 active ones; revoking one makes room.
#[test]
fn a_tenant_holds_a_bounded_number_of_keys() {
    let _s = serial();
    let d = Daemon::start(&["--mutations-per-second", "0"]);
    let first = tenant(&d, "acme");
    let mut last = String::new();
    for _ in 1..256 {
        let (status, body) = http(
            d.port,
            "POST",
            "/v1/keys",
            &d.key,
            Some(r#"{"tenant":"acme","role":"viewer"}"#),
        );
        assert_eq!(status, 200, "{body}");
        last = serde_json::from_str::<Value>(&body).unwrap()["key"]["id"]
            .as_str()
            .unwrap()
            .to_string();
    }
    let out = d.cli(&["key", "create", "--tenant", "acme"]);
    assert!(!out.status.success(), "a 257th key was made");
    assert!(String::from_utf8_lossy(&out.stderr).contains("256 active keys"));
    d.json(&["key", "revoke", &last]);
    d.json(&["key", "create", "--tenant", "acme"]);
    assert!(d.cli_as(&first, &["instance", "list"]).status.success());
}

/// A tenant admin lowers its tenant's quotas, never above what the admin allows, and the
/// stricter of the two is what creates are held to; members and other tenants cannot.
#[test]
fn a_tenant_admin_sets_quotas_within_the_admins() {
    let _s = serial();
    let d = Daemon::start(&[]);
    d.import_busybox();
    let member = tenant(&d, "acme");
    tenant(&d, "other");
    let ta = |t: &str| {
        d.json(&["key", "create", "--tenant", t, "--role", "tenant-admin"])["secret"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (mine, theirs) = (ta("acme"), ta("other"));
    d.json(&["tenant", "set", "acme", "--max-instances", "3"]);
    let err = |out: std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    let out = d.cli_as(&mine, &["tenant", "limit", "acme", "--max-instances", "5"]);
    assert!(
        !out.status.success(),
        "a tenant admin raised its quota above the admin's"
    );
    assert!(err(out).contains("above the 3"));
    let out = d.cli_as(
        &mine,
        &["tenant", "limit", "acme", "--max-priority", "high"],
    );
    assert!(
        !out.status.success(),
        "a tenant admin granted itself a priority"
    );
    assert!(!d
        .cli_as(
            &member,
            &["tenant", "limit", "acme", "--max-instances", "1"]
        )
        .status
        .success());
    let out = d.cli_as(
        &theirs,
        &["tenant", "limit", "acme", "--max-instances", "0"],
    );
    assert!(!out.status.success() && err(out).contains("not found"));
    let t = d.json_as(&mine, &["tenant", "limit", "acme", "--max-instances", "1"]);
    assert_eq!(t["limits"]["max_instances"], 1, "{t}");
    assert_eq!(t["policy"]["max_instances"], 3, "{t}");
    let small = [
        "--memory",
        "64MiB",
        "--container-disk",
        "64MiB",
        "--",
        "sleep",
        "1000000",
    ];
    d.create_as(&member, &small);
    let mut args = vec!["instance", "create", "--image", "busybox"];
    args.extend(small);
    let out = d.cli_as(&member, &args);
    assert!(
        !out.status.success(),
        "the tenant admin's limit of 1 instance was not held"
    );
    let e = err(out);
    assert!(
        e.contains("max_instances") && e.contains("quota_exceeded"),
        "{e}"
    );
    // Lifted again by the tenant admin: the admin's 3 applies.
    d.json_as(
        &mine,
        &["tenant", "limit", "acme", "--max-instances", "unlimited"],
    );
    d.create_as(&member, &small);
}

/// Every mutating call is in the audit log with who, what, on what, the result and the source;
/// reads are not; a tenant admin sees its tenant's rows only, a member none; a row edited in
/// the store behind the daemon's back is found by `audit verify`.
#[test]
fn the_audit_log_records_mutations_and_shows_an_edited_row() {
    let _s = serial();
    let mut d = Daemon::start(&[]);
    let member = tenant(&d, "acme");
    let other = tenant(&d, "other");
    let mk = |role: &str| {
        d.json(&["key", "create", "--tenant", "acme", "--role", role])["secret"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (tadmin, viewer) = (mk("tenant-admin"), mk("viewer"));
    let member_id = d
        .json(&["key", "list"])
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["tenant"] == "acme" && k["role"] == "member")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    d.json_as(&member, &["volume", "create", "v1", "--size", "16MiB"]);
    assert!(!d
        .cli_as(&viewer, &["volume", "create", "v2", "--size", "16MiB"])
        .status
        .success());
    d.json_as(&other, &["volume", "create", "w", "--size", "16MiB"]);
    d.json_as(&member, &["instance", "list"]);

    let all: Vec<Value> = d.json(&["audit", "list"]).as_array().unwrap().clone();
    let find = |role: &str, result: &str| {
        all.iter()
            .find(|r| r["op"] == "volume.create" && r["role"] == role && r["result"] == result)
            .unwrap_or_else(|| panic!("no volume.create by {role} with {result}: {all:?}"))
            .clone()
    };
    let made = find("member", "200");
    assert_eq!(made["key_id"], member_id.as_str(), "{made}");
    assert_eq!(made["tenant"], "acme");
    // What the call made is named, not only its path.
    assert_eq!(made["target"], "/v1/volumes → volume v1");
    let minted = all
        .iter()
        .find(|r| r["op"] == "key.create" && r["target"].as_str().unwrap().contains(&member_id))
        .unwrap_or_else(|| panic!("no key.create row names {member_id}: {all:?}"));
    assert!(
        minted["target"]
            .as_str()
            .unwrap()
            .ends_with("(member, tenant acme)"),
        "{minted}"
    );
    assert_eq!(made["source"], "127.0.0.1");
    let refused = find("viewer", "403");
    assert_eq!(refused["tenant"], "acme");
    assert!(all
        .iter()
        .any(|r| r["op"] == "tenant.create" && r["role"] == "admin"));
    for read in ["instance.list", "audit.list", "key.list"] {
        assert!(
            !all.iter().any(|r| r["op"] == read),
            "a read ({read}) was recorded"
        );
    }
    // Sequence numbers are consecutive.
    for w in all.windows(2) {
        assert_eq!(
            w[1]["seq"].as_i64().unwrap(),
            w[0]["seq"].as_i64().unwrap() + 1
        );
    }
    // A tenant admin: its tenant's rows; a member: none.
    let mine: Vec<Value> = d
        .json_as(&tadmin, &["audit", "list"])
        .as_array()
        .unwrap()
        .clone();
    assert!(
        !mine.is_empty() && mine.iter().all(|r| r["tenant"] == "acme"),
        "{mine:?}"
    );
    assert!(mine.iter().any(|r| r["result"] == "403"));
    assert!(!d
        .cli_as(&tadmin, &["audit", "list", "--tenant", "other"])
        .status
        .success());
    assert!(!d.cli_as(&member, &["audit", "list"]).status.success());
    let since = d.json(&["audit", "list", "--tenant", "other"]);
    assert!(
        since
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["tenant"] == "other"),
        "{since}"
    );

    let v = d.json(&["audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["rows"].as_u64().unwrap() >= all.len() as u64);
    // Turning the refusal into a success in the store is found.
    d.kill9();
    let db = d.data().join("gpuvisor.db");
    let st = Command::new("sqlite3")
        .arg(&db)
        .arg(format!(
            "UPDATE audit_log SET result = '200' WHERE seq = {}",
            refused["seq"]
        ))
        .status()
        .unwrap();
    assert!(st.success());
    d.restart();
    let out = d.cli(&["audit", "verify"]);
    assert!(!out.status.success(), "an edited row passed verification");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("row {} was changed", refused["seq"])),
        "{text}"
    );
}

/// Concurrent mutations make consecutive rows of one intact chain; a caller-chosen path is
/// kept cut short; the newest rows removed from the store behind the daemon's back show.
#[test]
fn the_audit_log_holds_under_concurrent_calls_and_shows_a_cut_tail() {
    let _s = serial();
    let mut d = Daemon::start(&[]);
    let member = tenant(&d, "acme");
    std::thread::scope(|s| {
        for t in 0..8 {
            let (d, member) = (&d, &member);
            s.spawn(move || {
                for v in 0..2 {
                    let name = format!("c{t}x{v}");
                    d.json_as(member, &["volume", "create", &name, "--size", "16MiB"]);
                }
            });
        }
    });
    let long = format!("/v1/volumes/{}", "x".repeat(400));
    let (status, _) = http(d.port, "DELETE", &long, &member, None);
    assert_eq!(status, 404);
    let all: Vec<Value> = d.json(&["audit", "list"]).as_array().unwrap().clone();
    let creates = all.iter().filter(|r| r["op"] == "volume.create").count();
    assert_eq!(creates, 16, "{all:?}");
    for w in all.windows(2) {
        assert_eq!(
            w[1]["seq"].as_i64().unwrap(),
            w[0]["seq"].as_i64().unwrap() + 1
        );
    }
    let cut = all.iter().find(|r| r["op"] == "volume.remove").unwrap();
    let target = cut["target"].as_str().unwrap();
    assert!(target.len() <= 260 && target.ends_with('…'), "{target}");
    assert_eq!(d.json(&["audit", "verify"])["ok"], true);
    // The newest row deleted in the store: the head noted outside it shows the cut.
    d.kill9();
    let st = Command::new("sqlite3")
        .arg(d.data().join("gpuvisor.db"))
        .arg("DELETE FROM audit_log WHERE seq = (SELECT MAX(seq) FROM audit_log)")
        .status()
        .unwrap();
    assert!(st.success());
    d.restart();
    let out = d.cli(&["audit", "verify"]);
    assert!(!out.status.success(), "a cut tail passed verification");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("newest rows were removed"), "{text}");
}

/// A TCP proxy that counts the HTTP requests it forwards (request lines seen client → server).
struct CountingProxy {
    port: u16,
    requests: Arc<AtomicUsize>,
}

impl CountingProxy {
    fn start(upstream: u16) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
                let count = count.clone();
                std::thread::spawn(move || {
                    let (mut c, mut up) = (c, up);
                    let mut buf = [0u8; 16384];
                    loop {
                        let n = match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let chunk = &buf[..n];
                        count.fetch_add(
                            chunk.windows(10).filter(|w| w == b" HTTP/1.1\r").count()
                                + chunk.windows(10).filter(|w| w == b" HTTP/1.0\r").count(),
                            Ordering::SeqCst,
                        );
                        if up.write_all(chunk).is_err() {
                            break;
                        }
                    }
                    let _ = up.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        CountingProxy { port, requests }
    }
}

/// `--wait` must long-poll, not spin: a stop that takes ~12 s (the container's PID 1 ignores
/// SIGTERM, so the stop grace runs out) costs a handful of requests, not thousands.
#[test]
fn wait_long_polls_instead_of_spinning() {
    let _s = serial();
    // Plain HTTP: the proxy counts request lines, which TLS would hide.
    let d = Daemon::start(&["--stop-grace", "12s", "--insecure-http"]);
    d.import_busybox();
    let id = d.create(&[
        "--memory",
        "64MiB",
        "--container-disk",
        "64MiB",
        "--",
        "sleep",
        "1000000",
    ]);
    let proxy = CountingProxy::start(d.port);
    let out = Command::new(BIN)
        .args(["instance", "stop", &id, "--wait", "--timeout", "60s"])
        .env(
            "GPUVISOR_ENDPOINT",
            format!("http://127.0.0.1:{}", proxy.port),
        )
        .env("GPUVISOR_API_KEY", &d.key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stop --wait failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inst = d.json(&["instance", "get", &id]);
    assert_eq!(inst["state"], "stopped", "{inst}");
    let n = proxy.requests.load(Ordering::SeqCst);
    // 1 stop + one long poll per 5 s slice or state change (stopping, stopped): about 5.
    assert!(n >= 2, "the proxy saw {n} requests: was it used?");
    assert!(
        n <= 10,
        "--wait sent {n} requests during a ~12 s stop: it polls"
    );
}

/// Quotas set by an admin are enforced at create, with an error that names the quota; a
/// tenant cannot raise its own.
#[test]
fn tenant_cannot_exceed_its_quotas() {
    let _s = serial();
    let d = Daemon::start(&[]);
    d.import_busybox();
    let key = tenant(&d, "capped");
    d.json(&[
        "tenant",
        "set",
        "capped",
        "--max-instances",
        "3",
        "--max-vcpus",
        "2",
        "--max-memory",
        "256MiB",
        "--max-gpu-fraction",
        "0.5",
        "--max-gpus",
        "0",
        "--max-disk",
        "512MiB",
        "--max-volumes",
        "1",
    ]);
    // The tenant cannot lift them itself.
    let out = d.cli_as(
        &key,
        &["tenant", "set", "capped", "--max-vcpus", "unlimited"],
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let small = ["--memory", "64MiB", "--container-disk", "64MiB"];
    let refused = |args: &[&str], quota: &str| {
        let mut a = vec!["instance", "create", "--image", "busybox"];
        a.extend(args);
        a.extend(["--", "sleep", "1000"]);
        let out = d.cli_as(&key, &a);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(6), "{args:?} not refused: {err}");
        assert!(
            err.contains(quota),
            "{args:?}: error does not name {quota}: {err}"
        );
    };
    refused(&["--gpus", "1", "--memory", "64MiB"], "max_gpus");
    // A fraction that rounds to a whole GPU is not a way around both GPU quotas.
    let out = d.cli_as(
        &key,
        &[
            "instance",
            "create",
            "--image",
            "busybox",
            "--gpu-fraction",
            "0.9999",
            "--",
            "true",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refused(
        &["--gpu-fraction", "0.75", "--memory", "64MiB"],
        "max_gpu_milli",
    );
    refused(&["--memory", "512MiB"], "max_memory");
    refused(
        &["--memory", "64MiB", "--container-disk", "1GiB"],
        "max_disk",
    );
    refused(
        &[
            "--memory",
            "64MiB",
            "--container-disk",
            "64MiB",
            "--volume",
            "a:/a:16MiB",
            "--volume",
            "b:/b:16MiB",
        ],
        "max_volumes",
    );
    // Nothing was made by the refusals.
    assert_eq!(
        d.json_as(&key, &["volume", "list"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        d.json_as(&key, &["instance", "list"])
            .as_array()
            .unwrap()
            .len(),
        0
    );

    let mut one = vec!["--gpu-fraction", "0.25", "--vcpus", "1"];
    one.extend(small);
    d.create_as(&key, &[one.as_slice(), &["--", "sleep", "1000"]].concat());
    d.create_as(&key, &[one.as_slice(), &["--", "sleep", "1000"]].concat());
    // Two instances hold the vCPU quota (and the fraction quota) now.
    refused(&[&small[..], &["--vcpus", "1"]].concat(), "max_vcpus");
    d.json(&["tenant", "set", "capped", "--max-instances", "2"]);
    refused(&small, "max_instances");
    // Standalone volumes count against the same quotas.
    d.json_as(&key, &["volume", "create", "v1", "--size", "16MiB"]);
    let out = d.cli_as(&key, &["volume", "create", "v2", "--size", "16MiB"]);
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_volumes"));
    let t = d.json_as(&key, &["tenant", "get", "capped"]);
    assert_eq!(t["usage"]["instances"], 2, "{t}");
    assert_eq!(t["usage"]["gpu_milli"], 500, "{t}");
    assert_eq!(t["usage"]["volumes"], 1, "{t}");
}

/// A tenant cannot choose its way past its neighbours: `--priority high` needs the right, and
/// even a granted high priority never evicts another tenant's interruptible instance unless an
/// admin allowed cross-tenant preemption (the market still may: see the next test).
#[test]
fn tenant_cannot_preempt_a_neighbour_by_choosing_a_priority() {
    let _s = serial();
    let d = Daemon::start(&[]);
    d.import_busybox();
    let victim = tenant(&d, "victim");
    let bully = tenant(&d, "bully");
    let h100 = [
        "--gpus",
        "1",
        "--gpu-model",
        "H100-80GB",
        "--memory",
        "64MiB",
        "--container-disk",
        "64MiB",
    ];
    let spot = d.create_as(
        &victim,
        &[
            &h100[..],
            &[
                "--priority",
                "low",
                "--interruptible",
                "--",
                "sleep",
                "1000000",
            ],
        ]
        .concat(),
    );
    // Spot requests at the floor: no market advantage over the victim (an on-demand request
    // or a higher bid would win by the market: a_neighbours_spot_instance_goes_to_the_market).
    let ask = |key: &str, prio: &str| {
        let mut a = vec!["instance", "create", "--image", "busybox", "--wait"];
        a.extend(h100);
        a.extend(["--priority", prio, "--interruptible", "--", "sleep", "1000"]);
        d.cli_as(key, &a)
    };
    // Not allowed to ask for high priority at all.
    let out = ask(&bully, "high");
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("max-priority"));
    // Granted high priority, still no right to evict another tenant: refused for capacity.
    d.json(&["tenant", "set", "bully", "--max-priority", "high"]);
    let out = ask(&bully, "high");
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.json(&["instance", "get", &spot])["state"], "running");
    // An admin grants cross-tenant preemption: now the spot instance is evicted.
    d.json(&["tenant", "set", "bully", "--preempt-other-tenants", "true"]);
    let out = ask(&bully, "high");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = d.json(&["instance", "get", &spot]);
    assert_ne!(v["state"], "running", "{v}");
}

/// Platform-owned environment (which GPUs, where the limiter's config is) cannot be set by a
/// user at create or exec, and the error names the variable.
#[test]
fn user_env_cannot_set_platform_variables() {
    let _s = serial();
    let d = Daemon::start(&[]);
    d.import_busybox();
    let key = tenant(&d, "envy");
    for var in [
        "GPUVISOR_LIMITER_CONFIG",
        "CUDA_VISIBLE_DEVICES",
        "NVIDIA_VISIBLE_DEVICES",
        "CUDA_MPS_PIPE_DIRECTORY",
    ] {
        let kv = format!("{var}=/tmp/x");
        let out = d.cli_as(
            &key,
            &[
                "instance", "create", "--image", "busybox", "--env", &kv, "--", "true",
            ],
        );
        assert_eq!(out.status.code(), Some(5), "{var} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var), "error does not name {var}: {err}");
    }
    assert_eq!(
        d.json_as(&key, &["instance", "list"])
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // LD_PRELOAD and LD_LIBRARY_PATH stay the user's.
    let id = d.create_as(
        &key,
        &[
            "--env",
            "LD_LIBRARY_PATH=/opt/lib",
            "--memory",
            "64MiB",
            "--",
            "sleep",
            "1000",
        ],
    );
    let out = d.cli_as(
        &key,
        &[
            "instance",
            "exec",
            &id,
            "--env",
            "GPUVISOR_LIMITER_CONFIG=/x",
            "--",
            "true",
        ],
    );
    assert_eq!(out.status.code(), Some(5));
    let p = crate::probe::allowed(&d, &id, "env of the instance", "env");
    assert!(p.out.contains("LD_LIBRARY_PATH=/opt/lib"), "{}", p.out);
    let env: BTreeMap<&str, &str> = p.out.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(env.get("GPUVISOR_INSTANCE_ID"), Some(&id.as_str()));
}

/// The daemon is never left without an admin key: revoking the last one is refused (a fuzzer
/// did exactly that); with a second admin key the first can go.
#[test]
fn the_last_admin_key_cannot_be_revoked() {
    let _s = serial();
    let mut d = Daemon::start(&[]);
    let keys = d.json(&["key", "list"]);
    let mine = keys.as_array().unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = d.cli(&["key", "revoke", &mine]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("last admin key"));
    assert!(
        d.cli(&["key", "list"]).status.success(),
        "the key still works"
    );
    let tenant = keys.as_array().unwrap()[0]["tenant"]
        .as_str()
        .unwrap()
        .to_string();
    let second = d.json(&["key", "create", "--tenant", &tenant, "--role", "admin"]);
    let second_secret = second["secret"].as_str().unwrap().to_string();
    d.json(&["key", "revoke", &mine]);
    // The harness cleans up with the admin key it holds: the live one from now on.
    d.key = second_secret.clone();
    let out = d.cli_as(
        &second_secret,
        &["key", "revoke", second["key"]["id"].as_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(d
        .cli_as(&second_secret, &["tenant", "list"])
        .status
        .success());
}

/// Across tenants the spot market applies without any right to preempt: an on-demand request
/// of a neighbour takes a spot instance's GPU, an interruptible one only by bidding more; an
/// equal bid, or a higher priority class with a lower bid, does not.
#[test]
fn a_neighbours_spot_instance_goes_to_the_market() {
    let _s = serial();
    let d = Daemon::start(&[]);
    d.import_busybox();
    let seller = tenant(&d, "seller");
    let buyer = tenant(&d, "buyer");
    d.json(&["tenant", "set", "buyer", "--max-priority", "high"]);
    let h100 = [
        "--gpus",
        "1",
        "--gpu-model",
        "H100-80GB",
        "--memory",
        "64MiB",
        "--container-disk",
        "64MiB",
    ];
    let spot = |key: &str, extra: &[&str]| {
        let mut a = vec!["instance", "create", "--image", "busybox", "--wait"];
        a.extend(h100);
        a.extend(extra);
        a.extend(["--", "sleep", "100000"]);
        d.cli_as(key, &a)
    };
    let out = spot(
        &seller,
        &["--priority", "low", "--interruptible", "--bid", "2"],
    );
    assert!(out.status.success(), "{out:?}");
    let held: Value = serde_json::from_slice(
        &d.cli_as(&seller, &["-o", "json", "instance", "list"])
            .stdout,
    )
    .unwrap();
    let victim = held[0]["id"].as_str().unwrap().to_string();
    for (what, extra) in [
        (
            "an equal bid",
            vec!["--priority", "low", "--interruptible", "--bid", "2"],
        ),
        (
            "a higher class with a lower bid",
            vec!["--priority", "high", "--interruptible", "--bid", "1.5"],
        ),
    ] {
        let out = spot(&buyer, &extra);
        assert_eq!(out.status.code(), Some(6), "{what} took the GPU: {out:?}");
        assert_eq!(
            d.json(&["instance", "get", &victim])["state"],
            "running",
            "{what}"
        );
    }
    let out = spot(
        &buyer,
        &["--priority", "low", "--interruptible", "--bid", "2.5"],
    );
    assert!(out.status.success(), "a higher bid: {out:?}");
    let v = d.json(&["instance", "get", &victim]);
    assert_eq!(v["state"], "interrupted", "{v}");
    let events = d.json(&["instance", "events", &victim]).to_string();
    assert!(
        events.contains("another tenant's instance (a higher bid"),
        "{events}"
    );
    // The buyer's spot instance, in turn, goes to the seller's on-demand request.
    let winner: Value =
        serde_json::from_slice(&d.cli_as(&buyer, &["-o", "json", "instance", "list"]).stdout)
            .unwrap();
    let winner = winner[0]["id"].as_str().unwrap().to_string();
    let out = spot(&seller, &[]);
    assert!(out.status.success(), "on demand: {out:?}");
    assert_eq!(
        d.json(&["instance", "get", &winner])["state"],
        "interrupted"
    );
}
