"""Runs the C unit tests of the paged KV cache and leankv.h's formulas (tests/test_cache.c):
fp16 conversion against the compiler's _Float16, page layout arithmetic for head dims 64 and
128 and every precision pair, the page manager's invariants under a random mix of
reservations and releases, and paged attention against dense attention."""
import os
import subprocess


# LEANKV_SAN=1 (the sanitizer pass of `make test`): built with ASan + UBSan
SAN = (["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
       if os.environ.get("LEANKV_SAN") == "1" else [])


def test_cache_units(root, tmp_path):
    exe = tmp_path / "test_cache"
    subprocess.run(["gcc", "-O2", "-std=gnu11", "-fopenmp", *SAN, f"-I{root}", "-o", str(exe),
                    str(root / "tests" / "test_cache.c"), str(root / "tokenizer.c"), "-lm"],
                   check=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].endswith(" 0 failed")
