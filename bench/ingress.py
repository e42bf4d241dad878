#!/usr/bin/env python3
"""The instance proxy against direct access to the instance, side by side in one run.

1. Starts a private daemon with the proxy on 127.0.0.1 (domain gv.bench), imports a busybox
   rootfs with tests/fixtures/portsrv.rs built static (rustc), and creates one instance
   serving `8081/http:public` (portsrv: a tiny threaded HTTP/1.1 server).
2. R rounds (default 3), alternating, with wrk (`apt-get install wrk`):
   - latency: 1 connection, 1 thread, D seconds (default 10) of `GET /`: p50/p99 direct
     (`http://<instance ip>:8081/`, plain HTTP from the host over the tenant's bridge) and
     through the proxy (`https://127.0.0.1:<proxy>/` with `Host: <id>-8081.gv.bench`: TLS 1.3
     from wrk to the proxy, HTTP/1.1 from the proxy to the instance);
   - throughput: C connections (default 16), 2 threads, D seconds: requests per second, both
     ways.
   Then the backend-bound rounds (the usual case in production: a model server, not the
   proxy, is the bottleneck): portsrv's cgroup is held to --backend-cpu CPUs (default 0.25)
   and each request costs it --backend-work-us of CPU (default 200, `GET /spin?us=N`);
   throughput direct and through the proxy as above.
3. Memory: the daemon's VmRSS before and after opening N (default 1000) TLS connections to
   the proxy that each made one request and then sit idle (keep-alive); the delta per 1000
   (the per-address cap is raised to N + 64 by a config file for this).
4. Terminates the instance and stops the daemon.

wrk does not verify certificates; the proxy routes by Host. Both paths cross the same
loopback/bridge; the proxy's path adds TLS and a second hop. Needs root. Python 3 standard
library, wrk, rustc.
"""

import argparse
import glob
import json
import os
import re
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gvbench as gb  # noqa: E402

DOMAIN = "gv.bench"


def wrk(url, conns, threads, secs, host=None):
    args = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{secs}s", "--latency"]
    if host:
        args += ["-H", f"Host: {host}"]
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk {url}: {errors.group(1)} non-2xx answers\n{out}")
    return {"rps": rps, "p50_ms": pct(50), "p99_ms": pct(99)}


def cpu_quota(iid, share):
    """Holds the instance's cgroup to `share` CPUs (None: no limit), cgroup v2 or v1."""
    v2 = glob.glob(f"/sys/fs/cgroup/**/gpuvisor/{iid}/cpu.max", recursive=True)
    v1 = glob.glob(f"/sys/fs/cgroup/cpu*/**/gpuvisor/{iid}/cpu.cfs_quota_us", recursive=True)
    if v2:
        with open(v2[0], "w") as f:
            f.write(f"{int(share * 100000)} 100000" if share else "max 100000")
    elif v1:
        with open(v1[0].replace("cfs_quota_us", "cfs_period_us"), "w") as f:
            f.write("100000")
        with open(v1[0], "w") as f:
            f.write(str(int(share * 100000)) if share else "-1")
    else:
        raise RuntimeError(f"no CPU controller in instance {iid}'s cgroup")


def idle_connections(port, host, n):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conns = []
    for _ in range(n):
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=host)
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        got = b""
        while b"hello from portsrv" not in got:
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError(f"connection closed: {got!r}")
            got += chunk
        conns.append(s)
    return conns


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=gb.DEFAULT_BINARY)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("-d", "--duration", type=int, default=10)
    ap.add_argument("-c", "--connections", type=int, default=16)
    ap.add_argument("-n", "--idle", type=int, default=1000)
    ap.add_argument("--data-dir", default="/tmp/gvbench-ingress")
    ap.add_argument("--port", type=int, default=18781)
    ap.add_argument("--proxy-port", type=int, default=18782)
    ap.add_argument("--rootfs", default="/tmp/gvbench-portsrv-root")
    ap.add_argument("--log", default="/tmp/gvbench-ingress.log")
    ap.add_argument("--backend-cpu", type=float, default=0.25,
                    help="the CPU share portsrv is held to (cgroup cpu.max) for the backend-bound "
                         "rounds; 0 skips them")
    ap.add_argument("--backend-work-us", type=int, default=200,
                    help="CPU time portsrv spends per request in the backend-bound rounds "
                         "(GET /spin?us=N); 0: the bare hello")
    ap.add_argument("--json", help="write the raw results here")
    a = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    if not os.path.isdir(a.rootfs):
        subprocess.run([os.path.join(gb.REPO, "scripts", "make-busybox-rootfs"), a.rootfs],
                       check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["rustc", "--edition", "2021", "-O", "-C", "target-feature=+crt-static", "-o",
                    os.path.join(a.rootfs, "bin", "portsrv"),
                    os.path.join(gb.REPO, "crates", "gpuvisor", "tests", "fixtures", "portsrv.rs")],
                   check=True)
    gb.remove_data_dir(a.data_dir)
    # All the idle connections come from one address: its cap (256 by default) goes up.
    conf = a.data_dir + ".toml"
    with open(conf, "w") as f:
        f.write(f"[proxy]\nmax_connections_per_ip = {a.idle + 64}\n")
    d = gb.Daemon(a.binary, a.data_dir, a.port, a.log,
                  extra_args=["--config", conf, "--proxy-listen", f"127.0.0.1:{a.proxy_port}",
                              "--proxy-domain", DOMAIN, "--proxy-tcp-listen", "127.0.0.1"])
    d.start()
    res = {"machine": gb.machine(), "rounds": []}
    try:
        d.cli("image", "import", a.rootfs, "--name", "portsrv")
        inst = json.loads(d.cli("-o", "json", "instance", "create", "--image", "portsrv",
                                "--vcpus", "1", "--memory", "256MiB", "--container-disk",
                                "256MiB", "--port", "8081/http:public", "--wait", "--",
                                "/bin/portsrv", "h:8081").stdout)
        iid, ip = inst["id"], inst["ip"]
        host = f"{iid}-8081.{DOMAIN}"
        direct = f"http://{ip}:8081/"
        proxied = f"https://127.0.0.1:{a.proxy_port}/"
        for _ in range(100):
            try:
                wrk(direct, 1, 1, 1)
                wrk(proxied, 1, 1, 1, host)
                break
            except (subprocess.CalledProcessError, RuntimeError, AttributeError):
                time.sleep(0.2)
        for rnd in range(a.rounds):
            r = {
                "direct_latency": wrk(direct, 1, 1, a.duration),
                "proxy_latency": wrk(proxied, 1, 1, a.duration, host),
                "direct_load": wrk(direct, a.connections, 2, a.duration),
                "proxy_load": wrk(proxied, a.connections, 2, a.duration, host),
            }
            res["rounds"].append(r)
            gb.log(f"round {rnd}: p50 direct {r['direct_latency']['p50_ms']:.3f} ms, proxy "
                   f"{r['proxy_latency']['p50_ms']:.3f} ms; rps direct {r['direct_load']['rps']:.0f}, "
                   f"proxy {r['proxy_load']['rps']:.0f}")
        if a.backend_cpu > 0:
            # The usual case in production: the backend (a model server) is the bottleneck, not
            # the proxy. portsrv's cgroup gets a CPU quota; wrk and the proxy keep the rest.
            cpu_quota(iid, a.backend_cpu)
            try:
                for rnd in range(a.rounds):
                    r = res["rounds"][rnd]
                    spin = f"spin?us={a.backend_work_us}" if a.backend_work_us else ""
                    r["bound_direct"] = wrk(direct + spin, a.connections, 2, a.duration)
                    r["bound_proxy"] = wrk(proxied + spin, a.connections, 2, a.duration, host)
                    gb.log(f"round {rnd}, backend held to {a.backend_cpu} CPU: rps direct "
                           f"{r['bound_direct']['rps']:.0f}, proxy {r['bound_proxy']['rps']:.0f}")
            finally:
                cpu_quota(iid, None)
        time.sleep(2)
        before = d.rss_kib()
        conns = idle_connections(a.proxy_port, host, a.idle)
        time.sleep(2)
        after = d.rss_kib()
        for s in conns:
            s.close()
        res["idle"] = {"n": a.idle, "rss_before_kib": before, "rss_after_kib": after}
    finally:
        gb.terminate_all(d)
        d.stop()
        shutil.rmtree(a.data_dir, ignore_errors=True)

    rs = res["rounds"]
    med = lambda k, f: statistics.median(r[k][f] for r in rs)  # noqa: E731
    rows = [
        ["latency p50 ms (1 connection)", f"{med('direct_latency', 'p50_ms'):.3f}",
         f"{med('proxy_latency', 'p50_ms'):.3f}",
         f"+{med('proxy_latency', 'p50_ms') - med('direct_latency', 'p50_ms'):.3f}"],
        ["latency p99 ms (1 connection)", f"{med('direct_latency', 'p99_ms'):.3f}",
         f"{med('proxy_latency', 'p99_ms'):.3f}",
         f"+{med('proxy_latency', 'p99_ms') - med('direct_latency', 'p99_ms'):.3f}"],
        [f"requests/s ({a.connections} connections)", f"{med('direct_load', 'rps'):.0f}",
         f"{med('proxy_load', 'rps'):.0f}",
         f"{100 * med('proxy_load', 'rps') / med('direct_load', 'rps'):.0f} %"],
    ]
    if "bound_direct" in rs[0]:
        rows.append([f"requests/s ({a.connections} conn., backend {a.backend_cpu} CPU, "
                     f"{a.backend_work_us} us/request)",
                     f"{med('bound_direct', 'rps'):.0f}", f"{med('bound_proxy', 'rps'):.0f}",
                     f"{100 * med('bound_proxy', 'rps') / med('bound_direct', 'rps'):.0f} %"])
    print(f"\n### Proxy against direct, medians of {a.rounds} rounds of {a.duration} s\n")
    gb.print_table(["", "direct", "proxy", "proxy vs direct"], rows)
    i = res["idle"]
    delta = (i["rss_after_kib"] - i["rss_before_kib"]) / 1024
    print(f"\n{i['n']} idle TLS keep-alive connections: daemon RSS {i['rss_before_kib'] / 1024:.1f} → "
          f"{i['rss_after_kib'] / 1024:.1f} MiB (+{delta:.1f} MiB, {delta * 1024 * 1024 / i['n'] / 1024:.1f} KiB each)")
    gb.finish(res, a.json)


if __name__ == "__main__":
    main()
