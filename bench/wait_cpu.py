#!/usr/bin/env python3
"""Daemon CPU while clients `--wait`: N instances whose PID 1 ignores SIGTERM are stopped with
`gpuvisor instance stop --wait` at once, so each stop lasts the whole stop grace (default 20 s)
and N clients wait side by side. The daemon's CPU time (utime+stime from /proc) over that window
is printed as a share of one core, with the number of clients. A `--wait` that polls instead of
long-polling shows here as a core kept busy.

Needs root. Python 3 standard library only.
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gvbench as gb  # noqa: E402


def cpu_ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])  # utime + stime, in clock ticks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=gb.DEFAULT_BINARY)
    ap.add_argument("-n", type=int, default=10, help="clients waiting at once (default 10)")
    ap.add_argument("--grace", default="20s", help="stop grace = how long each wait lasts")
    ap.add_argument("--data-dir", default="/tmp/gvbench-wait")
    ap.add_argument("--port", type=int, default=18743)
    ap.add_argument("--rootfs", default="/tmp/gvbench-bbroot")
    ap.add_argument("--log", default="/tmp/gvbench-wait.log")
    a = ap.parse_args()

    d = gb.Daemon(a.binary, a.data_dir, a.port, a.log, extra_args=["--stop-grace", a.grace])
    d.start()
    try:
        gb.import_image(d, a.rootfs)
        ids = []
        for _ in range(a.n):
            r = d.cli(*gb.create_args())
            ids.append(__import__("json").loads(r.stdout)["id"])
        time.sleep(2)  # let the creates' own work settle
        hz = os.sysconf("SC_CLK_TCK")
        idle0, t0 = cpu_ticks(d.proc.pid), time.time()
        time.sleep(5)
        idle_share = (cpu_ticks(d.proc.pid) - idle0) / hz / (time.time() - t0)
        c0, t0 = cpu_ticks(d.proc.pid), time.time()
        procs = [subprocess.Popen([a.binary, "instance", "stop", i, "--wait", "--timeout", "120s"],
                                  env=d.cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for i in ids]
        rcs = [p.wait() for p in procs]
        wall = time.time() - t0
        share = (cpu_ticks(d.proc.pid) - c0) / hz / wall
        if any(rcs):
            gb.log(f"some waits failed: {rcs}")
        gb.print_table(["clients", "wait (s)", "daemon CPU while waiting", "daemon CPU idle"],
                       [[str(a.n), f"{wall:.1f}", f"{share * 100:.1f} % of a core",
                         f"{idle_share * 100:.1f} % of a core"]])
        print(f"machine: {gb.machine()}")
    finally:
        gb.terminate_all(d)
        d.stop()


if __name__ == "__main__":
    main()
