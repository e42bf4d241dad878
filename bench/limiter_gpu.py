#!/usr/bin/env python3
"""GPU checks and figures for libgpuvisor_limiter.so (issue 3), run by scripts/gpu-check.

Needs only Python, PyTorch with CUDA, the NVIDIA driver (libnvidia-ml.so.1, nvidia-smi) and the
built libgpuvisor_limiter.so: no internet, no daemon. This script plays the daemon: it writes
the region's limits and usage files (layout of crates/limiter/src/shm.rs, offsets pinned by the
Rust test `offsets_used_by_the_python_gpu_check`) and the config file, publishes utilisation
samples from NVML and runs the compute-share controller (as `Region::publish_sample` does).
Children run in a private mount namespace with their config bound at /etc/gpuvisor (the only
path the library reads): run as root, with util-linux `unshare`.

Usage: limiter_gpu.py --lib path/to/libgpuvisor_limiter.so [--quick] [--out results.md]
Each check runs in a child process (`child <name> ...`) under LD_PRELOAD.
"""
import argparse
import ctypes
import json
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time

MIB = 1 << 20
# ---- region layout (crates/limiter/src/shm.rs) ----
# Two files: the limits (the daemon's; read-only to the instance) and the usage (the processes').
MAGIC_LIMITS = int.from_bytes(b"GPUVLIML", "little")
MAGIC_USAGE = int.from_bytes(b"GPUVLIMU", "little")
LAYOUT_VERSION = 2
MAX_DEVICES, MAX_SLOTS = 8, 256
LIMITS_BYTES = 64 + MAX_DEVICES * 64
USAGE_BYTES = 64 + MAX_DEVICES * 128 + MAX_SLOTS * 128
DEV0 = 64
# limits, per device
OFF_QUOTA, OFF_SHARE, OFF_UTIL, OFF_HIGH, OFF_SEQ = 0, 8, 12, 16, 24
OFF_INTERVAL, OFF_CTL_LAUNCHES, OFF_CTL_TIME = 32, 40, 48
# usage, per device
OFF_USED, OFF_LAUNCHES = 0, 72

# ---- the compute-share controller (crates/limiter/src/throttle.rs), which runs in the daemon ----
GAIN, MAX_UP, MAX_DOWN, MAX_INTERVAL_NS, FULL_SHARE_BP = 0.5, 2.0, 0.125, 100_000_000, 10_000


def next_interval(launches, dt_ns, util_bp, share_bp, prev_ns):
    if launches == 0 or dt_ns == 0:
        return None
    achieved = launches * 1e9 / dt_ns
    factor = MAX_UP if util_bp == 0 else min(max((share_bp / util_bp) ** GAIN, MAX_DOWN), MAX_UP)
    iv = int(min(max(1e9 / (achieved * factor), 1.0), MAX_INTERVAL_NS))
    if util_bp > share_bp > 0:
        grow = min((util_bp / share_bp) ** GAIN, 1 / MAX_DOWN)
        iv = max(iv, int(min(max(prev_ns, 1) * grow, MAX_INTERVAL_NS)))
    return iv


class Region:
    def __init__(self, dirpath, quota, share_bp, priority_high=True):
        self.limits_path = os.path.join(dirpath, "limiter.limits")
        self.usage_path = os.path.join(dirpath, "limiter.usage")
        lim = bytearray(LIMITS_BYTES)
        struct.pack_into("<Q", lim, 0, MAGIC_LIMITS)
        struct.pack_into("<III", lim, 8, LAYOUT_VERSION, 1, 1 if priority_high else 0)
        struct.pack_into("<Q", lim, DEV0 + OFF_QUOTA, quota)
        struct.pack_into("<I", lim, DEV0 + OFF_SHARE, share_bp)
        use = bytearray(USAGE_BYTES)
        struct.pack_into("<Q", use, 0, MAGIC_USAGE)
        struct.pack_into("<I", use, 8, LAYOUT_VERSION)
        for path, buf, mode in ((self.limits_path, lim, 0o644), (self.usage_path, use, 0o666)):
            with open(path, "wb") as f:
                f.write(buf)
            os.chmod(path, mode)
        self.lf = open(self.limits_path, "r+b")
        self.lm = mmap.mmap(self.lf.fileno(), LIMITS_BYTES)
        self.uf = open(self.usage_path, "r+b")
        self.um = mmap.mmap(self.uf.fileno(), USAGE_BYTES)
        self.share_bp = min(share_bp, FULL_SHARE_BP)

    def lim_u64(self, off):
        return struct.unpack_from("<Q", self.lm, DEV0 + off)[0]

    def used(self):
        return struct.unpack_from("<Q", self.um, DEV0 + OFF_USED)[0]

    def launches(self):
        return struct.unpack_from("<Q", self.um, DEV0 + OFF_LAUNCHES)[0]

    def publish(self, util_bp, high_bp=0):
        """The daemon's sample: the feed, and one controller step (Region::publish_sample)."""
        util_bp = min(int(util_bp), FULL_SHARE_BP)
        struct.pack_into("<I", self.lm, DEV0 + OFF_UTIL, util_bp)
        struct.pack_into("<I", self.lm, DEV0 + OFF_HIGH, int(high_bp))
        now, launches = time.monotonic_ns(), self.launches()
        prev_l, prev_t = self.lim_u64(OFF_CTL_LAUNCHES), self.lim_u64(OFF_CTL_TIME)
        struct.pack_into("<QQ", self.lm, DEV0 + OFF_CTL_LAUNCHES, launches, now)
        if self.share_bp >= FULL_SHARE_BP:
            struct.pack_into("<Q", self.lm, DEV0 + OFF_INTERVAL, 0)
        elif prev_t and now > prev_t:
            iv = next_interval(launches - prev_l, now - prev_t, util_bp, self.share_bp,
                               self.lim_u64(OFF_INTERVAL))
            if iv is not None:
                struct.pack_into("<Q", self.lm, DEV0 + OFF_INTERVAL, iv)
        struct.pack_into("<Q", self.lm, DEV0 + OFF_SEQ, self.lim_u64(OFF_SEQ) + 1)


def make_instance(tmp, name, quota, share_pct, context_bytes=0):
    """A region and its config in a directory of their own, which the child sees bound over
    /etc/gpuvisor (the only place the library reads its config)."""
    d = os.path.join(tmp, name)
    os.makedirs(d)
    region = Region(d, quota, int(share_pct * 100))
    with open(os.path.join(d, "limiter.conf"), "w") as f:
        f.write(f"limits={region.limits_path}\nusage={region.usage_path}\n"
                f"context_bytes={context_bytes}\n")
    return region, d


# ---- NVML via ctypes (no pynvml on the GPU machine) ----
class Nvml:
    class Sample(ctypes.Structure):
        _fields_ = [("pid", ctypes.c_uint), ("timeStamp", ctypes.c_ulonglong),
                    ("smUtil", ctypes.c_uint), ("memUtil", ctypes.c_uint),
                    ("encUtil", ctypes.c_uint), ("decUtil", ctypes.c_uint)]

    class Util(ctypes.Structure):
        _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]

    def __init__(self, index=0):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        assert self.lib.nvmlInit_v2() == 0, "nvmlInit failed"
        self.dev = ctypes.c_void_p()
        assert self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.dev)) == 0
        self.last_ts = 0

    def process_util(self):
        """{pid: smUtil%} over the samples since the last call (NVML's per-process sampler)."""
        count = ctypes.c_uint(0)
        self.lib.nvmlDeviceGetProcessUtilization(self.dev, None, ctypes.byref(count),
                                                 ctypes.c_ulonglong(self.last_ts))
        if count.value == 0:
            return {}
        arr = (self.Sample * count.value)()
        rc = self.lib.nvmlDeviceGetProcessUtilization(self.dev, arr, ctypes.byref(count),
                                                      ctypes.c_ulonglong(self.last_ts))
        if rc != 0:
            return {}
        out = {}
        for s in arr[: count.value]:
            out.setdefault(s.pid, []).append(s.smUtil)
            self.last_ts = max(self.last_ts, s.timeStamp)
        return {p: sum(v) / len(v) for p, v in out.items()}

    def gpu_util(self):
        u = self.Util()
        self.lib.nvmlDeviceGetUtilizationRates(self.dev, ctypes.byref(u))
        return u.gpu


class Sampler(threading.Thread):
    """The daemon's feed: every 200 ms, each instance's SM utilisation (sum over its pids)."""

    def __init__(self, nvml, instances):
        super().__init__(daemon=True)
        self.nvml, self.instances, self.stop = nvml, instances, threading.Event()

    def run(self):
        while not self.stop.wait(0.2):
            per_pid = self.nvml.process_util()
            for region, pids in self.instances:
                if per_pid:
                    util = sum(per_pid.get(p, 0) for p in pids())
                elif len(self.instances) == 1:
                    util = self.nvml.gpu_util()
                else:
                    continue
                region.publish(min(util, 100) * 100)


# ---- children (run under LD_PRELOAD) ----
def child(args):
    import torch
    name = args[0]
    if name == "meminfo":
        free, total = torch.cuda.mem_get_info()
        print(json.dumps({"free": free, "total": total}))
    elif name == "alloc":
        quota = int(args[1])
        x = torch.empty(quota - 64 * MIB, dtype=torch.uint8, device="cuda")
        ok_up_to_quota = True
        try:
            torch.empty(128 * MIB, dtype=torch.uint8, device="cuda")
            oom_beyond = False
        except torch.cuda.OutOfMemoryError:
            oom_beyond = True
        del x
        torch.cuda.empty_cache()
        y = torch.empty(quota - 64 * MIB, dtype=torch.uint8, device="cuda")  # freed memory is back
        del y
        print(json.dumps({"ok_up_to_quota": ok_up_to_quota, "oom_beyond": oom_beyond}))
    elif name == "graph":
        a = torch.randn(1024, 1024, device="cuda")
        b = torch.randn(1024, 1024, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                c = a @ b
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            c = a @ b
        for _ in range(50):
            g.replay()
        torch.cuda.synchronize()
        ok = torch.allclose(c, a @ b, atol=1e-2)
        print(json.dumps({"graph_ok": bool(ok)}))
    elif name == "matmul":
        secs, warm = float(args[1]), float(args[2])
        n = 4096
        a = torch.randn(n, n, device="cuda", dtype=torch.float16)
        b = torch.randn(n, n, device="cuda", dtype=torch.float16)
        t0 = time.time()
        count, tm = 0, None
        while True:
            for _ in range(4):
                a @ b
            torch.cuda.synchronize()
            t = time.time()
            if tm is None and t - t0 >= warm:
                tm, count = t, 0
            elif tm is not None:
                count += 4
            if t - t0 >= warm + secs:
                break
        print(json.dumps({"rate": count / (time.time() - tm)}))
    elif name == "train":
        steps = int(args[1])
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(512, 8, 2048, batch_first=True).cuda()
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-4)
        x = torch.randn(32, 256, 512, device="cuda")
        for i in range(steps + 20):
            if i == 20:
                torch.cuda.synchronize()
                t0 = time.time()
            opt.zero_grad(set_to_none=True)
            layer(x).pow(2).mean().backward()
            opt.step()
        torch.cuda.synchronize()
        print(json.dumps({"step_ms": (time.time() - t0) / steps * 1000}))
    else:
        raise SystemExit(f"unknown child {name}")


# ---- parent ----
class Runner:
    def __init__(self, lib):
        self.lib = os.path.abspath(lib)

    def env(self, conf, extra=None):
        e = dict(os.environ)
        if conf:
            e["LD_PRELOAD"] = self.lib
        e.update(extra or {})
        return e

    def spawn(self, conf, *args, extra=None):
        """`conf`: the instance's directory (holding limiter.conf), bound over /etc/gpuvisor in
        a private mount namespace, as the daemon binds it into an instance. Needs root."""
        cmd = [sys.executable, __file__, "child", *map(str, args)]
        if conf:
            os.makedirs("/etc/gpuvisor", exist_ok=True)
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount --bind "$0" /etc/gpuvisor && exec "$@"', conf, *cmd]
        return subprocess.Popen(cmd, env=self.env(conf, extra), stdout=subprocess.PIPE, text=True)

    def run(self, conf, *args, extra=None):
        p = self.spawn(conf, *args, extra=extra)
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"child {args} failed ({p.returncode})")
        return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--quick", action="store_true", help="shorter throughput windows")
    ap.add_argument("--out", default="limiter-gpu-results.md")
    a = ap.parse_args()
    r = Runner(a.lib)
    results, failures = [], []

    def check(name, ok, detail):
        results.append((name, "PASS" if ok else "FAIL", detail))
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            failures.append(name)

    tmp = tempfile.mkdtemp(prefix="gvlim-")
    quota = 4 << 30
    _, conf = make_instance(tmp, "mem", quota, 100)

    m = r.run(conf, "meminfo")
    check("mem_get_info reports the quota", m["total"] == quota and m["free"] <= quota,
          f"total={m['total']} free={m['free']} quota={quota}")
    for label, extra in [("", None), (" (expandable_segments)",
                                      {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})]:
        region, conf_a = make_instance(tmp, "alloc" + str(len(results)), quota, 100)
        x = r.run(conf_a, "alloc", quota, extra=extra)
        check("alloc up to quota, OOM beyond" + label, x["ok_up_to_quota"] and x["oom_beyond"],
              json.dumps(x) + f" region used after exit={region.used()}")
    region, conf_g = make_instance(tmp, "graph", quota, 100)
    g = r.run(conf_g, "graph")
    check("CUDA graph capture + replay", g["graph_ok"] and region.launches() >= 50,
          f"{g}, launches through the gate={region.launches()}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=memory.total,memory.used",
                              "--format=csv,noheader,nounits", "-i", "0"],
                             env=r.env(conf), capture_output=True, text=True, timeout=60)
        total_mib = int(smi.stdout.split(",")[0])
        check("nvidia-smi shows the quota", total_mib == quota // MIB, smi.stdout.strip())
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        check("nvidia-smi shows the quota", False, repr(e))

    nvml = Nvml()
    secs, warm = (4.0, 3.0) if a.quick else (10.0, 5.0)
    base = r.run(None, "matmul", secs, warm)["rate"]
    results.append(("matmul unlimited", "-", f"{base:.1f} matmul/s (4096^2 fp16)"))
    for share in (25, 50, 75):
        region, conf_s = make_instance(tmp, f"share{share}", quota, share)
        p = r.spawn(conf_s, "matmul", secs, warm)
        s = Sampler(nvml, [(region, lambda p=p: [p.pid])])
        s.start()
        out, _ = p.communicate()
        s.stop.set()
        frac = json.loads(out.strip().splitlines()[-1])["rate"] / base * 100
        check(f"matmul at share {share}%", abs(frac - share) <= 5,
              f"{frac:.1f}% of unlimited (target {share}±5)")

    r30, c30 = make_instance(tmp, "p30", quota, 30)
    r70, c70 = make_instance(tmp, "p70", quota, 70)
    p30 = r.spawn(c30, "matmul", secs, warm)
    p70 = r.spawn(c70, "matmul", secs, warm)
    s = Sampler(nvml, [(r30, lambda: [p30.pid]), (r70, lambda: [p70.pid])])
    s.start()
    o30, _ = p30.communicate()
    o70, _ = p70.communicate()
    s.stop.set()
    x30 = json.loads(o30.strip().splitlines()[-1])["rate"]
    x70 = json.loads(o70.strip().splitlines()[-1])["rate"]
    got = x30 / (x30 + x70) * 100
    check("30/70 pair splits 30:70", abs(got - 30) <= 5,
          f"{x30:.1f} vs {x70:.1f} matmul/s = {got:.1f}:{100 - got:.1f}")

    steps = 100 if a.quick else 300
    plain = r.run(None, "train", steps)["step_ms"]
    _, conf_t = make_instance(tmp, "train", 60 << 30, 100)
    lim = r.run(conf_t, "train", steps)["step_ms"]
    over = (lim - plain) / plain * 100
    check("training loop overhead (no compute cap)", over <= 1.0,
          f"{plain:.2f} ms/step plain, {lim:.2f} with limiter: {over:+.2f}%")

    with open(a.out, "w") as f:
        f.write("| check | result | detail |\n|---|---|---|\n")
        for n, res, d in results:
            f.write(f"| {n} | {res} | {d} |\n")
    print(f"\nwrote {a.out}; {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2:])
    else:
        main()
