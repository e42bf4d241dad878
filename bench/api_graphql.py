#!/usr/bin/env python3
"""GraphQL `instances` against REST `GET /v1/instances` at N instances, and the daemon's RSS
delta for GraphQL.

1. Starts a private daemon (TLS, its own CA), imports busybox and creates N instances
   (default 200; busybox `sleep`, 1 vCPU, 64 MiB, 256 MiB disk) with `instance create --wait`,
   then waits --settle seconds (default 15).
2. R rounds (default 4), each on a freshly restarted daemon (the instances keep running):
   - M (default 1000) `GET /v1/instances` on one keep-alive connection after 50 of warm-up:
     p50/p99, then the daemon's VmRSS (before any GraphQL request: the schema is built at the
     first one);
   - M `POST /graphql` of `instances { id name imageName status desiredStatus gpuCount
     vcpuCount memoryInGb containerDiskInGb ports env ip gpus { uuid model milli } }` on one
     keep-alive connection after 50 of warm-up: p50/p99, then VmRSS again. The delta is what
     GraphQL adds to the daemon.
3. Terminates everything and stops the daemon.

REST requests are also split into their phases: to the response head (the daemon's work, TLS
and loopback), the body read, and the client's JSON parse. The client's garbage collector is
off while a loop is timed. Rate limits are off (gvbench). Prints a table; --json writes the raw samples. Needs root.
Python 3 standard library only.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gvbench as gb  # noqa: E402

QUERY = ("{ instances { id name imageName status desiredStatus gpuCount vcpuCount memoryInGb "
         "containerDiskInGb ports env ip gpus { uuid model milli } } }")


PHASES = []


def rest(conn, key):
    t0 = time.perf_counter()
    conn.request("GET", "/v1/instances", headers={"x-api-key": key})
    r = conn.getresponse()
    t1 = time.perf_counter()
    body = r.read()
    t2 = time.perf_counter()
    if r.status != 200:
        raise RuntimeError(f"list: {r.status} {body[:200]!r}")
    out = json.loads(body)
    t3 = time.perf_counter()
    # Where the time goes: to the response head (the daemon's work, TLS, loopback), reading
    # the body, and the client's own JSON parse.
    PHASES.append(((t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000, len(body)))
    return out


def graphql(conn, key):
    body = json.dumps({"query": QUERY})
    conn.request("POST", "/graphql", body=body,
                 headers={"x-api-key": key, "content-type": "application/json"})
    r = conn.getresponse()
    out = json.loads(r.read())
    if r.status != 200 or out.get("errors"):
        raise RuntimeError(f"graphql: {r.status} {str(out)[:200]}")
    return out["data"]["instances"]


def latency(d, call, m, n):
    conn = d.connection()
    lat = []
    # The client's garbage collector is off while timing: its pauses (up to 4 ms, in the
    # JSON parse) are this Python process's, not the API's.
    gc.collect()
    gc.disable()
    for i in range(50 + m):
        t0 = time.perf_counter()
        got = call(conn, d.key)
        dt = (time.perf_counter() - t0) * 1000
        if i == 0 and len(got) != n:
            raise RuntimeError(f"the list holds {len(got)} instances, not {n}")
        if i >= 50:
            lat.append(dt)
    gc.enable()
    conn.close()
    return lat


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=gb.DEFAULT_BINARY)
    ap.add_argument("-n", "--instances", type=int, default=200)
    ap.add_argument("-m", "--requests", type=int, default=1000)
    ap.add_argument("-r", "--rounds", type=int, default=4)
    ap.add_argument("--settle", type=float, default=15)
    ap.add_argument("--data-dir", default="/tmp/gvbench-gql")
    ap.add_argument("--port", type=int, default=18771)
    ap.add_argument("--rootfs", default="/tmp/gvbench-bbroot")
    ap.add_argument("--log", default="/tmp/gvbench-gql.log")
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
        time.sleep(a.settle)
        for rnd in range(a.rounds):
            d.restart([])
            time.sleep(2)
            del PHASES[:]
            r_lat = latency(d, rest, a.requests, a.instances)
            r_phases = PHASES[50:]
            r_rss = d.rss_kib()
            g_lat = latency(d, graphql, a.requests, a.instances)
            g_rss = d.rss_kib()
            res["samples"].append({"round": rnd, "rest_ms": r_lat, "graphql_ms": g_lat,
                                   "rest_phases_ms": r_phases,
                                   "rss_rest_kib": r_rss, "rss_graphql_kib": g_rss})
            gb.log(f"round {rnd}: REST p50 {statistics.median(r_lat):.2f} ms, GraphQL p50 "
                   f"{statistics.median(g_lat):.2f} ms, RSS {r_rss} → {g_rss} KiB")
    finally:
        gb.terminate_all(d)
        d.stop()
    ss = res["samples"]
    rows = []
    for name, key in (("REST GET /v1/instances", "rest_ms"), ("GraphQL instances", "graphql_ms")):
        lat = [x for s in ss for x in s[key]]
        rows.append([name, len(lat), f"{gb.percentile(lat, 50):.2f}", f"{gb.percentile(lat, 99):.2f}"])
    print(f"\n### {a.instances} instances, one keep-alive TLS connection ({a.rounds} rounds)\n")
    for i, name in enumerate(("REST: request to response head", "REST: body read",
                              "REST: client JSON parse")):
        lat = [x[i] for s in ss for x in s["rest_phases_ms"]]
        rows.append([name, len(lat), f"{gb.percentile(lat, 50):.2f}", f"{gb.percentile(lat, 99):.2f}"])
    gb.print_table(["call", "requests", "p50 ms", "p99 ms"], rows)
    size = statistics.median([x[3] for s in ss for x in s["rest_phases_ms"]])
    print(f"\nREST body {size / 1024:.0f} KiB")
    before = statistics.median([s["rss_rest_kib"] for s in ss]) / 1024
    after = statistics.median([s["rss_graphql_kib"] for s in ss]) / 1024
    print(f"\nRSS after the REST requests {before:.1f} MiB, after the GraphQL requests "
          f"{after:.1f} MiB: +{after - before:.1f} MiB (medians of {a.rounds} rounds)")
    print(f"machine: {res['machine']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main()
