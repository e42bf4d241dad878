#!/usr/bin/env python3
"""Create-to-running latency: `gpuvisor instance create --wait` against bare `runc run -d`.

Interleaved in one run: one gpuvisor create (timed end to end as a user sees it: CLI process
start to exit, `--wait` included), then one bare `runc run -d` of an equivalent bundle (timed:
only the runc command). The bare bundle is a config.json the daemon generated, pointed at an
overlay rootfs on the same image layer and at a network namespace that are both made ahead of
time and not counted, with its own cgroup path and its own `runc --root`.

For every gpuvisor instance the daemon's own events also give the engine's share
(created -> provisioning: reconciler pick-up; provisioning -> running: host work), to the
millisecond, so the CLI's `--wait` poll interval can be told apart from the daemon's work.

Both kinds of container stay running until the end (so both sides see the same host load),
then every one is removed. Prints a table; `--json FILE` also writes the raw samples.
Needs root. Python 3 standard library only.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gvbench as gb  # noqa: E402

RUNC_ROOT = "/run/gvbench-runc"
CG_PARENT = "gvbench"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=gb.DEFAULT_BINARY)
    ap.add_argument("--runc", default="runc")
    ap.add_argument("-n", type=int, default=60, help="measured pairs (default 60)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured pairs first (default 3)")
    ap.add_argument("--data-dir", default="/tmp/gvbench-create")
    ap.add_argument("--port", type=int, default=18741)
    ap.add_argument("--rootfs", default="/tmp/gvbench-bbroot")
    ap.add_argument("--log", default="/tmp/gvbench-create.log")
    ap.add_argument("--json", help="write raw samples here")
    a = ap.parse_args()

    base = a.data_dir + "-baseline"
    if os.path.exists(base):
        raise SystemExit(f"{base} exists")
    d = gb.Daemon(a.binary, a.data_dir, a.port, a.log)
    gb.log(f"starting daemon on {d.endpoint}, data dir {a.data_dir}")
    d.start()
    gv_ids, rc_names, netns = [], [], []
    samples = []
    try:
        gb.import_image(d, a.rootfs)
        api = d.api()
        os.makedirs(base)
        total = a.warmup + a.n
        template = None
        layer = None
        for k in range(total):
            # --- gpuvisor: the CLI as a user runs it ---
            t0 = time.perf_counter()
            r = d.cli(*gb.create_args())
            t_gv = time.perf_counter() - t0
            inst = json.loads(r.stdout)
            iid = inst["id"]
            gv_ids.append(iid)
            if inst["state"] != "running":
                raise RuntimeError(f"{iid} is {inst['state']}")
            ev = {e["message"] if e["kind"] == "state" else e["kind"]: e["at"]
                  for e in api.call("GET", f"/v1/instances/{iid}/events")}
            pickup = ev["provisioning"] - ev["created"]
            provision = ev["running"] - ev["provisioning"]
            engine = ev["running"] - ev["created"]
            if template is None:
                template = json.load(open(os.path.join(a.data_dir, "bundles", iid, "config.json")))
                layer = overlay_lower(os.path.join(a.data_dir, "instances", iid, "rootfs"))

            # --- bare runc: prepare (not counted), then time `runc run -d` only ---
            name = f"gvb{k:04d}"
            bundle, ns = prepare_bundle(base, name, template, layer)
            netns.append(ns)
            logf = open(os.path.join(bundle, "log"), "a")
            t0 = time.perf_counter()
            rr = subprocess.run([a.runc, "--root", RUNC_ROOT, "run", "--detach", "--bundle", bundle,
                                 "--pid-file", os.path.join(bundle, "pid"), name],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
            t_rc = time.perf_counter() - t0
            logf.close()
            rc_names.append(name)
            if rr.returncode != 0:
                raise RuntimeError(f"runc run {name} failed: {open(os.path.join(bundle, 'log')).read()}")
            if k >= a.warmup:
                samples.append({"gpuvisor_cli_ms": t_gv * 1000, "runc_ms": t_rc * 1000,
                                "engine_ms": engine, "pickup_ms": pickup, "provision_ms": provision})
            gb.log(f"{k + 1}/{total}: gpuvisor {t_gv * 1000:.0f} ms (engine {engine} ms: pickup "
                   f"{pickup} + provision {provision}), runc {t_rc * 1000:.0f} ms")
        api.close()
        load = gb.loadavg()
    finally:
        gb.log("cleaning up")
        for name in rc_names:
            subprocess.run([a.runc, "--root", RUNC_ROOT, "delete", "-f", name],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        left = [f"runc container {c}" for c in runc_list(a.runc)]
        cleanup_baseline(a.runc, base, netns)
        n, failed = gb.terminate_all(d)
        d.stop()
        left += gb.leftovers(a.data_dir, gv_ids) + gb.leftovers(base, [])
        left += [f"netns {ns}" for ns in netns if os.path.exists(f"/var/run/netns/{ns}")]
        if os.path.exists(RUNC_ROOT):
            left.append(RUNC_ROOT)
        gb.remove_data_dir(a.data_dir)
        gb.log(f"terminated {n} instances ({len(failed)} failures); leftovers: {left or 'none'}")

    report(a, samples, load)
    if a.json:
        json.dump({"machine": gb.machine(), "samples": samples}, open(a.json, "w"), indent=1)


def overlay_lower(rootfs):
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        if f[4] == rootfs:
            opts = line.split(" - ", 1)[1].split()[2]
            for o in opts.split(","):
                if o.startswith("lowerdir="):
                    return o[len("lowerdir="):]
    raise RuntimeError(f"no overlay at {rootfs}")


def prepare_bundle(base, name, template, layer):
    """Overlay rootfs on the image layer, a fresh netns, and the daemon's config.json adapted."""
    root = os.path.join(base, name)
    for sub in ("upper", "work", "rootfs", "bundle"):
        os.makedirs(os.path.join(root, sub))
    rootfs = os.path.join(root, "rootfs")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={layer},upperdir={root}/upper,workdir={root}/work", rootfs], check=True)
    ns = f"gvbench-{name}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    c = json.loads(json.dumps(template))
    c["root"]["path"] = rootfs
    c["hostname"] = name
    for n in c["linux"]["namespaces"]:
        if n["type"] == "network":
            n["path"] = f"/var/run/netns/{ns}"
    c["linux"]["cgroupsPath"] = f"/{CG_PARENT}/{name}"
    bundle = os.path.join(root, "bundle")
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(c, f)
    return bundle, ns


def runc_list(runc):
    r = subprocess.run([runc, "--root", RUNC_ROOT, "list", "-q"], capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else []


def cleanup_baseline(runc, base, netns):
    for ns in netns:
        subprocess.run(["ip", "netns", "delete", ns], stderr=subprocess.DEVNULL)
    if os.path.isdir(base):
        for name in os.listdir(base):
            rootfs = os.path.join(base, name, "rootfs")
            if os.path.ismount(rootfs):
                subprocess.run(["umount", rootfs])
        shutil.rmtree(base, ignore_errors=True)
    for ctl in os.listdir("/sys/fs/cgroup"):
        p = os.path.join("/sys/fs/cgroup", ctl, CG_PARENT)
        if os.path.isdir(p) and not os.path.islink(os.path.join("/sys/fs/cgroup", ctl)):
            for sub in os.listdir(p):
                sp = os.path.join(p, sub)
                if os.path.isdir(sp):
                    try:
                        os.rmdir(sp)
                    except OSError:
                        pass
            try:
                os.rmdir(p)
            except OSError:
                pass
    # `runc list` would make the root again: only remove it once it holds no container
    if os.path.isdir(RUNC_ROOT) and not [e for e in os.listdir(RUNC_ROOT)]:
        os.rmdir(RUNC_ROOT)


def report(a, samples, load):
    if not samples:
        return
    cols = [("gpuvisor create --wait (CLI, end to end)", "gpuvisor_cli_ms"),
            ("  engine: created -> running (daemon events)", "engine_ms"),
            ("    reconciler pick-up (created -> provisioning)", "pickup_ms"),
            ("    provision (provisioning -> running)", "provision_ms"),
            ("bare runc run -d", "runc_ms")]
    rows = []
    for label, key in cols:
        s = gb.summary([x[key] for x in samples])
        rows.append([label, s["n"], f"{s['min']:.0f}", f"{s['p50']:.0f}", f"{s['p95']:.0f}",
                     f"{s['max']:.0f}", f"{s['mean']:.0f}"])
    print(f"\ncreate -> running, ms ({gb.machine()}; load avg at end {load})\n")
    gb.print_table(["what", "n", "min", "p50", "p95", "max", "mean"], rows)
    p50 = lambda k: gb.percentile([x[k] for x in samples], 50)  # noqa: E731
    print(f"\nratio p50(gpuvisor CLI) / p50(runc)    = {p50('gpuvisor_cli_ms') / p50('runc_ms'):.2f}"
          f"   (target <= 1.25)")
    print(f"ratio p50(engine events) / p50(runc)   = {p50('engine_ms') / p50('runc_ms'):.2f}")


if __name__ == "__main__":
    main()
