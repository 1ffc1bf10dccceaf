"""Runs the C unit tests:
- tests/test_cache.c: the paged KV cache and leankv.h's formulas: fp16 conversion against the
  compiler's _Float16, page layout arithmetic for head dims 64 and 128 and every precision
  pair, the page manager's invariants under a random mix of reservations and releases, and
  paged attention against dense attention;
- tests/test_tiers.c: leankv's tiers: the four decode cases and the prefill placement driven by
  hand-built scores, the significance scores and mixed-tier attention against dense
  references, the memory manager's invariants under a long random mix over thousands of heads,
  and the tier fractions and compression ratios against a count from the pages."""
import os
import subprocess

import pytest

# LEANKV_SAN=1 (the sanitizer pass of `make test`): built with ASan + UBSan
SAN = (["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
       if os.environ.get("LEANKV_SAN") == "1" else [])


@pytest.mark.parametrize("name", ["test_cache", "test_tiers"])
def test_c_units(root, tmp_path, name):
    exe = tmp_path / name
    subprocess.run(["gcc", "-O2", "-std=gnu11", "-fopenmp", *SAN, f"-I{root}", "-o", str(exe),
                    str(root / "tests" / f"{name}.c"), str(root / "tokenizer.c"), "-lm"],
                   check=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].endswith(" 0 failed")
