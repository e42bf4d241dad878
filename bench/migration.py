#!/usr/bin/env python3
"""Live migration downtime and total time of a 1 GiB guest dirtying memory (issue 14 item 2).

Starts a private daemon and a micro-VM of the test guest (scripts/vm-test-fixture): 1 vCPU,
`--memory` (default 1 GiB). The guest first fills `--fill-mib` of its RAM with random data (a
file in its tmpfs), then, for each rate in `--rates` (MiB/s), runs a loop that rewrites that
many MiB of the file every second (copies of random data, so QEMU cannot send them as zero
pages) and is migrated `--runs` times with `gpuvisor instance migrate` (a new QEMU process on
this host: pre-copy with auto-converge; `--postcopy` adds post-copy rows).

Per migration:
- QEMU's figures (the command's answer): downtime (`query-migrate`), total time, bytes sent,
  passes, auto-converge throttle.
- The outside view: the host pings the guest every 2 ms (ICMP echo from a raw socket, root)
  through the tenant's bridge during the migration; the longest gap between two answers is the outage a
  client of the guest sees (the guest's own clock does not tick while it is paused under TCG,
  so a heartbeat timed by the guest itself cannot see the pause; it is printed too: the
  longest gap between two lines of a 1 ms `usleep` loop that stamps `/proc/uptime`).
- The guest is checked afterwards: the dirtying loop's pid alive, the random file's checksum
  unchanged outside the rewritten region (the first `--fill-mib` minus the working set).

`--reserved-cpus none,1` measures each rate and copy mode under each setting of the daemon's
`--reserved-cpus` in turn (`none`: no CPU reserved, every QEMU thread on the VM's own CPU; `1`:
CPU 1 kept from instances, QEMU's threads other than the vCPU there), side by side in one run:
the daemon restarts with the setting (it adopts the running VM), then one warm-up move puts the
VM in a QEMU started under it (a QEMU keeps the threads' CPUs it started with), then `--runs`
measured moves. The warm-up moves are reported as such.

Needs root and qemu-system-x86_64. `--json FILE` writes the raw results.
"""

import argparse
import json
import os
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gvbench as gb  # noqa: E402


def jcli(d, *args, check=True):
    r = d.cli("-o", "json", *args, check=check)
    return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip()}


def exec_in(d, iid, cmd):
    r = d.cli("instance", "exec", iid, "--timeout", "30m", "--", "sh", "-c", cmd, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.stderr}")
    return r.stdout


def qmp_pause(sock_path, ms):
    """Stops the guest's vCPUs for `ms` through its QEMU's monitor and lets them run again
    (the same process: its translated code stays). Returns the pause as timed here, ms."""
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    f = s.makefile("rwb", buffering=0)

    def call(cmd):
        f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                return msg

    json.loads(f.readline())  # greeting
    call("qmp_capabilities")
    t0 = time.monotonic()
    call("stop")
    time.sleep(ms / 1000)
    call("cont")
    took = (time.monotonic() - t0) * 1000
    s.close()
    return took


def heartbeat_gaps(d, iid):
    """The gaps between the guest heartbeat's lines since it was last cleared, ms, longest
    first (one long gap is a pause; several are a slow stretch)."""
    hb = exec_in(d, iid, "cat /.gpuvisor/hb").split()
    stamps = [float(x) for x in hb if re.match(r"^\d+\.\d+$", x)]
    return sorted(((b - x) * 1000 for x, b in zip(stamps, stamps[1:])), reverse=True)


class Pinger:
    """ICMP echo requests to the guest every 2 ms (a raw socket: root) while a migration runs;
    the longest gap between two answers."""

    def __init__(self, addr, interval=0.002):
        import socket
        import struct
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.settimeout(0.2)
        self.addr, self.interval, self.struct = addr, interval, struct
        self.ident = os.getpid() & 0xFFFF
        self.stamps = []
        self.running = True
        self.tx = threading.Thread(target=self._send, daemon=True)
        self.rx = threading.Thread(target=self._recv, daemon=True)
        self.rx.start()
        self.tx.start()

    @staticmethod
    def _checksum(b):
        if len(b) % 2:
            b += b"\0"
        s = sum((b[i] << 8) + b[i + 1] for i in range(0, len(b), 2))
        s = (s >> 16) + (s & 0xFFFF)
        s += s >> 16
        return ~s & 0xFFFF

    def _send(self):
        seq = 0
        while self.running:
            hdr = self.struct.pack("!BBHHH", 8, 0, 0, self.ident, seq & 0xFFFF)
            pkt = self.struct.pack("!BBHHH", 8, 0, self._checksum(hdr + b"gv" * 8), self.ident,
                                   seq & 0xFFFF) + b"gv" * 8
            try:
                self.sock.sendto(pkt, (self.addr, 0))
            except OSError:
                pass
            seq += 1
            time.sleep(self.interval)

    def _recv(self):
        while self.running:
            try:
                data, src = self.sock.recvfrom(2048)
            except OSError:
                continue
            ihl = (data[0] & 0x0F) * 4
            if src[0] == self.addr and data[ihl] == 0 and \
                    self.struct.unpack("!H", data[ihl + 4:ihl + 6])[0] == self.ident:
                self.stamps.append(time.monotonic())

    def stop(self):
        self.running = False
        self.tx.join(timeout=2)
        self.rx.join(timeout=2)
        self.sock.close()
        s = self.stamps
        gaps = [b - a for a, b in zip(s, s[1:])]
        return (max(gaps) * 1000 if gaps else None), len(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=gb.DEFAULT_BINARY)
    ap.add_argument("--fixture", default="/var/tmp/gpuvisor-vm-fixture")
    ap.add_argument("--memory", default="1GiB")
    ap.add_argument("--fill-mib", type=int, default=384)
    ap.add_argument("--working-set-mib", type=int, default=128)
    ap.add_argument("--rates", default="0,8,32,64")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--postcopy", action="store_true")
    ap.add_argument("--data-dir", default="/var/tmp/gvbench-mig")
    ap.add_argument("--port", type=int, default=18794)
    ap.add_argument("--log", default="/tmp/gvbench-mig.log")
    ap.add_argument("--json")
    ap.add_argument("--pause-ms", type=int,
                    help="also pause the guest this long in place (QMP stop/cont), --runs times per "
                         "rate: the same probes with no new process")
    ap.add_argument("--reserved-cpus", help="settings of serve --reserved-cpus to compare, e.g. none,1")
    a = ap.parse_args()
    fx = os.path.abspath(a.fixture)
    gb.remove_data_dir(a.data_dir)
    base_args = ["--vm-kernel", os.path.join(fx, "vmlinuz"),
                 "--vm-initrd", os.path.join(fx, "initrd.img"),
                 "--net-prefix", "gmb", "--net-pool", "10.67.0.0/16"]
    policies = a.reserved_cpus.split(",") if a.reserved_cpus else [None]
    current = [policies[0]]

    def policy_args(p):
        return base_args + (["--reserved-cpus", p] if p not in (None, "none") else [])

    def use_policy(p):
        if p != current[0]:
            d.restart(extra_args=policy_args(p))
            current[0] = p

    d = gb.Daemon(a.binary, a.data_dir, a.port, a.log, extra_args=policy_args(policies[0]))
    d.start()
    res = {"machine": gb.machine(), "memory": a.memory, "fill_mib": a.fill_mib,
           "working_set_mib": a.working_set_mib, "runs": []}
    uffd = "/proc/sys/vm/unprivileged_userfaultfd"
    uffd_was = open(uffd).read().strip()
    try:
        d.cli("image", "import", os.path.join(fx, "image.tar"), "--name", "guest")
        v = jcli(d, "instance", "create", "--image", "guest", "--runtime", "vm", "--vcpus", "1",
                 "--memory", a.memory, "--container-disk", "2GiB", "--wait")
        iid = v["id"]
        addr = v.get("ip") or v.get("address")
        deadline = time.monotonic() + 300
        while "gpuvisor-guest-ready" not in d.cli("instance", "logs", iid).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError("guest not ready")
            time.sleep(1)
        t = time.monotonic()
        exec_in(d, iid, "mount -o remount,size=90% /.gpuvisor 2>/dev/null; "
                        f"dd if=/dev/urandom of=/.gpuvisor/fill bs=1M count={a.fill_mib} 2>/dev/null")
        gb.log(f"{a.fill_mib} MiB of random data in the guest's RAM in {time.monotonic() - t:.1f} s")
        ws = a.working_set_mib
        keep_sum = exec_in(d, iid, f"dd if=/.gpuvisor/fill bs=1M skip={ws} 2>/dev/null | md5sum").split()[0]
        # The guest's own heartbeat: a 1 ms loop stamping its uptime.
        exec_in(d, iid, "start-stop-daemon -S -b -m -p /.gpuvisor/hb.pid -x /bin/sh -- -c "
                        "'while :; do read u r < /proc/uptime; echo $u; usleep 1000; done > /.gpuvisor/hb'")
        modes = [False] + ([True] if a.postcopy else [])
        for rate in [int(r) for r in a.rates.split(",")]:
            exec_in(d, iid, "start-stop-daemon -K -p /.gpuvisor/dirty.pid 2>/dev/null; true")
            if rate > 0:
                # `rate` MiB rewritten every second inside the first `ws` MiB of the file.
                exec_in(d, iid, "start-stop-daemon -S -b -m -p /.gpuvisor/dirty.pid -x /bin/sh -- -c "
                                f"'i=0; while :; do s=$(( (i * {rate}) % {ws} )); "
                                f"dd if=/.gpuvisor/fill of=/.gpuvisor/fill bs=1M count={rate} "
                                f"skip=$(( ({ws} + s) )) seek=$s conv=notrunc 2>/dev/null; "
                                "i=$((i+1)); sleep 1; done'")
                time.sleep(3)
            # The same probes over a window without a migration: the guest's and the
            # network's own jitter under this load.
            exec_in(d, iid, ": > /.gpuvisor/hb")
            p = Pinger(addr)
            time.sleep(5)
            gap, answers = p.stop()
            gaps = heartbeat_gaps(d, iid)
            res["runs"].append({"rate_mib_s": rate, "postcopy": None, "run": 0, "wall_s": 5.0,
                                "report": {}, "ping_max_gap_ms": gap, "ping_answers": answers,
                                "guest_heartbeat_max_gap_ms": gaps[0] if gaps else None,
                                "state_intact": True})
            for k in range(a.runs if a.pause_ms else 0):
                exec_in(d, iid, ": > /.gpuvisor/hb")
                p = Pinger(addr)
                time.sleep(0.5)
                took = qmp_pause(os.path.join(a.data_dir, "vm", "run", iid, "qmp.sock"), a.pause_ms)
                time.sleep(0.5)
                gap, answers = p.stop()
                gaps = heartbeat_gaps(d, iid)
                res["runs"].append({"rate_mib_s": rate, "postcopy": "pause", "run": k, "wall_s": took / 1000,
                                    "report": {"downtime_ms": round(took)}, "ping_max_gap_ms": gap,
                                    "ping_answers": answers,
                                    "guest_heartbeat_max_gap_ms": gaps[0] if gaps else None,
                                    "guest_heartbeat_top_gaps_ms": [round(g) for g in gaps[:3]],
                                    "state_intact": True,
                                    "reserved_cpus": current[0] or "none"})
                gb.log(f"rate {rate} pause {took:.0f} ms run {k}: ping gap {gap} hb gaps {[round(g) for g in gaps[:3]]}")
            for postcopy in modes:
                if postcopy:
                    open(uffd, "w").write("1")
                plan = [(setting, k) for setting in policies
                        for k in ([-1] if len(policies) > 1 else []) + list(range(a.runs))]
                for setting, k in plan:
                    use_policy(setting)
                    exec_in(d, iid, ": > /.gpuvisor/hb")
                    p = Pinger(addr)
                    time.sleep(0.5)
                    args = ["instance", "migrate", iid] + (["--postcopy"] if postcopy else [])
                    t0 = time.monotonic()
                    m = jcli(d, *args, check=False)
                    wall = time.monotonic() - t0
                    time.sleep(0.5)
                    gap, answers = p.stop()
                    gaps = heartbeat_gaps(d, iid)
                    ok = exec_in(d, iid, f"dd if=/.gpuvisor/fill bs=1M skip={ws} 2>/dev/null | md5sum").split()[0] == keep_sum
                    row = {"rate_mib_s": rate, "postcopy": postcopy, "run": k, "wall_s": wall,
                           "report": m, "ping_max_gap_ms": gap, "ping_answers": answers,
                           "guest_heartbeat_max_gap_ms": gaps[0] if gaps else None,
                           "state_intact": ok, "reserved_cpus": current[0] or "none",
                           "guest_heartbeat_top_gaps_ms": [round(g) for g in gaps[:3]]}
                    res["runs"].append(row)
                    gb.log(f"rate {rate} postcopy {postcopy} run {k}: {m} ping gap {gap} hb gap {row['guest_heartbeat_max_gap_ms']} intact {ok}")
                if postcopy:
                    open(uffd, "w").write(uffd_was)
    finally:
        open(uffd, "w").write(uffd_was)
        gb.terminate_all(d)
        d.stop()
        gb.remove_data_dir(a.data_dir)
    rows = []
    for r in res["runs"]:
        m = r["report"]
        copy = {None: "none (5 s)", False: "pre", True: "post", "pause": "pause in place"}[r["postcopy"]]
        run = "warm-up" if r["run"] == -1 else r["run"]
        rows.append([r["rate_mib_s"], copy, run, r.get("reserved_cpus", "-"),
                     m.get("downtime_ms", "-"), m.get("total_ms", "-"),
                     (m.get("transferred_bytes", 0) or 0) >> 20, m.get("dirty_sync_count", "-"),
                     m.get("cpu_throttle_percent", "-"),
                     f"{r['ping_max_gap_ms']:.0f}" if r["ping_max_gap_ms"] is not None else "-",
                     f"{r['guest_heartbeat_max_gap_ms']:.0f}" if r["guest_heartbeat_max_gap_ms"] is not None else "-",
                     "/".join(map(str, r.get("guest_heartbeat_top_gaps_ms", []))) or "-",
                     "yes" if r["state_intact"] else "NO", m.get("error", "")[:60]])
    print(f"\n### Live migration of a {a.memory} guest ({a.fill_mib} MiB of random data in RAM, "
          f"dirtying inside {a.working_set_mib} MiB)\n")
    gb.print_table(["dirty MiB/s", "copy", "run", "reserved CPUs", "QEMU downtime ms", "total ms", "sent MiB", "passes",
                    "throttle %", "ping max gap ms", "guest heartbeat max gap ms", "3 longest gaps ms",
                    "state intact", "error"],
                   rows)
    gb.finish(res, a.json)


if __name__ == "__main__":
    main()
