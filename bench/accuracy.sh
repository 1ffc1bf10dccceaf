#!/usr/bin/env bash
# What each KV-cache setting costs in accuracy, on SmolLM2-135M-Instruct:
#   perplexity over the licence texts (decode mode, --ref fp16: KL and top-1 agreement),
#   passkey retrieval at 1k and 2k context, and both compression ratios.
# Writes bench/accuracy.md (table), bench/accuracy.csv and bench/accuracy.png (compression
# ratio against perplexity increase). Runs on the GPU when one is present, else the CPU.
#
#   bench/accuracy.sh                      # the full sweep
#   PPL_TOKENS=1024 TRIALS=1 bench/accuracy.sh   # a quick one
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-models/smollm2-135m-instruct.bin}"
PPL_TOKENS="${PPL_TOKENS:-4096}"     # tokens of text for perplexity
TRIALS="${TRIALS:-2}"                # passkey trials per depth (9 depths)
PASSKEY_LENS="${PASSKEY_LENS:-1024 2048}"
PASSKEY_KVS="${PASSKEY_KVS:-fp16 k8v4 k4v2}"
SETTINGS="${SETTINGS:-fp16 k8v8 k8v4 k4v4 k4v2 k2v2 k4v4:2 k4v2:2 k4v2:4 k2v2:4}"   # kv[:groups]
OUT="${OUT:-bench}"
TEXT="$(mktemp)"
trap 'rm -f "$TEXT"' EXIT
cat /usr/share/common-licenses/GPL-3 /usr/share/common-licenses/Apache-2.0 \
    /usr/share/common-licenses/MPL-2.0 > "$TEXT"
[ -x ./leankv ] || make -s leankv
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/pip install -q matplotlib

CSV="$OUT/accuracy.csv"
echo "kv,groups,ppl,ppl_fp16,kl,top1,bits_ratio,physical_ratio,passkey" > "$CSV"
for s in $SETTINGS; do
    kv="${s%%:*}"; g=1; [ "$s" != "$kv" ] && g="${s##*:}"
    out=$(./leankv "$MODEL" -m ppl -f "$TEXT" --ctx "$PPL_TOKENS" --kv "$kv" --kv-groups "$g" \
          --ref fp16 2>/dev/null)
    ppl=$(sed -n 's/^perplexity: //p' <<<"$out")
    ref=$(sed -n 's/^ref fp16 perplexity: //p' <<<"$out")
    kl=$(sed -n 's/^mean KL(ref || kv): //p' <<<"$out")
    top1=$(sed -n 's/^top-1 agreement: //p' <<<"$out")
    bits=$(sed -n 's/^kv: .*compression \([0-9.]*\)x bits-only.*/\1/p' <<<"$out")
    phys=$(sed -n 's/^kv: .*, \([0-9.]*\)x physical.*/\1/p' <<<"$out")
    pk=""
    if [ "$g" = 1 ] && [[ " $PASSKEY_KVS " == *" $kv "* ]]; then
        for L in $PASSKEY_LENS; do
            r=$(./leankv "$MODEL" -m passkey --ctx-len "$L" --ctx $((L + 64)) --trials "$TRIALS" \
                --kv "$kv" -s 7 2>/dev/null | sed -n 's/^passkey: //p')
            pk="$pk${pk:+ }${L}:$r"
        done
    fi
    echo "$kv,$g,$ppl,$ref,$kl,$top1,$bits,$phys,$pk" | tee -a "$CSV"
done
.venv/bin/python bench/accuracy_plot.py "$CSV" "$OUT/accuracy.md" "$OUT/accuracy.png"
echo "wrote $CSV, $OUT/accuracy.md, $OUT/accuracy.png"
