"""The budget rows of bench/gpu.sh (its budget.log, on stdin) as one markdown table: for each
setting the median over its runs of total tok/s (with the runs' range), prefill tok/s, mean
sequences in flight and preemptions, and the physical compression its `kv tiers` line reports
(fp16 and k8v4 print none: 1.00x and the page ratio below). Rows keep the log's first order."""
import json
import re
import statistics
import sys

runs, ratio, page_tok, order = {}, {}, {}, []
name = None
for line in sys.stdin:
    if line.startswith("== "):
        name = line[3:].split(":")[0].strip()
        if name not in runs:
            runs[name] = []
            order.append(name)
    elif line.startswith("{") and name:
        runs[name].append(json.loads(line))
    elif line.startswith("kv tiers") and name:
        m = re.search(r"([0-9.]+)x physical", line)
        if m:
            ratio[name] = float(m.group(1))
    elif "KV pool" in line and name:
        # one tier: its page's bytes a token, against fp16's (the k16v16 row's) below
        m = re.search(r"pages of (\d+) bytes \((\d+) tokens at (k\d+v\d+)", line)
        if m:
            page_tok[name] = (int(m.group(1)) / int(m.group(2)), m.group(3))

if not order:
    sys.exit("budget_table: no budget rows on stdin")
fp16 = [b for b, kv in page_tok.values() if kv == "k16v16"]
for n, (b, kv) in page_tok.items():
    if n not in ratio and fp16:
        ratio[n] = fp16[0] / b
med = lambda rs, k: statistics.median(r[k] for r in rs)
base = None
print("| setting | total tok/s (median) | range | vs fp16 | prefill tok/s | mean in flight | "
      "preemptions | physical | runs |")
print("|---|---|---|---|---|---|---|---|---|")
for n in order:
    rs = runs[n]
    if not rs:
        print(f"| {n} | failed | | | | | | | 0 |")
        continue
    tot = med(rs, "total_tok_s")
    if base is None:
        base = tot   # the first row (fp16) is the baseline
    lo, hi = min(r["total_tok_s"] for r in rs), max(r["total_tok_s"] for r in rs)
    phys = f"{ratio[n]:.2f}x" if n in ratio else "-"
    print(f"| {n} | {tot:,.0f} | {lo:,.0f}-{hi:,.0f} | {tot / base:.2f}x | "
          f"{med(rs, 'prefill_tok_s') / 1000:.0f}k | {med(rs, 'mean_seqs'):.1f} | "
          f"{med(rs, 'preemptions'):.0f} | {phys} | {len(rs)} |")
