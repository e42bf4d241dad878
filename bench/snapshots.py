#!/usr/bin/env python3
"""Snapshot create and restore times for a 10 GiB disk with 1 GiB written (issue 14).

Starts a private daemon, then for each kind:
- container: a busybox container with a 10 GiB container disk; 1 GiB written to a file in it
  (`dd`, random data, synced); `instance snapshot` timed (freeze + sparse copy), then
  `instance restore` timed until the instance runs again (stop, copy of the disk into the new
  instance disk, start).
- vm: a micro-VM of the test guest (scripts/vm-test-fixture) with a 10 GiB root disk; 1 GiB
  written to /dev/vda in the guest; `instance snapshot` (QEMU backup jobs) and `--memory`
  (live migration into a file, then the disks copied while the guest is paused) timed; QEMU's
  migration downtime is in the daemon's log (`VM state saved downtime_ms=`), printed at the
  end; `instance restore` of each timed until running.

Needs root; the VM part needs qemu-system-x86_64 (TCG here: the guest's writes are slow, the
host-side copy is what the figure is about). `--json FILE` writes the raw results.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gvbench as gb  # noqa: E402


def jcli(d, *args):
    return json.loads(d.cli("-o", "json", *args).stdout)


def timed(f):
    t = time.monotonic()
    out = f()
    return time.monotonic() - t, out


def wait_running(d, iid, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if jcli(d, "instance", "get", iid)["state"] == "running":
            return
        time.sleep(0.05)
    raise RuntimeError(f"{iid} not running")


def exec_in(d, iid, cmd):
    r = d.cli("instance", "exec", iid, "--timeout", "30m", "--", "sh", "-c", cmd, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.stderr}")
    return r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=gb.DEFAULT_BINARY)
    ap.add_argument("--fixture", default="/var/tmp/gpuvisor-vm-fixture")
    ap.add_argument("--written-mib", type=int, default=1024)
    ap.add_argument("--disk", default="10GiB")
    ap.add_argument("--kinds", default="container,vm")
    ap.add_argument("--data-dir", default="/var/tmp/gvbench-snap")
    ap.add_argument("--port", type=int, default=18793)
    ap.add_argument("--log", default="/tmp/gvbench-snap.log")
    ap.add_argument("--json")
    a = ap.parse_args()
    fx = os.path.abspath(a.fixture)
    gb.remove_data_dir(a.data_dir)
    d = gb.Daemon(a.binary, a.data_dir, a.port, a.log,
                  extra_args=["--vm-kernel", os.path.join(fx, "vmlinuz"),
                              "--vm-initrd", os.path.join(fx, "initrd.img"),
                              "--stop-grace", "60s", "--net-prefix", "gsb",
                              "--net-pool", "10.98.0.0/16"])
    d.start()
    res = {"machine": gb.machine(), "disk": a.disk, "written_mib": a.written_mib, "rows": []}
    rows = res["rows"]
    try:
        kinds = a.kinds.split(",")
        if "container" in kinds:
            gb.import_image(d, "/var/tmp/gvbench-busybox")
            # PID 1 ends at SIGTERM: the restore's stop is not the stop grace.
            v = jcli(d, "instance", "create", "--image", "busybox", "--vcpus", "1", "--memory",
                     "256MiB", "--container-disk", a.disk, "--wait", "--", "sh", "-c",
                     "trap 'exit 0' TERM; while :; do sleep 1; done")
            iid = v["id"]
            t, _ = timed(lambda: exec_in(d, iid, f"dd if=/dev/urandom of=/root/f bs=1M count={a.written_mib} && sync"))
            gb.log(f"container: {a.written_mib} MiB written in {t:.1f} s")
            t, s = timed(lambda: jcli(d, "instance", "snapshot", iid, "c1"))
            rows.append(["container", "snapshot (disk)", f"{t:.2f}", s["bytes"] >> 20, s["consistency"]])
            exec_in(d, iid, "rm /root/f && sync")
            t, _ = timed(lambda: (jcli(d, "instance", "restore", iid, "c1"), wait_running(d, iid)))
            rows.append(["container", "restore (disk) to running", f"{t:.2f}", "", ""])
            got = exec_in(d, iid, "ls -l /root/f | awk '{print $5}'").strip()
            assert got == str(a.written_mib << 20), got
        if "vm" in kinds:
            d.cli("image", "import", os.path.join(fx, "image.tar"), "--name", "guest")
            v = jcli(d, "instance", "create", "--image", "guest", "--runtime", "vm", "--vcpus", "1",
                     "--memory", "1GiB", "--container-disk", a.disk, "--wait")
            iid = v["id"]
            deadline = time.monotonic() + 300
            while "gpuvisor-guest-ready" not in d.cli("instance", "logs", iid).stdout:
                if time.monotonic() > deadline:
                    raise RuntimeError("guest not ready")
                time.sleep(1)
            t, _ = timed(lambda: exec_in(
                d, iid, f"dd if=/dev/urandom of=/dev/vda bs=1M count={a.written_mib} seek=1024 conv=fsync"))
            gb.log(f"vm: {a.written_mib} MiB written in {t:.1f} s")
            t, s = timed(lambda: jcli(d, "instance", "snapshot", iid, "v1"))
            rows.append(["vm", "snapshot (disk, backup jobs)", f"{t:.2f}", s["bytes"] >> 20, s["consistency"]])
            t, s = timed(lambda: jcli(d, "instance", "snapshot", iid, "v2", "--memory"))
            rows.append(["vm", "snapshot (disk + memory)", f"{t:.2f}", s["bytes"] >> 20, s["consistency"]])
            t, _ = timed(lambda: (jcli(d, "instance", "restore", iid, "v1"), wait_running(d, iid)))
            rows.append(["vm", "restore (disk) to QEMU running (guest boots after)", f"{t:.2f}", "", ""])
            t, _ = timed(lambda: (jcli(d, "instance", "restore", iid, "v2"), wait_running(d, iid)))
            rows.append(["vm", "restore (disk + memory) to guest running", f"{t:.2f}", "", ""])
            with open(a.log) as f:
                res["daemon_log_saved"] = [ln.strip() for ln in f if "VM state saved" in ln]
    finally:
        gb.terminate_all(d)
        d.stop()
        gb.remove_data_dir(a.data_dir)
    print(f"\n### Snapshots of a {a.disk} disk with {a.written_mib} MiB written\n")
    gb.print_table(["kind", "operation", "seconds", "snapshot MiB", "consistency"], rows)
    for ln in res.get("daemon_log_saved", []):
        print(ln)
    gb.finish(res, a.json)


if __name__ == "__main__":
    main()
