#!/usr/bin/env python3
"""Serverless endpoints: cold start, flashboot, warm latency, autoscaler reaction, throughput.

1. Starts a private daemon (worker API on a free port), imports the worker image of
   scripts/make-worker-image (Debian 12 + RunPod's worker SDK from PyPI, the handler of
   tests/serverless/handler.py), makes a tenant, a key and a template (`echo`, 16 jobs at once
   per worker).
2. Cold start, R rounds: an endpoint at 0 workers; the time from `POST /v2/<id>/runsync` to its
   answer with the output (a worker instance is made, Python starts and imports runpod, takes
   the job). Warm: the same with the worker up and idle. Flashboot: an endpoint with
   --flashboot whose worker was parked (frozen) after its idle timeout.
   The same cold start with examples/serverless/worker.sh (busybox sh + wget, the plain HTTP
   worker contract) in a busybox image: the platform's part without Python's start.
3. Autoscaler reaction: a step of J slow jobs (each 2 s) on an endpoint with request-count:25
   and workers-max 4: the time from the step to each worker being made and to each worker's
   first job.
4. Throughput: N echo jobs on 3 warm workers, submitted from 16 threads: jobs per second from
   the first submission to the last completion.
Needs root. Python 3 standard library; the image tar must exist (the serverless test builds
it: `cargo test -p gpuvisor --test serverless`, or run scripts/make-worker-image).
"""

import argparse
import glob
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gvbench import Daemon, import_image, log, machine, print_table, summary  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Queue:
    """The queue API with one keep-alive connection per thread."""

    def __init__(self, daemon, key):
        self.d = daemon
        self.key = key
        self.local = threading.local()

    def call(self, method, path, body=None, timeout=300):
        c = getattr(self.local, "c", None)
        if c is None:
            c = self.local.c = self.d.connection(timeout=timeout)
        data = json.dumps(body).encode() if body is not None else None
        try:
            c.request(method, path, body=data, headers={
                "authorization": f"Bearer {self.key}", "content-type": "application/json"})
            r = c.getresponse()
            raw = r.read()
        except (OSError, ConnectionError):
            self.local.c = None
            raise
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: {r.status} {raw[:300]!r}")
        return json.loads(raw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="target/release/gpuvisor")
    ap.add_argument("--image", default=None, help="worker image tar (default: the newest built)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--step", type=int, default=100)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    image = a.image or max(glob.glob("/var/tmp/gpuvisor-worker/worker-*.tar"), key=os.path.getmtime)
    work = tempfile.mkdtemp(prefix="gv-bench-sl-", dir="/var/tmp")
    data = os.path.join(work, "data")
    env = {"GPUVISOR_NET_PREFIX": os.environ.get("GPUVISOR_NET_PREFIX", "gsb"),
           "GPUVISOR_NET_POOL": os.environ.get("GPUVISOR_NET_POOL", "10.82.0.0/16")}
    d = Daemon(os.path.abspath(a.binary), data, free_port(), os.path.join(work, "daemon.log"),
               env_extra=env, extra_args=["--worker-port", str(free_port())])
    d.start()
    results = {"machine": machine(), "image": image}
    try:
        log(f"importing {image}")
        d.cli("image", "import", image, "--name", "runpod-worker")
        d.cli("tenant", "create", "bench")
        key = json.loads(d.cli("-o", "json", "key", "create", "--tenant", "bench", "--role", "member").stdout)["secret"]
        tenv = dict(d.cli_env(), GPUVISOR_API_KEY=key)

        def cli(*args):
            import subprocess
            r = subprocess.run([d.binary, "-o", "json", *args], env=tenv, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{args}: {r.stderr}")
            return json.loads(r.stdout)

        cli("template", "create", "echo", "--image", "runpod-worker", "--memory", "384MiB",
            "--env", "CONCURRENCY=16")
        q = Queue(d, key)

        def wait_workers(ep, pred, limit=120):
            end = time.time() + limit
            while time.time() < end:
                w = cli("endpoint", "get", ep)["health"]["workers"]
                if pred(w):
                    return w
                time.sleep(0.1)
            raise RuntimeError(f"{ep}: workers never reached the state")

        live = lambda w: w["idle"] + w["running"] + w["initializing"]  # noqa: E731

        def runsync(ep, tag):
            t0 = time.perf_counter()
            r = q.call("POST", f"/v2/{ep}/runsync?wait=120000", {"input": {"tag": tag}})
            dt = time.perf_counter() - t0
            assert r["status"] == "COMPLETED", r
            return dt, r

        # 2. cold, warm, flashboot
        cold, warm, flash = [], [], []
        ep = cli("endpoint", "create", "cold", "--template", "echo", "--workers-max", "1",
                 "--idle-timeout", "1s")["id"]
        fep = cli("endpoint", "create", "flash", "--template", "echo", "--workers-max", "1",
                  "--idle-timeout", "1s", "--flashboot")["id"]
        for r in range(a.rounds):
            wait_workers(ep, lambda w: live(w) == 0)
            dt, _ = runsync(ep, f"cold{r}")
            cold.append(dt * 1000)
            dt, _ = runsync(ep, f"warm{r}")
            warm.append(dt * 1000)
            if r == 0:
                runsync(fep, "first")  # makes the flashboot worker
            wait_workers(fep, lambda w: w["parked"] == 1)
            dt, _ = runsync(fep, f"flash{r}")
            flash.append(dt * 1000)
            log(f"round {r}: cold {cold[-1]:.0f} ms, warm {warm[-1]:.0f} ms, flashboot {flash[-1]:.0f} ms")
        results["cold_ms"], results["warm_ms"], results["flash_ms"] = cold, warm, flash
        cli("endpoint", "rm", ep)
        cli("endpoint", "rm", fep)

        # 2b. the same cold start with a worker that is not Python: examples/serverless/worker.sh
        # (busybox sh + wget, the plain HTTP contract) in a busybox image.
        import_image(d, os.path.join(work, "busybox-rootfs"))
        script = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                                   "serverless", "worker.sh")).read()
        cli("template", "create", "shw", "--image", "busybox", "--memory", "64MiB",
            "--", "/bin/sh", "-c", script)
        sep_ = cli("endpoint", "create", "shcold", "--template", "shw", "--workers-max", "1",
                   "--idle-timeout", "1s")["id"]
        shcold = []
        for r in range(a.rounds):
            wait_workers(sep_, lambda w: live(w) == 0)
            dt, out = runsync(sep_, f"sh{r}")
            assert out["output"]["echo"] == {"tag": f"sh{r}"}, out
            shcold.append(dt * 1000)
            log(f"round {r}: cold start, shell worker {shcold[-1]:.0f} ms")
        results["shell_cold_ms"] = shcold
        cli("endpoint", "rm", sep_)

        # 3. autoscaler reaction to a step
        sep = cli("endpoint", "create", "step", "--template", "echo", "--workers-max", "4",
                  "--idle-timeout", "2s", "--scaler", "request-count:25")["id"]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(lambda i: q.call("POST", f"/v2/{sep}/run", {"input": {"sleep": 2, "i": i}})["id"],
                                range(a.step)))
        submitted = time.perf_counter() - t0
        made, first_job = {}, {}
        while True:
            w = cli("endpoint", "get", sep)["health"]
            n = live(w["workers"])
            now = time.perf_counter() - t0
            for k in range(1, n + 1):
                made.setdefault(k, now)
            busy = w["workers"]["running"]
            for k in range(1, busy + 1):
                first_job.setdefault(k, now)
            if w["jobs"]["inQueue"] == 0 and w["jobs"]["inProgress"] == 0:
                break
            time.sleep(0.1)
        results["step"] = {"jobs": a.step, "submit_s": submitted, "made_s": made, "busy_s": first_job,
                           "drained_s": time.perf_counter() - t0}
        log(f"step of {a.step}: workers made at {made}, running a job at {first_job}")

        # 4. throughput on 3 warm workers
        cli("endpoint", "update", sep, "--workers-min", "3", "--workers-max", "3")
        wait_workers(sep, lambda w: w["idle"] == 3)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(lambda i: q.call("POST", f"/v2/{sep}/run", {"input": {"i": i}})["id"],
                                range(a.jobs)))
        sub = time.perf_counter() - t0
        while True:
            j = cli("endpoint", "get", sep)["health"]["jobs"]
            if j["inQueue"] == 0 and j["inProgress"] == 0:
                break
            time.sleep(0.05)
        total = time.perf_counter() - t0
        results["throughput"] = {"jobs": a.jobs, "submit_s": sub, "total_s": total, "jobs_per_s": a.jobs / total}
        cli("endpoint", "rm", sep)
        wait_end = time.time() + 60
        while time.time() < wait_end:
            left = [i for i in cli("instance", "list") if i["state"] not in ("terminated",)]
            if not left:
                break
            time.sleep(0.5)
    finally:
        d.stop()

    rows = []
    for name, vals in (("cold start (0 workers)", cold), ("warm (idle worker)", warm),
                       ("flashboot (parked worker)", flash),
                       ("cold start, shell worker (worker.sh)", shcold)):
        s = summary(vals)
        rows.append([name, len(vals), f"{s['p50']:.0f}", f"{s['min']:.0f}", f"{s['max']:.0f}"])
    print()
    print(f"runsync, request to result (ms), {machine()}")
    print_table(["case", "n", "p50", "min", "max"], rows)
    st = results["step"]
    print()
    print(f"autoscaler, a step of {st['jobs']} jobs of 2 s (request-count:25, max 4): seconds after the step")
    print_table(["worker", "made", "running a job"],
                [[k, f"{st['made_s'][k]:.2f}", f"{st['busy_s'].get(k, float('nan')):.2f}"] for k in sorted(st["made_s"])])
    t = results["throughput"]
    print()
    print(f"throughput: {t['jobs']} echo jobs on 3 warm workers: {t['jobs_per_s']:.0f} jobs/s "
          f"(submitted in {t['submit_s']:.1f} s, all done in {t['total_s']:.1f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
