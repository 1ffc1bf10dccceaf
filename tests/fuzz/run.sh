#!/usr/bin/env bash
# Runs every fuzz target (tests/fuzz/fuzz_*.c) with libFuzzer, AddressSanitizer and
# UndefinedBehaviorSanitizer, one after the other (`make fuzz` calls this):
#
#   tests/fuzz/run.sh [SECONDS] [RUNS] [TARGET...]
#
# Each target runs for SECONDS (default 60), or for RUNS executions when RUNS > 0, starting from
# tests/fuzz/seeds/<target>/ plus what earlier runs added to build/fuzz/corpus/<target>/. A
# crash, leak or sanitizer report stops the target and leaves the input in
# build/fuzz/crashes/<target>/: copy it to tests/fuzz/regress/<target>/ (the test suite replays
# that folder) and fix the code. The last lines are one per target: its executions and result.
# Installs clang and libFuzzer (Debian: clang, libclang-rt-dev) with apt-get when missing.
set -uo pipefail
cd "$(dirname "$0")/../.."

SECONDS_EACH="${1:-60}"
RUNS="${2:-0}"
shift 2 2>/dev/null || shift $#
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(model legacy tokfile encode jsonl flags)
CC="${FUZZ_CC:-clang}"

fail() { echo "fuzz: error: $*" >&2; exit 1; }

has_libfuzzer() {
    echo 'int LLVMFuzzerTestOneInput(const char *d, long n) { return 0; }' > build/fuzz/probe.c
    "$CC" -fsanitize=fuzzer build/fuzz/probe.c -o build/fuzz/probe 2>/dev/null
}

mkdir -p build/fuzz
if ! command -v "$CC" >/dev/null || ! has_libfuzzer; then
    echo "fuzz: installing clang and libFuzzer (Debian packages clang libclang-rt-dev)" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq clang libclang-rt-dev >/dev/null \
        || fail "apt-get install clang libclang-rt-dev failed"
    has_libfuzzer || fail "$CC cannot link -fsanitize=fuzzer"
fi

summary=()
status=0
for t in "${TARGETS[@]}"; do
    make -s "build/fuzz/fuzz_$t" FUZZ_CC="$CC" || fail "building fuzz_$t failed"
    corpus="build/fuzz/corpus/$t" crashes="build/fuzz/crashes/$t" log="build/fuzz/$t.log"
    mkdir -p "$corpus" "$crashes"
    limit=(-max_total_time="$SECONDS_EACH")
    [ "$RUNS" -gt 0 ] && limit=(-runs="$RUNS")
    echo "fuzz: $t (${limit[*]}), log in $log" >&2
    ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        nice "./build/fuzz/fuzz_$t" "${limit[@]}" -rss_limit_mb=2048 -timeout=20 \
        -max_len=65536 -print_final_stats=1 -artifact_prefix="$crashes/" \
        "$corpus" "tests/fuzz/seeds/$t" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ $rc -eq 0 ]; then result="ok"; else result="FAILED (exit $rc, see $log and $crashes/)"; status=1; fi
    summary+=("fuzz_$t: ${execs:-?} executions, $result")
done
printf '%s\n' "${summary[@]}"
exit $status
