#!/usr/bin/env python3
"""Where `instance create` spends its time inside the daemon.

Runs a private daemon whose PATH starts with a directory of thin bash shims for the host tools
it runs (`ip`, `iptables`, `mkfs.ext4`, `runc`). Each shim appends the wall-clock start and end
of the real command (bash's $EPOCHREALTIME, no extra fork) to a log. Instances are created one
after another with `instance create --wait`, so every tool run inside an instance's
provisioning window (from the daemon's `provisioning` and `running` events) belongs to it.

Prints, per phase, the median time per instance and the number of runs; what is left of the
provisioning window after the tool runs is the daemon's in-process work (loop device, mounts,
mount-table scans, /etc files, bundle, store writes) plus the shims' own bash start-up, which
is measured separately and subtracted. The shims slow each tool run by about a millisecond, so
the provisioning total here is a bit higher than in create_latency.py.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gvbench as gb  # noqa: E402

TOOLS = ["ip", "iptables", "mkfs.ext4", "runc"]

SHIM = """#!/bin/bash
t0=$EPOCHREALTIME
{real} "$@"
rc=$?
printf '%s %s %s %s\\n' "$t0" "$EPOCHREALTIME" "$rc" "{name} $*" >> {log}
exit $rc
"""


def phase_of(cmd):
    w = cmd.split()
    tool = w[0]
    if tool == "runc":
        # skip the --root value
        args = w[1:]
        if "--root" in args:
            i = args.index("--root")
            args = args[:i] + args[i + 2:]
        return f"runc {args[0]}" if args else "runc"
    if tool == "ip":
        if "veth" in w:
            return "ip link add veth"
        if w[1:3] == ["netns", "add"]:
            return "ip netns add"
        if w[1] == "-n":
            return "ip -n NS ... (in netns)"
        return "ip ... (host: bridge, veth master)"
    if tool == "iptables":
        return "iptables"
    return tool


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=gb.DEFAULT_BINARY)
    ap.add_argument("-n", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--data-dir", default="/tmp/gvbench-breakdown")
    ap.add_argument("--port", type=int, default=18742)
    ap.add_argument("--rootfs", default="/tmp/gvbench-bbroot")
    ap.add_argument("--log", default="/tmp/gvbench-breakdown.log")
    a = ap.parse_args()

    shimdir = a.data_dir + "-shims"
    execlog = os.path.join(shimdir, "exec.log")
    if os.path.exists(shimdir):
        raise SystemExit(f"{shimdir} exists")
    os.makedirs(shimdir)
    for t in TOOLS:
        real = shutil.which(t)
        p = os.path.join(shimdir, t)
        with open(p, "w") as f:
            f.write(SHIM.format(real=real, name=t, log=execlog))
        os.chmod(p, 0o755)
    overhead_ms = shim_overhead(shimdir)

    env = {"PATH": shimdir + ":" + os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    d = gb.Daemon(a.binary, a.data_dir, a.port, a.log, env_extra=env)
    d.start()
    ids = []
    windows = []
    try:
        gb.import_image(d, a.rootfs)
        api = d.api()
        for k in range(a.warmup + a.n):
            r = d.cli(*gb.create_args())
            iid = json.loads(r.stdout)["id"]
            ids.append(iid)
            ev = {e["message"] if e["kind"] == "state" else e["kind"]: e["at"]
                  for e in api.call("GET", f"/v1/instances/{iid}/events")}
            if k >= a.warmup:
                windows.append((iid, ev["provisioning"] / 1000, ev["running"] / 1000))
        api.close()
    finally:
        gb.terminate_all(d)
        d.stop()
        left = gb.leftovers(a.data_dir, ids)
        gb.remove_data_dir(a.data_dir)
        gb.log(f"leftovers: {left or 'none'}")

    runs = []
    for line in open(execlog):
        t0, t1, rc, cmd = line.rstrip("\n").split(" ", 3)
        runs.append((float(t0), float(t1), int(rc), cmd))
    shutil.rmtree(shimdir)

    per_phase = {}  # phase -> list of per-instance total ms
    counts = {}
    totals, rest = [], []
    examples = {}
    for iid, w0, w1 in windows:
        mine = [r for r in runs if r[0] >= w0 - 0.002 and r[1] <= w1 + 0.002]
        # `runc list` is the reconciler's periodic pass, not part of this instance's work
        acc = {}
        for t0, t1, rc, cmd in mine:
            ph = phase_of(cmd)
            acc[ph] = acc.get(ph, 0) + (t1 - t0) * 1000
            counts[ph] = counts.get(ph, 0) + 1
            examples.setdefault(ph, cmd)
        for ph, v in acc.items():
            per_phase.setdefault(ph, []).append(v)
        win = (w1 - w0) * 1000
        totals.append(win)
        rest.append(win - sum(acc.values()) - overhead_ms * len(mine))
    n = len(windows)
    rows = []
    for ph, vals in sorted(per_phase.items(), key=lambda kv: -statistics.median(kv[1])):
        vals = vals + [0.0] * (n - len(vals))
        rows.append([ph, f"{counts[ph] / n:.1f}", f"{statistics.median(vals):.1f}",
                     f"{statistics.fmean(vals):.1f}"])
    rows.append(["in-process, approx. (window - tool runs - shim cost)", "",
                 f"{statistics.median(rest):.1f}", f"{statistics.fmean(rest):.1f}"])
    rows.append(["provisioning window (events)", "", f"{statistics.median(totals):.1f}",
                 f"{statistics.fmean(totals):.1f}"])
    print(f"\nprovisioning breakdown over {n} instances, ms per instance "
          f"({gb.machine()}; shim overhead {overhead_ms:.2f} ms per run, subtracted)\n")
    gb.print_table(["phase", "runs/inst", "median ms", "mean ms"], rows)
    print("\nexample command per phase:")
    for ph, cmd in examples.items():
        print(f"  {ph}: {cmd[:150]}")


def shim_overhead(shimdir):
    """Median extra wall time of a shimmed run over the real one (`ip -V`)."""
    def t(cmd):
        vals = []
        for _ in range(30):
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL)
            vals.append((time.perf_counter() - t0) * 1000)
        return statistics.median(vals)
    real = t(["ip", "-V"])
    shim = t([os.path.join(shimdir, "ip"), "-V"])
    # the shim's logged interval already contains the real run: overhead is the rest
    open(os.path.join(shimdir, "exec.log"), "w").close()
    return max(0.0, shim - real)


if __name__ == "__main__":
    main()
