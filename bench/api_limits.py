#!/usr/bin/env python3
"""Exec and log caps shown working, and daemon CPU while 1000 hanging execs are attempted.

1. Exec output cap: `instance exec ID -- yes` against daemons with `--exec-max-output` 1, 4 and
   16 MiB: bytes the client received vs the cap, the exit status, the daemon's message.
2. Exec deadline: `instance exec --timeout 2s ID -- sleep ...`: exit status and wall time.
3. Log cap: an instance that writes N MiB (N = 4, 16, 64) with `--log-max-bytes 1MiB`: bytes
   of log on disk vs the cap, and whether the newest line is readable.
4. Exec storm: 50 threads × 20 raw `POST /exec` of `sleep` for one tenant (limit 8 at once);
   accepted ones hang with their connection open. Daemon CPU (utime+stime from
   /proc/<pid>/stat) and threads over the storm, against the same window idle; telemetry
   samples (/v1/gpus/stats `at`) seen and whether a `create --wait` completed meanwhile.

Needs root. Python 3 standard library only. Prints Markdown tables.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gvbench as gb  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK


def sleeper(d, key=None):
    env = d.cli_env()
    if key:
        env["GPUVISOR_API_KEY"] = key
    r = subprocess.run([d.binary, *gb.create_args()], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout)["id"]


def start(binary, name, port, extra):
    dd = f"/var/tmp/gvbench-limits-{name}"
    gb.remove_data_dir(dd)
    d = gb.Daemon(binary, dd, port, f"/tmp/gvbench-limits-{name}.log", extra_args=extra)
    d.start()
    gb.import_image(d, "/tmp/gvbench-bbroot")
    return d


def finish(d):
    gb.terminate_all(d)
    d.stop()
    gb.remove_data_dir(d.data_dir)


def exec_cap(binary, port):
    rows = []
    for mib in (1, 4, 16):
        d = start(binary, f"cap{mib}", port, ["--exec-max-output", f"{mib}MiB"])
        try:
            iid = sleeper(d)
            t = time.time()
            r = subprocess.run([binary, "instance", "exec", iid, "--", "yes", "flood"],
                               env=d.cli_env(), capture_output=True)
            rows.append([f"{mib} MiB", len(r.stdout), mib << 20, r.returncode,
                         f"{time.time() - t:.2f}", r.stderr.decode().strip()[:70]])
        finally:
            finish(d)
    print("\n### Exec output cap\n")
    gb.print_table(["cap", "bytes received", "cap bytes", "exit", "wall s", "message"], rows)


def exec_deadline(binary, port):
    d = start(binary, "deadline", port, [])
    try:
        iid = sleeper(d)
        rows = []
        for t_s in (1, 2, 5):
            t = time.time()
            r = subprocess.run([binary, "instance", "exec", "--timeout", f"{t_s}s", iid, "--",
                                "sleep", "1000009"], env=d.cli_env(), capture_output=True)
            rows.append([f"{t_s}s", r.returncode, f"{time.time() - t:.2f}",
                         r.stderr.decode().strip()[:70]])
    finally:
        finish(d)
    print("\n### Exec deadline\n")
    gb.print_table(["--timeout", "exit", "wall s", "message"], rows)


def log_cap(binary, port):
    d = start(binary, "logs", port, ["--log-max-bytes", "1MiB"])
    rows = []
    try:
        for mib in (4, 16, 64):
            env = d.cli_env()
            args = ["instance", "create", "--image", "busybox", "--vcpus", "1", "--memory",
                    "64MiB", "--container-disk", "256MiB", "--wait", "-o", "json", "--", "sh",
                    "-c", f"yes log-flood | head -c {mib << 20}; echo newest-line; sleep 1000000"]
            iid = json.loads(subprocess.run([binary, *args], env=env, capture_output=True,
                                            text=True, check=True).stdout)["id"]
            deadline = time.time() + 300
            text = ""
            while time.time() < deadline:
                text = subprocess.run([binary, "instance", "logs", iid], env=env,
                                      capture_output=True, text=True).stdout
                if "newest-line" in text:
                    break
                time.sleep(0.5)
            logdir = os.path.join(d.data_dir, "logs", iid)
            on_disk = sum(os.path.getsize(os.path.join(logdir, f)) for f in os.listdir(logdir))
            rows.append([f"{mib} MiB", on_disk, 1 << 20, len(os.listdir(logdir)),
                         text.endswith("newest-line\n")])
            d.cli("instance", "terminate", iid, "--wait")
    finally:
        finish(d)
    print("\n### Log cap (--log-max-bytes 1MiB)\n")
    gb.print_table(["written", "bytes on disk", "cap", "segments", "newest line readable"], rows)


def storm(binary, port, threads_n=50, per_thread=20):
    d = start(binary, "storm", port, [])
    try:
        d.cli("tenant", "create", "storm")
        key = json.loads(d.cli("-o", "json", "key", "create", "--tenant", "storm").stdout)["secret"]
        iid = sleeper(d, key)
        pid = d.proc.pid

        def stats_at():
            c = d.api()
            v = c.call("GET", "/v1/gpus/stats")
            c.close()
            return v[0]["at"]

        # Idle baseline over the same kind of window.
        c0, t0 = cpu_seconds(pid), time.time()
        time.sleep(10)
        idle = (cpu_seconds(pid) - c0) / (time.time() - t0)

        stop = threading.Event()
        counts = {"200": 0, "429": 0, "other": 0}
        lock = threading.Lock()
        body = json.dumps({"command": ["sleep", "1000008"]})
        req = (f"POST /v1/instances/{iid}/exec HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\n"
               f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
               f"connection: close\r\n\r\n{body}").encode()

        def worker():
            held = []
            for _ in range(per_thread):
                s = d.socket()
                s.sendall(req)
                head = s.recv(12)
                st = head[9:12].decode(errors="replace")
                with lock:
                    counts[st if st in counts else "other"] += 1
                if st == "200":
                    held.append(s)
                else:
                    s.close()
            stop.wait()
            for s in held:
                s.close()

        c1, t1 = cpu_seconds(pid), time.time()
        ts = [threading.Thread(target=worker) for _ in range(threads_n)]
        for t in ts:
            t.start()
        ats = {stats_at()}
        create_start = time.time()
        sleeper(d)
        create_s = time.time() - create_start
        while time.time() - t1 < 10:
            ats.add(stats_at())
            time.sleep(0.2)
        storm_cpu = (cpu_seconds(pid) - c1) / (time.time() - t1)
        threads = d.threads()
        stop.set()
        for t in ts:
            t.join()
        # Clients gone: every hanging exec must go.
        t2 = time.time()
        while time.time() - t2 < 60:
            left = subprocess.run(["pgrep", "-f", "sleep 1000008"], capture_output=True,
                                  text=True).stdout.split()
            if not left:
                break
            time.sleep(0.2)
        print("\n### 1000 hanging exec attempts (one tenant, exec_per_tenant 8)\n")
        gb.print_table(
            ["attempts", "accepted", "refused 429", "other", "daemon CPU idle",
             "daemon CPU storm (10 s)", "threads", "stats samples seen", "create --wait s",
             "exec processes left after clients left"],
            [[threads_n * per_thread, counts["200"], counts["429"], counts["other"],
              f"{idle * 100:.1f}%", f"{storm_cpu * 100:.1f}%", threads, len(ats),
              f"{create_s:.2f}", len(left)]])
    finally:
        finish(d)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=gb.DEFAULT_BINARY)
    ap.add_argument("--port", type=int, default=18751)
    ap.add_argument("--only", choices=["cap", "deadline", "logs", "storm"])
    a = ap.parse_args()
    print(f"machine: {gb.machine()}" if hasattr(gb, "machine") else "")
    steps = {"cap": exec_cap, "deadline": exec_deadline, "logs": log_cap, "storm": storm}
    for name, f in steps.items():
        if a.only in (None, name):
            gb.log(f"running {name}")
            f(a.binary, a.port)


if __name__ == "__main__":
    main()
