"""Shared helpers for the gpuvisor benchmarks (Python 3 standard library only).

Starts a private daemon on its own data dir and port, talks to it through the CLI and the REST
API, and checks that nothing it made is left on the host afterwards. Every benchmark owns its
daemon from start to finish so runs never see each other's instances.
"""

import http.client
import ssl
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

DEFAULT_BINARY = "/tmp/gpuvisor-bench"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def summary(values):
    return {
        "n": len(values),
        "min": min(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def print_table(headers, rows, out=sys.stdout):
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    print(line, file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for r in cells:
        print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(r, widths))) + " |", file=out)
    out.flush()


def finish(res, json_path):
    """The closing lines every benchmark prints, and its raw results to `json_path` if given."""
    print(f"machine: {res['machine']}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f)


def machine():
    """One line describing the host: CPU model, cores, memory, kernel."""
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = 0.0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, {mem_gib:.1f} GiB RAM, Linux {platform.release()}"


def loadavg():
    return open("/proc/loadavg").read().split()[0]


class Daemon:
    """A private `gpuvisor serve` with its own data dir and port."""

    def __init__(self, binary, data_dir, port, log_path, env_extra=None, log_filter="info",
                 extra_args=()):
        self.binary = binary
        self.data_dir = os.path.abspath(data_dir)
        self.port = port
        self.log_path = log_path
        self.env_extra = env_extra or {}
        self.log_filter = log_filter
        self.extra_args = list(extra_args)
        self.proc = None
        self.key = None

    @property
    def tls(self):
        return "--insecure-http" not in self.extra_args

    @property
    def endpoint(self):
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca(self):
        return os.path.join(self.data_dir, "ca.pem")

    def socket(self):
        """A raw socket to the API (TLS-wrapped unless --insecure-http)."""
        import socket as sk
        s = sk.create_connection(("127.0.0.1", self.port))
        if not self.tls:
            return s
        return ssl.create_default_context(cafile=self.ca).wrap_socket(s, server_hostname="127.0.0.1")

    def connection(self, timeout=30, context=None):
        """An HTTP connection to the API: TLS checked against the daemon's CA (the default; pass
        `context` from tls_context() to reuse one), plain with --insecure-http."""
        if not self.tls:
            return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        ctx = context or self.tls_context()
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=ctx)

    def tls_context(self):
        return ssl.create_default_context(cafile=self.ca)

    def start(self):
        if os.path.exists(self.data_dir):
            raise SystemExit(f"data dir {self.data_dir} exists; remove it or pick another")
        os.makedirs(self.data_dir)
        return self._spawn()

    def restart(self, extra_args=None):
        """Stops the daemon (SIGTERM: its instances keep running) and starts it again on the
        same data dir, with other extra serve options when given."""
        self.stop()
        if extra_args is not None:
            self.extra_args = list(extra_args)
        return self._spawn(mode="a")

    def _spawn(self, mode="w"):
        env = dict(os.environ)
        env["GPUVISOR_LOG"] = self.log_filter
        env.update(self.env_extra)
        keyfile = os.path.join(self.data_dir, "admin.key")
        args = [self.binary, "serve", "--data-dir", self.data_dir,
                "--listen", f"127.0.0.1:{self.port}", "--simulate-gpus", "2xA100-80GB",
                "--admin-key-file", keyfile, "--cpu-oversubscription", "1000",
                "--stop-grace", "1s", *self.extra_args]
        # The instance proxy (default :8443) only where a benchmark gives it an address.
        if "--proxy-listen" not in self.extra_args:
            args += ["--proxy-listen", "off"]
        if "--worker-port" not in self.extra_args:
            args += ["--worker-port", "off"]
        # Benchmarks measure the daemon, not the per-key rate limits (a thousand requests a
        # second from one key would be refused): off unless a benchmark sets them.
        for flag in ("--reads-per-second", "--mutations-per-second"):
            if flag not in self.extra_args:
                args += [flag, "0"]
        self.logf = open(self.log_path, mode)
        self.proc = subprocess.Popen(args, stdout=self.logf, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited early (rc {self.proc.returncode}); see {self.log_path}")
            if os.path.exists(keyfile) and os.path.getsize(keyfile) > 0:
                try:
                    self.key = open(keyfile).read().strip()
                    c = self.connection(timeout=2)
                    c.request("GET", "/v1/health")
                    if c.getresponse().status == 200:
                        c.close()
                        return self
                except OSError:
                    pass
            time.sleep(0.05)
        raise SystemExit("daemon did not come up in 30s")

    def rss_kib(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def threads(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("Threads:"):
                return int(line.split()[1])
        return 0

    def cli_env(self):
        env = dict(os.environ)
        env["GPUVISOR_ENDPOINT"] = self.endpoint
        env["GPUVISOR_CA"] = self.ca
        env["GPUVISOR_API_KEY"] = self.key
        return env

    def cli(self, *args, check=True):
        r = subprocess.run([self.binary, *args], env=self.cli_env(), capture_output=True,
                           text=True, stdin=subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise RuntimeError(f"gpuvisor {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def api(self):
        return Api(self.connection(), self.key)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "logf", None):
            self.logf.close()


class Api:
    """Keep-alive JSON client (one connection)."""

    def __init__(self, conn, key):
        self.conn = conn
        self.headers = {"x-api-key": key, "content-type": "application/json"}

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, body=data, headers=self.headers)
        r = self.conn.getresponse()
        raw = r.read()
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: {r.status} {raw[:300]!r}")
        return json.loads(raw) if raw else None

    def close(self):
        self.conn.close()


def import_image(daemon, rootfs, name="busybox"):
    if not os.path.isdir(rootfs):
        subprocess.run([os.path.join(REPO, "scripts", "make-busybox-rootfs"), rootfs], check=True,
                       stdout=subprocess.DEVNULL)
    daemon.cli("image", "import", rootfs, "--name", name)


def create_args(image="busybox"):
    return ["instance", "create", "--image", image, "--vcpus", "1", "--memory", "64MiB",
            "--container-disk", "256MiB", "--wait", "-o", "json", "--", "sleep", "1000000"]


def terminate_all(daemon, parallel=8):
    """`instance terminate --wait` for every live instance, `parallel` at a time."""
    api = daemon.api()
    ids = [i["id"] for i in api.call("GET", "/v1/instances") if i["state"] != "terminated"]
    api.close()
    env = daemon.cli_env()
    pending = list(ids)
    running = []
    failed = []
    while pending or running:
        while pending and len(running) < parallel:
            iid = pending.pop()
            p = subprocess.Popen([daemon.binary, "instance", "terminate", iid, "--wait",
                                  "--timeout", "5m"], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
            running.append((iid, p))
        time.sleep(0.05)
        still = []
        for iid, p in running:
            if p.poll() is None:
                still.append((iid, p))
            elif p.returncode != 0:
                failed.append((iid, p.stderr.read().strip()))
        running = still
    if failed:
        log(f"terminate failures: {failed[:5]}")
    return len(ids), failed


def leftovers(data_dir, ids):
    """Host objects of `data_dir` or of the instance `ids` still present."""
    out = []
    data_dir = os.path.abspath(data_dir)
    for line in open("/proc/self/mountinfo"):
        mp = line.split()[4]
        if mp.startswith(data_dir):
            out.append(f"mount {mp}")
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    for line in losetup.splitlines():
        if data_dir in line:
            out.append(f"loop {line}")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    ns_names = {l.split()[0] for l in netns.splitlines() if l.strip()}
    # The daemon's object prefix: GPUVISOR_NET_PREFIX reaches it through the environment.
    px = os.environ.get("GPUVISOR_NET_PREFIX", "gv")
    for iid in ids:
        if f"{px}-{iid}" in ns_names:
            out.append(f"netns {px}-{iid}")
        for ctl in ("memory", "cpu", "cpuset", "pids", "devices", "freezer", "blkio"):
            p = f"/sys/fs/cgroup/{ctl}/gpuvisor/{iid}"
            if os.path.exists(p):
                out.append(f"cgroup {p}")
        veth = f"{px}h{iid[:14 - len(px)]}"
        if os.path.exists(f"/sys/class/net/{veth}"):
            out.append(f"veth {veth}")
    return out


def remove_data_dir(data_dir):
    shutil.rmtree(data_dir, ignore_errors=True)
