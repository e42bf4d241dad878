#!/usr/bin/env python3
"""Create latency step by step, side by side with bare `runc run --detach` in the same run.

Interleaved, like create_latency.py: one `gpuvisor instance create --wait` (CLI process start to
exit), then one bare `runc run --detach` of the same bundle the daemon generated (its rootfs an
overlay of the same image layer and its netns both made ahead of time and not counted; only the
runc command is timed). Both kinds of container stay running until the end.

The daemon runs with `GPUVISOR_LOG=info,gpuvisor_timings=debug`, so `Node::provision` logs one
line per instance with the wall-clock start (µs) and each step's duration (µs). The daemon's
events (`created`, `provisioning`, `running`, ms) and the CLI's start and exit (µs, this
process's clock = the same wall clock) place the engine's parts around them:

  request -> row        CLI start -> `created` event (CLI start-up, HTTP, validation,
                        placement, store insert)
  reconciler pick-up    `created` -> `provisioning` (wake-up, pass, state write)
  plan + hand-off       `provisioning` -> node provision start (store reads, blocking task)
  node steps            the timing line's steps (netns+veth, disk+overlay, ..., runc run)
  -> state running      node end -> `running` event
  -> CLI exit           `running` -> CLI exit (state write, long-poll answer, CLI exit)

`--fill K` creates K more instances first (not measured), to see the steps on a fuller host.
Prints a table of p50 and p90 per part; `--json FILE` writes the raw samples. Needs root.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gvbench as gb  # noqa: E402
import create_latency as cl  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LINE = re.compile(r"gpuvisor_timings: provision (\S+) ok=(\S+) start_us=(\d+) total_us=(\d+) ?(.*)$")


DISK = re.compile(r"gpuvisor_timings: disk (\S+) fresh=\S+ image_us=(\d+) loop_us=(\d+) mount_us=(\d+) overlay_us=(\d+)")


def timings(log_path):
    out = {}
    disk = {}
    for line in open(log_path, errors="replace"):
        line = ANSI.sub("", line.rstrip("\n"))
        d = DISK.search(line)
        if d:
            disk[d.group(1)] = {"disk image (pool or mkfs)": int(d.group(2)) / 1000,
                                "loop device attach": int(d.group(3)) / 1000,
                                "ext4 mount": int(d.group(4)) / 1000,
                                "overlay mount": int(d.group(5)) / 1000}
            continue
        m = LINE.search(line)
        if not m:
            continue
        steps = {}
        for kv in m.group(5).split():
            k, v = kv.split("=", 1)
            steps[k] = int(v) / 1000
        out[m.group(1)] = {"ok": m.group(2) == "true", "start_ms": int(m.group(3)) / 1000,
                           "total_ms": int(m.group(4)) / 1000, "steps": steps}
    for iid, t in out.items():
        t["disk"] = disk.get(iid, {})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=gb.DEFAULT_BINARY)
    ap.add_argument("--runc", default="runc")
    ap.add_argument("-n", type=int, default=40, help="measured pairs (default 40)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured pairs first (default 3)")
    ap.add_argument("--fill", type=int, default=0, help="unmeasured instances created first")
    ap.add_argument("--data-dir", default="/tmp/gvbench-steps")
    ap.add_argument("--port", type=int, default=18744)
    ap.add_argument("--rootfs", default="/tmp/gvbench-bbroot")
    ap.add_argument("--log", default="/tmp/gvbench-steps.log")
    ap.add_argument("--json", help="write raw samples here")
    a = ap.parse_args()

    base = a.data_dir + "-baseline"
    if os.path.exists(base):
        raise SystemExit(f"{base} exists")
    d = gb.Daemon(a.binary, a.data_dir, a.port, a.log, log_filter="info,gpuvisor_timings=debug")
    gb.log(f"starting {a.binary} on {d.endpoint}, data dir {a.data_dir}")
    d.start()
    gv_ids, rc_names, netns = [], [], []
    samples = []
    try:
        gb.import_image(d, a.rootfs)
        api = d.api()
        os.makedirs(base)
        for k in range(a.fill):
            r = d.cli(*gb.create_args())
            gv_ids.append(json.loads(r.stdout)["id"])
            if (k + 1) % 20 == 0:
                gb.log(f"fill {k + 1}/{a.fill}")
        total = a.warmup + a.n
        template = layer = None
        for k in range(total):
            t0_wall = time.time()
            t0 = time.perf_counter()
            r = d.cli(*gb.create_args())
            t_gv = (time.perf_counter() - t0) * 1000
            t1_wall = t0_wall + t_gv / 1000
            inst = json.loads(r.stdout)
            iid = inst["id"]
            gv_ids.append(iid)
            if inst["state"] != "running":
                raise RuntimeError(f"{iid} is {inst['state']}")
            ev = {e["message"] if e["kind"] == "state" else e["kind"]: e["at"]
                  for e in api.call("GET", f"/v1/instances/{iid}/events")}
            if template is None:
                template = json.load(open(os.path.join(a.data_dir, "bundles", iid, "config.json")))
                layer = cl.overlay_lower(os.path.join(a.data_dir, "instances", iid, "rootfs"))
            name = f"gvs{k:04d}"
            bundle, ns = cl.prepare_bundle(base, name, template, layer)
            netns.append(ns)
            logf = open(os.path.join(bundle, "log"), "a")
            t0 = time.perf_counter()
            rr = subprocess.run([a.runc, "--root", cl.RUNC_ROOT, "run", "--detach", "--bundle", bundle,
                                 "--pid-file", os.path.join(bundle, "pid"), name],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
            t_rc = (time.perf_counter() - t0) * 1000
            logf.close()
            rc_names.append(name)
            if rr.returncode != 0:
                raise RuntimeError(f"runc run {name} failed: {open(os.path.join(bundle, 'log')).read()}")
            if k >= a.warmup:
                samples.append({"id": iid, "cli_start_ms": t0_wall * 1000, "cli_end_ms": t1_wall * 1000,
                                "cli_ms": t_gv, "runc_ms": t_rc, "events": ev})
            gb.log(f"{k + 1}/{total}: gpuvisor {t_gv:.0f} ms, runc {t_rc:.0f} ms")
        api.close()
        load = gb.loadavg()
    finally:
        gb.log("cleaning up")
        for name in rc_names:
            subprocess.run([a.runc, "--root", cl.RUNC_ROOT, "delete", "-f", name],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        left = [f"runc container {c}" for c in cl.runc_list(a.runc)]
        cl.cleanup_baseline(a.runc, base, netns)
        n, failed = gb.terminate_all(d)
        d.stop()
        left += gb.leftovers(a.data_dir, gv_ids) + gb.leftovers(base, [])
        left += [f"netns {ns}" for ns in netns if os.path.exists(f"/var/run/netns/{ns}")]
        tim = timings(a.log)
        gb.remove_data_dir(a.data_dir)
        gb.log(f"terminated {n} instances ({len(failed)} failures); leftovers: {left or 'none'}")

    for s in samples:
        t = tim.get(s["id"])
        if t is None:
            raise SystemExit(f"no timing line for {s['id']} in {a.log}")
        s["node"] = t
    report(a, samples, load)
    if a.json:
        json.dump({"machine": gb.machine(), "samples": samples}, open(a.json, "w"), indent=1)


def parts(s):
    ev, node = s["events"], s["node"]
    start = node["start_ms"]
    end = start + node["total_ms"]
    out = [("request -> row (CLI start -> created)", ev["created"] - s["cli_start_ms"]),
           ("reconciler pick-up (created -> provisioning)", ev["provisioning"] - ev["created"]),
           ("plan + hand-off (provisioning -> node start)", start - ev["provisioning"])]
    for k, v in node["steps"].items():
        out.append((f"  node: {k}", v))
        if k == "disk_overlay":
            out += [(f"    {dk}", dv) for dk, dv in node.get("disk", {}).items()]
    out += [("node provision total", node["total_ms"]),
            ("node end -> running event", ev["running"] - end),
            ("running -> CLI exit (long poll answer, CLI exit)", s["cli_end_ms"] - ev["running"]),
            ("gpuvisor create --wait (CLI, end to end)", s["cli_ms"]),
            ("bare runc run --detach", s["runc_ms"])]
    return out


def report(a, samples, load):
    if not samples:
        return
    cols = {}
    order = []
    for s in samples:
        for k, v in parts(s):
            if k not in cols:
                order.append(k)
                cols[k] = []
            cols[k].append(v)
    rows = []
    for k in order:
        v = cols[k]
        rows.append([k, len(v), f"{gb.percentile(v, 50):.1f}", f"{gb.percentile(v, 90):.1f}"])
    print(f"\ncreate --wait by step, ms ({gb.machine()}; {a.binary}; fill {a.fill}; "
          f"load avg at end {load})\n")
    gb.print_table(["part", "n", "p50", "p90"], rows)
    p50 = lambda k: gb.percentile(cols[k], 50)  # noqa: E731
    print(f"\nratio p50(gpuvisor CLI) / p50(runc) = "
          f"{p50('gpuvisor create --wait (CLI, end to end)') / p50('bare runc run --detach'):.2f}"
          "   (target <= 1.25)")


if __name__ == "__main__":
    main()
