#!/usr/bin/env python3
"""The API's cost of TLS, side by side with plain HTTP in one run, at N instances.

1. Starts a private daemon (TLS, its own CA), imports busybox and creates N instances
   (default 200; busybox `sleep`, 1 vCPU, 64 MiB, 64 MiB disk) with `instance create --wait`,
   then waits --settle seconds (default 15).
2. Then alternates the same daemon between TLS and --insecure-http (restarted on the same data
   dir; the instances keep running), R rounds of each (default 4), and in each mode measures:
   - `GET /v1/instances` (N instances in every answer) on one keep-alive connection, M requests
     (default 1000) after 50 of warm-up: p50/p99;
   - a full connection per request: K (default 300) new connections, each `GET /v1/health`
     then close: p50/p99 (TCP + TLS 1.3 handshake with an ECDSA P-256 certificate + request;
     the client's TLS context is made once);
   - the daemon's VmRSS after the run.
3. Terminates everything and stops the daemon.

Rate limits are off (gvbench): the benchmark sends far more than 200 reads a second.
Prints a table; --json writes the raw samples. Needs root. Python 3 standard library only.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gvbench as gb  # noqa: E402


def list_latency(d, m, n):
    conn = d.connection()
    hdr = {"x-api-key": d.key}
    lat = []
    for i in range(50 + m):
        t0 = time.perf_counter()
        conn.request("GET", "/v1/instances", headers=hdr)
        r = conn.getresponse()
        body = r.read()
        dt = (time.perf_counter() - t0) * 1000
        if r.status != 200:
            raise RuntimeError(f"list: {r.status} {body[:200]!r}")
        if i == 0 and len(json.loads(body)) != n:
            raise RuntimeError(f"list holds {len(json.loads(body))} instances, not {n}")
        if i >= 50:
            lat.append(dt)
    conn.close()
    return lat


def connect_latency(d, k):
    # One client TLS context for all (loading the CA is the client's cost, not the daemon's).
    ctx = d.tls_context() if d.tls else None
    lat = []
    for _ in range(k):
        t0 = time.perf_counter()
        c = d.connection(context=ctx)
        c.request("GET", "/v1/health")
        r = c.getresponse()
        r.read()
        c.close()
        lat.append((time.perf_counter() - t0) * 1000)
        if r.status != 200:
            raise RuntimeError(f"health: {r.status}")
    return lat


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=gb.DEFAULT_BINARY)
    ap.add_argument("-n", "--instances", type=int, default=200)
    ap.add_argument("-m", "--requests", type=int, default=1000)
    ap.add_argument("-k", "--connections", type=int, default=300)
    ap.add_argument("-r", "--rounds", type=int, default=4)
    ap.add_argument("--settle", type=float, default=15)
    ap.add_argument("--data-dir", default="/tmp/gvbench-tls")
    ap.add_argument("--port", type=int, default=18761)
    ap.add_argument("--rootfs", default="/tmp/gvbench-bbroot")
    ap.add_argument("--log", default="/tmp/gvbench-tls.log")
    ap.add_argument("--json", help="write raw samples here")
    a = ap.parse_args()

    gb.remove_data_dir(a.data_dir)
    d = gb.Daemon(a.binary, a.data_dir, a.port, a.log)
    d.start()
    res = {"machine": gb.machine(), "samples": []}
    try:
        gb.import_image(d, a.rootfs)
        for i in range(a.instances):
            d.cli(*gb.create_args())
            if (i + 1) % 50 == 0:
                gb.log(f"created {i + 1}/{a.instances}")
        # The creates' after-effects (telemetry of new instances, disk refill) settle first.
        time.sleep(a.settle)
        for rnd in range(a.rounds):
            for mode in ("tls", "plain"):
                d.restart([] if mode == "tls" else ["--insecure-http"])
                time.sleep(2)
                lst = list_latency(d, a.requests, a.instances)
                con = connect_latency(d, a.connections)
                rss = d.rss_kib()
                res["samples"].append({"round": rnd, "mode": mode, "list_ms": lst,
                                       "connect_ms": con, "rss_kib": rss})
                gb.log(f"round {rnd} {mode}: list p50 {statistics.median(lst):.2f} ms, "
                       f"connection p50 {statistics.median(con):.2f} ms, RSS {rss} KiB")
        d.restart([])
    finally:
        gb.terminate_all(d)
        d.stop()
    rows = []
    for mode in ("tls", "plain"):
        ss = [s for s in res["samples"] if s["mode"] == mode]
        lst = [x for s in ss for x in s["list_ms"]]
        con = [x for s in ss for x in s["connect_ms"]]
        rows.append([mode, len(lst), f"{gb.percentile(lst, 50):.2f}", f"{gb.percentile(lst, 99):.2f}",
                     f"{gb.percentile(con, 50):.2f}", f"{gb.percentile(con, 99):.2f}",
                     f"{statistics.median([s['rss_kib'] for s in ss]) / 1024:.1f}"])
    print(f"\n### GET /v1/instances at {a.instances} instances, TLS vs plain HTTP "
          f"({a.rounds} alternating rounds, one daemon)\n")
    gb.print_table(["mode", "requests", "list p50 ms", "list p99 ms", "new connection + GET p50 ms",
                    "new connection + GET p99 ms", "RSS MiB"], rows)
    t, p = res["samples"][0::2], res["samples"][1::2]
    ratio = [statistics.median(x["list_ms"]) / statistics.median(y["list_ms"]) for x, y in zip(t, p)]
    cratio = [statistics.median(x["connect_ms"]) / statistics.median(y["connect_ms"]) for x, y in zip(t, p)]
    print(f"\nper round, TLS / plain: list p50 {', '.join(f'{r:.2f}' for r in ratio)}; "
          f"new connection {', '.join(f'{r:.2f}' for r in cratio)}")
    print(f"machine: {res['machine']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
