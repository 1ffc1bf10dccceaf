#!/usr/bin/env bash
# A short generation under valgrind's memcheck, as `make test`'s last step:
#
#   tests/valgrind.sh ./leankv-cpu models/smollm2-135m-instruct.bin
#
# Two runs of the CPU-only build: one prompt (generate mode, 4 tokens) and two requests through
# the batch scheduler (-f). Either fails on a memcheck error (invalid read or write, use of
# uninitialised values) or on any byte "definitely lost"; the leak summary is printed.
set -uo pipefail
BIN="${1:?usage: tests/valgrind.sh BINARY MODEL}"
MODEL="${2:?usage: tests/valgrind.sh BINARY MODEL}"
command -v valgrind >/dev/null || { echo "valgrind: error: valgrind is not installed (run.sh --setup installs it)" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
printf '{"prompt": "The capital of France is", "n": 3}\n{"prompt": "1, 2, 3,", "n": 2, "id": "b"}\n' > "$tmp/req.jsonl"

status=0
run() {
    local name="$1"; shift
    valgrind --tool=memcheck --leak-check=full --errors-for-leak-kinds=definite \
        --error-exitcode=99 --log-file="$tmp/$name.log" "$BIN" "$MODEL" "$@" > "$tmp/$name.out" 2>&1
    local rc=$?
    local lost
    lost=$(sed -n 's/.*definitely lost: \([0-9,]*\) bytes.*/\1/p' "$tmp/$name.log" | tr -d ,)
    grep -q "All heap blocks were freed" "$tmp/$name.log" && lost=0
    local errors
    errors=$(sed -n 's/.*ERROR SUMMARY: \([0-9,]*\) errors.*/\1/p' "$tmp/$name.log" | tail -1)
    echo "valgrind: $name: exit $rc, definitely lost ${lost:-?} bytes, ${errors:-?} errors"
    if [ "$rc" -ne 0 ] || [ "${lost:-1}" != 0 ]; then
        status=1
        cat "$tmp/$name.out" "$tmp/$name.log" >&2
    fi
}
run generate "The capital of France is" -n 4 -t 0 --device cpu
run requests -f "$tmp/req.jsonl" -t 0 --batch 2 --device cpu
exit $status
