#!/usr/bin/env python3
"""Summarises bench/scheduler_sweep.sh's JSON files as the markdown tables of
docs/bench/scheduler.md: per trace, unallocated GPU % at 90/95/100/110/130 for fgd and the
policy, the largest (policy − fgd) over the integer points 90..130, and the mean arrived % of the
first refused full-node (8-GPU) request per policy.

Usage: bench/scheduler_sweep.py OUTDIR [POLICY]   (POLICY defaults to gvfrag)
"""
import json
import os
import sys

out = sys.argv[1]
pol = sys.argv[2] if len(sys.argv) > 2 else "gvfrag"
order = ["default", "cpu0", "cpu037", "cpu050", "cpu072", "cpu100", "cpu200", "cpu235",
         "cpu250", "cpu300"]
names = sorted(os.listdir(os.path.join(out, "json")))
keyed = [n[:-5] for n in names if n.endswith(".json")]
keyed.sort(key=lambda n: (order.index(n) if n in order else 99, n))


def first(r):
    f = r["full_node"]
    if f["first_refused_mean_pct"] is None:
        return "never"
    return "%.1f (%d)" % (f["first_refused_mean_pct"], f["seeds_with_refusal"])


print("| trace | fgd @90/95/100/110/130 | %s @90/95/100/110/130 | worst %s − fgd, 90..130 "
      "| 1st 8-GPU refused: bestfit / fgd / %s |" % (pol, pol, pol))
print("|---|---|---|---|---|")
for n in keyed:
    with open(os.path.join(out, "json", n + ".json")) as f:
        res = {r["policy"]: r for r in json.load(f)["results"]}
    pts = ["90", "95", "100", "110", "130"]
    row = lambda r: " / ".join("%.2f" % r["unallocated_pct"][p] for p in pts)
    w = res[pol]["worst_vs_fgd"]
    worst = "%+.3f @%d" % (w[0], w[1]) if w else "-"
    if w and w[0] >= 0.005:
        worst = "**" + worst + "**"
    firsts = " / ".join(first(res[p]) for p in ["bestfit", "fgd", pol] if p in res)
    print("| %s | %s | %s | %s | %s |" % (n, row(res["fgd"]), row(res[pol]), worst, firsts))
