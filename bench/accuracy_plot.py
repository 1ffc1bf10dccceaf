"""accuracy.csv -> a markdown table and a plot of perplexity increase against physical
compression ratio, one point per setting, the Pareto front (no other setting compresses more
for less loss) drawn through. Used by bench/accuracy.sh.

The perplexity increase is against --ref fp16 on the same text when the row has it, else
against the row of the fp16 setting (KL=0 runs), or, when the CSV has no fp16 row, against
FP16_PPL from the environment (a KL=0 run of a few settings compared with an earlier fp16 run)."""
import csv
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = list(csv.DictReader(open(sys.argv[1])))
fp16 = next((float(r["ppl"]) for r in rows if r["setting"] == "fp16"), None)
if fp16 is None and os.environ.get("FP16_PPL"):
    fp16 = float(os.environ["FP16_PPL"])


def num(x, fmt):
    return format(float(x), fmt) if x not in ("", None) else "-"


md = ["| setting | perplexity | vs fp16 | mean KL | top-1 | ratio (bits) | ratio (physical) "
      "| high / low / pruned | passkey |", "|---|---|---|---|---|---|---|---|---|"]
pts = []
for r in rows:
    base = float(r["ppl_fp16"]) if r["ppl_fp16"] else fp16
    inc = 100.0 * (float(r["ppl"]) / base - 1.0)
    label = r["setting"] if r["groups"] == "1" or ":" in r["setting"] else f"{r['setting']}"
    tiers = (f"{100 * float(r['high']):.0f} / {100 * float(r['low']):.0f} / "
             f"{100 * float(r['pruned']):.0f} %" if r["high"] else "-")
    md.append(f"| {label} | {float(r['ppl']):.4f} | {inc:+.2f}% | {num(r['kl'], '.5f')} | "
              f"{num(r['top1'], '.4f')} | {float(r['bits_ratio']):.2f}x | "
              f"{float(r['physical_ratio']):.2f}x | {tiers} | {r['passkey'] or '-'} |")
    pts.append((float(r["physical_ratio"]), inc, label, r["setting"].startswith("leankv")))
open(sys.argv[2], "w").write("\n".join(md) + "\n")

front, best = [], float("inf")
for x, y, t, _ in sorted(pts, key=lambda p: (-p[0], p[1])):   # most compression first
    if y < best:
        front.append((x, y))
        best = y
fig, ax = plt.subplots(figsize=(8, 5))
for lean in (False, True):
    sel = [p for p in pts if p[3] == lean]
    ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker="o" if lean else "s",
               label="leankv (three tiers)" if lean else "one precision (kXvY)")
for x, y, t, _ in pts:
    ax.annotate(t.replace("leankv:", "").replace(",", " "), (x, y), textcoords="offset points",
                xytext=(4, 4), fontsize=7)
front.sort()
ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
ax.axhline(1.0, color="grey", lw=0.6, ls=":")
ax.axhline(5.0, color="grey", lw=0.6, ls=":")
ax.set_xlabel("physical compression ratio vs fp16 cache (pages held, metadata included)")
ax.set_ylabel("perplexity increase vs fp16 cache (%, symlog)")
ax.set_yscale("symlog", linthresh=1.0)
ax.set_ylim(bottom=-0.3)
ax.set_title("SmolLM2-135M-Instruct: KV-cache settings")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[3], dpi=120)
