"""Replays every fuzz seed (tests/fuzz/seeds/<target>/) and every regression input
(tests/fuzz/regress/<target>/: inputs that once crashed or broke a property, kept after the fix)
through the fuzz targets built with gcc's AddressSanitizer + UndefinedBehaviorSanitizer and
tests/fuzz/replay.c as main(). A crash, a leak, a sanitizer report or a failed property
(assert) fails the test. `make fuzz` runs the same targets under libFuzzer for much longer."""
import os
import subprocess

import pytest

TARGETS = ["model", "legacy", "tokfile", "encode", "jsonl", "flags"]
ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
           UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")


@pytest.mark.parametrize("target", TARGETS)
def test_replay(root, target):
    exe = root / "build" / "fuzz" / f"replay_{target}"
    subprocess.run(["make", "-s", "-C", str(root), f"build/fuzz/replay_{target}"], check=True)
    folders = [root / "tests" / "fuzz" / d / target for d in ("seeds", "regress")]
    folders = [f for f in folders if f.is_dir()]
    n = sum(1 for f in folders for p in f.iterdir() if not p.name.startswith("."))
    assert n > 0
    r = subprocess.run([str(exe), *map(str, folders)], capture_output=True, text=True,
                       timeout=600, cwd=root, env=ENV)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-4000:]
    assert r.stdout.strip().splitlines()[-1] == f"replayed {n} inputs"
