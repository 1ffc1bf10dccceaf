"""--kv leankv end to end on the CPU (../shared/LEANKV.md sections 3-6; the unit tests of the
cases, the placement and the manager are in tests/test_tiers.c):

- alphas 0 keep every token in the high tier, so --kv leankv with --alpha-high 0 --alpha-low 0
  computes exactly what --kv k8v4 does: the same perplexity to the last digit, the same greedy
  tokens (SmolLM2, and a tiny GQA model with biases);
- the report every run prints: fractions that add up, ratios that follow from them;
- per-request alphas in JSONL, preemption on a tight pool, --kv-map's PNG, chat, the passkey's
  report of where the needle went, bad flags, the GPU refusal, and the whole policy under
  AddressSanitizer/UBSan."""
import json
import os
import re
import struct
import subprocess

import pytest

import tiny_models as tm

TEXT = open("/usr/share/common-licenses/BSD").read()[:1200]
PROMPT = ("The quick brown fox jumps over the lazy dog. " * 6 +
          "Once upon a time, in a small village by the sea, there lived an old fisherman who "
          "knew every star in the sky. One morning he found a bottle on the beach, and inside")


def run(exe, *args, timeout=600, env=None, stdin=None):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, input=stdin)


def ppl_out(exe, model, text_path, *extra):
    r = run(exe, model, "-m", "ppl", "-f", text_path, "--ppl-prefill", "64", *extra)
    assert r.returncode == 0, r.stderr
    return dict(l.split(": ", 1) for l in r.stdout.strip().splitlines() if ": " in l), r.stderr


def gen_ids(exe, model, prompt, *extra):
    r = run(exe, model, "-t", "0", "-n", "24", "--no-stop", "--print-ids", "-i", prompt,
            "--device", "cpu", *extra)
    assert r.returncode == 0, r.stderr
    return [int(x) for x in r.stdout.splitlines()[-1].split()], r.stderr


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "t.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
    return tm.build_model(tmp_path_factory.mktemp("qwen2_bias_gqa_tied"), "qwen2_bias_gqa_tied")


ZERO = ("--kv", "leankv", "--alpha-high", "0", "--alpha-low", "0")


def test_alphas_zero_is_k8v4(leankv_bin, smollm2_bin, text):
    a, _ = ppl_out(leankv_bin, smollm2_bin, text, "--kv", "k8v4")
    b, err = ppl_out(leankv_bin, smollm2_bin, text, *ZERO)
    assert a["perplexity"] == b["perplexity"]
    assert b["tiers"] == "high 1.0000, low 0.0000, pruned 0.0000"
    assert "kv cache: leankv, tier high k8v4, low k4v2" in err
    ids_a, _ = gen_ids(leankv_bin, smollm2_bin, PROMPT, "--kv", "k8v4")
    ids_b, _ = gen_ids(leankv_bin, smollm2_bin, PROMPT, *ZERO)
    assert ids_a == ids_b and len(ids_a) == 24


def test_alphas_zero_is_k8v4_tiny(leankv_bin, tiny_gqa):
    prompt = tm.CORPUS
    a, _ = gen_ids(leankv_bin, tiny_gqa, prompt, "--kv", "k8v4")
    b, _ = gen_ids(leankv_bin, tiny_gqa, prompt, *ZERO, "--kv-window", "0")
    assert a == b


def test_report_adds_up(leankv_bin, smollm2_bin, text):
    """default leankv: some tokens leave the high tier; the printed bits-only ratio is
    32 / (12 f_high + 6 f_low) of the printed fractions, and the stderr report agrees"""
    out, err = ppl_out(leankv_bin, smollm2_bin, text, "--kv", "leankv", "--kv-window", "16")
    fh, fl, fp = map(float, re.match(r"high ([\d.]+), low ([\d.]+), pruned ([\d.]+)",
                                     out["tiers"]).groups())
    assert abs(fh + fl + fp - 1) < 2e-4 and fh < 1 and fl > 0
    bits, phys = map(float, re.search(r"([\d.]+)x bits-only, ([\d.]+)x physical", out["kv"]).groups())
    assert abs(bits - 32 / (12 * fh + 6 * fl)) < 0.01 * bits
    k8v4, _ = ppl_out(leankv_bin, smollm2_bin, text, "--kv", "k8v4")
    assert phys > float(re.search(r"([\d.]+)x physical", k8v4["kv"]).group(1))
    line = [l for l in err.splitlines() if l.startswith("kv tiers:")]
    assert len(line) == 1 and f"{bits:.2f}x bits-only" in line[0]


def test_request_alphas(leankv_bin, smollm2_bin, tmp_path):
    """a request's own alphas: alphas 0 reproduce the k8v4 cache's text"""
    alone, _ = gen_ids(leankv_bin, smollm2_bin, PROMPT, "--kv", "k8v4")
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"id": "zero", "prompt": PROMPT, "n": 24, "temperature": 0,
                             "alpha_high": 0, "alpha_low": 0}) + "\n" +
                 json.dumps({"id": "hard", "prompt": PROMPT, "n": 24, "temperature": 0,
                             "alpha_high": 4, "alpha_low": 1}) + "\n")
    r = run(leankv_bin, smollm2_bin, "-f", f, "--kv", "leankv", "--no-stop", "--print-ids",
            "--device", "cpu", "--kv-window", "16")
    assert r.returncode == 0, r.stderr
    res = {d["id"]: d for d in map(json.loads, r.stdout.splitlines())}
    want = run(leankv_bin, smollm2_bin, "-t", "0", "-n", "24", "--no-stop", "-i", PROMPT,
               "--kv", "k8v4", "--device", "cpu").stdout[len(PROMPT):-1]
    assert res["zero"]["text"] == want and res["hard"]["generated_tokens"] == 24
    assert len(alone) == 24
    assert "kv tiers:" in r.stderr


@pytest.mark.parametrize("line,needle", [
    ('{"prompt": "hi", "alpha_high": 0.1, "alpha_low": 0.5}', "alpha_high >= alpha_low"),
    ('{"prompt": "hi", "alpha_low": -1}', "alpha_high >= alpha_low >= 0"),
    ('{"prompt": "hi", "alpha_high": "x"}', "bad number"),
])
def test_bad_request_alphas(leankv_bin, smollm2_bin, tmp_path, line, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    r = run(leankv_bin, smollm2_bin, "-f", p, "--kv", "leankv")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


def test_preemption_with_tiers(leankv_bin, smollm2_bin, tmp_path):
    """a 2 MiB pool (1170 pages) cannot hold four requests: some are preempted and recomputed;
    every request finishes, and one never preempted gives what a roomy pool gives it"""
    prompts = [PROMPT, PROMPT[100:], "Once upon a time", "def fibonacci(n):", PROMPT[:150]]
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps({"id": str(i), "prompt": p, "n": 40, "temperature": 0}) + "\n"
                         for i, p in enumerate(prompts)))
    args = ("-f", f, "--batch", "4", "--kv", "leankv", "--kv-window", "16", "--device", "cpu")
    roomy = {d["id"]: d for d in map(json.loads, run(leankv_bin, smollm2_bin, *args).stdout.splitlines())}
    r = run(leankv_bin, smollm2_bin, *args, "--kv-mem", "2", "--admit-steps", "0")
    assert r.returncode == 0, r.stderr
    tight = {d["id"]: d for d in map(json.loads, r.stdout.splitlines())}
    assert sum(d["preemptions"] for d in tight.values()) > 0, r.stderr
    for k, d in tight.items():
        assert "error" not in d and d["generated_tokens"] == roomy[k]["generated_tokens"]
        if d["preemptions"] == 0:
            assert d["text"] == roomy[k]["text"], k


def test_kv_map_png(leankv_bin, smollm2_bin, tmp_path):
    png = tmp_path / "map.png"
    r = run(leankv_bin, smollm2_bin, PROMPT, "-t", "0", "-n", "8", "--kv", "leankv",
            "--kv-window", "8", "--kv-map", png, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    # three panels of 3 KV heads x 30 px, 30 layers x 14 px (kv_write_map's constants)
    assert (w, h) == (44 + 3 * 90 + 2 * 22 + 12, 46 + 30 * 14 + 34)
    from PIL import Image   # an independent PNG decoder: the file is a valid image
    img = Image.open(png).convert("RGB")
    assert img.size == (w, h)
    assert min(lo for lo, hi in img.getextrema()) < 128   # something dark was drawn


def test_chat_with_tiers(leankv_bin, smollm2_bin):
    """later chat turns go through the decode policy one token at a time"""
    r = run(leankv_bin, smollm2_bin, "-m", "chat", "-t", "0", "-n", "16", "--kv", "leankv",
            "--kv-window", "8", stdin="What is the capital of France?\nAnd of Italy?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Assistant:") == 2 and "kv tiers:" in r.stderr


NEEDLE = re.compile(r"needle after placement:(.*?);? ?pruned (\d+) of its (\d+) digit tokens "
                    r"in (\d+) of (\d+) heads")


def passkey_needles(exe, model, *kv):
    """-m passkey on a short context (235 tokens, 9 depths, one trial each): the hits and, for
    each depth, the needle line (heads named, digits pruned, of how many, heads, of how many)"""
    r = run(exe, model, "-m", "passkey", "--ctx-len", "256", "--ctx", "300", "--trials", "1",
            "-s", "7", *kv)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^passkey: \d/9$", r.stdout, re.M), r.stdout
    return [NEEDLE.search(l).groups() for l in r.stderr.splitlines() if "needle after" in l]


def test_passkey_needle_report(leankv_bin, smollm2_bin):
    """The passkey's line of where the needle went, against what the policy must do
    (LEANKV.md section 4): alpha_low 0 prunes nothing; alpha_low 1000 prunes every token
    placement may touch (mean significance is at most 1, under 1000/n), so at depths 10-50%
    (the needle well before the last 64 tokens) every digit goes in all 90 heads. The key is 5
    digits written twice, and SmolLM2's tokenizer splits digits: 10 digit tokens. One tier:
    no line."""
    none = passkey_needles(leankv_bin, smollm2_bin, "--kv", "leankv", "--alpha-low", "0")
    assert len(none) == 9 and all(g[1:] == ("0", "10", "0", "90") and not g[0].strip()
                                  for g in none), none
    every = passkey_needles(leankv_bin, smollm2_bin, "--kv", "leankv", "--alpha-high", "1000",
                            "--alpha-low", "1000")
    assert len(every) == 9, every
    for g in every[:5]:
        assert g[1:] == ("10", "10", "90", "90") and len(g[0].split()) == 90, g
    assert passkey_needles(leankv_bin, smollm2_bin, "--kv", "k8v4") == []


@pytest.mark.parametrize("args,needle", [
    (("--kv", "leankv", "--alpha-high", "0.1", "--alpha-low", "0.2"), "alpha_high >= alpha_low"),
    (("--kv", "leankv", "--alpha-low", "-0.1"), "alpha_high >= alpha_low >= 0"),
    (("--kv", "k8v4", "--alpha-high", "2"), "need --kv leankv"),
    (("--kv", "leankv", "--kv-low", "k3v2"), "--kv-low: 'k3v2'"),
])
def test_bad_flags(leankv_bin, smollm2_bin, args, needle):
    r = run(leankv_bin, smollm2_bin, "Hi", *args)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("leankv: error: ") and needle in r.stderr, r.stderr


def test_policy_under_sanitizers(leankv_asan, tiny_gqa, tmp_path):
    """high alphas and a short window drive every case, placement and page give-back on a
    tiny model: no out-of-bounds access, no leak, no undefined behaviour"""
    t = tmp_path / "t.txt"
    t.write_text(tm.CORPUS * 2)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1", OMP_NUM_THREADS="1")
    for extra in (("--alpha-high", "2", "--alpha-low", "0.5"), ("--kv-low", "k2v2", "--kv-groups", "2")):
        r = run(leankv_asan, tiny_gqa, "-m", "ppl", "-f", t, "--ppl-prefill", "40", "--kv",
                "leankv", "--kv-window", "4", *extra, env=env)
        assert r.returncode == 0 and "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, \
            r.stderr
        assert "kv tiers:" in r.stderr
