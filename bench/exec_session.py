#!/usr/bin/env python3
"""Interactive exec (`instance exec -i/-t`) against the one-shot exec: start-to-exit latency
and stdin throughput, through the real CLI.

1. Latency: `instance exec ID -- true` (one-shot, streamed POST), `exec -i ID -- true` (a
   WebSocket session on pipes) and `exec -it ID -- true` (a session on a terminal: the exec
   shim, a detached `runc exec --tty`, the pty master over the console socket), N runs each,
   sequential, after 3 warm-up runs; wall time of the CLI process, min/p50/p90/max.
2. Throughput: `exec -i ID -- wc -c` fed N MiB on stdin: MiB/s end to end (CLI → WebSocket →
   daemon → runc's stdin → wc), and whether the count is exact.

Needs root. Python 3 standard library only. Prints Markdown tables.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gvbench as gb  # noqa: E402


def run_pty(args, env):
    """Runs the CLI with a pty as stdin/stdout/stderr; returns (rc, output)."""
    master, slave = os.openpty()
    p = subprocess.Popen(args, env=env, stdin=slave, stdout=slave, stderr=slave,
                         start_new_session=True)
    os.close(slave)
    out = bytearray()

    def reader():
        while True:
            try:
                b = os.read(master, 4096)
            except OSError:
                return
            if not b:
                return
            out.extend(b)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    rc = p.wait()
    t.join(timeout=5)
    os.close(master)
    return rc, bytes(out)


def latency(d, iid, runs):
    env = d.cli_env()
    kinds = [
        ("exec (one-shot)", ["instance", "exec", iid, "--", "true"], False),
        ("exec -i (pipes session)", ["instance", "exec", "-i", iid, "--", "true"], False),
        ("exec -it (terminal session)", ["instance", "exec", "-it", iid, "--", "true"], True),
    ]
    rows = []
    for name, args, tty in kinds:
        times = []
        for i in range(runs + 3):
            t0 = time.perf_counter()
            if tty:
                rc, out = run_pty([d.binary, *args], env)
            else:
                p = subprocess.run([d.binary, *args], env=env, stdin=subprocess.DEVNULL,
                                   capture_output=True)
                rc, out = p.returncode, p.stderr
            dt = time.perf_counter() - t0
            if rc != 0:
                raise SystemExit(f"{name} failed ({rc}): {out[-500:]!r}")
            if i >= 3:
                times.append(dt * 1000)
        rows.append([name, runs, f"{min(times):.1f}", f"{gb.percentile(times, 50):.1f}",
                     f"{gb.percentile(times, 90):.1f}", f"{max(times):.1f}"])
    gb.print_table(["command", "runs", "min ms", "p50 ms", "p90 ms", "max ms"], rows)


def throughput(d, iid, sizes_mib):
    env = d.cli_env()
    rows = []
    chunk = bytes(range(256)) * 4096  # 1 MiB
    for mib in sizes_mib:
        p = subprocess.Popen([d.binary, "instance", "exec", "-i", iid, "--", "wc", "-c"],
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        t0 = time.perf_counter()

        def feed():
            for _ in range(mib):
                p.stdin.write(chunk)
            p.stdin.close()

        t = threading.Thread(target=feed)
        t.start()
        out = p.stdout.read()
        p.stderr.read()
        p.wait()
        t.join()
        dt = time.perf_counter() - t0
        got = out.decode().strip()
        rows.append([mib, f"{dt:.2f}", f"{mib / dt:.1f}", got == str(mib << 20),
                     p.returncode])
    gb.print_table(["MiB in", "seconds", "MiB/s", "count exact", "exit"], rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=gb.DEFAULT_BINARY)
    ap.add_argument("--port", type=int, default=18761)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--sizes", default="16,64")
    a = ap.parse_args()
    print(f"machine: {gb.machine()}")
    data = f"/var/tmp/gv-bench-exec-session-{os.getpid()}"
    d = gb.Daemon(a.binary, data, a.port, data + ".log",
                  extra_args=["--net-prefix", "gy", "--net-pool", "10.79.0.0"]).start()
    try:
        rootfs = f"/tmp/gv-bench-rootfs-{os.getpid()}"
        gb.import_image(d, rootfs)
        shutil.rmtree(rootfs, ignore_errors=True)
        iid = json.loads(d.cli(*gb.create_args()).stdout)["id"]
        gb.log("latency")
        latency(d, iid, a.runs)
        gb.log("throughput")
        throughput(d, iid, [int(x) for x in a.sizes.split(",")])
    finally:
        gb.terminate_all(d)
        d.stop()
        gb.remove_data_dir(data)


if __name__ == "__main__":
    main()
