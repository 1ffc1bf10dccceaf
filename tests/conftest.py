"""Shared fixtures: where the binaries and the default model are.

`make test` builds ./leankv and ./leankv-asan and runs ./run.sh --setup (which fetches and
exports the default model) before pytest, so these exist in CI. LEANKV_BIN, when set, names the
program the tests run instead of ./leankv (the sanitizer pass of `make test`)."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_BIN = ROOT / "models" / "smollm2-135m-instruct.bin"
SMOLLM2_GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# the sanitizer pass of `make test` (LEANKV_SAN=1): tests marked slow_under_sanitizers, which
# take minutes there, are skipped; they run in the first pass
SANITIZED = os.environ.get("LEANKV_SAN") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow_under_sanitizers: skipped in make test's "
                                       "sanitizer pass (LEANKV_SAN=1)")


def pytest_collection_modifyitems(config, items):
    if not SANITIZED:
        return
    skip = pytest.mark.skip(reason="minutes under ASan + UBSan; runs in make test's first pass")
    for item in items:
        if "slow_under_sanitizers" in item.keywords:
            item.add_marker(skip)


def _built(target):
    path = ROOT / target
    subprocess.run(["make", "-s", "-C", str(ROOT), target], check=True)
    return path


@pytest.fixture(scope="session")
def root():
    return ROOT


@pytest.fixture(scope="session")
def leankv_bin():
    """./leankv, or the binary LEANKV_BIN names: `make test` runs the suite a second time with
    LEANKV_BIN=./leankv-asan, so that every test of the program also runs under ASan + UBSan."""
    env = os.environ.get("LEANKV_BIN")
    if env:
        return Path(env).resolve()
    return _built("leankv")


@pytest.fixture(scope="session")
def leankv_asan():
    return _built("leankv-asan")


@pytest.fixture(scope="session")
def smollm2_bin():
    if not SMOLLM2_BIN.exists():
        pytest.fail(f"{SMOLLM2_BIN} is missing: run ./run.sh --setup (make test does)")
    return SMOLLM2_BIN


@pytest.fixture(scope="session")
def smollm2_gguf():
    if not SMOLLM2_GGUF.exists():
        pytest.fail(f"{SMOLLM2_GGUF} is missing: run ./run.sh --setup (make test does)")
    return SMOLLM2_GGUF


# ---- the closing line -------------------------------------------------------------------------
# `make test` ends with "N passed, M failed, K skipped" alone on a line, after pytest's own
# summary, so that the count of failures is there even when it is zero.

_counts = {"passed": 0, "failed": 0, "skipped": 0}


def pytest_runtest_logreport(report):
    if report.failed:
        _counts["failed"] += 1
    elif report.skipped:
        _counts["skipped"] += 1
    elif report.when == "call" and report.passed:
        _counts["passed"] += 1


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):
        print(f"{_counts['passed']} passed, {_counts['failed']} failed, "
              f"{_counts['skipped']} skipped", flush=True)
