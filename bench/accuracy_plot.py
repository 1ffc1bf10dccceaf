"""accuracy.csv -> a markdown table and a plot of compression ratio against perplexity
increase (one point per setting). Used by bench/accuracy.sh."""
import csv
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = list(csv.DictReader(open(sys.argv[1])))
md = ["| kv | groups | perplexity | vs fp16 | mean KL | top-1 | ratio (bits) | ratio (physical) "
      "| passkey |", "|---|---|---|---|---|---|---|---|---|"]
xs, ys, labels = [], [], []
for r in rows:
    inc = 100.0 * (float(r["ppl"]) / float(r["ppl_fp16"]) - 1.0)
    md.append(f"| {r['kv']} | {r['groups']} | {float(r['ppl']):.4f} | {inc:+.2f}% | "
              f"{float(r['kl']):.5f} | {float(r['top1']):.4f} | {float(r['bits_ratio']):.2f}x | "
              f"{float(r['physical_ratio']):.2f}x | {r['passkey'] or '-'} |")
    xs.append(float(r["physical_ratio"]))
    ys.append(inc)
    labels.append(r["kv"] + (f"/g{r['groups']}" if r["groups"] != "1" else ""))
open(sys.argv[2], "w").write("\n".join(md) + "\n")
fig, ax = plt.subplots(figsize=(7, 4.5))
ax.scatter(xs, ys)
for x, y, t in zip(xs, ys, labels):
    ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
ax.set_xlabel("physical compression ratio vs fp16 cache (pages held, metadata included)")
ax.set_ylabel("perplexity increase vs fp16 cache (%, symlog)")
ax.set_yscale("symlog", linthresh=1.0)
ax.set_title("SmolLM2-135M-Instruct: KV-cache settings")
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(sys.argv[3], dpi=120)
