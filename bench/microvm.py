#!/usr/bin/env python3
"""Micro-VM create latency and QEMU's memory overhead, side by side with a bare QEMU in one run.

Interleaved rounds; in each:
  gpuvisor   `instance create --runtime vm` (no --wait) started -> the fixture's first console
             line (`--marker`) seen in the instance's log segment files (polled every 5 ms).
  bare qemu  `qemu-system-x86_64` started by hand with the same kernel, initrd, command line,
             accelerator, vCPUs and memory, booting a qcow2 overlay of the same template base
             disk, serial console on stdout -> the same line on its stdout.
The daemon runs with `GPUVISOR_LOG=info,gpuvisor_timings=debug`: its per-create timing line gives
the node-side work of each VM create (template lookup, overlay, seed, tap, cgroup, relay, QEMU
start until QMP answers, vCPU pinning), i.e. the daemon's work excluding the guest's boot.
QEMU's memory beyond guest RAM: the QEMU process's RSS (smaps) less the RSS of the guest RAM
mapping (the anonymous mapping of exactly the guest's memory size), once the guest is up.

Needs root, qemu-system-x86_64 and a fixture dir with `vmlinuz` and `initrd.img`
(scripts/vm-test-fixture). Prints a table; `--json FILE` writes the raw samples.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gvbench as gb  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LINE = re.compile(r"gpuvisor_timings: provision (\S+) ok=(\S+) start_us=(\d+) total_us=(\d+) ?(.*)$")


def timings(log_path):
    out = {}
    for line in open(log_path, errors="replace"):
        m = LINE.search(ANSI.sub("", line))
        if m and m.group(2) == "true":
            steps = dict(kv.split("=") for kv in m.group(5).split())
            out[m.group(1)] = (int(m.group(4)) / 1000, {k: int(v) / 1000 for k, v in steps.items()})
    return out


def wait_marker_files(pattern, marker, t0, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for f in glob.glob(pattern):
            try:
                if marker.encode() in open(f, "rb").read():
                    return time.time() - t0
            except OSError:
                pass
        time.sleep(0.005)
    raise SystemExit(f"{marker!r} not seen in {pattern}")


def qemu_overhead_kib(pid, guest_bytes):
    """QEMU's RSS outside the guest RAM mapping (kB): (total, file-backed, TCG translation
    buffer, the rest: QEMU's own anonymous memory)."""
    total = guest = files = tb = 0
    size = None
    path = perms = ""
    for line in open(f"/proc/{pid}/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            f = line.split()
            lo, hi = f[0].split("-")
            size = int(hi, 16) - int(lo, 16)
            path = f[5] if len(f) > 5 else ""
            perms = f[1]
        elif line.startswith("Rss:"):
            kb = int(line.split()[1])
            total += kb
            if size == guest_bytes:
                guest += kb
            elif path.startswith("/"):
                files += kb
            elif "x" in perms:
                # The translation buffer: QEMU's one anonymous executable mapping.
                tb += kb
    over = total - guest
    return over, files, tb, over - files - tb


def bare_boot(qemu, fx, base, workdir, marker, mem_mib, append):
    ov = os.path.join(workdir, "bare.qcow2")
    if os.path.exists(ov):
        os.remove(ov)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, ov, "1G"],
                   check=True)
    args = [qemu, "-nodefaults", "-no-user-config", "-machine", "q35", "-accel", "tcg,tb-size=64",
            "-cpu", "max", "-smp", "1", "-m", f"{mem_mib}M", "-display", "none", "-no-reboot",
            "-kernel", os.path.join(fx, "vmlinuz"), "-initrd", os.path.join(fx, "initrd.img"),
            "-append", append, "-serial", "stdio",
            "-drive", f"if=none,id=root,format=qcow2,file={ov}",
            "-device", "virtio-blk-pci,drive=root,serial=root",
            # A NIC as the VM has (user-mode here): without one the kernel's `ip=` waits for eth0.
            "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0"]
    t0 = time.time()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL)
    seen = b""
    took = None
    while True:
        chunk = p.stdout.read1(4096)
        if not chunk:
            break
        seen += chunk
        if marker.encode() in seen:
            took = time.time() - t0
            break
    p.kill()
    p.wait()
    if took is None:
        raise SystemExit("bare QEMU ended before the marker")
    return took


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=gb.DEFAULT_BINARY)
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--marker", default="gpuvisor-guest-ready")
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--memory-mib", type=int, default=256)
    ap.add_argument("--data-dir", default="/var/tmp/gv-bench-microvm")
    ap.add_argument("--port", type=int, default=7391)
    ap.add_argument("--json")
    a = ap.parse_args()
    qemu = "/usr/bin/qemu-system-x86_64"
    fx = os.path.abspath(a.fixture)
    gb.remove_data_dir(a.data_dir)
    d = gb.Daemon(a.binary, a.data_dir, a.port, a.data_dir + ".log",
                  log_filter="info,gpuvisor_timings=debug",
                  extra_args=["--vm-kernel", os.path.join(fx, "vmlinuz"),
                              "--vm-initrd", os.path.join(fx, "initrd.img")])
    d.start()
    samples = []
    try:
        gb.import_image(d, "/var/tmp/gv-bench-rootfs")
        for i in range(a.n):
            t0 = time.time()
            r = d.cli("instance", "create", "--image", "busybox", "--runtime", "vm", "--vcpus", "1",
                      "--memory", f"{a.memory_mib}MiB", "--container-disk", "1GiB", "-o", "json")
            iid = json.loads(r.stdout)["id"]
            vm = wait_marker_files(os.path.join(d.data_dir, "logs", iid, "*.log"), a.marker, t0)
            pid = int(open(os.path.join(d.data_dir, "vm", "run", iid, "main.pid")).read())
            over, files, tb, own = qemu_overhead_kib(pid, a.memory_mib << 20)
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            append = cmdline[cmdline.index(b"-append") + 1].decode()
            base = glob.glob(os.path.join(d.data_dir, "vm", "templates", "*", "*", "base.ext4"))[0]
            bare = bare_boot(qemu, fx, base, d.data_dir, a.marker, a.memory_mib, append)
            d.cli("instance", "terminate", iid, "--wait")
            samples.append({"id": iid, "gpuvisor_s": vm, "bare_s": bare, "overhead_kib": over,
                            "files_kib": files, "tb_kib": tb, "own_kib": own})
            gb.log(f"round {i}: gpuvisor {vm:.2f}s bare {bare:.2f}s overhead {over} KiB")
        t = timings(d.log_path)
        for s in samples:
            total, steps = t.get(s["id"], (None, {}))
            s["provision_ms"] = total
            s["steps_ms"] = steps
    finally:
        d.stop()
    med = lambda k: gb.percentile([s[k] for s in samples if s.get(k) is not None], 50)  # noqa: E731
    p90 = lambda k: gb.percentile([s[k] for s in samples if s.get(k) is not None], 90)  # noqa: E731
    rows = [
        ["create -> first console line (gpuvisor)", f"{med('gpuvisor_s'):.2f} s", f"{p90('gpuvisor_s'):.2f} s"],
        ["bare qemu start -> same line", f"{med('bare_s'):.2f} s", f"{p90('bare_s'):.2f} s"],
        ["ratio (medians)", f"{med('gpuvisor_s') / med('bare_s'):.2f}", ""],
        ["daemon node work per create (provision)", f"{med('provision_ms'):.0f} ms", f"{p90('provision_ms'):.0f} ms"],
    ]
    steps = sorted({k for s in samples for k in s["steps_ms"]})
    for k in steps:
        vals = [s["steps_ms"][k] for s in samples if k in s["steps_ms"]]
        rows.append([f"  step {k}", f"{gb.percentile(vals, 50):.1f} ms", f"{gb.percentile(vals, 90):.1f} ms"])
    for k, what in [("overhead_kib", "QEMU RSS beyond guest RAM"),
                    ("files_kib", "  of which file-backed (binary, libraries: shared)"),
                    ("tb_kib", "  of which TCG translation buffer (none under KVM)"),
                    ("own_kib", "  of which QEMU's own anonymous memory")]:
        rows.append([what, f"{med(k) / 1024:.1f} MiB", f"{p90(k) / 1024:.1f} MiB"])
    print(f"micro-VM create, n={len(samples)}, TCG, {gb.machine()}")
    gb.print_table(["what", "p50", "p90"], rows)
    if a.json:
        json.dump(samples, open(a.json, "w"), indent=1)
    gb.remove_data_dir(a.data_dir)


if __name__ == "__main__":
    main()
