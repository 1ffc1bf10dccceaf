#!/usr/bin/env bash
# CPU speed of the default model: a 128-token prompt, then exactly 128 generated tokens,
# three runs, medians. Run from the repository root after ./run.sh --setup.
#   bench/cpu_speed.sh [MODEL.bin] [extra leankv flags]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-models/smollm2-135m-instruct.bin}"
shift || true
# the first 128 tokens of the Apache-2.0 licence text
ids=$(./leankv "$MODEL" -m tokenize -i "$(cat /usr/share/common-licenses/Apache-2.0)" | cut -d' ' -f1-128)
prompt=$(.venv/bin/python - "$MODEL" $ids <<'PY'
import struct, sys
# decode the ids with the tokenizer section of model.bin (raw bytes per token)
data = open(sys.argv[1], "rb").read()
off, size = struct.unpack_from("<QQ", data, 136)
p = off + 20
toks = []
n = struct.unpack_from("<i", data, off + 8)[0]
for _ in range(n):
    t, s, nb = struct.unpack_from("<ifi", data, p); p += 12
    toks.append(data[p:p + nb]); p += nb
sys.stdout.write(b"".join(toks[int(i)] for i in sys.argv[2:]).decode("utf-8", "replace"))
PY
)
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; OMP_NUM_THREADS=${OMP_NUM_THREADS:-all}"
for run in 1 2 3; do
    ./leankv "$MODEL" "$prompt" -n 128 --no-stop -t 0 "$@" 2>&1 >/dev/null | grep "tok/s"
done | tee /tmp/cpu_speed.$$ 
python3 - /tmp/cpu_speed.$$ <<'PY'
import re, statistics, sys
rows = [list(map(float, re.findall(r"([\d.]+) tok/s", l))) + [int(re.search(r"prompt: (\d+)", l).group(1))]
        for l in open(sys.argv[1])]
print(f"median of {len(rows)}: prompt ({rows[0][2]} tokens) {statistics.median(r[0] for r in rows):.1f} tok/s, "
      f"generation (128 tokens) {statistics.median(r[1] for r in rows):.1f} tok/s")
PY
rm -f /tmp/cpu_speed.$$
