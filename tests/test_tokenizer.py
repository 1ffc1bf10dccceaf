"""tokenizer.c against reference tokenizers, through tests/tok_driver.c.

  BPE (SmolLM2): the ids for every piece of the corpus (tests/tokcorpus.py) must equal those
      of Hugging Face's tokenizer that transformers builds from the model's GGUF, and decoding
      them must give the text back. The pre-tokenizer variants (GPT2, LLAMA3, QWEN2) are checked
      the same way on copies of the section with another pre-tokenizer code.
  SPM: a small SentencePiece BPE model trained here on licence text, written as llama2.c's
      tokenizer.bin and as a model.bin tokenizer section, must give SentencePiece's own ids.
  Robustness: damaged sections give an error and a reason, never a crash (sanitizer build).

The SmolLM2 tests need models/smollm2-135m-instruct.bin (written by export.py; the environment
variable LEANKV_MODEL_BIN names another file) and the GGUF it came from; they skip without.
"""
import os
import re
import struct
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tokcorpus  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF_DIR = os.path.join(REPO, "models")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_BIN = os.environ.get("LEANKV_MODEL_BIN",
                           os.path.join(REPO, "models", "smollm2-135m-instruct.bin"))
PRETOK = {"none": 0, "gpt2": 1, "smollm": 2, "llama3": 3, "qwen2": 4}

# ---------------------------------------------------------------------------------------------
# Fixtures


def _compile(out, *flags):
    cmd = ["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", *flags, f"-I{REPO}",
           os.path.join(REPO, "tests", "tok_driver.c"), os.path.join(REPO, "tokenizer.c"),
           "-o", out, "-lm"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return _compile(str(tmp_path_factory.mktemp("tok") / "tok_driver"), "-O2")


@pytest.fixture(scope="module")
def asan_driver(tmp_path_factory):
    return _compile(str(tmp_path_factory.mktemp("tok") / "tok_driver_asan"), "-O1", "-g",
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=all")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tokcorpus.write_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def smollm2_bin():
    if not os.path.isfile(MODEL_BIN):
        pytest.skip(f"{MODEL_BIN} is missing: run export.py on models/{GGUF_NAME} first")
    return MODEL_BIN


@pytest.fixture(scope="module")
def smollm2_section(smollm2_bin, tmp_path_factory):
    """the tokenizer section of model.bin as a file, and its bytes"""
    data = open(smollm2_bin, "rb").read()
    off, size = struct.unpack_from("<QQ", data, 136)
    sec = data[off:off + size]
    path = tmp_path_factory.mktemp("sec") / "smollm2.section"
    path.write_bytes(sec)
    return str(path), sec


@pytest.fixture(scope="module")
def oracle():
    """Hugging Face's tokenizer for SmolLM2, as transformers builds it from the GGUF."""
    if not os.path.isfile(os.path.join(GGUF_DIR, GGUF_NAME)):
        pytest.skip(f"models/{GGUF_NAME} is missing")
    transformers = pytest.importorskip("transformers")
    # transformers' GGUF loader checks that torch is importable before it reads any GGUF, even
    # though the tokenizer needs no tensors and torch is not installed here. Only that guard is
    # switched off: no tensor is ever loaded.
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    gguf_utils.is_torch_available = lambda: True
    return transformers.AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)


def reference(oracle, pretok):
    """a copy of the oracle's tokenizer with the pre-tokenizer of model.bin's code pretok.

    transformers' GGUF converter ignores tokenizer.ggml.pre: it always builds a plain ByteLevel
    pre-tokenizer, which is GPT2 here. SmolLM2's own tokenizer.json, and llama.cpp's "smollm"
    pre-tokenizer, first split every digit (Unicode N*) off on its own, then apply ByteLevel.
    The two differ on text such as "x  1" (the pieces "x", "  ", "1" against "x", " ", " 1"),
    so the SMOLLM reference puts the Digits step back. LLAMA3 and QWEN2 are these models'
    Split regexes followed by a ByteLevel without its own regex, as in their tokenizer.json."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    tok = Tokenizer.from_str(oracle.backend_tokenizer.to_str())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pretok == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pretok in ("llama3", "qwen2"):
        pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        if pretok == "qwen2":
            pat = pat.replace(r"\p{N}{1,3}", r"\p{N}")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pat), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        assert pretok == "gpt2"
    return tok

# ---------------------------------------------------------------------------------------------
# Helpers


def run_driver(driver, source, files, *opts, check=True):
    """ids per file: source is ["-m", path], ["-s", path] or ["-l", path, "-v", n]"""
    out = subprocess.run([driver, *source, *opts, *files], capture_output=True, text=True)
    if check:
        assert out.returncode == 0, out.stderr
    return [None if line == "ERR" else [int(x) for x in line.split()]
            for line in out.stdout.splitlines()]


def decode_ids(driver, source, id_lists, tmp_path):
    """bytes per id list, through the driver's decode mode"""
    paths = []
    for k, ids in enumerate(id_lists):
        p = tmp_path / f"ids{k:04d}"
        p.write_text(" ".join(map(str, ids)))
        paths.append(str(p))
    out = subprocess.run([driver, *source, "-d", "-x", *paths], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [bytes.fromhex(h) for h in out.stdout.splitlines()]


def first_difference(a, b):
    k = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
    lo, hi = max(0, k - 3), k + 5
    return f"first difference at id {k}: leankv {a[lo:hi]} vs reference {b[lo:hi]}"


def compare(name, got, want, mismatches):
    if got != want:
        mismatches.append(f"{name}: {first_difference(got, want)}")


def report(capsys, line):
    with capsys.disabled():
        print(f"\n    {line}", end="")


def text_of(data):
    """what the references are given: bytes decoded as Python does, bad sequences -> U+FFFD"""
    return data.decode("utf-8", errors="replace")

# ---------------------------------------------------------------------------------------------
# The source itself


def test_unicode_tables_are_generated():
    src = open(os.path.join(REPO, "tokenizer.c")).read()
    m = re.search(r"/\* BEGIN UNICODE TABLES \*/\n(.*)/\* END UNICODE TABLES \*/", src, re.S)
    assert m, "tokenizer.c lost its table markers"
    assert m.group(1) == tokcorpus.unicode_tables_c(), \
        "tables differ from `python3 tests/tokcorpus.py tables`: regenerate them"


@pytest.mark.parametrize("flags", [["-O2"], ["-std=c11", "-O2", "-pedantic"]])
def test_compiles_without_warnings(flags, tmp_path):
    out = subprocess.run(["gcc", *flags, "-Wall", "-Wextra", "-c", "tokenizer.c", "-o",
                          str(tmp_path / "t.o")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr

# ---------------------------------------------------------------------------------------------
# BPE: SmolLM2 against Hugging Face


def test_smollm2_matches_reference(driver, smollm2_bin, corpus, oracle, capsys):
    ref = reference(oracle, "smollm")
    got = run_driver(driver, ["-m", smollm2_bin], [p for _, p, _ in corpus])
    assert len(got) == len(corpus)
    mismatches = []
    plain_differs = 0   # pieces where transformers' converted tokenizer, as is, disagrees
    for (name, _, data), ids in zip(corpus, got):
        text = text_of(data)
        want = ref.encode(text, add_special_tokens=False).ids
        compare(name, ids, want, mismatches)
        plain_differs += oracle.encode(text, add_special_tokens=False) != want
    total = sum(len(d) for _, _, d in corpus)
    report(capsys, f"SmolLM2 BPE: {len(corpus)} pieces, {total} bytes, {len(mismatches)} "
                   f"mismatches ({plain_differs} pieces tokenize differently without digit "
                   "splitting)")
    assert total >= 200_000
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("pretok", ["gpt2", "llama3", "qwen2"])
def test_pretokenizer_variants(pretok, driver, smollm2_section, corpus, oracle, tmp_path, capsys):
    """the same vocabulary and merges, cut into pieces by another pre-tokenizer"""
    sec = bytearray(smollm2_section[1])
    struct.pack_into("<i", sec, 4, PRETOK[pretok])
    path = tmp_path / f"{pretok}.section"
    path.write_bytes(sec)
    got = run_driver(driver, ["-s", str(path)], [p for _, p, _ in corpus])
    mismatches = []
    if pretok == "gpt2":   # exactly the tokenizer transformers builds from the GGUF
        for (name, _, data), ids in zip(corpus, got):
            compare(name, ids, oracle.encode(text_of(data), add_special_tokens=False), mismatches)
    else:
        ref = reference(oracle, pretok)
        for (name, _, data), ids in zip(corpus, got):
            compare(name, ids, ref.encode(text_of(data), add_special_tokens=False).ids, mismatches)
    report(capsys, f"pre-tokenizer {pretok}: {len(corpus)} pieces, {len(mismatches)} mismatches")
    assert not mismatches, "\n".join(mismatches)


def test_smollm2_round_trip(driver, smollm2_bin, corpus, tmp_path):
    """decode(encode(x)) == x for valid UTF-8, except text with bytes that have no token"""
    source = ["-m", smollm2_bin]
    ids = run_driver(driver, source, [p for _, p, _ in corpus])
    back = decode_ids(driver, source, ids, tmp_path)
    checked = 0
    for (name, _, data), b in zip(corpus, back):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if any(c in data.decode() for c in tokcorpus.MISSING_BYTES):
            continue
        assert b == data, f"{name}: round trip changed the text"
        checked += 1
    assert checked >= len(corpus) - 12


def test_smollm2_edge_behaviour(driver, smollm2_bin, oracle, tmp_path):
    """the documented cases: bytes without a token, invalid UTF-8, special-token splitting"""
    cases = {
        # 0x04 and 0x06 have no token: a run inside one piece is one unknown token (id 0)
        "missing": (b"a\x04\x06b", [81, 0, 82]),
        "missing_apart": (b"\x04 \x04", None),
        # each maximal subpart of a bad sequence is one U+FFFD
        "invalid": (b"\xe4\xb8 \xf0\x9f\x98\x80\xff\xc0\xaf", None),
        "special_longest": (b"<|im_start|><|im_end|>x<|endoftext|", [1, 2, 104, None]),
    }
    paths = []
    for name, (data, _) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        paths.append(str(p))
    got = run_driver(driver, ["-m", smollm2_bin], paths)
    ref = reference(oracle, "smollm")
    for (name, (data, expect)), ids in zip(cases.items(), got):
        assert ids == ref.encode(text_of(data), add_special_tokens=False).ids, name
        if expect:
            assert all(e is None or e == i for e, i in zip(expect, ids)), (name, ids)
    # the C clean-up equals Python's "replace" for every lead byte and what may follow it
    bad = b"|".join(bytes([lead]) + tail for lead in range(0x80, 0x100)
                    for tail in (b"", b"\x80", b"\xa0", b"\x90\x80", b"\xbf\xbf\xbf", b"\x8f\x80"))
    (tmp_path / "bad").write_bytes(bad)
    (tmp_path / "good").write_bytes(text_of(bad).encode())
    a, b = run_driver(driver, ["-m", smollm2_bin], [str(tmp_path / "bad"), str(tmp_path / "good")])
    assert a == b


def test_max_ids(driver, smollm2_bin, tmp_path):
    p = tmp_path / "t"
    p.write_bytes(b"Hello world, this is leankv. <|im_end|>")
    (ids,) = run_driver(driver, ["-m", smollm2_bin], [str(p)])
    assert run_driver(driver, ["-m", smollm2_bin], [str(p)], "-n", str(len(ids))) == [ids]
    assert run_driver(driver, ["-m", smollm2_bin], [str(p)], "-n", str(len(ids) - 1),
                      check=False) == [None]


def test_speed(driver, smollm2_bin, tmp_path, capsys):
    """200 KB must encode well under a second (this includes building the tokenizer)"""
    data = b"".join(open(os.path.join(tokcorpus.LICENCE_DIR, n), "rb").read()
                    for n in sorted(os.listdir(tokcorpus.LICENCE_DIR)))[:200_000]
    p = tmp_path / "200k"
    p.write_bytes(data)
    t0 = time.perf_counter()
    (ids,) = run_driver(driver, ["-m", smollm2_bin], [str(p)])
    dt = time.perf_counter() - t0
    report(capsys, f"200 KB -> {len(ids)} ids in {dt * 1000:.0f} ms (process, build and encode)")
    assert dt < 0.5

# ---------------------------------------------------------------------------------------------
# SPM: llama2.c's scheme against SentencePiece


SPM_EXTRA = {
    "spm_spaces": "  two leading, two trailing  ",
    "spm_u2581": "a\u2581b \u2581\u2581c\u2581",   # SentencePiece reads U+2581 as a space
    "spm_nul": "a\x00b\x00",
    "spm_byte_text": "<0x41> <0x0A><0xZZ> <unk>",   # the text of byte pieces is just text
    "spm_unseen": "漢字 😀 ☃ ∑ ǅ",                     # outside the vocabulary: <0xNN> tokens
    "spm_empty": "",
}


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """a SentencePiece BPE model trained on the licence texts, written in both formats"""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    lines = []
    for n in sorted(os.listdir(tokcorpus.LICENCE_DIR)):
        with open(os.path.join(tokcorpus.LICENCE_DIR, n), "rb") as f:
            lines += [l for l in text_of(f.read()).splitlines() if l.strip()]
    # identity normalisation and kept whitespace: llama2.c normalises nothing. One thread and
    # no sampling or shuffling: the same model every run.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(d / "m"), model_type="bpe",
        vocab_size=1500, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(d / "m.model"))
    n = sp.get_piece_size()

    # llama2.c's tokenizer.bin, as its tokenizer.py writes it
    pieces, scores = [], []
    for i in range(n):
        t = sp.id_to_piece(i)
        if i == sp.bos_id():
            t = "\n<s>\n"
        elif i == sp.eos_id():
            t = "\n</s>\n"
        pieces.append(t.replace("\u2581", " ").encode())
        scores.append(sp.get_score(i))
    with open(d / "tokenizer.bin", "wb") as f:
        f.write(struct.pack("I", max(len(t) for t in pieces)))
        for b, s in zip(pieces, scores):
            f.write(struct.pack("fI", s, len(b)) + b)

    # the model.bin tokenizer section (leankv.h): U+2581 kept, GGUF token types
    raw = [sp.id_to_piece(i).encode() for i in range(n)]
    sec = bytearray(struct.pack("<5i", 2, 0, n, 0, max(map(len, raw))))
    for i in range(n):
        ty = (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
              else 5 if sp.is_unused(i) else 1)
        sec += struct.pack("<ifi", ty, sp.get_score(i), len(raw[i])) + raw[i]
    (d / "section.bin").write_bytes(sec)
    return sp, n, str(d / "tokenizer.bin"), str(d / "section.bin")


@pytest.mark.parametrize("fmt", ["legacy", "section"])
def test_spm_matches_sentencepiece(fmt, driver, spm_model, corpus, tmp_path, capsys):
    """llama2.c's greedy merge (best score first, leftmost on a tie) is what SentencePiece's
    BPE does too, so the ids agree exactly. tokenizer.c departs from llama2.c where llama2.c
    departs from SentencePiece: merged symbols are never byte, control or unknown tokens, and
    a U+2581 in the input is a space."""
    sp, n, legacy, section = spm_model
    pieces = [(name, p, d) for name, p, d in corpus]
    for name, text in SPM_EXTRA.items():
        p = tmp_path / name
        p.write_bytes(text.encode())
        pieces.append((name, str(p), text.encode()))
    source = ["-l", legacy, "-v", str(n)] if fmt == "legacy" else ["-s", section]
    got = run_driver(driver, source, [p for _, p, _ in pieces])
    mismatches, total, checked = [], 0, []
    for (name, _, data), ids in zip(pieces, got):
        text = text_of(data)
        # in a section "<s>" and "</s>" are control tokens, cut out of text like every special
        # token; SentencePiece (and llama2.c) read them as plain text
        if fmt == "section" and ("<s>" in text or "</s>" in text):
            continue
        compare(name, ids, sp.encode(text), mismatches)
        total += len(data)
        checked.append((name, data, ids))
    report(capsys, f"SPM ({fmt}): {len(checked)} pieces, {total} bytes, "
                   f"{len(mismatches)} mismatches")
    assert not mismatches, "\n".join(mismatches)

    # decoding gives the text back, after the dummy-prefix space
    back = decode_ids(driver, source, [ids for _, _, ids in checked], tmp_path)
    for (name, data, _), b in zip(checked, back):
        try:
            text = data.decode()
        except UnicodeDecodeError:
            continue
        if "\u2581" not in text:
            assert b == (b" " + data if data else b""), name

# ---------------------------------------------------------------------------------------------
# Robustness: damaged input gives an error with a reason, never a crash


def test_sanitized_build_agrees(asan_driver, driver, smollm2_bin, corpus):
    files = [p for _, p, _ in corpus]
    assert run_driver(asan_driver, ["-m", smollm2_bin], files) == \
        run_driver(driver, ["-m", smollm2_bin], files)


def test_damaged_sections(asan_driver, spm_model, corpus):
    sp, n, legacy, section = spm_model
    sample = [p for name, p, _ in corpus if name in ("accents", "cjk", "specials", "invalid_mixed")]
    out = subprocess.run([asan_driver, "-s", section, "-F", "3000", *sample],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert re.match(r"built \d+ of 3000", out.stdout)


def test_damaged_smollm2_section(asan_driver, smollm2_section, corpus):
    path, _ = smollm2_section
    sample = [p for name, p, _ in corpus if name in ("accents", "specials", "invalid_mixed")]
    out = subprocess.run([asan_driver, "-s", path, "-F", "200", *sample],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _section(kind=1, pretok=2, tokens=((1, b"a"), (1, b"b"), (1, b"ab")), merges=((0, 1, 2),),
             max_bytes=None, tail=b""):
    sec = struct.pack("<5i", kind, pretok, len(tokens), len(merges),
                      max(len(b) for _, b in tokens) if max_bytes is None else max_bytes)
    for ty, b in tokens:
        sec += struct.pack("<ifi", ty, 0.0, len(b)) + b
    for m in merges:
        sec += struct.pack("<3i", *m)
    return sec + tail


BAD_SECTIONS = [
    ("empty", b"", "truncated header"),
    ("kind", _section(kind=7), "unknown kind"),
    ("pretok", _section(pretok=9), "pre-tokenizer"),
    ("spm_merges", _section(kind=2, pretok=0), "merge count"),
    ("vocab_too_big", struct.pack("<5i", 1, 2, 1 << 30, 0, 4), "vocab size"),
    ("record_cut", _section()[:-15], "truncated at token 2"),
    ("text_cut", _section()[:-13], "past the end"),
    ("max_bytes", _section(max_bytes=1), "length"),
    ("bad_type", _section(tokens=((9, b"a"), (1, b"b"), (1, b"ab"))), "type"),
    ("not_concat", _section(merges=((1, 0, 2),)), "concatenation"),
    ("merge_id", _section(merges=((0, 5, 2),)), "concatenation"),
    ("trailing", _section(tail=b"\0"), "left over"),
]


@pytest.mark.parametrize("name,data,reason", BAD_SECTIONS, ids=[c[0] for c in BAD_SECTIONS])
def test_bad_section_reason(name, data, reason, driver, tmp_path):
    p = tmp_path / name
    p.write_bytes(data)
    out = subprocess.run([driver, "-s", str(p), "-c"], capture_output=True, text=True)
    assert out.returncode == 1
    assert reason in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_tiny_section_works(driver, tmp_path):
    p, t = tmp_path / "sec", tmp_path / "text"
    p.write_bytes(_section())
    t.write_bytes(b"abba ab")
    # no byte has a token but a and b: the space becomes the unknown token, id 0 ("a")
    assert run_driver(driver, ["-s", str(p)], [str(t)]) == [[2, 1, 0, 0, 2]]


def test_bad_legacy_file(driver, spm_model, tmp_path):
    sp, n, legacy, _ = spm_model
    data = open(legacy, "rb").read()
    for cut in (0, 3, 4, 11, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}"
        p.write_bytes(data[:cut])
        out = subprocess.run([driver, "-l", str(p), "-v", str(n), "-c"], capture_output=True,
                             text=True)
        assert out.returncode == 1 and "tokenizer.bin" in out.stderr, (cut, out.stderr)
    out = subprocess.run([driver, "-l", legacy, "-v", str(n + 1), "-c"], capture_output=True,
                         text=True)
    assert out.returncode == 1
