"""Drives a gpuvisor endpoint with RunPod's own client SDK (`runpod.Endpoint`, base URL pointed
at gpuvisor), as a RunPod user would. Prints one JSON line per command for the Rust test.

Usage: client.py BASE_URL KEY ENDPOINT COMMAND [ARG]
  load N      N jobs (input {"i": k}) submitted from 16 threads, then followed to their end
  runsync     one runsync job; its output and the wall time
  stream N    a streaming job of N chunks, read with Job.stream()
  submit N    N jobs submitted, their ids printed (nothing waited for)
  submit-through-crash N
              N jobs submitted one after another, each tried once: the ids the daemon
              accepted and how many calls failed (the daemon is killed meanwhile)
  follow IDS  the given jobs (comma-separated) followed to their end
"""
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import runpod

base, key, ep_id, cmd = sys.argv[1:5]
arg = sys.argv[5] if len(sys.argv) > 5 else None
runpod.api_key = key
runpod.endpoint_url_base = base
ep = runpod.Endpoint(ep_id)
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


def submit(n):
    def one(i):
        return ep.run({"i": i}).job_id

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(n)))


def follow(ids, deadline_s=600):
    """Each job's final status, asked oldest first; a round stops at 16 unfinished jobs in a
    row (the queue is FIFO), so waiting costs few requests."""
    jobs = {i: runpod.endpoint.runner.Job(ep_id, i, ep.rp_client) for i in ids}
    final = {}
    pending = list(ids)
    end = time.time() + deadline_s
    while pending and time.time() < end:
        still, unfinished = [], 0
        for n, i in enumerate(pending):
            if unfinished >= 16:
                still.extend(pending[n:])
                break
            st = jobs[i].status()
            if st in FINAL:
                # The SDK caches a final status: asking again would not reach the server,
                # so the raw answer is read once here.
                final[i] = ep.rp_client.get(f"{ep_id}/status/{i}")
            else:
                still.append(i)
                unfinished += 1
        pending = still
        if pending:
            time.sleep(0.3)
    return final, pending


if cmd == "load":
    n = int(arg)
    t0 = time.time()
    ids = submit(n)
    t1 = time.time()
    final, pending = follow(ids)
    bad = []
    for k, i in enumerate(ids):
        s = final.get(i)
        if s is None or s["status"] != "COMPLETED" or s["output"]["echo"] != {"i": k}:
            bad.append({"id": i, "status": s})
    print(json.dumps({
        "submitted": len(ids), "distinct": len(set(ids)), "completed": len(final) - len(bad),
        "bad": bad[:5], "pending": len(pending), "submit_s": t1 - t0, "total_s": time.time() - t0,
        "workers": sorted({s["workerId"] for s in final.values() if s.get("workerId")}),
        "retries": sum(s.get("retries", 0) for s in final.values()),
    }))
elif cmd == "runsync":
    t0 = time.time()
    out = ep.run_sync({"hello": "world"}, timeout=120)
    print(json.dumps({"output": out, "seconds": time.time() - t0}))
elif cmd == "stream":
    job = ep.run({"n": int(arg), "gap": 0.3})
    t0 = time.time()
    chunks = []
    for c in job.stream():
        chunks.append({"chunk": c, "at": time.time() - t0})
    print(json.dumps({"id": job.job_id, "chunks": chunks, "status": job.status(),
                      "output": job.output()}))
elif cmd == "submit-through-crash":
    accepted, failed = [], 0
    for i in range(int(arg)):
        try:
            accepted.append(ep.run({"i": i, "sleep": 0.5}).job_id)
        except Exception:  # the daemon is down: the job was not accepted
            failed += 1
        time.sleep(0.02)
    print(json.dumps({"ids": accepted, "failed": failed}))
elif cmd == "submit":
    print(json.dumps({"ids": submit(int(arg))}))
elif cmd == "follow":
    ids = arg.split(",")
    final, pending = follow(ids)
    print(json.dumps({"final": final, "pending": pending}))
else:
    sys.exit(f"unknown command {cmd}")
