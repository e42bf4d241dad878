#!/usr/bin/env python3
"""KSM: what N idle VMs from one image cost the host, against N times one VM.

Starts a private daemon (which runs KSM while VMs run: `manage_ksm`), boots N micro-VMs of the
test guest (scripts/vm-test-fixture's kernel and initrd, the busybox image) one after the other,
then waits while they sit idle and KSM scans. Every few seconds: the QEMU processes' summed RSS
and PSS (/proc/<pid>/smaps_rollup: PSS splits a merged page among its sharers), KSM's
pages_sharing (pages that point at a kept copy), ksm_zero_pages (zero-filled pages mapped to
the kernel's zero page: `use_zero_pages`, which the daemon turns on) and the daemon's
`gpuvisor_ksm_saved_bytes`. One VM's cost is its RSS with nothing merged: the first VM alone,
KSM told to unmerge everything (`run` = 2) and left off for 15 s, before the others boot (the
daemon turns KSM on again with the second). Two ratios against N x that: what KSM says it
saved ((pages_sharing + ksm_zero_pages) x page size), and the host memory the N VMs use,
their PSS summed (a merged page split among its sharers, a zero-page mapping not counted).

Needs root, qemu-system-x86_64 and KSM (/sys/kernel/mm/ksm). `--json FILE` writes the samples.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gvbench as gb  # noqa: E402

KSM = "/sys/kernel/mm/ksm"


def ksm(name):
    with open(os.path.join(KSM, name)) as f:
        return int(f.read().strip())


def rollup(pid):
    """(RSS, PSS) in KiB of one process."""
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def mem_available_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise RuntimeError("no MemAvailable")


def qemu_pid(iid):
    out = subprocess.run(["pgrep", "-f", f"gpuvisor-{iid}"], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    if len(pids) != 1:
        raise RuntimeError(f"QEMU of {iid}: {pids}")
    return pids[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=gb.DEFAULT_BINARY)
    ap.add_argument("--fixture", default="/var/tmp/gpuvisor-vm-fixture")
    ap.add_argument("-n", "--vms", type=int, default=10)
    ap.add_argument("--memory", default="256MiB")
    ap.add_argument("--settle", type=int, default=240, help="seconds to let KSM scan")
    ap.add_argument("--data-dir", default="/var/tmp/gvbench-ksm")
    ap.add_argument("--port", type=int, default=18791)
    ap.add_argument("--log", default="/tmp/gvbench-ksm.log")
    ap.add_argument("--json")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(KSM, "run")):
        sys.exit("no KSM on this kernel (/sys/kernel/mm/ksm)")
    fx = os.path.abspath(a.fixture)
    page = os.sysconf("SC_PAGE_SIZE")
    gb.remove_data_dir(a.data_dir)
    d = gb.Daemon(a.binary, a.data_dir, a.port, a.log,
                  extra_args=["--vm-kernel", os.path.join(fx, "vmlinuz"),
                              "--vm-initrd", os.path.join(fx, "initrd.img"),
                              "--stop-grace", "60s"])
    d.start()
    res = {"machine": gb.machine(), "vms": a.vms, "memory": a.memory, "samples": []}
    try:
        d.cli("image", "import", os.path.join(fx, "image.tar"), "--name", "guest")
        ids = []
        one_rss = None
        # The host's view: MemAvailable before any VM and at the end (moves with the page
        # cache too: a cross-check, not the figure).
        avail_before = mem_available_kib()
        for n in range(a.vms):
            v = json.loads(d.cli("-o", "json", "instance", "create", "--image", "guest",
                                 "--runtime", "vm", "--vcpus", "1", "--memory", a.memory,
                                 "--container-disk", "1GiB", "--wait").stdout)
            ids.append(v["id"])
            gb.log(f"VM {n + 1}/{a.vms} running: {v['id']}")
            if n == 0:
                # One VM's own cost with nothing merged, once it has booted and settled.
                deadline = time.monotonic() + 300
                while "gpuvisor-guest-ready" not in d.cli("instance", "logs", v["id"]).stdout:
                    if time.monotonic() > deadline:
                        raise RuntimeError("guest not ready")
                    time.sleep(1)
                gb.log(f"VM 1 booted {time.monotonic() - deadline + 300:.1f} s after its create returned")
                with open(os.path.join(KSM, "run"), "w") as f:
                    f.write("2")
                time.sleep(15)
                one_rss = rollup(qemu_pid(ids[0]))[0]
                gb.log(f"one VM alone, nothing merged: RSS {one_rss / 1024:.0f} MiB")
        t0 = time.time()
        while True:
            rp = [rollup(qemu_pid(i)) for i in ids]
            s = {
                "t": round(time.time() - t0, 1),
                "rss_kib": sum(r for r, _ in rp),
                "pss_kib": sum(p for _, p in rp),
                "pages_sharing": ksm("pages_sharing"),
                "zero_pages": ksm("ksm_zero_pages") if os.path.exists(os.path.join(KSM, "ksm_zero_pages")) else 0,
                "pages_shared": ksm("pages_shared"),
                "full_scans": ksm("full_scans"),
                "run": ksm("run"),
            }
            res["samples"].append(s)
            gb.log(f"t={s['t']:.0f}s PSS {s['pss_kib'] / 1024:.0f} MiB, RSS {s['rss_kib'] / 1024:.0f} MiB, "
                   f"sharing {s['pages_sharing']} pages, zero {s['zero_pages']}, scans {s['full_scans']}")
            if time.time() - t0 > a.settle:
                break
            time.sleep(10)
        c = d.connection()
        c.request("GET", "/metrics", headers={"authorization": f"Bearer {d.key}"})
        metrics = c.getresponse().read().decode()
        res["one_rss_kib"] = one_rss
        res["mem_available_drop_kib"] = avail_before - mem_available_kib()
        res["metrics_ksm"] = [ln for ln in metrics.splitlines() if ln.startswith("gpuvisor_ksm_")]
    finally:
        gb.terminate_all(d)
        d.stop()
        gb.remove_data_dir(a.data_dir)
    last = res["samples"][-1]
    saved = (last["pages_sharing"] + last["zero_pages"]) * page / 1024
    n_one = a.vms * res["one_rss_kib"]
    print(f"\n### {a.vms} idle VMs ({a.memory} each), after {last['t']:.0f} s of KSM\n")
    gb.print_table(["", "KiB"], [
        [f"{a.vms} x one VM's RSS, alone with nothing merged", f"{n_one}"],
        ["QEMU processes' RSS summed (merged pages counted in each)", f"{last['rss_kib']}"],
        ["QEMU processes' PSS summed (merged pages split)", f"{last['pss_kib']}"],
        ["of which pages sharing / zero pages", f"{last['pages_sharing'] * page // 1024} / {last['zero_pages'] * page // 1024}"],
        ["saved by KSM ((pages_sharing + ksm_zero_pages) x page size)", f"{saved:.0f}"],
        ["saved (KSM's count) vs N x one VM", f"{100 * saved / n_one:.0f} %"],
        ["host memory used (PSS summed) vs N x one VM", f"{100 * last['pss_kib'] / n_one:.0f} %"],
        ["saved (host memory) vs N x one VM", f"{100 - 100 * last['pss_kib'] / n_one:.0f} %"],
        ["cross-check: MemAvailable drop since before the first VM", f"{res['mem_available_drop_kib']}"],
    ])
    print("\n".join(res["metrics_ksm"]))
    gb.finish(res, a.json)


if __name__ == "__main__":
    main()
