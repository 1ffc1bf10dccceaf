"""Bad input gets one line of error and a non-zero exit, never a crash: every case runs the
AddressSanitizer + UndefinedBehaviorSanitizer build (make leankv-asan), whose reports would
show on stderr. Also the modes and flags that a user types."""
import os
import struct
import subprocess

import pytest

import tiny_models as tm

SAN_ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1", OMP_NUM_THREADS="1")


def run(exe, *args, input=None, timeout=120):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, input=input,
                          timeout=timeout, env=SAN_ENV)


def assert_one_line_error(r, must_contain):
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 1, f"exit {r.returncode}, stderr:\n{err}"
    assert "Sanitizer" not in err and "runtime error" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("leankv: error: "), err
    assert must_contain in lines[0], f"expected '{must_contain}' in: {lines[0]}"


@pytest.fixture(scope="module")
def tiny_bin(tmp_path_factory):
    return tm.build_model(tmp_path_factory.mktemp("tiny"), "llama_mha_tied")


def test_missing_file(leankv_asan, tmp_path):
    assert_one_line_error(run(leankv_asan, tmp_path / "nope.bin", "hi"), "cannot open model")


def test_truncated_file(leankv_asan, tiny_bin, tmp_path):
    data = tiny_bin.read_bytes()
    for cut in (10, 200, 300, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.bin"
        p.write_bytes(data[:cut])
        r = run(leankv_asan, p, "hi")
        assert_one_line_error(r, "")


def test_wrong_magic(leankv_asan, tiny_bin, tmp_path):
    data = bytearray(tiny_bin.read_bytes())
    data[0:4] = b"GGUF"
    p = tmp_path / "magic.bin"
    p.write_bytes(bytes(data))
    assert_one_line_error(run(leankv_asan, p, "hi"), "not a llama2.c checkpoint")


def test_wrong_version(leankv_asan, tiny_bin, tmp_path):
    data = bytearray(tiny_bin.read_bytes())
    data[4:8] = struct.pack("<i", 99)
    p = tmp_path / "version.bin"
    p.write_bytes(bytes(data))
    assert_one_line_error(run(leankv_asan, p, "hi"), "version 99")


@pytest.mark.parametrize("offset,value,needle", [
    (8, 128, "shape"),            # dim no longer matches the tensors
    (16, 50, "missing"),          # more layers than the file holds
    (24, 3, "multiple"),          # 4 heads over 3 KV heads
    (8, -5, "non-positive"),
    (32, 1 << 30, "implausibly"),
])
def test_dimensions_that_do_not_fit(leankv_asan, tiny_bin, tmp_path, offset, value, needle):
    data = bytearray(tiny_bin.read_bytes())
    data[offset:offset + 4] = struct.pack("<i", value)
    p = tmp_path / "dims.bin"
    p.write_bytes(bytes(data))
    assert_one_line_error(run(leankv_asan, p, "hi"), needle)


def test_legacy_dimensions_that_do_not_fit(leankv_asan, tmp_path):
    p = tmp_path / "legacy.bin"
    p.write_bytes(struct.pack("<7i", 64, 160, 2, 4, 4, 256, 128) + b"\0" * 4000)
    assert_one_line_error(run(leankv_asan, p, "hi"), "not a llama2.c checkpoint")


def test_prompt_longer_than_ctx(leankv_asan, smollm2_bin):
    r = run(leankv_asan, smollm2_bin, "word " * 50, "--ctx", "16", "-n", "4")
    assert_one_line_error(r, "context")


def test_unknown_flag(leankv_asan, tiny_bin):
    assert_one_line_error(run(leankv_asan, tiny_bin, "--frobnicate"), "unknown option")
    assert_one_line_error(run(leankv_asan, tiny_bin, "-q"), "unknown option")


@pytest.mark.parametrize("args,needle", [
    (["-n", "-3"], "-n"), (["-t", "-1"], "negative"), (["-p", "0"], "top-p"),
    (["-p", "1.5"], "top-p"), (["--ctx", "0"], "--ctx"), (["-n", "abc"], "not an integer"),
    (["-m", "dance"], "unknown mode"), (["-n"], "needs a value"),
])
def test_bad_flag_values(leankv_asan, tiny_bin, args, needle):
    assert_one_line_error(run(leankv_asan, tiny_bin, "hi", *args), needle)


def test_ctx_beyond_model(leankv_asan, tiny_bin):
    assert_one_line_error(run(leankv_asan, tiny_bin, "hi", "--ctx", "100000"),
                          "--ctx 100000 exceeds the model's context of 256")


@pytest.mark.parametrize("args,needle", [
    (["-t", "nan"], "not a number"), (["-t", "inf"], "not a number"),
    (["-p", "-0.5"], "top-p -0.5 is outside (0, 1]"), (["-p", "nan"], "not a number"),
    (["-s", "-1"], "-s: -1 is out of range [0, "), (["--batch", "0"], "[1, 4096]"),
    (["--batch", "5000"], "--batch: 5000 is out of range [1, 4096]"),
    (["--prefill-chunk", "0"], "--prefill-chunk: 0 is out of range [1, 4096]"),
    (["--kv-mem", "0"], "--kv-mem: 0 is out of range"),
    (["--swap-mem", "-1"], "--swap-mem: -1 is out of range [0, 16777216]"),
    (["--trials", "0"], "--trials: 0 is out of range"),
    (["--ctx-len", "10"], "--ctx-len: 10 is out of range [64, "),
    (["--requests", "-4"], "--requests: -4 is out of range"),
    (["--gen-len", "0"], "--gen-len: 0 is out of range"),
    (["--kv-groups", "65"], "--kv-groups: 65 is out of range [1, 64]"),
    (["-n", "99999999999"], "-n: 99999999999 is out of range [0, 1073741823]"),
    (["-n", "99999999999999999999"], "-n: 99999999999999999999 is out of range [0, "),
])
def test_numeric_limits(leankv_asan, tiny_bin, args, needle):
    assert_one_line_error(run(leankv_asan, tiny_bin, "hi", *args), needle)


def test_kv_groups_must_divide_head_dim(leankv_asan, tiny_bin):
    # the tiny model's head dim is 16: 3 groups would leave a channel out of every group
    r = run(leankv_asan, tiny_bin, "hi", "--kv", "k4v4", "--kv-groups", "3", "-n", "1")
    assert_one_line_error(r, "--kv-groups 3 does not divide the model's head dim of 16")


def test_kv_mem_beyond_memory(leankv_asan, tiny_bin):
    r = run(leankv_asan, tiny_bin, "hi", "--kv-mem", str(1 << 24), "--device", "cpu")
    assert_one_line_error(r, "--kv-mem 16777216 MiB is more than this machine's memory")


def test_swap_mem_beyond_memory(leankv_asan, tiny_bin):
    r = run(leankv_asan, tiny_bin, "hi", "--swap-mem", str(1 << 24), "--device", "cpu")
    assert_one_line_error(r, "--swap-mem 16777216 MiB is more than this machine's memory")


def test_file_larger_than_memory(leankv_asan, tiny_bin, tmp_path):
    # a sparse file of 1 TiB: nothing is written to disk, but its size is beyond any test machine
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(1 << 40)
    for mode in (["-m", "ppl"], []):   # -f: ppl's text, generate's requests
        r = run(leankv_asan, tiny_bin, *mode, "-f", big)
        assert_one_line_error(r, f"is {1 << 40} bytes, more than this machine's memory (")
    assert_one_line_error(run(leankv_asan, tiny_bin, "-m", "ppl", "-f", tmp_path),
                          "is a folder, not a file")


def test_error_quoting_a_newline_stays_one_line(leankv_asan, tiny_bin):
    # tests/fuzz/regress/flags: an argument with a newline once made the message two lines
    r = run(leankv_asan, tiny_bin, "hi", "there\nfriend")
    assert_one_line_error(r, "unexpected argument 'there\\x0afriend'")


def test_tensors_sharing_bytes(leankv_asan, tmp_path):
    """Two tensors at the same bytes would let a small fp16 file ask for fp32 copies many times
    its size; the table is refused before anything is allocated."""
    tm.write_hf(tmp_path / "hf", "llama_mha_tied", tokenizer=False)
    tm.run_export(tmp_path / "hf", tmp_path / "m.bin", "--dtype", "fp16")
    data = bytearray((tmp_path / "m.bin").read_bytes())
    t0, n = struct.unpack_from("<Q", data, 128)[0], struct.unpack_from("<i", data, 116)[0]
    entry = {bytes(data[t0 + 96 * k:t0 + 96 * k + 64]).split(b"\0")[0]: t0 + 96 * k
             for k in range(n)}
    off = struct.unpack_from("<Q", data, entry[b"layers.0.wq"] + 80)[0]
    struct.pack_into("<Q", data, entry[b"layers.1.wq"] + 80, off)
    p = tmp_path / "alias.bin"
    p.write_bytes(bytes(data))
    assert_one_line_error(run(leankv_asan, p, "hi"), f"two tensors share bytes [{off}, ")


def test_invalid_utf8_prompt(leankv_asan, smollm2_bin):
    r = subprocess.run([str(leankv_asan), str(smollm2_bin), b"caf\xc3 \xff ok", "-n", "2"],
                       capture_output=True, timeout=120, env=SAN_ENV)
    assert_one_line_error(r, "invalid UTF-8")


def test_kv_pool_full(leankv_asan, smollm2_bin):
    # 1 MiB holds 248 pages of 4224 bytes; 40 tokens need 3 pages for each of SmolLM2's
    # 30 x 3 heads (270): the pool runs out and the run says so
    r = run(leankv_asan, smollm2_bin, "--kv-mem", "1", "-m", "logits", "-o", os.devnull,
            "-i", " ".join(["5"] * 40))
    assert_one_line_error(r, "KV pool full")


def test_tokenize_mode(leankv_bin, smollm2_bin):
    r = subprocess.run([str(leankv_bin), str(smollm2_bin), "-m", "tokenize", "-i",
                        "The capital of France is"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["504", "3575", "282", "4649", "314"]


def test_generate_under_sanitizers(leankv_asan, smollm2_bin):
    # a short real generation through the sanitizer build: no report, clean exit
    r = run(leankv_asan, smollm2_bin, "Hello", "-n", "3", "-t", "0")
    err = r.stderr.decode()
    assert r.returncode == 0 and "Sanitizer" not in err and "runtime error" not in err, err
    assert "tok/s" in err


def test_help(leankv_bin):
    r = subprocess.run([str(leankv_bin), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: leankv" in r.stdout


def test_chat_uses_the_models_template(leankv_bin, smollm2_bin, smollm2_gguf):
    """The conversation leankv builds in chat mode is, token for token, what the model's own
    chat template (rendered by transformers from the GGUF, system turn injected) gives,
    followed by the reply, <|im_end|> and a newline."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoTokenizer
    gguf_utils.is_torch_available = lambda: True   # an import guard only; see test_tokenizer
    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    msg = "What is the capital of France?"
    want = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=True,
                                   add_generation_prompt=True)
    if isinstance(want, dict):
        want = want["input_ids"]
    r = subprocess.run([str(leankv_bin), str(smollm2_bin), "-m", "chat", "-i", msg, "-t", "0",
                        "-n", "40", "--print-ids"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = [int(x) for x in r.stdout.strip().splitlines()[-1].split()]
    assert got[:len(want)] == list(want)
    reply = got[len(want):]
    assert reply[-2:] == [2, tok.convert_tokens_to_ids("Ċ")], reply[-3:]
    assert "Paris" in tok.decode(reply)
