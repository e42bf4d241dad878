#!/usr/bin/env python3
"""Daemon memory and `GET /v1/instances` latency with many running instances.

1. Starts a private daemon and reads its VmRSS (/proc/PID/status) idle, 2 s after start.
2. Creates N instances (default 200) one after another with `instance create --wait`
   (busybox `sleep`, 1 vCPU, 64 MiB memory, 256 MiB container disk; the daemon runs with
   --cpu-oversubscription 1000), lets the daemon settle, and samples VmRSS for 10 s.
3. Sends M (default 1000) `GET /v1/instances` on one keep-alive connection (http.client)
   and reports the latency percentiles; every answer is checked to hold N instances.
4. Terminates everything (`instance terminate --wait`), stops the daemon, and checks that no
   mount, loop device, netns, veth or cgroup of the run is left.

Prints tables. Needs root. Python 3 standard library only.
"""

import argparse
import http.client
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gvbench as gb  # noqa: E402
import create_steps as cs  # noqa: E402


def sample_rss(d, seconds, every=0.5):
    vals = []
    end = time.time() + seconds
    while time.time() < end:
        vals.append(d.rss_kib())
        time.sleep(every)
    return vals


def cpu_ticks(pid):
    """(own utime+stime, reaped children's cutime+cstime) in clock ticks."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12]), int(f[13]) + int(f[14])


def time_runc_list(d, runs=10):
    import subprocess
    vals = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(["runc", "--root", os.path.join(d.data_dir, "run", "runc"), "list",
                        "--format", "json"], stdout=subprocess.DEVNULL, check=True)
        vals.append((time.perf_counter() - t0) * 1000)
    return statistics.median(vals)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=gb.DEFAULT_BINARY)
    ap.add_argument("-n", "--instances", type=int, default=200)
    ap.add_argument("-m", "--requests", type=int, default=1000)
    ap.add_argument("--settle", type=float, default=15, help="seconds to wait before sampling RSS at N")
    ap.add_argument("--data-dir", default="/tmp/gvbench-scale")
    ap.add_argument("--port", type=int, default=18743)
    ap.add_argument("--rootfs", default="/tmp/gvbench-bbroot")
    ap.add_argument("--log", default="/tmp/gvbench-scale.log")
    ap.add_argument("--json", help="write raw samples here")
    a = ap.parse_args()

    d = gb.Daemon(a.binary, a.data_dir, a.port, a.log, log_filter="info,gpuvisor_timings=debug")
    d.start()
    gb.log(f"daemon pid {d.proc.pid} on {d.endpoint}")
    ids = []
    res = {"machine": gb.machine()}
    try:
        time.sleep(2)
        idle = sample_rss(d, 3)
        res["idle_rss_kib"] = statistics.median(idle)
        res["idle_threads"] = d.threads()
        gb.import_image(d, a.rootfs)
        time.sleep(1)
        res["after_import_rss_kib"] = d.rss_kib()
        gb.log(f"idle RSS {res['idle_rss_kib']} KiB, after image import {res['after_import_rss_kib']} KiB")

        create_ms = []
        t_start = time.time()
        for k in range(a.instances):
            t0 = time.perf_counter()
            r = d.cli(*gb.create_args())
            create_ms.append((time.perf_counter() - t0) * 1000)
            inst = json.loads(r.stdout)
            ids.append(inst["id"])
            if inst["state"] != "running":
                raise RuntimeError(f"{inst['id']} is {inst['state']}")
            if (k + 1) % 20 == 0:
                gb.log(f"{k + 1}/{a.instances} running, last create {create_ms[-1]:.0f} ms, "
                       f"RSS {d.rss_kib()} KiB, load {gb.loadavg()}")
        res["create_all_s"] = time.time() - t_start
        res["ids"] = list(ids)
        res["create_ms"] = create_ms

        gb.log(f"settling {a.settle}s, then sampling RSS for 10s")
        time.sleep(a.settle)
        c0, w0 = cpu_ticks(d.proc.pid), time.time()
        at_n = sample_rss(d, 10)
        c1, w1 = cpu_ticks(d.proc.pid), time.time()
        hz = os.sysconf("SC_CLK_TCK")
        res["idle_cpu_own_pct"] = (c1[0] - c0[0]) / hz / (w1 - w0) * 100
        res["idle_cpu_children_pct"] = (c1[1] - c0[1]) / hz / (w1 - w0) * 100
        res["runc_list_ms"] = time_runc_list(d)
        res["rss_at_n_kib"] = statistics.median(at_n)
        res["rss_at_n_max_kib"] = max(at_n)
        res["threads_at_n"] = d.threads()

        # --- list latency ---
        conn = d.connection()
        hdr = {"x-api-key": d.key}
        lat = []
        size = 0
        for i in range(20 + a.requests):
            t0 = time.perf_counter()
            conn.request("GET", "/v1/instances", headers=hdr)
            r = conn.getresponse()
            body = r.read()
            dt = (time.perf_counter() - t0) * 1000
            if r.status != 200:
                raise RuntimeError(f"GET /v1/instances: {r.status}")
            if i >= 20:
                lat.append(dt)
            size = len(body)
        got = len(json.loads(body))
        conn.close()
        if got != a.instances:
            raise RuntimeError(f"list returned {got} instances, expected {a.instances}")
        res["list_ms"] = lat
        res["list_bytes"] = size
        res["rss_after_list_kib"] = d.rss_kib()
        res["load_end"] = gb.loadavg()
    finally:
        gb.log("terminating everything")
        t0 = time.time()
        n, failed = gb.terminate_all(d)
        gb.log(f"terminated {n} in {time.time() - t0:.0f}s, {len(failed)} failures")
        d.stop()
        res["timings"] = {i: t for i, t in cs.timings(a.log).items() if i in ids}
        left = gb.leftovers(a.data_dir, ids)
        gb.remove_data_dir(a.data_dir)
        res["leftovers"] = left
        gb.log(f"leftovers: {left or 'none'}")

    report(a, res)
    if a.json:
        json.dump(res, open(a.json, "w"), indent=1)


def report(a, res):
    n = a.instances
    idle = res["idle_rss_kib"]
    per = (res["rss_at_n_kib"] - idle) / n
    print(f"\ndaemon memory ({res['machine']})\n")
    gb.print_table(["measure", "value", "target"], [
        ["VmRSS idle (2 s after start)", f"{idle / 1024:.1f} MiB", "<= 30 MiB"],
        ["VmRSS after image import", f"{res['after_import_rss_kib'] / 1024:.1f} MiB", ""],
        [f"VmRSS with {n} running (median of 10 s)", f"{res['rss_at_n_kib'] / 1024:.1f} MiB", ""],
        [f"VmRSS with {n} running (max of 10 s)", f"{res['rss_at_n_max_kib'] / 1024:.1f} MiB", ""],
        [f"(RSS@{n} - idle) / {n}", f"{per:.0f} KiB", "<= 256 KiB"],
        ["VmRSS after the list benchmark", f"{res['rss_after_list_kib'] / 1024:.1f} MiB", ""],
        ["threads idle / with instances", f"{res['idle_threads']} / {res['threads_at_n']}", ""],
    ])
    print(f"\nwith {n} running and no requests, the daemon used {res['idle_cpu_own_pct']:.1f}% of a CPU "
          f"itself and {res['idle_cpu_children_pct']:.1f}% in the tools it ran (reaped children); "
          f"`runc list --format json` over its root takes {res['runc_list_ms']:.0f} ms (median of 10)")
    s = gb.summary(res["list_ms"])
    print(f"\nGET /v1/instances with {n} instances, {s['n']} requests, one keep-alive connection, "
          f"{res['list_bytes']} bytes per answer (load avg at end {res['load_end']})\n")
    gb.print_table(["min", "p50", "p95", "p99", "max", "mean", "target p99"], [[
        f"{s['min']:.2f}", f"{s['p50']:.2f}", f"{s['p95']:.2f}", f"{s['p99']:.2f}",
        f"{s['max']:.2f}", f"{s['mean']:.2f}", "<= 5 ms"]])
    c = res["create_ms"]
    k = min(20, len(c))
    print(f"\ncreate --wait while filling up (ms): first {k} p50 {gb.percentile(c[:k], 50):.0f}, "
          f"last {k} p50 {gb.percentile(c[-k:], 50):.0f}, all {len(c)} in {res['create_all_s']:.0f} s")
    # The daemon's provisioning steps (its gpuvisor_timings lines) for the same two groups.
    ids = res.get("ids", [])
    tim = res.get("timings", {})
    if len(ids) >= 2 * k and all(i in tim for i in ids[:k] + ids[-k:]):
        def med(group, f):
            return gb.percentile([f(tim[i]) for i in group], 50)
        rows = [["create --wait (CLI)", f"{gb.percentile(c[:k], 50):.1f}",
                 f"{gb.percentile(c[-k:], 50):.1f}"],
                ["node provision total", f"{med(ids[:k], lambda t: t['total_ms']):.1f}",
                 f"{med(ids[-k:], lambda t: t['total_ms']):.1f}"]]
        for step in tim[ids[0]]["steps"]:
            rows.append([f"  {step}", f"{med(ids[:k], lambda t: t['steps'].get(step, 0)):.1f}",
                         f"{med(ids[-k:], lambda t: t['steps'].get(step, 0)):.1f}"])
        print(f"\np50 by step (ms), first {k} vs last {k} creates\n")
        gb.print_table(["part", f"first {k}", f"last {k}"], rows)


if __name__ == "__main__":
    main()
