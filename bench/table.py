"""Prints the JSON lines of leankv-gpu-bench bench (stdin) as a table."""
import json
import sys

print(f"{'kv':>5} {'batch':>5} {'prompt':>6} {'gen':>4} {'prefill/s':>10} {'decode/s':>10} {'total/s':>10} "
      f"{'step ms':>8} {'GB/s':>6} {'of copy':>7}  device")
for line in sys.stdin:
    if not line.startswith("{"):
        continue
    j = json.loads(line)
    print(f"{j.get('kv', 'k16v16'):>5} {j['batch']:5d} {j['prompt_len']:6d} {j['gen_len']:4d} {j['prefill_tok_s']:10.0f} "
          f"{j['decode_tok_s']:10.0f} {j['total_tok_s']:10.0f} {j['decode_step_ms']:8.3f} "
          f"{j['decode_gb_s']:6.0f} {j['bw_fraction']:7.2f}  {j['device']}")
