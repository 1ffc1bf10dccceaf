"""Many requests at once (-f) on the CPU engine: the request reader, continuous batching,
preemption and -m bench. The same scheduler drives the GPU; tests/test_gpu.py checks it there."""
import json
import re
import subprocess
import sys

import pytest

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def fibonacci(n):",
           "The best way to learn is"]


def run(exe, *args, timeout=600):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def jsonl(tmp_path, rows, name="req.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def outputs(r):
    assert r.returncode == 0, r.stderr
    return {d["id"]: d for d in map(json.loads, r.stdout.splitlines())}


@pytest.fixture(scope="module")
def alone(leankv_bin, smollm2_bin):
    """each prompt run by itself in generate mode, greedy, 24 tokens: the continuation"""
    out = {}
    for i, p in enumerate(PROMPTS):
        r = run(leankv_bin, smollm2_bin, p, "-t", "0", "-n", "24", "--no-stop")
        assert r.returncode == 0 and r.stdout.startswith(p), r.stderr
        out[str(i)] = r.stdout[len(p):-1]   # generate prints prompt, continuation, newline
    return out


def test_batch_equals_alone(leankv_bin, smollm2_bin, tmp_path, alone):
    """a batch of different prompts gives, per request, what each gives alone"""
    f = jsonl(tmp_path, [{"id": str(i), "prompt": p, "n": 24, "temperature": 0}
                         for i, p in enumerate(PROMPTS)])
    res = outputs(run(leankv_bin, smollm2_bin, "-f", f, "--batch", "3", "--no-stop"))
    assert set(res) == set(alone)
    for k, d in res.items():
        assert d["generated_tokens"] == 24 and d["preemptions"] == 0
        assert d["text"] == alone[k], k


TIGHT_ROWS = [{"id": str(i), "prompt": p, "n": 40, "temperature": 0} for i, p in enumerate(PROMPTS)]
GENEROUS = 100   # --admit-steps: more steps than a request generates (40), so a join waits
                 # for room for all that the running requests and it still generate


@pytest.fixture(scope="module")
def tight(leankv_bin, smollm2_bin, tmp_path_factory):
    """TIGHT_ROWS on a pool of 2 MiB (496 pages), which holds one 50-token request (270 pages)
    but not two, with no admission watermark (--admit-steps 0: a request joins as soon as its
    prompt fits) and with GENEROUS: {admit_steps: the finished run}"""
    f = jsonl(tmp_path_factory.mktemp("tight"), TIGHT_ROWS)
    return {n: run(leankv_bin, smollm2_bin, "-f", f, "--batch", "4", "--kv-mem", "2",
                   "--admit-steps", n) for n in (0, GENEROUS)}


def summary_swap(r):
    """(preemptions, parked in the swap space, tokens recomputed) as -f's closing line on
    stderr reports them"""
    last = r.stderr.splitlines()[-1]
    m = re.search(r"peak \d+ sequences in flight .* (\d+) preemptions \((\d+) parked in swap "
                  r"space, (\d+) tokens recomputed\)$", last)
    assert m, r.stderr
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def summary_preemptions(r):
    """(preemptions, tokens recomputed)"""
    p, _, recomputed = summary_swap(r)
    return p, recomputed


def test_preemption_keeps_outputs(leankv_bin, smollm2_bin, tmp_path, tight):
    """without the watermark the scheduler preempts and recomputes, and every output is what a
    roomy pool gives"""
    roomy = outputs(run(leankv_bin, smollm2_bin, "-f", jsonl(tmp_path, TIGHT_ROWS), "--batch", "4"))
    res = outputs(tight[0])
    assert sum(d["preemptions"] for d in res.values()) > 0, tight[0].stderr
    # a preempted request comes back as a prompt of its prompt and all it had generated (at
    # least the token its prefill gave, at most one short of its output)
    p, recomputed = summary_preemptions(tight[0])
    assert p == sum(d["preemptions"] for d in res.values())
    assert sum(d["preemptions"] * (d["prompt_tokens"] + 1) for d in res.values()) <= recomputed
    assert recomputed <= sum(d["preemptions"] * (d["prompt_tokens"] + d["generated_tokens"] - 1)
                             for d in res.values())
    assert set(res) == set(roomy)
    for k in roomy:
        assert "error" not in res[k]
        assert res[k]["text"] == roomy[k]["text"], k


def test_watermark_keeps_outputs(tight):
    """the admission watermark changes when requests run, never what they generate"""
    none, generous = outputs(tight[0]), outputs(tight[GENEROUS])
    assert set(none) == set(generous) == {r["id"] for r in TIGHT_ROWS}
    for k in none:
        assert "error" not in none[k] and "error" not in generous[k], k
        assert generous[k]["text"] == none[k]["text"], k
        assert generous[k]["generated_tokens"] == none[k]["generated_tokens"], k


def test_watermark_cuts_preemptions(tight):
    """the summary's preemptions are the requests' own, summed; without the watermark four
    requests join a pool that holds one and some are preempted; with GENEROUS a request joins
    only when the pool keeps room for what the running one has left and for its own next
    GENEROUS steps (it may join the running one near its end): fewer are. Not none: the room
    is counted at the average pages a step, and pages come a whole page per head at once."""
    counts = {}
    for n, r in tight.items():
        counts[n] = summary_preemptions(r)[0]
        assert counts[n] == sum(d["preemptions"] for d in outputs(r).values())
    assert counts[0] > 0
    assert counts[GENEROUS] < counts[0]


SWAP_ROWS = [{"id": str(i), "prompt": p, "n": 100, "temperature": 0} for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("kv,mib", [
    (["--kv", "k8v4"], 1),
    (["--kv", "leankv"], 2),
    (["--kv", "leankv", "--alpha-high", "8", "--alpha-low", "4", "--kv-window", "8"], 1)],
    ids=["k8v4", "leankv", "leankv-aggressive"])
@pytest.mark.slow_under_sanitizers   # minutes there; the swap code runs there in the two below
def test_swap_resumes_exactly(leankv_bin, smollm2_bin, tmp_path, kv, mib):
    """--swap-mem: every preempted request is parked in host memory and resumes where it
    stopped, so each output is what a roomy pool gives. On these caches a request recomputed
    from its prompt may not give it (a prompt's keys are written and placed afresh), which is
    why the roomy run, not the recomputing one, is the reference."""
    f = jsonl(tmp_path, SWAP_ROWS)
    roomy = outputs(run(leankv_bin, smollm2_bin, "-f", f, "--batch", "4", *kv, "--no-stop"))
    r = run(leankv_bin, smollm2_bin, "-f", f, "--batch", "4", *kv, "--kv-mem", mib,
            "--admit-steps", "0", "--swap-mem", "8", "--no-stop")
    res = outputs(r)
    p, parked, recomputed = summary_swap(r)
    assert p > 0 and parked == p and recomputed == 0, r.stderr
    assert p == sum(d["preemptions"] for d in res.values())
    assert set(res) == set(roomy)
    for k in roomy:
        assert "error" not in res[k] and "error" not in roomy[k], k
        assert res[k]["text"] == roomy[k]["text"], k


def test_swap_space_too_small_recomputes(leankv_bin, smollm2_bin, tmp_path, tight):
    """a swap space of 1 MiB (248 pages) parks only a preempted request of at most 32 tokens
    (180 pages); longer ones are recomputed as without it, and every output stays the roomy
    pool's"""
    r = run(leankv_bin, smollm2_bin, "-f", jsonl(tmp_path, TIGHT_ROWS), "--batch", "4",
            "--kv-mem", "2", "--admit-steps", "0", "--swap-mem", "1")
    p, parked, recomputed = summary_swap(r)
    assert p > parked and recomputed > 0, r.stderr
    roomy = outputs(run(leankv_bin, smollm2_bin, "-f", jsonl(tmp_path, TIGHT_ROWS), "--batch", "4"))
    res = outputs(r)
    for k in roomy:
        assert "error" not in res[k] and res[k]["text"] == roomy[k]["text"], k


def test_request_too_big_for_the_pool(leankv_bin, smollm2_bin, tmp_path):
    """1 MiB (248 pages) cannot hold 45 tokens of one request (270 pages): the request ends
    truncated with an error in its line; the run itself succeeds"""
    f = jsonl(tmp_path, [{"id": "x", "prompt": "Once upon a time", "n": 60, "temperature": 0}])
    res = outputs(run(leankv_bin, smollm2_bin, "-f", f, "--kv-mem", "1", "--no-stop"))
    assert "KV pool" in res["x"]["error"] and 0 < res["x"]["generated_tokens"] < 60


def test_plain_text_file(leankv_bin, smollm2_bin, tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("Hello\n\nThe sky is\n")
    res = outputs(run(leankv_bin, smollm2_bin, "-f", p, "-n", "4", "-t", "0"))
    assert sorted(res) == ["1", "2"]
    assert res["1"]["prompt_tokens"] == 1 and res["2"]["prompt_tokens"] == 3


@pytest.mark.parametrize("line,needle", [
    ('{"prompt": "hi", "n": -2}', "integer in [1, 10000000]"),
    ('{"prompt": "hi", "n": 33333333333333334}', "integer in [1, 10000000]"),   # fuzz_jsonl
    ('{"prompt": "hi", "n": 2.5}', "integer in [1, 10000000]"),
    ('{"prompt": "hi"', "expected ',' or '}'"),
    ('{"n": 3}', "no \\\"prompt\\\""),
    ('{"prompt": "\\x"}', "bad escape"),
    ('{"prompt": "hi"} trailing', "text after"),
    ('{"prompt": "hi", "temperature": -1}', "temperature"),
    ('[1, 2]', "not a JSON object"),
])
def test_bad_request_lines(leankv_bin, smollm2_bin, tmp_path, line, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok"}\n' + line + "\n")
    r = run(leankv_bin, smollm2_bin, "-f", p)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leankv: error: ") and ":2:" in err[0], r.stderr
    assert needle.replace("\\\"", '"') in err[0]


def test_prompt_errors_are_per_request(leankv_bin, smollm2_bin, tmp_path):
    """a prompt over the context is refused in its own output line; the others run"""
    f = jsonl(tmp_path, [{"id": "long", "prompt": "word " * 100}, {"id": "ok", "prompt": "Hi",
                                                                    "n": 3}])
    res = outputs(run(leankv_bin, smollm2_bin, "-f", f, "--ctx", "64"))
    assert "context" in res["long"]["error"] and res["ok"]["generated_tokens"] == 3


def test_bench_mode(leankv_bin, smollm2_bin):
    r = run(leankv_bin, smollm2_bin, "-m", "bench", "--batch", "2", "--requests", "3",
            "--prompt-len", "8", "--gen-len", "4", "--admit-steps", "5")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["device"] == "cpu" and d["requests"] == 3 and d["peak_seqs"] == 2
    assert d["admit_steps"] == 5 and d["preemptions"] == 0
    assert d["prefill_tok_s"] > 0 and d["decode_tok_s"] > 0 and d["peak_pages"] > 0
    assert d["recomputed_tokens"] == 0 and d["prefill_tokens"] == 3 * 8
    assert d["decode_tokens"] == 3 * (4 - 1)


@pytest.mark.slow_under_sanitizers
def test_budget_table_medians(leankv_bin, smollm2_bin, root):
    """bench/budget_table.py (the README's budget table) on -m bench output in bench/gpu.sh's
    log format: each row's median, range and run count, vs fp16 against the first row's
    median, and leankv's physical ratio from its `kv tiers` line -- all recomputed here from
    the JSON lines and the stderr the program printed"""
    import statistics
    log, totals, tiers = [], {"fp16": [], "leankv": []}, None
    for name in ["fp16", "leankv", "fp16", "leankv", "fp16"]:
        r = run(leankv_bin, smollm2_bin, "-m", "bench", "--kv", name, "--batch", "2",
                "--requests", "3", "--prompt-len", "8", "--gen-len", "4")
        assert r.returncode == 0, r.stderr
        log.append(f"== {name}: --kv {name}\n{r.stdout}")
        log += [l + "\n" for l in r.stderr.splitlines() if l.startswith("kv tiers")]
        totals[name].append(json.loads(r.stdout.strip().splitlines()[-1])["total_tok_s"])
        tiers = re.search(r"([0-9.]+)x physical", r.stderr).group(1) if name == "leankv" else tiers
    t = subprocess.run(["python3", str(root / "bench" / "budget_table.py")], input="".join(log),
                       capture_output=True, text=True, check=True).stdout
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
            for l in t.splitlines()[2:]}
    assert list(rows) == ["fp16", "leankv"], t
    med = {k: statistics.median(v) for k, v in totals.items()}
    for k in rows:
        assert rows[k][0] == f"{med[k]:,.0f}", t
        assert rows[k][1] == f"{min(totals[k]):,.0f}-{max(totals[k]):,.0f}", t
        assert rows[k][-1] == str(len(totals[k])), t
    assert rows["fp16"][2] == "1.00x" and rows["leankv"][2] == f"{med['leankv'] / med['fp16']:.2f}x"
    assert rows["leankv"][6] == f"{float(tiers):.2f}x", t


@pytest.mark.slow_under_sanitizers
def test_capacity_plot_points(leankv_bin, smollm2_bin, root, tmp_path):
    """bench/capacity_plot.py on -m bench output in bench/gpu.sh's log format (fp16 at batch 2
    and 1, two points of one series, and a leankv row): each run a point at its mean sequences
    in flight and its total tok/s over the first run's, in the series its name gives; a PNG
    comes out"""
    log, want = [], []
    for name, flags in [("fp16-swap8192", ["--kv", "fp16", "--batch", "2"]),
                        ("fp16-batch1", ["--kv", "fp16", "--batch", "1"]),
                        ("leankv-1-0.02-swap8192", ["--kv", "leankv", "--batch", "2"])]:
        r = run(leankv_bin, smollm2_bin, "-m", "bench", *flags,
                "--requests", "3", "--prompt-len", "8", "--gen-len", "4")
        assert r.returncode == 0, r.stderr
        log.append(f"== {name}: {' '.join(flags)}\n{r.stdout}")
        want.append(json.loads(r.stdout.strip().splitlines()[-1]))
    png = tmp_path / "c.png"
    t = subprocess.run([sys.executable, str(root / "bench" / "capacity_plot.py"), str(png)],
                       input="".join(log), capture_output=True, text=True)
    if "No module named 'matplotlib'" in t.stderr:
        pytest.skip("matplotlib is not installed")
    assert t.returncode == 0, t.stderr
    got = re.findall(r"^(.+): ([0-9.]+) in flight, ([0-9.]+)x$", t.stdout, re.M)
    base = want[0]["total_tok_s"]
    fp16 = sorted((d["mean_seqs"], d["total_tok_s"] / base) for d in want[:2])
    exp = [("fp16", f"{x:.1f}", f"{y:.3f}") for x, y in fp16]
    exp.append(("leankv ah 1, al 0.02", f"{want[2]['mean_seqs']:.1f}",
                f"{want[2]['total_tok_s'] / base:.3f}"))
    assert got == exp, t.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_counts_recomputation(leankv_bin, smollm2_bin):
    """-m bench on a pool that holds one request at a time (1 MiB: 256 pages; a 20-token
    request takes 2 pages for each of 90 layer-heads), with no watermark: requests are
    preempted, and the counts add up. Each admission's prefill gives one token and the decode
    steps the rest; a preempted request comes back as a prompt of its prompt and all it had
    generated (at least one token, at most gen_len - 1)."""
    n, plen, glen = 3, 8, 12
    r = run(leankv_bin, smollm2_bin, "-m", "bench", "--batch", n, "--requests", n,
            "--prompt-len", plen, "--gen-len", glen, "--kv-mem", 1, "--admit-steps", 0)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    p = d["preemptions"]
    assert p > 0, r.stdout
    assert d["prefill_tokens"] - d["recomputed_tokens"] == n * plen
    assert p * (plen + 1) <= d["recomputed_tokens"] <= p * (plen + glen - 1)
    assert d["decode_tokens"] == n * glen - (n + p)
    line = f"({d['recomputed_tokens']} of them recomputed after preemptions)"
    assert line in r.stdout, r.stdout


def test_bench_counts_swaps(leankv_bin, smollm2_bin):
    """-m bench as above with a swap space: every preemption parks its request, nothing is
    recomputed, and a parked request resumes by decode steps, so the prefill computes each
    prompt once and the decode steps every token but the one each prefill gives"""
    n, plen, glen = 3, 8, 12
    r = run(leankv_bin, smollm2_bin, "-m", "bench", "--batch", n, "--requests", n,
            "--prompt-len", plen, "--gen-len", glen, "--kv-mem", 1, "--admit-steps", 0,
            "--swap-mem", 4)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["preemptions"] > 0 and d["swap_outs"] == d["preemptions"], r.stdout
    assert d["swap_mib"] == 4 and d["recomputed_tokens"] == 0
    assert d["prefill_tokens"] == n * plen and d["decode_tokens"] == n * (glen - 1)
    # the line prints the seconds to 2 places and the JSON to 3, both from the same time, so
    # they agree to within both roundings (re-rounding the JSON's value is off at x.xx5)
    m = re.search(r"swap ([0-9.]+) s for (\d+) sequences parked", r.stdout)
    assert m and int(m.group(2)) == d["swap_outs"], r.stdout
    assert len(m.group(1).split(".")[1]) == 2 and abs(float(m.group(1)) - d["swap_s"]) <= 0.0055


@pytest.mark.parametrize("value,needle", [
    ("-1", "--admit-steps: -1 is out of range [0, "),
    ("abc", "--admit-steps: 'abc' is not an integer"),
    ("", "--admit-steps: '' is not an integer")])
def test_bad_admit_steps(leankv_bin, smollm2_bin, tmp_path, value, needle):
    f = jsonl(tmp_path, TIGHT_ROWS[:1])
    r = run(leankv_bin, smollm2_bin, "-f", f, "--admit-steps", value)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert len(err) == 1 and err[0].startswith("leankv: error: ") and needle in err[0], r.stderr


def test_device_cuda_without_gpu(leankv_bin, smollm2_bin):
    r = run(leankv_bin, smollm2_bin, "Hi", "--device", "cuda")
    if "device: cuda" in r.stderr:
        pytest.skip("this machine has a GPU")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no usable GPU" in r.stderr


@pytest.mark.parametrize("kv,groups", [
    pytest.param("k8v4", 1, marks=pytest.mark.slow_under_sanitizers),   # k4v2 covers it there
    ("k4v2", 2),
    pytest.param("fp16", 1, marks=pytest.mark.slow_under_sanitizers)])
def test_ppl_ratios_and_ref(leankv_bin, smollm2_bin, tmp_path, kv, groups):
    """-m ppl on a quantized cache: the compression ratios it prints are the ones the test
    counts from the page layout it printed (bits-only = 32 / (kbits + vbits); physical = fp16
    bytes of K and V over the bytes of the pages held), and --ref fp16 compares sanely"""
    import re
    text = tmp_path / "t.txt"
    text.write_text(open("/usr/share/common-licenses/BSD").read()[:700])
    r = subprocess.run([str(leankv_bin), str(smollm2_bin), "-m", "ppl", "-f", str(text), "--kv",
                        kv, "--kv-groups", str(groups), "--ref", "fp16", "--ppl-prefill", "64"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = dict(l.split(": ", 1) for l in r.stdout.strip().splitlines() if ": " in l)
    n = int(out["tokens"]) - 1                       # tokens written to the cache
    page, tpp = map(int, re.search(r"page (\d+) bytes, (\d+) tokens per page", r.stderr).groups())
    kb, vb = (16, 16) if kv == "fp16" else map(int, re.match(r"k(\d+)v(\d+)", kv).groups())
    bits, phys = map(float, re.search(r"([\d.]+)x bits-only, ([\d.]+)x physical", out["kv"]).groups())
    heads = 30 * 3
    assert abs(bits - 32 / (kb + vb)) < 0.01
    pages = heads * -(-n // tpp)
    assert abs(phys - n * heads * 64 * 4 / (pages * page)) < 0.01
    kl, top1 = float(out["mean KL(ref || kv)"]), float(out["top-1 agreement"])
    if kv == "fp16":   # the same cache twice
        assert kl < 1e-9 and top1 == 1.0 and out["perplexity"] == out["ref fp16 perplexity"]
    else:
        assert 0 < kl < 5 and 0 < top1 <= 1
