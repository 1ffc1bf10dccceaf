"""Where one kernel's time goes, phase by phase: reads ncu's per-instruction source page
(`ncu --set full -o rep ...`, then `ncu -i rep.ncu-rep --page source --csv
--print-source sass > sass.csv`) and cuts the SASS where leankv's kernels change phase: at
block-wide barriers (BAR), exits, the commit of a batch of cp.async copies (LDGDEPBAR) and the
release of the next kernel (PREEXIT, programmatic dependent launch) -- for attention_tiers the
wait for the previous kernel, the token write, the page ids, the score copies, the passes
over the tiers, the merge and the scores. For each phase: its share of the warp-stall samples (where the warps spent
their time), of the instructions executed, and its main stall reasons. Phases under MIN% of
the samples are left out.
Usage: python3 bench/ncu_phases.py sass.csv [MIN%]"""
import csv
import sys
from collections import Counter


def num(x):
    return int(x) if x.isdigit() else 0


if len(sys.argv) not in (2, 3):
    sys.exit("usage: python3 bench/ncu_phases.py sass.csv [MIN%]")
try:
    with open(sys.argv[1]) as f:
        rows = list(csv.reader(f))
except OSError as e:
    sys.exit(f"ncu_phases: cannot read {sys.argv[1]}: {e.strerror}")
head = next((i for i, r in enumerate(rows) if "Source" in r and "Address" in r), None)
if head is None or "Warp Stall Sampling (All Samples)" not in rows[head]:
    sys.exit(f"ncu_phases: {sys.argv[1]} is not ncu's source page with stall sampling "
             "(--set full, then --page source --csv --print-source sass)")
cols, data = rows[head], rows[head + 1:]
src = cols.index("Source")
samples = cols.index("Warp Stall Sampling (All Samples)")
execd = cols.index("Instructions Executed")
stalls = [(i, c[len("stall_"):]) for i, c in enumerate(cols)
          if c.startswith("stall_") and "Not Issued" not in c]
try:
    min_share = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
except ValueError:
    sys.exit(f"ncu_phases: MIN% must be a number, not {sys.argv[2]!r}")

phases, cur = [], None
for k, r in enumerate(data):
    if cur is None:
        cur = {"first": k, "samples": 0, "exec": 0, "stalls": Counter()}
    cur["samples"] += num(r[samples])
    cur["exec"] += num(r[execd])
    for i, name in stalls:
        cur["stalls"][name] += num(r[i])
    op = r[src].split()
    op = op[1] if op and op[0].startswith("@") else (op[0] if op else "")
    if op.startswith("BAR") or op in ("EXIT", "LDGDEPBAR", "PREEXIT") or k == len(data) - 1:
        cur["last"], cur["end"] = k, r[src].strip()
        phases.append(cur)
        cur = None

all_samples = sum(p["samples"] for p in phases) or 1
all_exec = sum(p["exec"] for p in phases) or 1
print(f"{len(data)} instructions, {all_samples} stall samples, {all_exec} warp instructions executed")
print("  SASS lines       samples  executed  ends with                       top stalls (points of all samples)")
for p in phases:
    share = 100 * p["samples"] / all_samples
    if share < min_share:
        continue
    top = ", ".join(f"{n} {100 * v / all_samples:.1f}" for n, v in p["stalls"].most_common(3) if v)
    print(f"  {p['first']:5d}-{p['last']:5d}  {share:7.1f}%  {100 * p['exec'] / all_exec:7.1f}%  "
          f"{p['end'][:30]:30s}  {top}")
