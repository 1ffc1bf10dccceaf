"""The chunked prefill (forward_rows: a prompt goes through the model up to --prefill-chunk rows
at a time) against the token-by-token path (--prefill-chunk 1, which is forward(), the decode
step, once per token).

The two compute the same function; only the order of some fp32 sums differs (the matrix
products and the attention run over several rows at once). So:
  - with an exact cache (--kv fp32), every position's logits agree within 1e-5 relative
    (max|chunked - one by one| / max|one by one|, per position);
  - with the default fp16 cache they agree within test_forward.py's cap of 2e-3 and pick the same
    top-1 token: a last-bit difference in a key can round to a different fp16 value, which
    moves an attention weight by up to ~1e-3 (test_forward.py's "tie noise"), so 1e-5 is out of
    reach for any two fp32 orderings there;
  - greedy generation, prompt chunked or not, gives the same tokens.
The ids are 150 long, so that a 64-row chunk runs twice and then a partial one (22 rows), and the
odd chunk sizes reach the edges of the tiling (rows past a multiple of 4, a last chunk of 1).
"""
import itertools
import json
import os
import subprocess

import numpy as np
import pytest

import tiny_models as tm

N_IDS = 150
_runs = itertools.count()
TOL_EXACT = 1e-5   # --kv fp32
CAP_FP16 = 2e-3    # the default fp16 cache: test_forward.py's CAP
SMOL_PROMPT = ("Once upon a time, in a small village by the sea, there lived an old fisherman who "
               "knew every star in the sky and every fish in the water. One morning he found a "
               "bottle on the beach. Inside the bottle was a letter, written in a language he had "
               "never seen, and a small map drawn in blue ink. The map showed an island that was "
               "not on any of his charts, far to the west, beyond the place where the fishing "
               "boats turned back. He showed the letter to his daughter, who had learned many languages "
               "from the sailors in the harbour. She read it twice, slowly, and then she looked "
               "up at him and said that it was an invitation. Whoever found the bottle was asked "
               "to sail to the island before the next full moon, and to bring")


def run(exe, *args, timeout=600, env=None):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def logits(exe, model, ids, tmp_path, *extra):
    out = tmp_path / f"logits{next(_runs)}.f32"
    r = run(exe, model, *extra, "-m", "logits", "-i", " ".join(map(str, ids)), "-o", out)
    assert r.returncode == 0, r.stderr
    a = np.fromfile(out, dtype="<f4")
    assert a.size % len(ids) == 0
    return a.reshape(len(ids), -1)


def rel_err(got, want):
    return np.abs(got - want).max(1) / np.abs(want).max(1)


def compare(exe, model, ids, tmp_path, chunk, kv):
    one = logits(exe, model, ids, tmp_path, "--kv", kv, "--prefill-chunk", "1")
    got = logits(exe, model, ids, tmp_path, "--kv", kv, *(("--prefill-chunk", chunk) if chunk else ()))
    err = rel_err(got, one)
    print(f"\n    chunk {chunk or 'default'}, --kv {kv}: max rel err {err.max():.2e} at position "
          f"{int(err.argmax())} (median {np.median(err):.1e})", end="")
    assert np.isfinite(got).all()
    return got, one, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny models with biases + GQA, and with head_dim 32 (QD != dim) + one KV head"""
    out = {}
    for variant in ("qwen2_bias_gqa_tied", "mistral_mqa_hd32"):
        out[variant] = tm.build_model(tmp_path_factory.mktemp(variant), variant)
    return out


@pytest.fixture(scope="module")
def smol_ids(leankv_bin, smollm2_bin):
    r = run(leankv_bin, smollm2_bin, "-m", "tokenize", "-i", SMOL_PROMPT)
    assert r.returncode == 0, r.stderr
    ids = [int(x) for x in r.stdout.split()]
    assert len(ids) >= 100, len(ids)
    return ids


# ---- logits -------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [None, 5, 13])
@pytest.mark.parametrize("variant", ["qwen2_bias_gqa_tied", "mistral_mqa_hd32"])
def test_tiny_chunked_equals_one_by_one(leankv_bin, tiny, tmp_path, variant, chunk):
    ids = np.random.default_rng(7).integers(0, tm.VOCAB, N_IDS).tolist()
    _, _, err = compare(leankv_bin, tiny[variant], ids, tmp_path, chunk, "fp32")
    assert err.max() <= TOL_EXACT
    got, one, err = compare(leankv_bin, tiny[variant], ids, tmp_path, chunk, "fp16")
    assert err.max() <= CAP_FP16
    assert (got.argmax(1) == one.argmax(1)).all()


@pytest.mark.slow_under_sanitizers   # minutes under ASan; the tiny tests cover it there
@pytest.mark.parametrize("chunk", [None, 17])
def test_smollm2_chunked_equals_one_by_one(leankv_bin, smollm2_bin, smol_ids, tmp_path, chunk):
    assert len(smol_ids) > 64 * 2
    _, _, err = compare(leankv_bin, smollm2_bin, smol_ids, tmp_path, chunk, "fp32")
    assert err.max() <= TOL_EXACT
    got, one, err = compare(leankv_bin, smollm2_bin, smol_ids, tmp_path, chunk, "fp16")
    assert err.max() <= CAP_FP16
    assert (got.argmax(1) == one.argmax(1)).all()


def test_chunk_tail_of_one_row(leankv_bin, tiny, tmp_path):
    """129 ids at 64 a chunk: the last chunk is a single row, which takes forward()"""
    ids = np.random.default_rng(8).integers(0, tm.VOCAB, 129).tolist()
    _, _, err = compare(leankv_bin, tiny["qwen2_bias_gqa_tied"], ids, tmp_path, 64, "fp32")
    assert err.max() <= TOL_EXACT


def test_chunked_logits_under_sanitizers(leankv_asan, tiny, tmp_path):
    """the tiling's edges (7 rows: a 4-row tile and 3 left over) read and write in bounds"""
    ids = np.random.default_rng(9).integers(0, tm.VOCAB, 40).tolist()
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1", OMP_NUM_THREADS="1")
    out = tmp_path / "asan.f32"
    r = run(leankv_asan, tiny["mistral_mqa_hd32"], "--prefill-chunk", "7", "-m", "logits", "-i",
            " ".join(map(str, ids)), "-o", out, env=env)
    assert r.returncode == 0 and "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, \
        r.stderr
    assert np.fromfile(out, dtype="<f4").size == 40 * tm.VOCAB


# ---- generation -----------------------------------------------------------------------------

def generated_ids(exe, model, prompt, *extra):
    r = run(exe, model, "-t", "0", "-n", "24", "--no-stop", "--print-ids", "-i", prompt, *extra)
    assert r.returncode == 0, r.stderr
    return [int(x) for x in r.stdout.splitlines()[-1].split()]


@pytest.mark.slow_under_sanitizers   # minutes under ASan; the tiny tests cover it there
def test_smollm2_greedy_same_either_way(leankv_bin, smollm2_bin):
    chunked = generated_ids(leankv_bin, smollm2_bin, SMOL_PROMPT)
    one = generated_ids(leankv_bin, smollm2_bin, SMOL_PROMPT, "--prefill-chunk", "1")
    print(f"\n    {chunked}", end="")
    assert chunked == one and len(chunked) == 24


def test_tiny_greedy_same_either_way(leankv_bin, tiny):
    prompt = tm.CORPUS   # about 100 tokens of the tiny tokenizer
    for model in tiny.values():
        chunked = generated_ids(leankv_bin, model, prompt)
        assert chunked == generated_ids(leankv_bin, model, prompt, "--prefill-chunk", "1")
        assert chunked == generated_ids(leankv_bin, model, prompt, "--prefill-chunk", "6")


@pytest.mark.slow_under_sanitizers   # minutes under ASan; the tiny tests cover it there
def test_batched_prefill_same_either_way(leankv_bin, smollm2_bin, tmp_path):
    """-f requests: engine_prefill's CPU branch chunks each prompt the same way"""
    f = tmp_path / "req.jsonl"
    f.write_text("".join(json.dumps({"id": str(i), "prompt": p, "n": 16, "temperature": 0}) + "\n"
                         for i, p in enumerate([SMOL_PROMPT, SMOL_PROMPT[:200], "Hello"])))

    def texts(*extra):
        r = run(leankv_bin, smollm2_bin, "-f", f, "--device", "cpu", "--batch", "2", "--no-stop",
                *extra)
        assert r.returncode == 0, r.stderr
        return {d["id"]: d["text"] for d in map(json.loads, r.stdout.splitlines())}

    assert texts() == texts("--prefill-chunk", "1")


def test_ppl_same_either_way(leankv_bin, tiny, tmp_path):
    """-m ppl with an exact cache: the prompt part chunked, the rest decoded one by one"""
    f = tmp_path / "text.txt"
    f.write_text(tm.CORPUS * 2)

    def ppl(*extra):
        r = run(leankv_bin, tiny["qwen2_bias_gqa_tied"], "-m", "ppl", "-f", f, "--kv", "fp32",
                "--ppl-prefill", "100", *extra)
        assert r.returncode == 0, r.stderr
        return float(r.stdout.split("perplexity:")[-1])

    a, b = ppl(), ppl("--prefill-chunk", "1")
    assert abs(a - b) <= 1e-5 * b, (a, b)


@pytest.mark.parametrize("value,needle", [("0", "out of range [1, 4096]"),
                                          ("4097", "out of range [1, 4096]"),
                                          ("1025", "the CPU takes at most 1024"),
                                          ("x", "is not an integer")])
def test_bad_prefill_chunk(leankv_bin, tiny, value, needle):
    """the flag's range is the GPU's; the CPU, which keeps a chunk's scores over the whole
    context, takes 1024 rows at most and says so"""
    r = run(leankv_bin, tiny["mistral_mqa_hd32"], "--prefill-chunk", value, "-i", "1 2", "-m",
            "logits", "-o", "/dev/null")
    assert r.returncode == 1 and "--prefill-chunk" in r.stderr and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("kv", ["fp16", "k8v4", "k4v2"])
def test_ppl_harness_equals_plain_logits(leankv_bin, tiny, tmp_path, kv):
    """The accuracy harness (-m ppl: a prompt part, then every token through the decode path)
    reports exactly the perplexity that the plain path's logits give (-m logits over the same
    ids, token by token, with the same cache type), the log-softmax taken here in numpy: the
    harness adds nothing of its own to what a cache does."""
    f = tmp_path / "text.txt"
    f.write_text(tm.CORPUS * 2)
    model = tiny["qwen2_bias_gqa_tied"]
    r = run(leankv_bin, model, "-m", "tokenize", "-i", f.read_text())
    assert r.returncode == 0, r.stderr
    ids = [int(x) for x in r.stdout.split()]
    assert len(ids) > 120
    r = run(leankv_bin, model, "-m", "ppl", "-f", f, "--kv", kv, "--ppl-prefill", "40",
            "--prefill-chunk", "1")
    assert r.returncode == 0, r.stderr
    harness = float(r.stdout.split("perplexity:")[-1])
    lg = logits(leankv_bin, model, ids, tmp_path, "--kv", kv, "--prefill-chunk", "1")
    lg = lg.astype(np.float64)[:-1]
    lse = lg.max(1) + np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1))
    plain = float(np.exp(np.mean(lse - lg[np.arange(len(ids) - 1), ids[1:]])))
    print(f"\n    --kv {kv}: harness {harness:.6f}, plain logits {plain:.6f}", end="")
    assert abs(harness - plain) <= 2e-6 * plain, (harness, plain)
