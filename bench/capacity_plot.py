"""bench/gpu.sh's budget.log (its `budget` and `capacity` rows, on stdin) -> a plot of total
throughput against the mean sequences in flight, relative to the first row (fp16 under the
1 GiB budget):

    python3 bench/capacity_plot.py OUT.png < budget.log

One point per run, one series per cache type (fp16 and k8v4 at several pools: capacity alone;
each leankv setting under the budget), and the line that throughput would follow if a decode
step cost the same however many sequences it holds (a step bound by reading the whole pool):
throughput in proportion to the sequences in flight. How far the points fall under that line
is how little of a compression ratio turns into throughput on this model and card; the dotted
lines are issue 5's targets for the lossless and aggressive settings (the paper's figures)."""
import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if len(sys.argv) != 2:
    sys.exit("usage: capacity_plot.py OUT.png < budget.log")
runs, name, card = [], None, ""
for line in sys.stdin:
    if line.startswith("== "):
        name = line[3:].split(":")[0].strip()
    elif line.startswith("{") and name:
        runs.append((name, json.loads(line)))
    elif "leankv: GPU " in line and not card:
        card = line.split("leankv: GPU ")[1].split(":")[0]
if not runs:
    sys.exit("capacity_plot: no runs on stdin")


def series(n):
    """fp16-3471-MiB -> fp16 (pools); leankv-4-1-swap8192 -> leankv 4/1; fp16-swap8192 -> fp16"""
    parts = n.split("-")
    if parts[0] == "leankv":
        return f"leankv ah {parts[1]}, al {parts[2]}"
    return parts[0]


base = runs[0][1]
x0, y0 = base["mean_seqs"], base["total_tok_s"]
fig, ax = plt.subplots(figsize=(7.5, 5))
groups = {}
for n, r in runs:
    groups.setdefault(series(n), []).append((r["mean_seqs"], r["total_tok_s"] / y0))
for s, pts in groups.items():
    pts.sort()
    for x, y in pts:   # what is drawn, for a reader (and tests/test_batch.py) to check
        print(f"{s}: {x:.1f} in flight, {y:.3f}x")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    style = "o-" if len(pts) > 1 and not s.startswith("leankv") else "s"
    ax.plot(xs, ys, style, label=s, ms=6)
xmax = max(r["mean_seqs"] for _, r in runs) * 1.05
ax.plot([0, xmax], [0, xmax / x0], "k--", lw=1,
        label="throughput in proportion to sequences in flight")
for t, what in ((2.5, "lossless"), (6.9, "aggressive")):   # issue 5's targets (the paper's)
    ax.axhline(t, color="grey", ls=":", lw=1)
    ax.text(xmax * 0.99, t + 0.08, f"target, {what}: {t}x", ha="right", fontsize=8, color="grey")
ax.set_xlim(0, xmax)
ax.set_ylim(0, max(7.5, max(max(p[1] for p in v) for v in groups.values()) * 1.2))
ax.set_xlabel("mean sequences in flight")
ax.set_ylabel(f"total tok/s, relative to the first row ({runs[0][0]})")
ax.set_title(f"What capacity buys: 512 requests of 1,024 + 1,024 tokens ({card or 'GPU'})",
             fontsize=10)
ax.grid(alpha=0.3)
ax.legend(fontsize=8, loc="upper left")
fig.tight_layout()
fig.savefig(sys.argv[1], dpi=110)
print(f"capacity_plot: {len(runs)} runs -> {sys.argv[1]}")
