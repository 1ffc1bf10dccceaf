#!/usr/bin/env bash
# What each KV-cache setting costs in accuracy, on SmolLM2-135M-Instruct:
#   perplexity over the licence texts (decode mode, --ref fp16: KL and top-1 agreement),
#   passkey retrieval at 1k and 2k context, both compression ratios and, for leankv, the
#   fraction of tokens kept high, kept low and pruned.
# Writes bench/accuracy.md (table), bench/accuracy.csv and bench/accuracy.png (perplexity
# increase against physical compression, with the Pareto front). Runs on the CPU.
#
#   bench/accuracy.sh                             # the full sweep
#   PPL_TOKENS=1024 TRIALS=1 bench/accuracy.sh    # a quick one
#   SETTINGS="fp16 leankv:ah=1,al=0.02" JOBS=2 bench/accuracy.sh
#
# A setting is kv[:groups] (fp16, k8v4, k4v2:4 ...) or leankv with its options after a colon,
# comma-separated: ah= alpha_high, al= alpha_low, w= window, hi= high tier, lo= low tier,
# g= channel groups; e.g. leankv:ah=2,al=0.5,lo=k2v2. KL=0 skips the --ref fp16 run (half the
# time; the perplexity increase is then taken against the fp16 setting's row, which must come
# first, or be given as FP16_PPL=17.919834). JOBS runs that many settings at once (one thread
# each).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-models/smollm2-135m-instruct.bin}"
PPL_TOKENS="${PPL_TOKENS:-4096}"     # tokens of text for perplexity
TRIALS="${TRIALS:-2}"                # passkey trials per depth (9 depths)
PASSKEY_LENS="${PASSKEY_LENS:-1024 2048}"
PASSKEY_KVS="${PASSKEY_KVS:-fp16 k8v4 k4v2}"   # plus every leankv setting unless PASSKEY_LEANKV=0
PASSKEY_LEANKV="${PASSKEY_LEANKV:-1}"
SETTINGS="${SETTINGS:-fp16 k8v8 k8v4 k4v4 k4v2 k2v2 k4v4:2 k4v2:2 k4v2:4 k2v2:4 \
leankv:ah=1,al=0.02 leankv:ah=2,al=0.5 leankv:ah=4,al=1}"
KL="${KL:-1}"
export FP16_PPL="${FP16_PPL:-}"   # the fp16 perplexity, for KL=0 runs without the fp16 setting
JOBS="${JOBS:-1}"
OUT="${OUT:-bench}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
TEXT="$TMP/text.txt"
cat /usr/share/common-licenses/GPL-3 /usr/share/common-licenses/Apache-2.0 \
    /usr/share/common-licenses/MPL-2.0 > "$TEXT"
LEANKV="${LEANKV:-./leankv}"   # the binary (a copy keeps a long sweep safe from rebuilds)
[ -x "$LEANKV" ] || make -s leankv
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/pip install -q matplotlib

# the leankv flags of a setting (kv[:groups] or leankv:k=v,...), into FLAGS; its groups into G
flags_of() {
    local s="$1" kv="${1%%:*}" opts="" kvpair
    G=1
    [ "$s" != "$kv" ] && opts="${s#*:}"
    FLAGS=(--kv "$kv")
    if [ "$kv" != leankv ]; then
        [ -n "$opts" ] && G="$opts"
        FLAGS+=(--kv-groups "$G")
        return
    fi
    IFS=, read -ra kvpair <<<"$opts"
    for p in "${kvpair[@]}"; do
        case "${p%%=*}" in
            ah) FLAGS+=(--alpha-high "${p#*=}") ;;
            al) FLAGS+=(--alpha-low "${p#*=}") ;;
            w)  FLAGS+=(--kv-window "${p#*=}") ;;
            hi) FLAGS+=(--kv-high "${p#*=}") ;;
            lo) FLAGS+=(--kv-low "${p#*=}") ;;
            g)  G="${p#*=}"; FLAGS+=(--kv-groups "$G") ;;
            *)  echo "accuracy.sh: unknown leankv option '$p' in '$s'" >&2; exit 1 ;;
        esac
    done
}

# one CSV line for setting $1
run_one() {
    local s="$1" kv="${1%%:*}" out ref=() pk=""
    flags_of "$s"
    [ "$KL" = 1 ] && ref=(--ref fp16)
    out=$(OMP_NUM_THREADS=1 "$LEANKV" "$MODEL" -m ppl -f "$TEXT" --ctx "$PPL_TOKENS" \
          "${FLAGS[@]}" "${ref[@]}" 2>/dev/null)
    local ppl ref_ppl kl top1 bits phys tiers
    ppl=$(sed -n 's/^perplexity: //p' <<<"$out")
    ref_ppl=$(sed -n 's/^ref fp16 perplexity: //p' <<<"$out")
    kl=$(sed -n 's/^mean KL(ref || kv): //p' <<<"$out")
    top1=$(sed -n 's/^top-1 agreement: //p' <<<"$out")
    bits=$(sed -n 's/^kv: .*compression \([0-9.]*\)x bits-only.*/\1/p' <<<"$out")
    phys=$(sed -n 's/^kv: .*, \([0-9.]*\)x physical.*/\1/p' <<<"$out")
    tiers=$(sed -n 's/^tiers: high \([0-9.]*\), low \([0-9.]*\), pruned \([0-9.]*\)/\1,\2,\3/p' <<<"$out")
    if [[ " $PASSKEY_KVS " == *" $s "* ]] || { [ "$kv" = leankv ] && [ "$PASSKEY_LEANKV" = 1 ]; }; then
        for L in $PASSKEY_LENS; do
            r=$(OMP_NUM_THREADS=1 "$LEANKV" "$MODEL" -m passkey --ctx-len "$L" --ctx $((L + 64)) \
                --trials "$TRIALS" "${FLAGS[@]}" -s 7 2>/dev/null | sed -n 's/^passkey: //p')
            pk="$pk${pk:+ }${L}:$r"
        done
    fi
    echo "\"$s\",$G,$ppl,$ref_ppl,$kl,$top1,$bits,$phys,$tiers,$pk"
}

i=0
for s in $SETTINGS; do
    i=$((i + 1))
    run_one "$s" > "$TMP/$(printf %03d $i).csv" &
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
done
wait
CSV="$OUT/accuracy.csv"
echo "setting,groups,ppl,ppl_fp16,kl,top1,bits_ratio,physical_ratio,high,low,pruned,passkey" > "$CSV"
cat "$TMP"/[0-9]*.csv | tee -a "$CSV"
.venv/bin/python bench/accuracy_plot.py "$CSV" "$OUT/accuracy.md" "$OUT/accuracy.png"
echo "wrote $CSV, $OUT/accuracy.md, $OUT/accuracy.png"
