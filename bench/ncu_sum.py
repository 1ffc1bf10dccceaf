"""Sums ncu's per-kernel durations (--metrics gpu__time_duration.sum --csv) by kernel name,
the largest first (the first TOP of them), and the share of leankv's compression and
memory-manager kernels (kv_*, and cub's scan inside the manager).
Usage: python3 bench/ncu_sum.py ncu.csv [TOP]"""
import csv
import sys
from collections import defaultdict

tot, cnt = defaultdict(float), defaultdict(int)
with open(sys.argv[1]) as f:
    rows = [l for l in f if l.startswith('"')]
for r in csv.DictReader(rows):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = r["Kernel Name"].split("(")[0][:60]
    v = float(r["Metric Value"].replace(",", ""))
    unit = r.get("Metric Unit", "ns")
    v *= {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "nsecond": 1e-3, "ms": 1e3, "msecond": 1e3}.get(unit, 1e-3)
    tot[name] += v
    cnt[name] += 1
all_us = sum(tot.values())
print(f"one decode step, kernels one by one: {all_us:.0f} us in {sum(cnt.values())} kernels")
top = int(sys.argv[2]) if len(sys.argv) > 2 else len(tot)
for k in sorted(tot, key=tot.get, reverse=True)[:top]:
    print(f"  {tot[k]:9.1f} us {100 * tot[k] / all_us:5.1f}%  x{cnt[k]:4d}  {k}")
kv = sum(v for k, v in tot.items() if k.startswith("kv_") or "cub::" in k)
if kv:
    print(f"compression and memory-manager kernels (kv_*, cub's scan): {kv:.0f} us, "
          f"{100 * kv / all_us:.1f}% of the step")
