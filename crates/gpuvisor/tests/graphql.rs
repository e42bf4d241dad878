//! GraphQL at /graphql against a real daemon (TLS, simulated GPUs, real containers): deploy,
//! list, scale (the container's cgroup changes on the host), stop, resume, terminate; another
//! tenant's key sees and stops nothing; every root field × every role; the metrics
//! subscription over a real WebSocket speaking graphql-transport-ws; depth, complexity and
//! rate limits; the audit rows of mutations. Runs as root (CI does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{cgroup_dirs, serial, Daemon, BIN};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

/// A daemon with this suite's own network prefix and pool.
fn daemon(extra: &[&str]) -> Daemon {
    let mut a = vec!["--net-prefix", "gq", "--net-pool", "10.71.0.0/16"];
    a.extend(extra);
    let d = Daemon::start(&a);
    d.import_busybox();
    d
}

/// A tenant and a key of `role` for it.
fn key(d: &Daemon, tenant: &str, role: &str) -> String {
    if d.cli(&["tenant", "get", tenant]).status.code() != Some(0) {
        d.json(&["tenant", "create", tenant]);
    }
    d.json(&["key", "create", "--tenant", tenant, "--role", role])["secret"]
        .as_str()
        .unwrap()
        .to_string()
}

/// One raw HTTP/1.0 POST of a GraphQL request: (status, body as JSON).
fn post(d: &Daemon, key: &str, body: &Value) -> (u16, Value) {
    let mut s = common::connect(d.port);
    s.tcp()
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let body = body.to_string();
    let req = format!(
        "POST /graphql HTTP/1.0\r\nHost: x\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let buf = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|_| json!({ "raw": body })),
    )
}

/// A GraphQL answer: `data`, or the first error's (code, message).
fn gql(d: &Daemon, key: &str, query: &str, vars: Value) -> Result<Value, (String, String)> {
    let (status, v) = post(d, key, &json!({ "query": query, "variables": vars }));
    assert_eq!(status, 200, "{query}: {v}");
    match v["errors"].as_array().and_then(|e| e.first()) {
        Some(e) => Err((
            e["extensions"]["code"].as_str().unwrap_or("").to_string(),
            e["message"].as_str().unwrap_or("").to_string(),
        )),
        None => Ok(v["data"].clone()),
    }
}

fn ok(d: &Daemon, key: &str, query: &str, vars: Value) -> Value {
    gql(d, key, query, vars).unwrap_or_else(|e| panic!("{query}: {e:?}"))
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}");
}

fn status_of(d: &Daemon, key: &str, id: &str) -> String {
    let v = ok(
        d,
        key,
        "query($id: ID!) { instance(id: $id) { status } }",
        json!({ "id": id }),
    );
    v["instance"]["status"].as_str().unwrap().to_string()
}

fn wait_status(d: &Daemon, key: &str, id: &str, want: &str) {
    until(&format!("{id} {want}"), || status_of(d, key, id) == want);
}

const DEPLOY: &str = r#"mutation($input: DeployInput!) {
  clusterFindAndDeployOnDemand(input: $input) {
    instance { id name imageName gpuCount vcpuCount memoryInGb ports env interruptible }
    gpus { uuid model milli }
    ip
    endpoints { ip port protocol url }
    execCommand
  }
}"#;

/// A small sleeping instance's deploy input.
fn small(name: &str, gpus: u32) -> Value {
    json!({
        "name": name,
        "imageName": "busybox",
        "gpuCount": gpus,
        "vcpuCount": 1,
        "memoryInGb": 0.0625,
        "containerDiskInGb": 0.0625,
        "ports": "8888/http",
        "env": [{ "key": "A", "value": "b" }],
        "command": ["sleep", "1000000"],
    })
}

fn deploy(d: &Daemon, key: &str, input: Value) -> Value {
    ok(d, key, DEPLOY, json!({ "input": input }))["clusterFindAndDeployOnDemand"].clone()
}

/// A cgroup file of the instance, from whichever hierarchy has it.
fn cgroup_file(id: &str, names: &[&str]) -> String {
    for dir in cgroup_dirs(id) {
        for n in names {
            if let Ok(s) = std::fs::read_to_string(dir.join(n)) {
                return s.trim().to_string();
            }
        }
    }
    panic!("no cgroup file {names:?} for {id}");
}

fn cpuset(id: &str) -> String {
    cgroup_file(id, &["cpuset.cpus"])
}

fn memory_limit(id: &str) -> String {
    cgroup_file(id, &["memory.limit_in_bytes", "memory.max"])
}

#[test]
fn deploy_list_scale_stop_resume_terminate() {
    let _s = serial();
    let d = daemon(&[]);
    let k = key(&d, "acme", "member");
    let me = ok(&d, &k, "{ myself { tenant role keyId } }", json!({}));
    assert_eq!(me["myself"]["tenant"], "acme");
    assert_eq!(me["myself"]["role"], "member");
    let types = ok(
        &d,
        &k,
        "{ gpuTypes { id memoryInGb totalCount freeCount } }",
        json!({}),
    );
    let a100 = |v: &Value| {
        v["gpuTypes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == "A100-80GB")
            .cloned()
            .unwrap()
    };
    assert_eq!(a100(&types)["totalCount"], 2, "{types}");
    assert_eq!(a100(&types)["freeCount"], 2, "{types}");

    let mut input = small("gq1", 1);
    input["gpuTypeId"] = json!("A100-80GB");
    let dep = deploy(&d, &k, input);
    let id = dep["instance"]["id"].as_str().unwrap().to_string();
    assert_eq!(dep["instance"]["imageName"], "busybox");
    assert_eq!(dep["instance"]["gpuCount"], 1);
    assert_eq!(dep["instance"]["ports"], "8888/http");
    assert_eq!(dep["gpus"][0]["model"], "A100-80GB", "{dep}");
    let ip = dep["ip"].as_str().expect("the deploy answers the address");
    assert_eq!(dep["endpoints"][0]["url"], format!("http://{ip}:8888"));
    assert!(dep["execCommand"].as_str().unwrap().contains(&id));
    wait_status(&d, &k, &id, "RUNNING");

    let all = ok(
        &d,
        &k,
        "{ instances { id gpuCount env ports desiredStatus } endpoints { instanceId port } }",
        json!({}),
    );
    let mine = all["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id.as_str())
        .cloned()
        .expect("the instance is listed");
    assert_eq!(mine["desiredStatus"], "RUNNING");
    assert!(mine["env"].as_array().unwrap().contains(&json!("A=b")));
    assert_eq!(all["endpoints"][0]["instanceId"], id.as_str());
    assert_eq!(
        a100(&ok(
            &d,
            &k,
            "{ gpuTypes { id totalCount freeCount } }",
            json!({})
        ))["freeCount"],
        1
    );

    // vCPUs and memory of the running container, in place: its cgroup changes, it runs on.
    let before_cpus = cpuset(&id);
    assert_eq!(memory_limit(&id), (64u64 << 20).to_string());
    let scaled = ok(
        &d,
        &k,
        "mutation($id: ID!) { clusterScaleResources(input: {id: $id, vcpuCount: 2, memoryInGb: 0.125}) { vcpuCount memoryInGb cpus status restartCount } }",
        json!({ "id": id }),
    )["clusterScaleResources"]
        .clone();
    assert_eq!(scaled["vcpuCount"], 2, "{scaled}");
    assert_eq!(scaled["memoryInGb"], 0.125);
    assert_eq!(scaled["cpus"].as_array().unwrap().len(), 2);
    assert_eq!(scaled["status"], "RUNNING");
    assert_eq!(memory_limit(&id), (128u64 << 20).to_string());
    assert_eq!(cpuset(&id), "0-1", "was {before_cpus}");
    assert_eq!(status_of(&d, &k, &id), "RUNNING");
    // The same engine operation through REST (the CLI): no rule is GraphQL's own.
    let cli = d.json_as(&k, &["instance", "scale", &id, "--memory", "96MiB"]);
    assert_eq!(cli["memory"], 96u64 << 20, "{cli}");
    assert_eq!(memory_limit(&id), (96u64 << 20).to_string());
    d.json_as(&k, &["instance", "scale", &id, "--memory", "128MiB"]);

    // A GPU count cannot change live: refused with what to do, then done by consent.
    let refused = gql(
        &d,
        &k,
        "mutation($id: ID!) { clusterScaleResources(input: {id: $id, gpuCount: 2}) { id } }",
        json!({ "id": id }),
    )
    .unwrap_err();
    assert_eq!(refused.0, "invalid_state", "{refused:?}");
    assert!(refused.1.contains("restart: true"), "{refused:?}");
    let two = ok(
        &d,
        &k,
        "mutation($id: ID!) { clusterScaleResources(input: {id: $id, gpuCount: 2, restart: true}) { gpuCount gpus { model } } }",
        json!({ "id": id }),
    );
    assert_eq!(two["clusterScaleResources"]["gpuCount"], 2, "{two}");
    wait_status(&d, &k, &id, "RUNNING");
    assert_eq!(memory_limit(&id), (128u64 << 20).to_string());

    let m = ok(
        &d,
        &k,
        "query($id: ID!) { clusterGetMetrics(id: $id, range: \"1m\", step: \"1s\") { instanceId stepSeconds series { metric } } }",
        json!({ "id": id }),
    );
    assert_eq!(m["clusterGetMetrics"]["instanceId"], id.as_str());
    assert_eq!(m["clusterGetMetrics"]["stepSeconds"], 1);

    let stop = ok(
        &d,
        &k,
        "mutation($id: ID!) { clusterStop(id: $id) { desiredStatus } }",
        json!({ "id": id }),
    );
    assert_eq!(stop["clusterStop"]["desiredStatus"], "STOPPED");
    wait_status(&d, &k, &id, "STOPPED");
    assert!(
        cgroup_dirs(&id).iter().all(|p| !p.exists()),
        "a stopped container keeps a cgroup"
    );
    // Stopped: resized in the store; the next start has the new size.
    let stopped = ok(
        &d,
        &k,
        "mutation($id: ID!) { clusterScaleResources(input: {id: $id, memoryInGb: 0.1875}) { memoryInGb status } }",
        json!({ "id": id }),
    );
    assert_eq!(stopped["clusterScaleResources"]["status"], "STOPPED");
    ok(
        &d,
        &k,
        "mutation($id: ID!) { clusterResume(id: $id) { id } }",
        json!({ "id": id }),
    );
    wait_status(&d, &k, &id, "RUNNING");
    assert_eq!(cpuset(&id), "0-1", "the new size survives a restart");
    assert_eq!(memory_limit(&id), (192u64 << 20).to_string());
    let term = ok(
        &d,
        &k,
        "mutation($id: ID!) { clusterTerminate(id: $id) { desiredStatus } }",
        json!({ "id": id }),
    );
    assert_eq!(term["clusterTerminate"]["desiredStatus"], "TERMINATED");
    until("the terminated instance leaves the list", || {
        let v = ok(&d, &k, "{ instances { id } }", json!({}));
        !v.to_string().contains(&id)
    });

    let vol = ok(
        &d,
        &k,
        "mutation { createVolume(input: {name: \"gv1\", sizeInGb: 0.015625}) { name sizeInGb state } }",
        json!({}),
    );
    assert_eq!(vol["createVolume"]["sizeInGb"], 0.015625, "{vol}");
    assert!(ok(&d, &k, "{ volumes { name } }", json!({}))
        .to_string()
        .contains("gv1"));
    ok(
        &d,
        &k,
        "mutation { deleteVolume(name: \"gv1\") { name } }",
        json!({}),
    );
    assert!(!ok(&d, &k, "{ volumes { name } }", json!({}))
        .to_string()
        .contains("gv1"));

    // Each mutation is in the audit log as a REST call would be.
    let rows = d.json(&["audit", "list", "--tenant", "acme"]);
    let rows = rows.as_array().unwrap();
    let row = |op: &str, target: &str| {
        rows.iter()
            .find(|r| r["op"] == op && r["target"].as_str().unwrap().starts_with(target))
    };
    let scale = row("instance.scale", "/graphql clusterScaleResources").expect("scale audited");
    assert_eq!(scale["role"], "member");
    assert_eq!(scale["result"], "200");
    assert_eq!(scale["source"], "127.0.0.1");
    let refused_row = rows
        .iter()
        .find(|r| r["op"] == "instance.scale" && r["result"] == "409")
        .expect("a refused scale is audited with REST's status");
    assert!(refused_row["target"].as_str().unwrap().contains(&id));
    let create = row("instance.create", "/graphql clusterFindAndDeployOnDemand").unwrap();
    assert!(create["target"].as_str().unwrap().contains(&id), "{create}");
    for (op, target) in [
        ("instance.stop", "/graphql clusterStop"),
        ("instance.start", "/graphql clusterResume"),
        ("instance.terminate", "/graphql clusterTerminate"),
        ("volume.create", "/graphql createVolume"),
        ("volume.remove", "/graphql deleteVolume"),
    ] {
        assert!(row(op, target).is_some(), "{op} not audited: {rows:?}");
    }
    assert!(
        !rows.iter().any(|r| r["op"] == "instance.list"),
        "a read was audited"
    );
}

#[test]
fn another_tenant_sees_and_stops_nothing() {
    let _s = serial();
    let d = daemon(&[]);
    let a = key(&d, "alpha", "member");
    let b = key(&d, "beta", "member");
    let mut input = small("secret-one", 0);
    input["volumeName"] = json!("sv");
    input["volumeInGb"] = json!(0.015625);
    let dep = deploy(&d, &a, input);
    let id = dep["instance"]["id"].as_str().unwrap().to_string();
    let vol = ok(
        &d,
        &a,
        "query($id: ID!) { instance(id: $id) { volumeInGb volumeMountPath volumes { name } } }",
        json!({ "id": id }),
    );
    assert_eq!(vol["instance"]["volumeInGb"], 0.015625, "{vol}");
    assert_eq!(vol["instance"]["volumeMountPath"], "/workspace");
    let by_id = |q: &str| gql(&d, &b, q, json!({ "id": id })).unwrap_err();
    for q in [
        "query($id: ID!) { instance(id: $id) { id } }",
        "query($id: ID!) { clusterGetMetrics(id: $id) { instanceId } }",
        "mutation($id: ID!) { clusterStop(id: $id) { id } }",
        "mutation($id: ID!) { clusterTerminate(id: $id) { id } }",
        "mutation($id: ID!) { clusterScaleResources(input: {id: $id, vcpuCount: 2}) { id } }",
    ] {
        let (code, msg) = by_id(q);
        assert_eq!(code, "not_found", "{q}: {msg}");
    }
    // By name too: names are per tenant.
    let (code, _) = gql(&d, &b, "{ instance(id: \"secret-one\") { id } }", json!({})).unwrap_err();
    assert_eq!(code, "not_found");
    let listed = ok(
        &d,
        &b,
        "{ instances { id name } endpoints { instanceId } }",
        json!({}),
    );
    assert!(
        !listed.to_string().contains(&id) && !listed.to_string().contains("secret-one"),
        "{listed}"
    );
    assert_eq!(status_of(&d, &a, &id), status_of(&d, &d.key, &id));
    let desired = ok(
        &d,
        &a,
        "query($id: ID!) { instance(id: $id) { desiredStatus } }",
        json!({ "id": id }),
    );
    assert_eq!(desired["instance"]["desiredStatus"], "RUNNING");
    // A viewer of the owner's tenant reads but does not operate.
    let v = key(&d, "alpha", "viewer");
    assert!(ok(&d, &v, "{ instances { id } }", json!({}))
        .to_string()
        .contains(&id));
    let (code, msg) = gql(
        &d,
        &v,
        "mutation($id: ID!) { clusterStop(id: $id) { id } }",
        json!({ "id": id }),
    )
    .unwrap_err();
    assert_eq!(code, "forbidden");
    assert!(msg.contains("instance.stop needs"), "{msg}");
    // A wrong key is refused before GraphQL, as on every route.
    let (status, body) = post(&d, "nope", &json!({ "query": "{ myself { role } }" }));
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    ok(
        &d,
        &a,
        "mutation($id: ID!) { clusterTerminate(id: $id) { id } }",
        json!({ "id": id }),
    );
}

/// The WebSocket side: graphql-transport-ws over TLS.
struct Ws(tungstenite::WebSocket<common::ApiStream>);

impl Ws {
    fn open(d: &Daemon, key: Option<&str>) -> Ws {
        let url = format!("{}/graphql", d.endpoint().replacen("http", "ws", 1));
        let mut b = tungstenite::ClientRequestBuilder::new(url.parse().unwrap())
            .with_sub_protocol("graphql-transport-ws");
        if let Some(k) = key {
            b = b.with_header("x-api-key", k.to_string());
        }
        let stream = common::connect(d.port);
        stream
            .tcp()
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (ws, resp) = tungstenite::client::client(b, stream).unwrap();
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok()),
            Some("graphql-transport-ws")
        );
        Ws(ws)
    }

    fn send(&mut self, v: Value) {
        self.0
            .send(tungstenite::Message::Text(v.to_string().into()))
            .unwrap();
    }

    /// The next protocol message (pings answered), `None` once the socket closes.
    fn next(&mut self) -> Option<Value> {
        loop {
            match self.0.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["type"] == "ping" {
                        self.send(json!({ "type": "pong" }));
                        continue;
                    }
                    return Some(v);
                }
                Ok(tungstenite::Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    fn init(&mut self, payload: Value) {
        self.send(json!({ "type": "connection_init", "payload": payload }));
        let ack = self.next().expect("an answer to connection_init");
        assert_eq!(ack["type"], "connection_ack", "{ack}");
    }

    fn subscribe(&mut self, sid: &str, id: &str) {
        self.send(json!({
            "id": sid,
            "type": "subscribe",
            "payload": {
                "query": "subscription($id: ID!) { instanceMetrics(id: $id) { instanceId t cpuPercent memoryBytes gpuUtilPercent netRxBytesPerSecond } }",
                "variables": { "id": id },
            },
        }));
    }
}

#[test]
fn metrics_subscription_over_graphql_transport_ws() {
    let _s = serial();
    let d = daemon(&[]);
    let k = key(&d, "acme", "member");
    let other = key(&d, "other", "member");
    let dep = deploy(&d, &k, small("watched", 1));
    let id = dep["instance"]["id"].as_str().unwrap().to_string();
    wait_status(&d, &k, &id, "RUNNING");

    let mut ws = Ws::open(&d, Some(&k));
    ws.init(json!({}));
    // Mutations go over POST (rates, audit): refused on the socket, and nothing is done.
    ws.send(json!({
        "id": "m",
        "type": "subscribe",
        "payload": { "query": format!("mutation {{ clusterStop(id: \"{id}\") {{ id }} }}") },
    }));
    let m = ws.next().unwrap();
    assert_eq!(
        m["payload"]["errors"][0]["extensions"]["code"], "invalid_argument",
        "{m}"
    );
    assert_eq!(ws.next().unwrap()["type"], "complete");
    assert_eq!(status_of(&d, &k, &id), "RUNNING");
    ws.subscribe("1", &id);
    let start = Instant::now();
    let mut samples = Vec::new();
    while samples.len() < 3 {
        let m = ws.next().expect("the subscription streams");
        assert_eq!(m["type"], "next", "{m}");
        assert_eq!(m["id"], "1");
        assert_eq!(
            m["payload"]["data"]["instanceMetrics"]["instanceId"],
            id.as_str()
        );
        samples.push(m);
    }
    assert!(
        start.elapsed() >= Duration::from_millis(1800),
        "three samples came faster than one a second: {:?}",
        start.elapsed()
    );
    // The client ends it: the server confirms, and sends nothing more for that id.
    ws.send(json!({ "id": "1", "type": "complete" }));
    loop {
        let m = ws.next().expect("the server confirms the complete");
        assert_eq!(m["id"], "1", "{m}");
        if m["type"] == "complete" {
            break;
        }
    }

    // A revoked key ends what it opened.
    let short = d.json(&["key", "create", "--tenant", "acme", "--role", "viewer"]);
    let mut ws2 = Ws::open(&d, Some(short["secret"].as_str().unwrap()));
    ws2.init(json!({}));
    ws2.subscribe("r", &id);
    assert_eq!(ws2.next().unwrap()["type"], "next");
    d.json(&["key", "revoke", short["key"]["id"].as_str().unwrap()]);
    let t = Instant::now();
    let end = loop {
        let m = ws2.next().expect("the stream ends with complete");
        if m["type"] != "next" {
            break m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still streaming after revocation"
        );
    };
    assert_eq!(end["type"], "complete", "{end}");
    // ...and the socket it opened runs nothing more.
    ws2.send(json!({
        "id": "q",
        "type": "subscribe",
        "payload": { "query": "{ instances { id } }" },
    }));
    let answer = loop {
        let m = ws2.next().expect("an answer to the query");
        if m["id"] == "q" {
            break m;
        }
    };
    assert_eq!(
        answer["payload"]["errors"][0]["extensions"]["code"], "unauthorized",
        "a revoked key's socket ran a query: {answer}"
    );

    // The stream ends by itself when the instance is terminated.
    ws.subscribe("2", &id);
    let first = ws.next().unwrap();
    assert_eq!(
        (&first["type"], &first["id"]),
        (&json!("next"), &json!("2")),
        "{first}"
    );
    ok(
        &d,
        &k,
        "mutation($id: ID!) { clusterTerminate(id: $id) { id } }",
        json!({ "id": id }),
    );
    let end = loop {
        let m = ws.next().expect("the stream ends with complete");
        if m["type"] != "next" {
            break m;
        }
    };
    assert_eq!(end["type"], "complete", "{end}");
    assert_eq!(end["id"], "2");

    // Another tenant's key, given in connection_init (as a browser does): not found.
    let mut ws = Ws::open(&d, None);
    ws.init(json!({ "x-api-key": other }));
    ws.subscribe("x", &id);
    let m = ws.next().unwrap();
    assert_eq!(m["type"], "next", "{m}");
    assert_eq!(
        m["payload"]["errors"][0]["extensions"]["code"], "not_found",
        "{m}"
    );
    assert_eq!(ws.next().unwrap()["type"], "complete");
    // No key at all: the connection is refused at init.
    let mut ws = Ws::open(&d, None);
    ws.send(json!({ "type": "connection_init", "payload": {} }));
    assert!(
        ws.next().is_none_or(|m| m["type"] != "connection_ack"),
        "a WebSocket without a key was acknowledged"
    );
}

/// Every root field × every role, against the schema's own list (`gpuvisor graphql-ops`): a
/// field without a row fails. Allowed: no `forbidden`/`unauthorized` error; refused: a
/// `forbidden` error naming the operation.
#[test]
fn every_graphql_field_by_role() {
    let _s = serial();
    let d = daemon(&[]);
    let roles = ["admin", "tenant-admin", "member", "viewer", "metrics"];
    let keys: Vec<String> = roles
        .iter()
        .map(|r| {
            if *r == "admin" {
                d.key.clone()
            } else {
                key(&d, "owner", r)
            }
        })
        .collect();
    let member = keys[2].clone();
    let id = deploy(&d, &member, small("target", 0))["instance"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (y, n) = (true, false);
    let read = [y, y, y, y, n];
    let operate = [y, y, y, n, n];
    let deploy_input =
        r#"{imageName: "busybox", vcpuCount: 1, memoryInGb: 100000000, containerDiskInGb: 0.0625}"#;
    let table: Vec<(&str, &str, String, [bool; 5])> = vec![
        ("query", "myself", "{ myself { role } }".into(), read.map(|_| y)),
        ("query", "instances", "{ instances { id } }".into(), read),
        ("query", "instance", "query($id: ID!) { instance(id: $id) { id } }".into(), read),
        ("query", "gpus", "{ gpus { uuid } }".into(), read),
        ("query", "gpuTypes", "{ gpuTypes { id } }".into(), read),
        ("query", "images", "{ images { name } }".into(), read),
        ("query", "volumes", "{ volumes { name } }".into(), read),
        ("query", "endpoints", "{ endpoints { url } }".into(), read),
        (
            "query",
            "clusterGetMetrics",
            "query($id: ID!) { clusterGetMetrics(id: $id) { stepSeconds } }".into(),
            read,
        ),
        (
            "mutation",
            "clusterFindAndDeployOnDemand",
            format!("mutation {{ clusterFindAndDeployOnDemand(input: {deploy_input}) {{ ip }} }}"),
            operate,
        ),
        (
            "mutation",
            "clusterRentInterruptible",
            format!("mutation {{ clusterRentInterruptible(input: {{bidPerGpuHour: 0.5, {} }}) {{ ip }} }}", &deploy_input[1..deploy_input.len() - 1]),
            operate,
        ),
        (
            "mutation",
            "clusterScaleResources",
            "mutation($id: ID!) { clusterScaleResources(input: {id: $id, memoryInGb: 0.0625}) { id } }".into(),
            operate,
        ),
        (
            "mutation",
            "createVolume",
            "mutation { createVolume(input: {name: \"rv\", sizeInGb: 0.015625}) { name } }".into(),
            operate,
        ),
        (
            "mutation",
            "deleteVolume",
            "mutation { deleteVolume(name: \"rv\") { name } }".into(),
            operate,
        ),
        (
            "mutation",
            "clusterStop",
            "mutation($id: ID!) { clusterStop(id: $id) { id } }".into(),
            operate,
        ),
        (
            "mutation",
            "clusterResume",
            "mutation($id: ID!) { clusterResume(id: $id) { id } }".into(),
            operate,
        ),
        (
            "mutation",
            "clusterTerminate",
            "mutation($id: ID!) { clusterTerminate(id: $id) { id } }".into(),
            operate,
        ),
        (
            "query",
            "usage",
            "{ usage { totalCost lines { resource } } }".into(),
            read,
        ),
        ("query", "templates", "{ templates { name } }".into(), read),
        (
            "mutation",
            "createTemplate",
            "mutation { createTemplate(input: {name: \"rt\", imageName: \"busybox\"}) { name } }"
                .into(),
            operate,
        ),
        (
            "mutation",
            "deleteTemplate",
            "mutation { deleteTemplate(name: \"rt\") { name } }".into(),
            operate,
        ),
        ("subscription", "instanceMetrics", String::new(), read),
    ];
    let out = Command::new(BIN).arg("graphql-ops").output().unwrap();
    assert!(out.status.success());
    let ops: Vec<(String, String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            (w[0].to_string(), w[1].to_string(), w[2].to_string())
        })
        .collect();
    assert!(ops.len() > 10, "{ops:?}");
    for (kind, field, _) in &ops {
        assert!(
            table.iter().any(|(k, f, _, _)| k == kind && f == field),
            "GraphQL {kind} field {field} has no row in the role table: add one"
        );
    }
    for (k, f, _, _) in &table {
        assert!(
            ops.iter().any(|(kind, field, _)| kind == k && field == f),
            "row {k} {f} names no field of the schema"
        );
    }
    let mut failures = Vec::new();
    for (kind, field, query, want) in &table {
        let op = &ops.iter().find(|o| &o.1 == field).unwrap().2;
        // Refused roles first: an allowed one may change what the next one finds.
        let mut order: Vec<usize> = (0..5).collect();
        order.sort_by_key(|i| want[*i]);
        for i in order {
            let got = if *kind == "subscription" {
                subscription_outcome(&d, &keys[i], &id)
            } else {
                gql(&d, &keys[i], query, json!({ "id": id })).err()
            };
            let refused = matches!(&got, Some((c, _)) if c == "forbidden" || c == "unauthorized");
            if want[i] && refused {
                failures.push(format!("{field} as {}: refused: {got:?}", roles[i]));
            } else if !want[i]
                && !matches!(&got, Some((c, m)) if c == "forbidden" && m.contains(&format!("{op} needs")))
            {
                failures.push(format!(
                    "{field} as {}: {got:?}, want forbidden ({op})",
                    roles[i]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The first answer of an `instanceMetrics` subscription as `key`: `None` for a sample, else
/// the error's (code, message).
fn subscription_outcome(d: &Daemon, key: &str, id: &str) -> Option<(String, String)> {
    let mut ws = Ws::open(d, Some(key));
    ws.init(json!({}));
    ws.subscribe("r", id);
    let m = ws.next().unwrap();
    assert_eq!(m["type"], "next", "{m}");
    let e = &m["payload"]["errors"][0];
    if e.is_null() {
        return None;
    }
    Some((
        e["extensions"]["code"].as_str().unwrap_or("").to_string(),
        e["message"].as_str().unwrap_or("").to_string(),
    ))
}

/// Too deep and too complex requests are refused with a clear error; reads are charged as
/// reads and mutations as mutations.
#[test]
fn limits_depth_complexity_and_rates() {
    let _s = serial();
    let d = daemon(&["--mutations-per-second", "1", "--mutation-burst", "1"]);
    let k = key(&d, "acme", "member");
    let mut deep = String::from("{ __schema { types { fields { type ");
    for _ in 0..20 {
        deep.push_str("{ ofType ");
    }
    deep.push_str("{ name }");
    deep.push_str(&"}".repeat(24));
    let (status, v) = post(&d, &k, &json!({ "query": deep }));
    assert_eq!(status, 200);
    assert!(v.to_string().contains("nested too deep"), "{v}");
    let wide: String = (0..1200)
        .map(|i| format!("i{i}: instances {{ id }} "))
        .collect();
    let (_, v) = post(&d, &k, &json!({ "query": format!("{{ {wide} }}") }));
    assert!(v.to_string().contains("too complex"), "{v}");
    // Introspection is allowed.
    let (_, v) = post(
        &d,
        &k,
        &json!({ "query": "{ __schema { queryType { name } } }" }),
    );
    assert_eq!(v["data"]["__schema"]["queryType"]["name"], "Query", "{v}");
    // Many reads within a second: none is charged against the one mutation a second.
    for _ in 0..10 {
        ok(&d, &k, "{ myself { role } }", json!({}));
    }
    let m = "mutation { createVolume(input: {name: \"rate\", sizeInGb: 0.015625}) { name } }";
    let (status, _) = post(&d, &k, &json!({ "query": m }));
    assert_eq!(status, 200);
    let (status, body) = post(&d, &k, &json!({ "query": m }));
    assert_eq!(status, 429, "a second mutation within the second: {body}");
    assert_eq!(body["error"]["code"], "resource_exhausted");
    // ...and reads go on.
    ok(&d, &k, "{ volumes { name } }", json!({}));
    // Aliases are charged one each: two aliased mutations in one request are two mutations,
    // over the burst of one (after the allowance came back); more than ten are refused.
    std::thread::sleep(Duration::from_millis(1100));
    let two = "mutation { a: deleteVolume(name: \"none1\") { name } b: deleteVolume(name: \"none2\") { name } }";
    let (status, body) = post(&d, &k, &json!({ "query": two }));
    assert_eq!(
        status, 429,
        "two aliased mutations under a burst of one: {body}"
    );
    let many: String = (0..11)
        .map(|i| format!("m{i}: deleteVolume(name: \"x{i}\") {{ name }} "))
        .collect();
    let (status, body) = post(
        &d,
        &k,
        &json!({ "query": format!("mutation {{ {many} }}") }),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("at most 10"),
        "{body}"
    );
}

/// A spot rental is interruptible and low priority: on-demand work that needs its GPU
/// preempts it.
#[test]
fn an_interruptible_rental_is_preempted_by_on_demand() {
    let _s = serial();
    let d = daemon(&[]);
    let k = key(&d, "acme", "member");
    let mut input = small("spot", 1);
    input["gpuTypeId"] = json!("H100-80GB");
    input["bidPerGpuHour"] = json!(2.0);
    let rent = ok(
        &d,
        &k,
        "mutation($input: RentInterruptibleInput!) { clusterRentInterruptible(input: $input) { instance { id interruptible priority } gpus { model } } }",
        json!({ "input": input }),
    )["clusterRentInterruptible"]
        .clone();
    assert_eq!(rent["instance"]["interruptible"], true, "{rent}");
    assert_eq!(
        rent["instance"]["priority"], "normal",
        "REST's default class"
    );
    assert_eq!(rent["gpus"][0]["model"], "H100-80GB");
    let spot = rent["instance"]["id"].as_str().unwrap().to_string();
    wait_status(&d, &k, &spot, "RUNNING");
    let mut od = small("on-demand", 1);
    od["gpuTypeId"] = json!("H100-80GB");
    let dep = deploy(&d, &k, od);
    assert_eq!(dep["gpus"][0]["model"], "H100-80GB", "{dep}");
    let desired = ok(
        &d,
        &k,
        "query($id: ID!) { instance(id: $id) { desiredStatus } }",
        json!({ "id": spot }),
    );
    assert_eq!(
        desired["instance"]["desiredStatus"], "INTERRUPTED",
        "{desired}"
    );
    wait_status(&d, &k, &spot, "INTERRUPTED");
}

/// Prices, bids, templates and usage through GraphQL: `gpuTypes` carries the configured
/// prices, a bid below the floor is refused and a valid one is what the spot instance pays;
/// a deploy from a template takes its fields; `usage` meters the instance.
#[test]
fn prices_bids_templates_and_usage() {
    let _s = serial();
    let d = daemon(&[]);
    let member = key(&d, "acme", "member");
    let types = ok(
        &d,
        &member,
        "{ gpuTypes { id freeCount onDemandPrice interruptiblePrice minimumBidPrice currency } }",
        json!({}),
    );
    let h100 = types["gpuTypes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "H100-80GB")
        .unwrap_or_else(|| panic!("{types}"))
        .clone();
    let floor = h100["minimumBidPrice"].as_f64().unwrap();
    assert!(
        h100["onDemandPrice"].as_f64().unwrap() > floor && floor > 0.0,
        "{h100}"
    );
    assert_eq!(h100["currency"], "USD");
    let rent = "mutation($bid: Float) { clusterRentInterruptible(input: {bidPerGpuHour: $bid, \
                imageName: \"busybox\", gpuCount: 1, gpuTypeId: \"H100-80GB\", memoryInGb: 0.0625, \
                containerDiskInGb: 0.0625, command: [\"sleep\", \"100000\"]}) \
                { instance { id bidPerGpuHour } } }";
    let low = gql(&d, &member, rent, json!({ "bid": floor / 2.0 })).unwrap_err();
    assert_eq!(low.0, "invalid_argument", "{low:?}");
    assert!(low.1.contains("below the interruptible price"), "{low:?}");
    let spot = ok(&d, &member, rent, json!({ "bid": floor + 1.0 }));
    let spot_id = spot["clusterRentInterruptible"]["instance"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        spot["clusterRentInterruptible"]["instance"]["bidPerGpuHour"].as_f64(),
        Some(floor + 1.0)
    );

    // A template, then a deploy from it with one override.
    ok(
        &d,
        &member,
        "mutation { createTemplate(input: {name: \"svc\", imageName: \"busybox\", vcpuCount: 1, \
         memoryInGb: 0.125, containerDiskInGb: 0.0625, ports: \"8080/http\", \
         env: [{key: \"MODE\", value: \"t\"}], command: [\"sleep\", \"100000\"]}) { name } }",
        json!({}),
    );
    let listed = ok(
        &d,
        &member,
        "{ templates { name isPublic ports } }",
        json!({}),
    );
    assert_eq!(listed["templates"][0]["name"], "svc", "{listed}");
    assert_eq!(listed["templates"][0]["ports"], "8080/http");
    let dep = ok(
        &d,
        &member,
        "mutation { clusterFindAndDeployOnDemand(input: {templateId: \"svc\", \
         env: [{key: \"MODE\", value: \"override\"}]}) \
         { instance { id imageName memoryInGb ports env } } }",
        json!({}),
    );
    let inst = &dep["clusterFindAndDeployOnDemand"]["instance"];
    assert_eq!(inst["imageName"], "busybox");
    assert_eq!(inst["memoryInGb"], 0.125);
    assert_eq!(inst["ports"], "8080/http");
    let env: Vec<&str> = inst["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"MODE=override") && !env.contains(&"MODE=t"),
        "{env:?}"
    );
    let id = inst["id"].as_str().unwrap().to_string();
    until("running", || {
        ok(
            &d,
            &member,
            "query($id: ID!) { instance(id: $id) { status } }",
            json!({ "id": id }),
        )["instance"]["status"]
            == "RUNNING"
    });
    std::thread::sleep(Duration::from_secs(2));
    let one = ok(
        &d,
        &member,
        "query($id: ID!) { instance(id: $id) { costPerHr totalCost } usage(subject: $id) \
         { currency totalCost lines { resource seconds unitPrice cost } } }",
        json!({ "id": id }),
    );
    // The spot instance is billed its bid per GPU-hour, not the on-demand price or the floor.
    let spot_usage = ok(
        &d,
        &member,
        "query($id: String) { usage(subject: $id) { lines { resource unitPrice interruptible gpuTypeId } } }",
        json!({ "id": spot_id }),
    );
    let gpu_line = spot_usage["usage"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["resource"] == "gpu")
        .unwrap_or_else(|| panic!("{spot_usage}"))
        .clone();
    assert_eq!(
        gpu_line["unitPrice"].as_f64(),
        Some(floor + 1.0),
        "{gpu_line}"
    );
    assert_eq!(gpu_line["interruptible"], true);
    assert_eq!(gpu_line["gpuTypeId"], "H100-80GB");
    assert!(
        one["instance"]["costPerHr"].as_f64().unwrap() > 0.0,
        "{one}"
    );
    let lines = one["usage"]["lines"].as_array().unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l["resource"] == "vcpu" && l["seconds"].as_f64().unwrap() >= 1.0),
        "{one}"
    );
    assert!(one["usage"]["totalCost"].as_f64().unwrap() > 0.0, "{one}");
    // Another tenant's usage is not this tenant's to read.
    let other = key(&d, "other", "member");
    let theirs = ok(&d, &other, "{ usage { lines { id } } }", json!({}));
    assert!(
        theirs["usage"]["lines"].as_array().unwrap().is_empty(),
        "{theirs}"
    );
    let err = gql(
        &d,
        &other,
        "{ usage(tenant: \"acme\") { totalCost } }",
        json!({}),
    )
    .unwrap_err();
    assert_eq!(err.0, "not_found", "{err:?}");
    for i in [&id, &spot_id] {
        ok(
            &d,
            &member,
            "mutation($id: ID!) { clusterTerminate(id: $id) { id } }",
            json!({ "id": i }),
        );
    }
}
