//! Serverless endpoints end to end with RunPod's own SDKs: a Debian worker image with the
//! `runpod` package from PyPI (scripts/make-worker-image) runs `runpod.serverless.start`
//! unchanged in each worker instance; the `runpod` client SDK (`runpod.Endpoint` pointed at
//! the daemon) and curl drive the queue. 1000 jobs over a 0 → N → 0 scale cycle, each
//! completed once with its own output; a worker killed mid-job (the job retried and
//! completed); the daemon SIGKILLed under load (no accepted job lost); cancel, timeout, retry,
//! streaming; another tenant's key and a worker's credential used where they do not belong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{free_port, instance_pids, serial, Daemon};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const NET: [&str; 4] = ["--net-prefix", "gs", "--net-pool", "10.81.0.0/16"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A key for the cache of what this test builds: the build script's and the handler's text.
fn cache_key() -> String {
    let out = Command::new("sha256sum")
        .arg(repo().join("scripts/make-worker-image"))
        .arg(repo().join("tests/serverless/handler.py"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let sums: String = text.lines().filter_map(|l| l.get(..16)).collect();
    sums
}

/// The worker image tar, built once per version of its script and handler.
fn worker_image() -> PathBuf {
    let dir = PathBuf::from("/var/tmp/gpuvisor-worker");
    let tar = dir.join(format!("worker-{}.tar", cache_key()));
    if !tar.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let t0 = Instant::now();
        let out = Command::new(repo().join("scripts/make-worker-image"))
            .arg(&tar)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "make-worker-image failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("worker image built in {:?}", t0.elapsed());
    }
    tar
}

/// A venv on the host with the `runpod` client SDK (the same version as the workers').
fn client_python() -> PathBuf {
    let venv = PathBuf::from(format!("/var/tmp/gpuvisor-worker/client-{}", cache_key()));
    let py = venv.join("bin/python3");
    if !py.exists() {
        let st = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "python3 -m venv failed (python3-venv installed?)"
        );
        let out = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "runpod==1.12.0"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pip install runpod: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    py
}

struct Fixture {
    d: Daemon,
    /// A member key of tenant `acme`, which owns the endpoints.
    acme: String,
    /// A member key of tenant `other`.
    other: String,
    worker_port: u16,
}

impl Fixture {
    fn start() -> Fixture {
        let worker_port = free_port();
        let port = worker_port.to_string();
        let mut args = NET.to_vec();
        // Webhooks to loopback only where the operator allows it: 127.0.0.1, not 127.0.0.2.
        args.extend(["--worker-port", &port, "--webhook-allow", "127.0.0.1"]);
        // Small, so that the test reaches it (job_storage_cap, on tenant `other`).
        args.extend(["--job-storage-per-tenant", "4MiB"]);
        let d = Daemon::start(&args);
        let tar = worker_image();
        d.json(&[
            "image",
            "import",
            tar.to_str().unwrap(),
            "--name",
            "runpod-worker",
        ]);
        let mut keys = Vec::new();
        for t in ["acme", "other"] {
            d.json(&["tenant", "create", t]);
            keys.push(
                d.json(&["key", "create", "--tenant", t, "--role", "member"])["secret"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        let f = Fixture {
            acme: keys[0].clone(),
            other: keys[1].clone(),
            d,
            worker_port,
        };
        for (name, handler, conc) in [("echo", "echo", "16"), ("streamer", "stream", "1")] {
            f.template(
                &f.acme,
                name,
                &[
                    "--env",
                    &format!("HANDLER={handler}"),
                    "--env",
                    &format!("CONCURRENCY={conc}"),
                ],
            );
        }
        f
    }

    /// A template of `key`'s tenant running the worker image (384 MiB), with `extra` flags.
    fn template(&self, key: &str, name: &str, extra: &[&str]) {
        let mut a = vec![
            "template",
            "create",
            name,
            "--image",
            "runpod-worker",
            "--memory",
            "384MiB",
        ];
        a.extend(extra);
        self.d.json_as(key, &a);
    }

    fn endpoint(&self, name: &str, extra: &[&str]) -> String {
        let mut a = vec!["endpoint", "create", name];
        a.extend(extra);
        self.d.json_as(&self.acme, &a)["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn get(&self, ep: &str) -> Value {
        self.d.json_as(&self.acme, &["endpoint", "get", ep])
    }

    /// Workers that are up or coming up (not parked, not gone).
    fn live_workers(&self, ep: &str) -> u64 {
        let w = &self.get(ep)["health"]["workers"];
        ["idle", "running", "initializing"]
            .iter()
            .map(|k| w[k].as_u64().unwrap())
            .sum()
    }

    /// The queue API with curl as a RunPod user writes it (`authorization: <key>`, bare).
    fn curl(&self, key: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "120", "--cacert"])
            .arg(self.d.ca())
            .args(["-X", method, "-H", &format!("authorization: {key}")])
            .args(["-w", "\n%{http_code}"]);
        if let Some(b) = body {
            c.args(["-H", "content-type: application/json", "-d", &b.to_string()]);
        }
        c.arg(format!("{}{path}", self.d.endpoint()));
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (
            code.trim().parse().unwrap(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }

    /// POSTs the JSON in file `body` (too large for a command-line argument) to the queue API
    /// path: the status code and the answer's text.
    fn post_file(&self, key: &str, path: &str, body: &std::path::Path) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "120", "--cacert"])
            .arg(self.d.ca())
            .args(["-H", &format!("authorization: Bearer {key}")])
            .args([
                "-H",
                "content-type: application/json",
                "-w",
                "\n%{http_code}",
            ])
            .arg("--data-binary")
            .arg(format!("@{}", body.display()))
            .arg(format!("{}{path}", self.d.endpoint()))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (b, code) = text.rsplit_once('\n').unwrap();
        (code.trim().parse().unwrap(), b.to_string())
    }

    /// RunPod's client SDK (tests/serverless/client.py) as the tenant, not started.
    fn sdk_command(&self, ep: &str, args: &[&str]) -> Command {
        let mut c = Command::new(client_python());
        c.arg(repo().join("tests/serverless/client.py"))
            .arg(format!("{}/v2", self.d.endpoint()))
            .arg(&self.acme)
            .arg(ep)
            .args(args)
            .env("REQUESTS_CA_BUNDLE", self.d.ca())
            .env("SSL_CERT_FILE", self.d.ca());
        c
    }

    /// RunPod's client SDK (tests/serverless/client.py): its JSON answer.
    fn sdk(&self, ep: &str, args: &[&str]) -> Value {
        let out = self.sdk_command(ep, args).output().unwrap();
        assert!(
            out.status.success(),
            "client.py {args:?}: {}\n--- daemon log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&self.d.log())
        );
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    }

    fn status(&self, ep: &str, job: &str) -> Value {
        let (code, v) = self.curl(&self.acme, "GET", &format!("/v2/{ep}/status/{job}"), None);
        assert_eq!(code, 200, "{v}");
        v
    }

    fn wait_status(&self, ep: &str, job: &str, want: &[&str], within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.status(ep, job);
            if want.iter().any(|w| v["status"] == *w) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "job {job} never became {want:?}: {v}\n{}",
                tail(&self.d.log())
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_workers(&self, ep: &str, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.live_workers(ep) != n {
            assert!(
                Instant::now() < deadline,
                "endpoint {ep} never had {n} workers: {}",
                self.get(ep)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// An HTTP server that keeps the body of every request it gets (a webhook's receiver).
fn hook_server(ip: &str) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = got.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            if r.read_exact(&mut body).is_ok() {
                keep.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
            }
            let mut c = c;
            let _ =
                c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (port, got)
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// The whole story on one daemon (the image and the workers' start-up are the slow part):
/// scale-out and back to zero under 1000 jobs, then the failure cases.
#[test]
fn runpod_sdks_drive_an_endpoint_from_zero_to_n_and_back() {
    let _g = serial();
    let f = Fixture::start();
    let ep = f.endpoint(
        "echo",
        &[
            "--template",
            "echo",
            "--workers-max",
            "3",
            "--idle-timeout",
            "3s",
            "--scaler",
            "request-count:50",
        ],
    );
    assert_eq!(f.live_workers(&ep), 0, "an endpoint starts with no workers");

    // Cold start: runsync with no worker running.
    let cold = f.sdk(&ep, &["runsync"]);
    assert_eq!(cold["output"]["echo"], json!({"hello": "world"}), "{cold}");
    eprintln!("cold start (runsync, 0 workers): {:.2} s", cold["seconds"]);

    // 1000 jobs through RunPod's client: every one completed once, with its own output.
    let ids_seen = std::thread::scope(|s| {
        let t0 = Instant::now();
        let load = s.spawn(|| f.sdk(&ep, &["load", "1000"]));
        let (mut most, mut reached) = (0, Vec::new());
        while !load.is_finished() {
            let n = f.live_workers(&ep);
            if n > most {
                reached.push((n, t0.elapsed()));
            }
            most = most.max(n);
            std::thread::sleep(Duration::from_millis(100));
        }
        (load.join().unwrap(), most, reached)
    });
    let (load, most, reached) = ids_seen;
    eprintln!("load: {load}");
    eprintln!("autoscaler: workers (up or starting) reached at: {reached:?}");
    assert_eq!(load["submitted"], 1000, "{load}");
    assert_eq!(load["distinct"], 1000, "{load}");
    assert_eq!(load["completed"], 1000, "{load}");
    assert_eq!(load["pending"], 0, "{load}");
    assert!(
        most >= 2,
        "the endpoint never scaled out (at most {most} workers)"
    );
    assert!(most <= 3, "more workers than --workers-max: {most}");
    let h = &f.get(&ep)["health"]["jobs"];
    assert!(h["completed"].as_u64().unwrap() >= 1001, "{h}");
    // Back to zero once idle.
    f.wait_workers(&ep, 0, Duration::from_secs(60));

    // Streaming: each chunk once, in order, then the aggregate.
    let sep = f.endpoint(
        "streamer",
        &["--template", "streamer", "--workers-max", "1"],
    );
    let st = f.sdk(&sep, &["stream", "5"]);
    let chunks: Vec<Value> = st["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["chunk"].clone())
        .collect();
    assert_eq!(
        chunks,
        (0..5).map(|i| json!({"i": i})).collect::<Vec<_>>(),
        "{st}"
    );
    assert_eq!(st["status"], "COMPLETED", "{st}");
    let first = st["chunks"][0]["at"].as_f64().unwrap();
    let last = st["chunks"][4]["at"].as_f64().unwrap();
    assert!(last - first > 0.5, "the chunks came all at once: {st}");

    // Flashboot: an idle worker is frozen, then thawed for the next job (the same worker).
    let fep = f.endpoint(
        "flash",
        &[
            "--template",
            "echo",
            "--workers-max",
            "1",
            "--idle-timeout",
            "2s",
            "--flashboot",
        ],
    );
    let first = f.sdk(&fep, &["runsync"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while f.get(&fep)["health"]["workers"]["parked"] != 1 {
        assert!(Instant::now() < deadline, "never parked: {}", f.get(&fep));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(f.live_workers(&fep), 0, "a parked worker is not live");
    let warm = f.sdk(&fep, &["runsync"]);
    eprintln!(
        "flashboot: cold {:.2} s, from parked {:.2} s",
        first["seconds"], warm["seconds"]
    );
    assert_eq!(
        warm["output"]["worker"], first["output"]["worker"],
        "the parked worker was not the one thawed: {first} {warm}"
    );
    f.d.json_as(&f.acme, &["endpoint", "rm", &fep]);

    shell_worker(&f);
    job_storage_cap(&f);
    failure_cases(&f, &ep);
    isolation_cases(&f, &ep);
    daemon_sigkill_loses_no_job(f, ep);
}

/// The plain HTTP worker contract without RunPod's SDK: examples/serverless/worker.sh (busybox
/// sh + wget) in a busybox image serves a cold runsync and a burst of queued jobs, each with
/// its own output.
fn shell_worker(f: &Fixture) {
    f.d.import_busybox();
    let script = std::fs::read_to_string(repo().join("examples/serverless/worker.sh")).unwrap();
    f.d.json_as(
        &f.acme,
        &[
            "template", "create", "shw", "--image", "busybox", "--memory", "64MiB", "--",
            "/bin/sh", "-c", &script,
        ],
    );
    let ep = f.endpoint(
        "shell",
        &[
            "--template",
            "shw",
            "--workers-max",
            "1",
            "--idle-timeout",
            "3s",
        ],
    );
    let t0 = Instant::now();
    let (code, v) = f.curl(
        &f.acme,
        "POST",
        &format!("/v2/{ep}/runsync?wait=60000"),
        Some(&json!({"input": {"n": -1, "s": "a b"}})),
    );
    eprintln!("shell worker: cold runsync {:?}", t0.elapsed());
    assert_eq!(code, 200, "{v}\n{}", tail(&f.d.log()));
    assert_eq!(v["status"], "COMPLETED", "{v}\n{}", tail(&f.d.log()));
    assert_eq!(v["output"], json!({"echo": {"n": -1, "s": "a b"}}), "{v}");
    let ids: Vec<String> = (0..20)
        .map(|i| {
            let (code, v) = f.curl(
                &f.acme,
                "POST",
                &format!("/v2/{ep}/run"),
                Some(&json!({"input": {"i": i}})),
            );
            assert_eq!(code, 200, "{v}");
            v["id"].as_str().unwrap().to_string()
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let v = f.wait_status(&ep, id, &["COMPLETED", "FAILED"], Duration::from_secs(60));
        assert_eq!(v["output"], json!({"echo": {"i": i}}), "{v}");
        assert_eq!(v["retries"], 0, "{v}");
    }
    // An input larger than one command-line argument may be (128 KiB) comes back whole.
    let big = big_input(300);
    let (code, b) = f.post_file(&f.acme, &format!("/v2/{ep}/runsync?wait=60000"), &big);
    let v: Value = serde_json::from_str(&b).unwrap_or(Value::Null);
    assert_eq!((code, &v["status"]), (200, &json!("COMPLETED")), "{b:.300}");
    assert_eq!(
        v["output"]["echo"]["s"].as_str().map(str::len),
        Some(300 << 10)
    );
    std::fs::remove_file(big).unwrap();
    f.d.json_as(&f.acme, &["endpoint", "rm", &ep]);
}

/// A file holding `{"input": {"s": "xx…"}}` with `kib` KiB of x.
fn big_input(kib: usize) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("gv-sl-{kib}k-{}.json", std::process::id()));
    std::fs::write(
        &p,
        json!({"input": {"s": "x".repeat(kib << 10)}}).to_string(),
    )
    .unwrap();
    p
}

/// The fixture's `--job-storage-per-tenant 4MiB`, on tenant `other` (nothing kept before):
/// new jobs fill at most three quarters of it (3 MiB): exactly five inputs of 600 KiB (each
/// with its row's 512 octets) are taken, the sixth is refused with 429 and not kept; a purge
/// lets them go. Then a result that would pass the whole 4 MiB ends its job FAILED, saying
/// why, and is not kept.
fn job_storage_cap(f: &Fixture) {
    let k = f.other.as_str();
    f.template(k, "hold", &["--", "/nonexistent"]);
    f.template(k, "echo1", &[]);
    let endpoint = |name: &str, template: &str| {
        f.d.json_as(
            k,
            &[
                "endpoint",
                "create",
                name,
                "--template",
                template,
                "--workers-max",
                "1",
            ],
        )["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Workers of `hold` never start: its jobs stay queued.
    let hold = endpoint("hold", "hold");
    let echo = endpoint("echo1", "echo1");
    let body = big_input;
    let submit = |ep: &str, body: &std::path::Path| f.post_file(k, &format!("/v2/{ep}/run"), body);
    let queued = |ep: &str| {
        f.d.json_as(k, &["endpoint", "get", ep])["health"]["jobs"]["inQueue"]
            .as_u64()
            .unwrap()
    };
    let small = body(600);
    for i in 0..5 {
        let (code, b) = submit(&hold, &small);
        assert_eq!(code, 200, "input {i} of 600 KiB refused: {b}");
    }
    let (code, why) = submit(&hold, &small);
    assert_eq!(code, 429, "a sixth input of 600 KiB: {why}");
    assert!(why.contains("in the store"), "{why}");
    assert_eq!(queued(&hold), 5, "a refused job was kept");
    let (c, v) = f.curl(k, "POST", &format!("/v2/{hold}/purge-queue"), None);
    assert_eq!((c, &v["removed"]), (200, &json!(5)), "{v}");
    // 3 × 600 KiB queued + 1200 KiB on `echo`: 3 MiB of inputs at most, taken; its echoed
    // result would bring the tenant to 4.2 MiB.
    for _ in 0..3 {
        assert_eq!(submit(&hold, &small).0, 200);
    }
    let big = body(1200);
    let (code, b) = submit(&echo, &big);
    assert_eq!(code, 200, "{b}");
    let id = serde_json::from_str::<Value>(&b).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(90);
    let end = loop {
        let (c, v) = f.curl(k, "GET", &format!("/v2/{echo}/status/{id}"), None);
        assert_eq!(c, 200, "{v}");
        if v["status"] == "FAILED" || v["status"] == "COMPLETED" {
            break v;
        }
        assert!(Instant::now() < deadline, "the big job never ended: {v}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(end["status"], "FAILED", "a result past the cap was kept");
    assert!(
        end["error"].as_str().unwrap_or("").contains("in the store"),
        "{end}"
    );
    assert!(end.get("output").is_none_or(Value::is_null), "{end}");
    for ep in [&hold, &echo] {
        f.d.json_as(k, &["endpoint", "rm", ep]);
    }
    for p in [small, big] {
        std::fs::remove_file(p).unwrap();
    }
}

/// Cancel, execution timeout, retry, purge, and a worker killed mid-job.
fn failure_cases(f: &Fixture, ep: &str) {
    // A worker killed under its job: the job goes back to the queue and completes.
    let (c, v) = f.curl(
        &f.acme,
        "POST",
        &format!("/v2/{ep}/run"),
        Some(&json!({"input": {"sleep": 6, "tag": "killed"}})),
    );
    assert_eq!(c, 200, "{v}");
    let job = v["id"].as_str().unwrap().to_string();
    let running = f.wait_status(ep, &job, &["IN_PROGRESS"], Duration::from_secs(60));
    let pod = running["workerId"].as_str().unwrap().to_string();
    let inst =
        f.d.json_as(&f.acme, &["instance", "get", &format!("ep-{pod}")]);
    let id = inst["id"].as_str().unwrap();
    let pids = instance_pids(id);
    assert!(!pids.is_empty(), "no process of worker {id}");
    for p in &pids {
        let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
    }
    let done = f.wait_status(ep, &job, &["COMPLETED", "FAILED"], Duration::from_secs(90));
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert_eq!(done["output"]["echo"]["tag"], "killed", "{done}");
    assert!(done["retries"].as_u64().unwrap() >= 1, "{done}");

    // Webhooks: called with the job's final status where the operator allows the address;
    // never to another loopback address.
    let (hport, hooks) = hook_server("127.0.0.1");
    let (dport, denied) = hook_server("127.0.0.2");
    let (_, v) = f.curl(
        &f.acme,
        "POST",
        &format!("/v2/{ep}/run"),
        Some(&json!({"input": {"tag": "hooked"}, "webhook": format!("http://127.0.0.1:{hport}/hook")})),
    );
    let hooked = v["id"].as_str().unwrap().to_string();
    let (_, v) = f.curl(
        &f.acme,
        "POST",
        &format!("/v2/{ep}/run"),
        Some(&json!({"input": {"tag": "denied"}, "webhook": format!("http://127.0.0.2:{dport}/hook")})),
    );
    let denied_job = v["id"].as_str().unwrap().to_string();
    f.wait_status(ep, &denied_job, &["COMPLETED"], Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(30);
    while hooks.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the webhook was never called");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let got = hooks.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["id"], hooked.as_str());
    assert_eq!(got[0]["status"], "COMPLETED");
    assert_eq!(got[0]["output"]["echo"]["tag"], "hooked");
    assert!(
        denied.lock().unwrap().is_empty(),
        "a webhook reached 127.0.0.2"
    );

    // A job longer than a lease on a healthy worker: its pings keep it, it runs once.
    let (_, v) = f.curl(
        &f.acme,
        "POST",
        &format!("/v2/{ep}/run"),
        Some(&json!({"input": {"sleep": 18, "tag": "long"}})),
    );
    let long = v["id"].as_str().unwrap().to_string();
    // A running job cancelled stays cancelled (its worker is told to stop it).
    let (_, v) = f.curl(
        &f.acme,
        "POST",
        &format!("/v2/{ep}/run"),
        Some(&json!({"input": {"sleep": 5, "tag": "stopped"}})),
    );
    let stopped = v["id"].as_str().unwrap().to_string();
    f.wait_status(ep, &stopped, &["IN_PROGRESS"], Duration::from_secs(60));
    let (c, v) = f.curl(&f.acme, "POST", &format!("/v2/{ep}/cancel/{stopped}"), None);
    assert_eq!((c, v["status"].clone()), (200, json!("CANCELLED")), "{v}");
    let done = f.wait_status(ep, &long, &["COMPLETED", "FAILED"], Duration::from_secs(90));
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert_eq!(
        done["retries"], 0,
        "a healthy worker's long job was run again: {done}"
    );
    assert!(done["executionTime"].as_u64().unwrap() >= 18_000, "{done}");
    let st = f.status(ep, &stopped);
    assert_eq!(
        st["status"], "CANCELLED",
        "a result overwrote the cancel: {st}"
    );

    // Execution timeout: TIMED_OUT at the job's own policy, then retried on request.
    let (_, v) = f.curl(
        &f.acme,
        "POST",
        &format!("/v2/{ep}/run"),
        Some(&json!({"input": {"sleep": 9}, "policy": {"executionTimeout": 5000}})),
    );
    let slow = v["id"].as_str().unwrap().to_string();
    let t = f.wait_status(
        ep,
        &slow,
        &["TIMED_OUT", "COMPLETED"],
        Duration::from_secs(90),
    );
    assert_eq!(t["status"], "TIMED_OUT", "{t}");
    // The endpoint's last 5 minutes: the long job's run, the cancel, the timeout.
    let stats = &f.get(ep)["stats"];
    eprintln!("endpoint stats: {stats}");
    assert_eq!(stats["window_s"], 300, "{stats}");
    for k in ["completed", "cancelled", "timed_out"] {
        assert!(stats[k].as_u64().unwrap() >= 1, "{k}: {stats}");
    }
    assert!(stats["per_minute"].as_f64().unwrap() > 0.0, "{stats}");
    let run = &stats["execution_ms"];
    assert!(run["max"].as_u64().unwrap() >= 18_000, "{stats}");
    let q = &stats["delay_ms"];
    for p in [run, q] {
        let v: Vec<u64> = ["p50", "p95", "p99", "max"]
            .iter()
            .map(|k| p[k].as_u64().unwrap())
            .collect();
        assert!(v.windows(2).all(|w| w[0] <= w[1]), "{stats}");
    }
    let (c, r) = f.curl(&f.acme, "POST", &format!("/v2/{ep}/retry/{slow}"), None);
    assert_eq!((c, r["status"].clone()), (200, json!("IN_QUEUE")), "{r}");
    // A completed job is not retried.
    let (c, _) = f.curl(&f.acme, "POST", &format!("/v2/{ep}/retry/{job}"), None);
    assert_eq!(c, 409);

    // Cancel: a queued job never runs; a finished job stays finished.
    let (_, v) = f.curl(
        &f.acme,
        "POST",
        &format!("/v2/{ep}/run"),
        Some(&json!({"input": {"tag": "cancelled"}})),
    );
    let cj = v["id"].as_str().unwrap().to_string();
    let (c, v) = f.curl(&f.acme, "POST", &format!("/v2/{ep}/cancel/{cj}"), None);
    assert_eq!(c, 200, "{v}");
    let after = f.status(ep, &cj);
    assert!(
        after["status"] == "CANCELLED" || after["status"] == "COMPLETED",
        "{after}"
    );
    let (_, v) = f.curl(&f.acme, "POST", &format!("/v2/{ep}/cancel/{job}"), None);
    assert_eq!(
        v["status"], "COMPLETED",
        "cancel changed a finished job: {v}"
    );

    // runsync with a short wait answers while the job runs, with its id.
    let (c, v) = f.curl(
        &f.acme,
        "POST",
        &format!("/v2/{ep}/runsync?wait=1000"),
        Some(&json!({"input": {"sleep": 4}})),
    );
    assert_eq!(c, 200, "{v}");
    assert!(
        v["status"] == "IN_QUEUE" || v["status"] == "IN_PROGRESS",
        "{v}"
    );

    // Purge removes queued jobs only.
    f.d.json_as(&f.acme, &["endpoint", "update", ep, "--workers-max", "1"]);
    let mut queued = Vec::new();
    for _ in 0..5 {
        let (_, v) = f.curl(
            &f.acme,
            "POST",
            &format!("/v2/{ep}/run"),
            Some(&json!({"input": {"sleep": 3}})),
        );
        queued.push(v["id"].as_str().unwrap().to_string());
    }
    let (c, v) = f.curl(&f.acme, "POST", &format!("/v2/{ep}/purge-queue"), None);
    assert_eq!(c, 200, "{v}");
    assert!(v["removed"].as_u64().unwrap() >= 3, "{v}");
    let (c, _) = f.curl(
        &f.acme,
        "GET",
        &format!("/v2/{ep}/status/{}", queued[4]),
        None,
    );
    assert_eq!(c, 404, "a purged job is gone");

    // Bad requests say what is wrong.
    let (c, v) = f.curl(
        &f.acme,
        "POST",
        &format!("/v2/{ep}/run"),
        Some(&json!({"nope": 1})),
    );
    assert_eq!(c, 400, "{v}");
    let (c, _) = f.curl(
        &f.acme,
        "POST",
        &format!("/v2/{ep}/run"),
        Some(&json!({"input": 1, "policy": {"executionTimeout": 10}})),
    );
    assert_eq!(c, 400);
}

/// Another tenant's key, and a worker's credential, where they do not belong.
fn isolation_cases(f: &Fixture, ep: &str) {
    for (m, path) in [
        ("POST", format!("/v2/{ep}/run")),
        ("GET", format!("/v2/{ep}/health")),
        ("POST", format!("/v2/{ep}/purge-queue")),
    ] {
        let (c, v) = f.curl(&f.other, m, &path, Some(&json!({"input": {}})));
        assert_eq!(c, 404, "{m} {path} with another tenant's key: {v}");
    }
    let (c, _) = f.curl("gv_nonsense", "GET", &format!("/v2/{ep}/health"), None);
    assert_eq!(c, 401);
    let out = f.d.cli_as(&f.other, &["endpoint", "get", ep]);
    assert!(!out.status.success());

    // The worker API answers instances only: from the host the connection is closed before
    // anything is read, whatever the key.
    let (c, _) = {
        let out = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("authorization: {}", f.acme))
            .arg(format!(
                "http://127.0.0.1:{}/v2/{ep}/job-take/x?job_in_progress=0",
                f.worker_port
            ))
            .output()
            .unwrap();
        (String::from_utf8_lossy(&out.stdout).to_string(), ())
    };
    assert_eq!(c, "000", "the worker API answered the host");

    // From inside a worker: its own credential takes nothing of another endpoint, and a
    // tenant key is no worker credential.
    let sep = f.d.json_as(&f.acme, &["endpoint", "get", "streamer"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    f.d.json_as(&f.acme, &["endpoint", "update", ep, "--workers-min", "1"]);
    f.wait_workers(ep, 1, Duration::from_secs(60));
    let inst =
        f.d.json_as(&f.acme, &["instance", "list"])
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"].as_str().unwrap().starts_with("ep-") && i["state"] == "running")
            .cloned()
            .unwrap();
    let id = inst["id"].as_str().unwrap();
    let probe = format!(
        r#"import os, urllib.request, urllib.error
pod = os.environ["RUNPOD_POD_ID"]
base = os.environ["RUNPOD_WEBHOOK_PING"].rsplit("/ping/", 1)[0]
tok = os.environ["RUNPOD_AI_API_KEY"]
def code(url, key):
    r = urllib.request.Request(url, headers={{"Authorization": key}})
    try:
        return urllib.request.urlopen(r, timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code
other = base.rsplit("/", 1)[0] + "/{sep}"
print(code(other + "/job-take/" + pod + "?job_in_progress=0", tok),
      code(base + "/job-take/" + pod + "?job_in_progress=0", "{acme}"),
      code(base + "/ping/someone-else", tok))
"#,
        acme = f.acme
    );
    let out = f.d.cli_as(
        &f.acme,
        &[
            "instance",
            "exec",
            id,
            "--",
            "/opt/venv/bin/python3",
            "-c",
            &probe,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(text.trim(), "401 401 401", "worker API probe: {out:?}");
    // Its readers do not see the credential: a viewer cannot act as the worker.
    let viewer =
        f.d.json(&["key", "create", "--tenant", "acme", "--role", "viewer"])["secret"]
            .as_str()
            .unwrap()
            .to_string();
    let shown = f.d.json_as(&viewer, &["instance", "get", id]).to_string();
    assert!(
        !shown.contains("gvw_"),
        "the worker's credential is shown: {shown}"
    );
    // Read on the host, the credential does not work from another tenant's instance (nor
    // through the worker's own gateway address).
    let environ = instance_pids(id)
        .into_iter()
        .filter_map(|p| std::fs::read(format!("/proc/{p}/environ")).ok())
        .map(|e| String::from_utf8_lossy(&e).to_string())
        .find(|e| e.contains("RUNPOD_AI_API_KEY=gvw_"))
        .expect("the worker's environment");
    let var = |name: &str| {
        environ
            .split('\0')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap()
            .to_string()
    };
    let (tok, pod, ping) = (
        var("RUNPOD_AI_API_KEY"),
        var("RUNPOD_POD_ID"),
        var("RUNPOD_WEBHOOK_PING"),
    );
    let acme_gw = ping
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let thief = f.d.json_as(
        &f.other,
        &[
            "instance",
            "create",
            "--image",
            "runpod-worker",
            "--memory",
            "256MiB",
            "--wait",
            "--",
            "sleep",
            "100000",
        ],
    );
    let thief_id = thief["id"].as_str().unwrap();
    let stolen = format!(
        r#"import socket, urllib.request, urllib.error
def code(url):
    r = urllib.request.Request(url, headers={{"Authorization": "{tok}"}})
    try:
        return urllib.request.urlopen(r, timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code
gw = [l.split()[2] for l in open("/proc/net/route") if l.split()[1] == "00000000"][0]
own = socket.inet_ntoa(bytes.fromhex(gw)[::-1])
print(code(f"http://{{own}}:{port}/v2/{ep}/ping/{pod}"), code("http://{acme_gw}:{port}/v2/{ep}/ping/{pod}"))
"#,
        port = f.worker_port
    );
    let out = f.d.cli_as(
        &f.other,
        &[
            "instance",
            "exec",
            thief_id,
            "--",
            "/opt/venv/bin/python3",
            "-c",
            &stolen,
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "401 401",
        "a stolen worker credential worked from another tenant's instance: {out:?}"
    );
    f.d.cli_as(&f.other, &["instance", "terminate", thief_id, "--wait"]);
    f.d.json_as(&f.acme, &["endpoint", "update", ep, "--workers-min", "0"]);
}

/// SIGKILL the daemon while jobs are being accepted and run: every job whose id a client got
/// completes after the restart.
fn daemon_sigkill_loses_no_job(mut f: Fixture, ep: String) {
    f.d.json_as(&f.acme, &["endpoint", "update", &ep, "--workers-max", "3"]);
    // A client submitting one job after another while the daemon is killed and restarted:
    // every job whose id it got back completes.
    let client = f
        .sdk_command(&ep, &["submit-through-crash", "300"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Some are running and more are being submitted when the daemon dies.
    loop {
        let j = &f.get(&ep)["health"]["jobs"];
        if j["inProgress"].as_u64().unwrap() > 0 && j["inQueue"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no job started: {j}");
        std::thread::sleep(Duration::from_millis(50));
    }
    f.d.kill9();
    std::thread::sleep(Duration::from_millis(500));
    f.d.restart();
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let sub: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let ids: Vec<String> = sub["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let failed = sub["failed"].as_u64().unwrap();
    eprintln!(
        "through the crash: {} accepted, {failed} refused",
        ids.len()
    );
    assert!(
        failed > 0,
        "the daemon was never down while jobs were submitted"
    );
    assert!(ids.len() > 100, "{}", ids.len());
    let fol = f.sdk(&ep, &["follow", &ids.join(",")]);
    assert_eq!(fol["pending"], json!([]), "{fol}");
    let fin = fol["final"].as_object().unwrap();
    assert_eq!(fin.len(), ids.len());
    for (id, s) in fin {
        assert_eq!(s["status"], "COMPLETED", "{id}: {s}");
    }
    // Removing the endpoint terminates its workers.
    f.d.json_as(&f.acme, &["endpoint", "rm", &ep]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let live =
            f.d.json_as(&f.acme, &["instance", "list"])
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| {
                    i["name"].as_str().unwrap().starts_with("ep-") && i["state"] != "terminated"
                })
                .count();
        if live == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "workers left after endpoint rm");
        std::thread::sleep(Duration::from_millis(300));
    }
    // A template whose workers cannot start: the endpoint never holds more than its
    // workers-max of them (failed ones are removed, and it waits before the next).
    f.d.json_as(
        &f.acme,
        &[
            "template",
            "create",
            "broken",
            "--image",
            "runpod-worker",
            "--memory",
            "64MiB",
            "--",
            "/nonexistent",
        ],
    );
    let bep = f.endpoint(
        "broken",
        &[
            "--template",
            "broken",
            "--workers-min",
            "1",
            "--workers-max",
            "1",
        ],
    );
    let count = || {
        f.d.json_as(&f.acme, &["instance", "list"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| {
                i["name"].as_str().unwrap().starts_with("ep-") && i["state"] != "terminated"
            })
            .count()
    };
    let (mut most, until) = (0, Instant::now() + Duration::from_secs(12));
    while Instant::now() < until {
        most = most.max(count());
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("broken template: at most {most} worker instances at once");
    assert!(most <= 2, "a broken template's workers piled up: {most}");
    assert!(most >= 1, "no worker was even tried");
    f.d.json_as(&f.acme, &["endpoint", "rm", &bep]);

    // A tenant with an endpoint is not removed unless asked to remove what it owns; with
    // --cascade its endpoints go too.
    f.d.json(&["tenant", "create", "gone"]);
    let gk =
        f.d.json(&["key", "create", "--tenant", "gone", "--role", "member"])["secret"]
            .as_str()
            .unwrap()
            .to_string();
    f.d.json_as(
        &gk,
        &["template", "create", "t", "--image", "runpod-worker"],
    );
    let gep =
        f.d.json_as(&gk, &["endpoint", "create", "e", "--template", "t"])["id"]
            .as_str()
            .unwrap()
            .to_string();
    let out = f.d.cli(&["tenant", "rm", "gone"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 serverless endpoint"),
        "{out:?}"
    );
    f.d.json(&["tenant", "rm", "--cascade", "--wait", "gone"]);
    let (c, _) = f.curl(&f.d.key, "GET", &format!("/v2/{gep}/health"), None);
    assert_eq!(c, 404, "the endpoint outlived its tenant");
    f.d.terminate_all();
}
