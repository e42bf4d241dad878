//! Test harness: runs the real `gpuvisor` binary as a daemon on a private data dir and port, and
//! drives it through the real CLI. Tests in one binary are serialised by [`serial`]: every
//! daemon shares the host's bridges and iptables chains, as a daemon per host does in production.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod vm;

use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_gpuvisor");

pub fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|p| p.into_inner())
}

/// A busybox rootfs (built once per test binary), with a static `kprobe` that calls keyctl.
pub fn busybox_rootfs() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("gv-test-rootfs-{}", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-busybox-rootfs");
        let st = Command::new(script).arg(&dir).stdout(Stdio::null()).status().unwrap();
        assert!(st.success(), "make-busybox-rootfs failed (is busybox-static installed?)");
        let src = dir.join("kprobe.c");
        std::fs::write(
            &src,
            "#include <stdio.h>\n#include <errno.h>\n#include <string.h>\n#include <unistd.h>\n#include <sys/syscall.h>\n\
             int main(void){long r=syscall(SYS_keyctl,0,-3,0);printf(\"keyctl=%ld errno=%s\\n\",r,r<0?strerror(errno):\"0\");return r<0?1:0;}\n",
        )
        .unwrap();
        let st = Command::new("cc")
            .args(["-static", "-O1", "-o"])
            .arg(dir.join("bin/kprobe"))
            .arg(&src)
            .status()
            .unwrap();
        assert!(st.success(), "cannot build the static keyctl probe");
        std::fs::remove_file(src).unwrap();
        dir
    })
    .clone()
}

/// `../shared/data/<rel>` beside the checkout (the workspace's parent directory), or under
/// `GPUVISOR_SHARED_DATA` when set. When it is missing: under CI (`CI=true`) the test fails;
/// elsewhere a skip is printed and recorded (`gpuvisor_node::testfx::skip_log`, which `.ci/run`
/// prints) and `None` is returned.
pub fn shared_data(rel: &str) -> Option<PathBuf> {
    let base = std::env::var_os("GPUVISOR_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    let path = base.join(rel);
    if path.is_file() {
        return Some(path);
    }
    prerequisite_missing(&format!("data file {} not found", path.display()));
    None
}

/// The rule for a test whose prerequisite is missing: under CI (`CI=true`) the test fails;
/// elsewhere a skip is printed and recorded in `GPUVISOR_SKIP_LOG` (default
/// `$TMPDIR/gpuvisor-test-skips.log`, what `gpuvisor_node::testfx` records to; `.ci/run` lists
/// it), and the caller returns.
pub fn prerequisite_missing(what: &str) {
    let test = std::thread::current().name().unwrap_or("test").to_string();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(!ci, "{test}: missing prerequisite under CI=true: {what}");
    let line = format!("SKIP {test}: {what}\n");
    eprint!("{line}");
    let log = std::env::var_os("GPUVISOR_SKIP_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("gpuvisor-test-skips.log"));
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
}

/// A small instance: 1 vCPU, 64 MiB of memory, a 64 MiB container disk.
pub const SMALL: [&str; 6] = [
    "--vcpus",
    "1",
    "--memory",
    "64MiB",
    "--container-disk",
    "64MiB",
];
/// The command of an instance that only has to stay up.
pub const SLEEP: [&str; 3] = ["--", "sleep", "1000000"];

/// `instance create` options of a small instance that sleeps (for [`Daemon::create`]).
pub fn sleeper() -> Vec<&'static str> {
    [&SMALL[..], &SLEEP[..]].concat()
}

/// `instance create --image IMAGE --wait` of a small sleeping instance, `extra` options before
/// its command (for `Daemon::json`/`cli`).
pub fn sleeper_create<'a>(image: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["instance", "create", "--image", image, "--wait"];
    a.extend(SMALL);
    a.extend(extra);
    a.extend(SLEEP);
    a
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub key: String,
    child: Option<Child>,
    extra: Vec<String>,
    gpus: String,
    /// The CA clients trust when it is not the daemon's own (`<data>/ca.pem`).
    ca_file: Option<PathBuf>,
    /// The network namespace it runs in (`ip netns exec`), and the address it listens on
    /// there (reached from the test's namespace); none: 127.0.0.1 in the test's.
    netns: Option<(String, String)>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Daemon {
    pub fn start(extra: &[&str]) -> Daemon {
        Self::start_with_gpus("2xA100-80GB,1xH100-80GB", extra)
    }

    /// A daemon simulating `gpus` (a `--simulate-gpus` spec).
    pub fn start_with_gpus(gpus: &str, extra: &[&str]) -> Daemon {
        Self::start_trusting(gpus, extra, None)
    }

    /// A daemon whose clients trust `ca` (an operator's certificate given in `extra`) instead
    /// of the CA the daemon makes.
    pub fn start_trusting(gpus: &str, extra: &[&str], ca: Option<&Path>) -> Daemon {
        Self::start_on(free_port(), gpus, extra, ca)
    }

    /// [`Daemon::start_trusting`] on a port chosen beforehand (what another server of the test
    /// must know before the daemon starts).
    pub fn start_on(port: u16, gpus: &str, extra: &[&str], ca: Option<&Path>) -> Daemon {
        Self::start_where(port, gpus, extra, ca, None)
    }

    /// A daemon in network namespace `netns`, listening on `addr` there (an address the test's
    /// namespace routes to), with its own prefix and data dir: one of two "hosts".
    pub fn start_in_netns(netns: &str, addr: &str, extra: &[&str]) -> Daemon {
        Self::start_where(
            free_port(),
            "2xA100-80GB,1xH100-80GB",
            extra,
            None,
            Some((netns.to_string(), addr.to_string())),
        )
    }

    fn start_where(
        port: u16,
        gpus: &str,
        extra: &[&str],
        ca: Option<&Path>,
        netns: Option<(String, String)>,
    ) -> Daemon {
        if let Some((_, addr)) = &netns {
            api_hosts().insert(port, addr.clone());
        }
        let dir = tempfile::Builder::new()
            .prefix("gvtest")
            .tempdir_in("/var/tmp")
            .unwrap();
        let mut d = Daemon {
            dir,
            port,
            key: String::new(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            gpus: gpus.to_string(),
            ca_file: ca.map(Path::to_path_buf),
            netns,
        };
        d.spawn();
        d.key = std::fs::read_to_string(d.data().join("admin.key"))
            .unwrap()
            .trim()
            .to_string();
        d
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn rate_flags(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for flag in ["--reads-per-second", "--mutations-per-second"] {
            if !self.extra.iter().any(|a| a == flag) {
                out.extend([flag, "0"]);
            }
        }
        // Daemons run side by side: the instance proxy (default :8443) only where a test
        // gives it an address.
        if !self.extra.iter().any(|a| a == "--proxy-listen") {
            out.extend(["--proxy-listen", "off"]);
        }
        // The serverless worker API (default :8444) likewise.
        if !self.extra.iter().any(|a| a == "--worker-port") {
            out.extend(["--worker-port", "off"]);
        }
        out
    }

    /// What its clients trust: the CA the daemon made at its first start, or the one given.
    pub fn ca(&self) -> PathBuf {
        self.ca_file
            .clone()
            .unwrap_or_else(|| self.data().join("ca.pem"))
    }

    pub fn tls(&self) -> bool {
        tls_ports().contains_key(&self.port)
    }

    /// The API's base URL (`https://127.0.0.1:PORT`, `http://` with `--insecure-http`).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls() { "https" } else { "http" };
        format!("{scheme}://{}:{}", api_host(self.port), self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data().join("daemon.log"))
            .unwrap();
        let mut cmd = match &self.netns {
            Some((ns, _)) => {
                // `ip netns exec` mounts a sysfs of the namespace over /sys, which hides the
                // cgroup hierarchies: the host's are bound back (from a bind made here once).
                let cg = host_cgroups();
                let mut c = Command::new("ip");
                c.args([
                    "netns",
                    "exec",
                    ns,
                    "sh",
                    "-c",
                    &format!(
                        "mount --rbind {} /sys/fs/cgroup && exec \"$@\"",
                        cg.display()
                    ),
                    "sh",
                    BIN,
                ]);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .args(["serve", "--data-dir"])
            .arg(self.data())
            .args([
                "--listen",
                &format!("{}:{}", api_host(self.port), self.port),
            ])
            .args(["--simulate-gpus", &self.gpus, "--stop-grace", "1s"])
            // CI machines have 2 CPUs; exclusivity is covered by the placement tests.
            .args(["--cpu-oversubscription", "16"])
            .arg("--admin-key-file")
            .arg(self.data().join("admin.key"))
            // Tests drive the daemon harder than a client may (hundreds of calls a second from
            // one key): the per-key rates are off unless a test sets them (the rate limit
            // tests do).
            .args(self.rate_flags())
            .args(&self.extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        // TLS unless the test asked for plain HTTP; the CA file appears at the first start.
        if self.extra.iter().any(|a| a == "--insecure-http") {
            tls_ports().remove(&self.port);
        } else {
            tls_ports().insert(self.port, self.ca());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.healthy() {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited ({st}): {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("daemon did not listen: {}", self.log());
    }

    /// A real HTTP answer from /v1/health. A bare TCP connect is not enough: polling a free
    /// port in the ephemeral range can connect the socket to itself.
    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let Some(mut s) = try_connect(self.port) else {
            return false;
        };
        let _ = s.tcp().set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /v1/health HTTP/1.0\r\nHost: x\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.") && &buf[9..12] == b"200"
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data().join("daemon.log")).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as an operator stops it (it removes its host chains), then reaps it; SIGKILL
    /// after 30 s.
    pub fn stop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill9();
    }

    /// Restarts the daemon with other extra `serve` options.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The `--simulate-gpus` spec of the next start (a host that lost or gained GPUs).
    pub fn set_gpus(&mut self, gpus: &str) {
        self.gpus = gpus.to_string();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The CLI with `args`, pointed at this daemon with `key` (not started).
    pub fn command_as<I, S>(&self, key: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("GPUVISOR_ENDPOINT", self.endpoint())
            .env("GPUVISOR_CA", self.ca())
            .env("GPUVISOR_API_KEY", key);
        c
    }

    pub fn cli_as(&self, key: &str, args: &[&str]) -> Output {
        self.command_as(key, args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(&self.key, args)
    }

    /// Runs a command that must succeed and returns its `-o json` output.
    pub fn json_as(&self, key: &str, args: &[&str]) -> Value {
        // `-o json` before any `--`, which starts the instance's command.
        let mut a = vec!["-o", "json"];
        a.extend(args);
        let out = self.cli_as(key, &a);
        assert!(
            out.status.success(),
            "gpuvisor {args:?} failed ({}): {}\n--- daemon log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        self.json_as(&self.key.clone(), args)
    }

    pub fn import_busybox(&self) {
        let root = busybox_rootfs();
        self.json(&[
            "image",
            "import",
            root.to_str().unwrap(),
            "--name",
            "busybox",
        ]);
    }

    /// Creates an instance with `--wait` and returns its id.
    pub fn create(&self, args: &[&str]) -> String {
        self.create_as(&self.key.clone(), args)
    }

    pub fn create_as(&self, key: &str, args: &[&str]) -> String {
        let mut a = vec!["instance", "create", "--image", "busybox", "--wait"];
        a.extend(args);
        let v = self.json_as(key, &a);
        assert_eq!(v["state"], "running", "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    /// `registry login HOST --username USER --password-stdin` as `key`.
    pub fn registry_login(&self, key: &str, host: &str, user: &str, password: &str) -> Output {
        use std::io::Write;
        let mut c = self
            .command_as(
                key,
                [
                    "registry",
                    "login",
                    host,
                    "--username",
                    user,
                    "--password-stdin",
                ],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(format!("{password}\n").as_bytes())
            .unwrap();
        c.wait_with_output().unwrap()
    }

    /// `instance exec` returning (exit code, stdout, stderr).
    pub fn exec(&self, id: &str, cmd: &str) -> (i32, String, String) {
        let out = self.cli(&["instance", "exec", id, "--", "sh", "-c", cmd]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The daemon's network prefix: its `--net-prefix`, else `GPUVISOR_NET_PREFIX`, else `gv`.
    pub fn net_prefix(&self) -> String {
        self.extra
            .windows(2)
            .find(|w| w[0] == "--net-prefix")
            .map(|w| w[1].clone())
            .or_else(|| std::env::var("GPUVISOR_NET_PREFIX").ok())
            .unwrap_or_else(|| "gv".into())
    }

    /// Every host object with one of `ids` (or under our data dir): must be empty after cleanup.
    pub fn leaks(&self, ids: &[String]) -> Vec<String> {
        let mut leaks = Vec::new();
        let data = std::fs::canonicalize(self.data()).unwrap();
        let data_s = data.to_string_lossy().to_string();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        for l in mountinfo.lines() {
            if let Some(mp) = l.split_whitespace().nth(4) {
                if mp.starts_with(&data_s) {
                    leaks.push(format!("mount {mp}"));
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir("/sys/block") {
            for e in rd.flatten() {
                let bf = e.path().join("loop/backing_file");
                if let Ok(f) = std::fs::read_to_string(&bf) {
                    if f.trim().starts_with(&data_s) {
                        leaks.push(format!(
                            "loop {} -> {}",
                            e.file_name().to_string_lossy(),
                            f.trim()
                        ));
                    }
                }
            }
        }
        let netns = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string();
        let links = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-o", "link"])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string();
        let runc = String::from_utf8_lossy(
            &Command::new("runc")
                .arg("--root")
                .arg(data.join("run/runc"))
                .args(["list", "-q"])
                .output()
                .unwrap()
                .stdout,
        )
        .to_string();
        for c in runc.lines().filter(|l| !l.is_empty()) {
            leaks.push(format!("runc container {c}"));
        }
        // Log relays (`gpuvisor log-relay --dir <data>/logs ... <id>`) of these instances.
        let relay_dir = data.join("logs").to_string_lossy().to_string();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.get(1).is_some_and(|a| a == "log-relay")
                && args
                    .windows(2)
                    .any(|w| w[0] == "--dir" && w[1] == relay_dir)
                && args
                    .iter()
                    .rev()
                    .find(|a| !a.is_empty())
                    .is_some_and(|id| ids.contains(id))
            {
                leaks.push(format!("log relay pid {}", e.file_name().to_string_lossy()));
            }
        }
        let p = self.net_prefix();
        let nft_table = format!("gpuvisor_{p}");
        let nft_chains = nft_chains(&nft_table);
        for id in ids {
            if netns.contains(&format!("{p}-{id}")) {
                leaks.push(format!("netns {p}-{id}"));
            }
            // `<P>h<id>` cut to the 15 characters of an interface name.
            let veth: String = format!("{p}h{id}").chars().take(15).collect();
            if links.contains(&veth) {
                leaks.push(format!("veth {veth}"));
            }
            // `gpuvisor/<id>` at the cgroup-v2 root and under every v1 controller (or hybrid
            // `unified`) mounted below /sys/fs/cgroup, whatever their names.
            for p in cgroup_dirs(id) {
                if p.exists() {
                    leaks.push(format!("cgroup {}", p.display()));
                }
            }
            for sub in ["instances", "bundles"] {
                if data.join(sub).join(id).exists() {
                    leaks.push(format!("dir {sub}/{id}"));
                }
            }
            if data.join("disks").join(format!("{id}.img")).exists() {
                leaks.push(format!("disk image {id}.img"));
            }
            // Micro-VMs: tap, run dir (sockets, pid files, seed), overlay, QEMU process.
            let tap: String = format!("{p}t{id}").chars().take(15).collect();
            if links.contains(&format!(": {tap}")) {
                leaks.push(format!("tap {tap}"));
            }
            // Its anti-spoofing chain in our bridge table: the one VM network object that
            // outlives QEMU (the tap goes with it).
            if nft_chains.contains(&tap) {
                leaks.push(format!("nft chain bridge {nft_table} {tap}"));
            }
            if data.join("vm/run").join(id).exists() {
                leaks.push(format!("dir vm/run/{id}"));
            }
            if data.join("vm/disks").join(format!("{id}.qcow2")).exists() {
                leaks.push(format!("overlay vm/disks/{id}.qcow2"));
            }
            for pid in qemu_pids(id) {
                leaks.push(format!("QEMU pid {pid} of {id}"));
            }
        }
        leaks
    }

    /// Processes whose cgroup path names one of `ids`.
    pub fn leaked_processes(&self, ids: &[String]) -> Vec<String> {
        ids.iter()
            .flat_map(|id| {
                instance_pids(id)
                    .into_iter()
                    .map(move |pid| format!("pid {pid} in {id}"))
            })
            .collect()
    }

    /// Terminates every live instance and waits.
    pub fn terminate_all(&self) {
        // Serverless endpoints first: their autoscaler would make workers again.
        for e in self.json(&["endpoint", "list"]).as_array().unwrap() {
            self.json(&["endpoint", "rm", e["id"].as_str().unwrap()]);
        }
        let list = self.json(&["instance", "list"]);
        for i in list.as_array().unwrap() {
            let id = i["id"].as_str().unwrap();
            self.json(&["instance", "terminate", id, "--wait", "--timeout", "60s"]);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // `GPUVISOR_TEST_KEEP_LOGS=1`: every daemon's log is kept, for timings read after a
        // passing run.
        if std::env::var_os("GPUVISOR_TEST_KEEP_LOGS").is_some() {
            let keep = std::env::temp_dir().join(format!("gvtest-kept-{}.log", self.port));
            let _ = std::fs::copy(self.data().join("daemon.log"), &keep);
            eprintln!("daemon log kept: {}", keep.display());
        }
        let mut listed = Vec::new();
        if self.child.is_some() && !std::thread::panicking() {
            self.terminate_all();
        } else if self.child.is_some() {
            // The log outlives the data dir, for whoever reads the failure.
            let keep = std::env::temp_dir().join(format!("gvtest-failed-{}.log", self.port));
            let _ = std::fs::copy(self.data().join("daemon.log"), &keep);
            eprintln!("daemon log kept: {}", keep.display());
            // Best effort on failure: leave nothing behind for the next test. Serverless
            // endpoints first, or their autoscaler makes workers again.
            let eps = self.cli(&["endpoint", "list", "-o", "json"]);
            if let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(&eps.stdout) {
                for e in items {
                    if let Some(id) = e["id"].as_str() {
                        let _ = self.cli(&["endpoint", "rm", id]);
                    }
                }
            }
            let list = self.cli(&["instance", "list", "-o", "json"]);
            if let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(&list.stdout) {
                for i in items {
                    if let Some(id) = i["id"].as_str() {
                        let _ =
                            self.cli(&["instance", "terminate", id, "--wait", "--timeout", "30s"]);
                        listed.push(id.to_string());
                    }
                }
            }
        }
        self.kill9();
        // A VM outlives its daemon by design (adopted at the next start); after a failure
        // nobody will adopt it, and a guest left spinning under TCG slows every later test.
        for id in listed {
            for pid in qemu_pids(&id) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// The instance cgroups' parent of the daemons this test starts without `--cgroup-parent`:
/// `GPUVISOR_CGROUP_PARENT` (which they inherit), else the default.
pub fn cgroup_parent() -> String {
    std::env::var("GPUVISOR_CGROUP_PARENT").unwrap_or_else(|_| "gpuvisor".to_string())
}

/// Where instance `id`'s cgroup may be: `/sys/fs/cgroup/gpuvisor/<id>` (cgroup v2, the runtime's
/// `cgroupsPath` `/gpuvisor/<id>`, see gpuvisor_node::cgroup) and
/// `/sys/fs/cgroup/<hierarchy>/gpuvisor/<id>` for each hierarchy mounted below (cgroup v1,
/// hybrid).
pub fn cgroup_dirs(id: &str) -> Vec<std::path::PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    // Every daemon's parent: `gpuvisor`, or `gpuvisor-<name>` (`--cgroup-parent`).
    let ours = |n: &std::ffi::OsStr| {
        let n = n.to_string_lossy();
        n == "gpuvisor" || n.starts_with("gpuvisor-")
    };
    let mut out = vec![base.join("gpuvisor").join(id)];
    let mut hierarchies = vec![base.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(base) {
        hierarchies.extend(
            rd.flatten()
                .filter(|e| !ours(&e.file_name()) && e.path().is_dir())
                .map(|e| e.path()),
        );
    }
    for h in hierarchies {
        if let Ok(rd) = std::fs::read_dir(&h) {
            for e in rd.flatten().filter(|e| ours(&e.file_name())) {
                out.push(e.path().join(id));
            }
        }
        out.push(h.join("gpuvisor").join(id));
    }
    out.sort();
    out.dedup();
    out
}

/// The chain names of nftables table `table` (family bridge): empty when there is no such table.
pub fn nft_chains(table: &str) -> Vec<String> {
    let out = Command::new("nft")
        .args(["list", "table", "bridge", table])
        .output();
    let Ok(out) = out else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() == 3 && w[0] == "chain" && w[2] == "{").then(|| w[1].to_string())
        })
        .collect()
}

/// Live QEMU processes of instance `id` (`-name gpuvisor-<id>,...` on their command line), in
/// or out of its cgroup.
pub fn qemu_pids(id: &str) -> Vec<u32> {
    let name = format!("gpuvisor-{id},");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with(['Z', 'X']));
        if !zombie
            && cmd
                .split(|b| *b == 0)
                .any(|a| a.starts_with(name.as_bytes()))
        {
            out.push(pid);
        }
    }
    out
}

/// Live (not zombie) processes in instance `id`'s cgroup, seen from the host. A zombie keeps the
/// path of its (already removed) cgroup until it is reaped; it runs nothing and holds nothing.
pub fn instance_pids(id: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if stat.is_empty()
            || stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X']))
        {
            continue;
        }
        let cg = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if cg.lines().any(|l| {
            // `/gpuvisor/<id>` or `/gpuvisor-<prefix>/<id>`, possibly deeper.
            l.split('/')
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| (w[0] == "gpuvisor" || w[0].starts_with("gpuvisor-")) && w[1] == id)
        }) {
            out.push(pid);
        }
    }
    out
}

/// The CA file of each daemon of this test binary that serves TLS, by port.
/// A bind of the host's /sys/fs/cgroup (recursive), for daemons started in another network
/// namespace (made once, kept).
fn host_cgroups() -> PathBuf {
    static DONE: OnceLock<PathBuf> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = PathBuf::from("/run/gvtest-cgroup");
        let bound = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some("/run/gvtest-cgroup"));
        if !bound {
            std::fs::create_dir_all(&dir).unwrap();
            let st = Command::new("mount")
                .args(["--rbind", "/sys/fs/cgroup"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(st.success(), "cannot bind /sys/fs/cgroup");
        }
        dir
    })
    .clone()
}

/// The address of the daemons that listen elsewhere than 127.0.0.1 (in another network
/// namespace), by port.
fn api_hosts() -> MutexGuard<'static, std::collections::HashMap<u16, String>> {
    static M: OnceLock<Mutex<std::collections::HashMap<u16, String>>> = OnceLock::new();
    M.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Where the daemon on `port` listens.
pub fn api_host(port: u16) -> String {
    api_hosts()
        .get(&port)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1".to_string())
}

fn tls_ports() -> MutexGuard<'static, std::collections::HashMap<u16, PathBuf>> {
    static M: OnceLock<Mutex<std::collections::HashMap<u16, PathBuf>>> = OnceLock::new();
    M.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Clients of the daemon on `port` check its certificate against `ca` from now on.
pub fn trust(port: u16, ca: &Path) {
    tls_ports().insert(port, ca.to_path_buf());
}

/// A connection to a daemon's API port as its clients make one: TLS checked against the
/// daemon's CA when it serves TLS (the default), plain TCP for `--insecure-http`.
pub enum ApiStream {
    Plain(std::net::TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>),
}

impl ApiStream {
    pub fn tcp(&self) -> &std::net::TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(t) => &t.sock,
        }
    }

    /// Sends the TLS close_notify (when TLS) and shuts the TCP write side.
    pub fn shutdown_write(&mut self) {
        use std::io::Write;
        if let Self::Tls(t) = self {
            t.conn.send_close_notify();
            let _ = t.flush();
        }
        let _ = self.tcp().shutdown(std::net::Shutdown::Write);
    }
}

impl std::io::Read for ApiStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            // A peer that closes without close_notify is an end of stream here (what the
            // tests look at is the HTTP answer).
            Self::Tls(t) => match t.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
                r => r,
            },
        }
    }
}

impl std::io::Write for ApiStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(t) => t.flush(),
        }
    }
}

/// A rustls client config trusting the CA in `ca` (PEM).
pub fn tls_client_config(ca: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Connects to the API on 127.0.0.1:`port` ([`ApiStream`]); `None` when the connection is
/// refused or the TLS handshake fails.
pub fn try_connect(port: u16) -> Option<ApiStream> {
    let tcp = std::net::TcpStream::connect((api_host(port).as_str(), port)).ok()?;
    wrap(port, tcp)
}

/// [`ApiStream`] over a TCP connection already made to the daemon on `port`.
pub fn wrap(port: u16, tcp: std::net::TcpStream) -> Option<ApiStream> {
    let ca = tls_ports().get(&port).cloned();
    match ca {
        None => Some(ApiStream::Plain(tcp)),
        Some(ca) => {
            let name = rustls::pki_types::ServerName::try_from(api_host(port)).unwrap();
            let conn = rustls::ClientConnection::new(tls_client_config(&ca), name).unwrap();
            let mut t = rustls::StreamOwned::new(conn, tcp);
            let _ = t.sock.set_read_timeout(Some(Duration::from_secs(10)));
            while t.conn.is_handshaking() {
                t.conn.complete_io(&mut t.sock).ok()?;
            }
            let _ = t.sock.set_read_timeout(None);
            Some(ApiStream::Tls(Box::new(t)))
        }
    }
}

pub fn connect(port: u16) -> ApiStream {
    try_connect(port).expect("cannot connect to the daemon's API")
}

/// A raw HTTP/1.0 GET: (status, content type, body).
pub fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = connect(port);
    s.tcp()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: x\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

/// Where the web console's sources, end-to-end script and node modules are.
pub fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web")
}

/// node and chromium (and the console's node modules), or a counted skip (a failure under CI).
pub fn browser_tools() -> Option<(PathBuf, PathBuf)> {
    let which = |name: &str| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
    };
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| which("chromium"));
    match (which("node"), chromium) {
        (Some(n), Some(c)) if web_dir().join("node_modules/playwright-core").is_dir() => {
            Some((n, c))
        }
        _ => {
            prerequisite_missing(
                "node, chromium and web/node_modules (scripts/install-deps, scripts/build-console)",
            );
            None
        }
    }
}

/// Runs the web console's end-to-end script (web/e2e/console.mjs) in headless chromium
/// against daemon `d` with its admin key, `env` naming the scenario; panics with its output
/// when it fails. Screenshots go to docs/console/ when `GPUVISOR_CONSOLE_SHOTS=1`.
pub fn console_e2e(d: &Daemon, env: &[(&str, &str)]) {
    let Some((node, chromium)) = browser_tools() else {
        return;
    };
    let mut cmd = Command::new(node);
    cmd.arg(web_dir().join("e2e/console.mjs"))
        .env("GV_URL", format!("https://{}:{}", api_host(d.port), d.port))
        .env("GV_API_KEY", &d.key)
        .env("CHROMIUM", chromium)
        .envs(env.iter().copied());
    if std::env::var("GPUVISOR_CONSOLE_SHOTS").is_ok_and(|v| v == "1") {
        cmd.env(
            "GV_SHOTS",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/console"),
        );
    }
    let out = cmd.output().unwrap();
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{said}");
    assert!(
        out.status.success(),
        "the console's end-to-end run failed:\n{said}\n--- daemon log ---\n{}",
        d.log()
    );
}
