"""Tests of export.py: round trips (model.bin read back with an independent numpy reader and
compared with the source, tensor by tensor and field by field) and malformed inputs (exit code 1,
one line "export.py: error: ...", no traceback, no output file left behind)."""

import json
import os
import struct
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # ref_llama, tiny_models

import ref_llama  # noqa: E402
import tiny_models as tm  # noqa: E402
from tiny_models import read_model_bin, run_export  # noqa: E402

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

HF_TO_LKV = {
    "input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo", "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv",
    "post_attention_layernorm.weight": "ffn_norm", "mlp.gate_proj.weight": "w1",
    "mlp.down_proj.weight": "w2", "mlp.up_proj.weight": "w3",
}
GGUF_TO_LKV = {
    "attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk",
    "attn_v.weight": "wv", "attn_output.weight": "wo", "attn_q.bias": "bq",
    "attn_k.bias": "bk", "attn_v.bias": "bv", "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "w1", "ffn_down.weight": "w2", "ffn_up.weight": "w3",
}
FP32_ALWAYS = ("attn_norm", "ffn_norm", "norm", "bq", "bk", "bv")
PRETOK = {"gpt2": 1, "smollm": 2, "llama3": 3, "qwen2": 4}


def hf_name(name):
    if name.startswith("model.layers."):
        _, _, L, rest = name.split(".", 3)
        return f"layers.{L}.{HF_TO_LKV[rest]}"
    return {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "norm",
            "lm_head.weight": "output"}[name]


def gguf_name(name):
    if name.startswith("blk."):
        _, L, rest = name.split(".", 2)
        return f"layers.{L}.{GGUF_TO_LKV[rest]}"
    return {"token_embd.weight": "tok_embeddings", "output_norm.weight": "norm",
            "output.weight": "output"}[name]


def expected_order(s):
    names = ["tok_embeddings"]
    for L in range(s["n_layers"]):
        p = f"layers.{L}."
        names += [p + x for x in ("attn_norm", "wq", "wk", "wv")]
        if s["bias"]:
            names += [p + x for x in ("bq", "bk", "bv")]
        names += [p + x for x in ("wo", "ffn_norm", "w1", "w2", "w3")]
    return names + ["norm"] + ([] if s["tied"] else ["output"])


def check_header(h, s, rope_style, dtype):
    assert h["dim"] == s["dim"] and h["hidden_dim"] == s["hidden_dim"]
    assert h["n_layers"] == s["n_layers"] and h["n_heads"] == s["n_heads"]
    assert h["n_kv_heads"] == s["n_kv_heads"] and h["head_dim"] == s["head_dim"]
    assert h["vocab_size"] == s["vocab"] and h["seq_len"] == s["max_pos"]
    assert h["rope_theta"] == np.float32(s["theta"]) and h["norm_eps"] == np.float32(s["eps"])
    assert h["rope_style"] == rope_style and h["weight_dtype"] == dtype
    assert h["tied_classifier"] == int(s["tied"]) and h["qkv_bias"] == int(s["bias"])
    assert h["bos_id"] == 1 and h["eos_id"] == 2 and h["add_bos"] == 0
    assert h["chat_template"] == 1  # ChatML
    assert h["stop_ids"][:h["n_stop"]] == [2, 0]   # eos <|im_end|>, then <|endoftext|>
    assert h["n_tensors"] == len(expected_order(s))


def check_tiny_tokenizer(tok, pretok):
    """The tiny byte-level BPE of tiny_models: ids 0-2 specials, 3+b byte b, 41 merges, ids
    300-319 unused."""
    assert tok is not None and tok["kind"] == 1 and tok["pretokenizer"] == PRETOK[pretok]
    assert tok["vocab_size"] == tm.VOCAB and tok["n_merges"] == 41
    recs = tok["records"]
    for i, s in enumerate(tm.SPECIALS):
        assert recs[i][0] == 3 and recs[i][2] == s.encode()
    for b in range(256):
        assert recs[3 + b][0] == 1 and recs[3 + b][2] == bytes([b])
    for left, right, res in tok["merges"]:
        assert recs[res][2] == recs[left][2] + recs[right][2]
    assert recs[259 + 40][2] == recs[tok["merges"][40][0]][2] + recs[tok["merges"][40][1]][2]
    return recs


# ---- round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(tm.VARIANTS))
def test_roundtrip_hf(tmp_path, variant):
    folder = tm.write_hf(tmp_path / "hf", variant)
    out = tmp_path / "model.bin"
    r = run_export(folder, out)
    assert r.stdout.count("\n") == 1 and "dim=64" in r.stdout
    m = read_model_bin(out)
    s = tm.spec(variant)
    check_header(m["header"], s, rope_style=1, dtype=0)
    assert list(m["tensors"]) == expected_order(s)
    src = load_file(os.path.join(folder, "model.safetensors"))
    if s["tied"]:
        assert "lm_head.weight" not in src
    for k, a in src.items():
        got = m["tensors"][hf_name(k)]
        assert got.dtype == np.float32 and np.array_equal(got, a), k
    recs = check_tiny_tokenizer(m["tokenizer"], s["pretok"])
    for i in range(tm.TOKENIZER_TOKENS, tm.VOCAB):  # in the model, not in the tokenizer
        assert recs[i][0] == 5 and recs[i][2] == b""


@pytest.mark.parametrize("variant", ["qwen2_bias_gqa_tied", "mistral_mqa_hd32"])
def test_roundtrip_hf_fp16(tmp_path, variant):
    folder = tm.write_hf(tmp_path / "hf", variant)
    out = tmp_path / "model.bin"
    run_export(folder, out, "--dtype", "fp16")
    m = read_model_bin(out)
    check_header(m["header"], tm.spec(variant), rope_style=1, dtype=1)
    for k, a in load_file(os.path.join(folder, "model.safetensors")).items():
        n = hf_name(k)
        got = m["tensors"][n]
        if n.split(".")[-1] in FP32_ALWAYS:
            assert got.dtype == np.float32 and np.array_equal(got, a), k
        else:
            assert got.dtype == np.float16 and np.array_equal(got, a.astype(np.float16)), k


def test_hf_no_tokenizer_and_bf16(tmp_path):
    """No tokenizer.json: tokenizer_bytes = 0. BF16/F16 safetensors are widened exactly."""
    from safetensors.numpy import save_file
    folder = tm.write_hf(tmp_path / "hf", "llama_mha_tied", tokenizer=False)
    w = load_file(os.path.join(folder, "model.safetensors"))
    # store the embedding as BF16 (truncate to the high half) and one matrix as F16: safetensors'
    # numpy API has no bf16, so write the file by hand
    bf = (w["model.embed_tokens.weight"].view(np.uint32) >> 16).astype("<u2")
    w16 = w["model.layers.0.mlp.up_proj.weight"].astype(np.float16)
    rest = {k: v for k, v in w.items()
            if k not in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight")}
    save_file(rest, os.path.join(folder, "model.safetensors"))
    hdr, blob = {}, b""
    for name, arr, dt in (("model.embed_tokens.weight", bf, "BF16"),
                          ("model.layers.0.mlp.up_proj.weight", w16, "F16")):
        hdr[name] = {"dtype": dt, "shape": list(arr.shape),
                     "data_offsets": [len(blob), len(blob) + arr.nbytes]}
        blob += arr.tobytes()
    j = json.dumps(hdr).encode()
    j += b" " * (-len(j) % 8)
    with open(os.path.join(folder, "model-extra.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(j)) + j + blob)
    out = tmp_path / "model.bin"
    run_export(folder, out)
    m = read_model_bin(out)
    assert m["header"]["tokenizer_bytes"] == 0 and m["tokenizer"] is None
    want = (bf.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(m["tensors"]["tok_embeddings"], want)
    assert np.array_equal(m["tensors"]["layers.0.w3"], w16.astype(np.float32))


@pytest.mark.parametrize("types", ["f32", "mixed"])
@pytest.mark.parametrize("variant", ["llama_gqa_untied", "qwen2_bias_gqa_tied", "mistral_mqa_hd32"])
def test_roundtrip_gguf_tiny(tmp_path, variant, types):
    path = tm.write_gguf(str(tmp_path / "m.gguf"), variant, types=types)
    out = tmp_path / "model.bin"
    run_export(path, out)
    m = read_model_bin(out)
    s = tm.spec(variant)
    check_header(m["header"], s, rope_style=0, dtype=0)
    assert list(m["tensors"]) == expected_order(s)
    r = gguf.GGUFReader(path)
    seen = set()
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(list(t.shape)))
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        mine = ref_llama.decode_ggml(t.data, t.tensor_type.name, shape)
        assert np.array_equal(want, mine), f"ref_llama's decoder differs on {t.name}"
        got = m["tensors"][gguf_name(t.name)]
        assert got.dtype == np.float32 and np.array_equal(got, want), t.name
        seen.add(t.tensor_type.name)
    if types == "mixed":
        assert {"Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32"} <= seen
    recs = check_tiny_tokenizer(m["tokenizer"], "smollm")
    for i in range(tm.TOKENIZER_TOKENS, tm.VOCAB):  # "[PADnnn]", type unused
        assert recs[i][0] == 5 and recs[i][2] == f"[PAD{i}]".encode()


def test_gguf_pretokenizer_names(tmp_path):
    for pre, want in (("gpt2", 1), ("default", 1), ("llama-bpe", 3), ("qwen2", 4), (None, 1)):
        path = tm.write_gguf(str(tmp_path / "m.gguf"), "llama_mha_tied", pre=pre)
        run_export(path, tmp_path / "m.bin")
        assert read_model_bin(tmp_path / "m.bin")["tokenizer"]["pretokenizer"] == want, pre
        os.remove(path)


def test_roundtrip_gguf_spm(tmp_path):
    """tokenizer.ggml.model "llama": pieces stored as they are, with scores and types; add_bos
    defaults to 1 without the key; an [INST] template is LLAMA2."""
    path = tm.write_gguf(str(tmp_path / "m.gguf"), "llama_mha_tied", tok_model="llama")
    run_export(path, tmp_path / "m.bin")
    m = read_model_bin(tmp_path / "m.bin")
    h, tok = m["header"], m["tokenizer"]
    assert h["bos_id"] == 1 and h["eos_id"] == 2 and h["add_bos"] == 1
    assert h["chat_template"] == 2 and h["stop_ids"][:h["n_stop"]] == [2]
    assert tok["kind"] == 2 and tok["pretokenizer"] == 0 and tok["n_merges"] == 0
    pieces, scores, types = tm.spm_vocab(tm.VOCAB)
    for (tt, sc, b), p, s_, t_ in zip(tok["records"], pieces, scores, types):
        assert (tt, sc, b) == (t_, np.float32(s_), p.encode("utf-8"))
    assert tok["records"][3][2] == b"<0x00>" and tok["records"][300][2].startswith(b"\xe2\x96\x81")


def test_roundtrip_smollm2():
    path = tm.smollm2_bin()
    if path is None:
        pytest.skip(f"{tm.SMOL_GGUF} not present")
    m = read_model_bin(path)
    h = m["header"]
    want = dict(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                vocab_size=49152, seq_len=8192, rope_style=0, tied_classifier=1, qkv_bias=0,
                weight_dtype=0, bos_id=1, eos_id=2, add_bos=0, chat_template=1)
    assert {k: h[k] for k in want} == want
    assert h["rope_theta"] == 100000.0 and h["norm_eps"] == np.float32(1e-5)
    assert set(h["stop_ids"][:h["n_stop"]]) == {0, 2}
    assert h["n_tensors"] == 273   # 272 weights + chat.system
    system = m["tensors"].pop("chat.system").tobytes().decode()
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    n_params = sum(a.size for a in m["tensors"].values())
    assert n_params == 134_515_008
    r = gguf.GGUFReader(tm.SMOL_GGUF)
    types = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(list(t.shape)))
        want_a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        got = m["tensors"][gguf_name(t.name)]
        assert np.array_equal(got, want_a), t.name
        types.setdefault(t.tensor_type.name, 0)
        types[t.tensor_type.name] += 1
        if t.name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
            assert np.array_equal(ref_llama.decode_ggml(t.data, t.tensor_type.name, shape),
                                  want_a), t.name
    assert types == {"Q8_0": 1, "Q4_1": 210, "F32": 61}
    tok = m["tokenizer"]
    assert tok["kind"] == 1 and tok["pretokenizer"] == 2
    assert tok["vocab_size"] == 49152 and tok["n_merges"] == 48900
    recs = tok["records"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for i, s in enumerate(specials):
        assert recs[i][0] == 3 and recs[i][2] == s.encode()
    assert sum(1 for r in recs if r[0] == 3) == 17
    assert all(r[0] == 1 for r in recs[17:])
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    assert recs[toks.index("Ġthe")][2] == b" the"
    assert recs[toks.index("Ċ")][2] == b"\n"
    assert len(toks) == 49152
    singles = {r[2] for r in recs[17:] if len(r[2]) == 1}
    assert len(singles) < 256   # not every byte has a token (MODEL-NOTES)
    for left, right, res in tok["merges"][:: 97]:
        assert recs[res][2] == recs[left][2] + recs[right][2]
    assert tok["max_token_bytes"] == max(len(r[2]) for r in recs)


# ---- malformed inputs -----------------------------------------------------------------------

def expect_error(tmp_path, *args, match=None):
    out = tmp_path / "out.bin"
    r = run_export(*args, out, check=False)
    err = r.stderr.strip()
    print(f"\n    {err}")
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert len(err.splitlines()) == 1 and err.startswith("export.py: error: "), err
    if match:
        assert match in err, err
    assert not out.exists() and not (tmp_path / "out.bin.tmp").exists()
    return err


def truncate(path, n):
    with open(path, "r+b") as f:
        f.truncate(n)


def test_truncated_gguf(tmp_path):
    path = tm.write_gguf(str(tmp_path / "m.gguf"), "llama_gqa_untied", types="mixed")
    size = os.path.getsize(path)
    for n in (size - 1, size * 2 // 3, 6000, 100, 10):
        p2 = tmp_path / f"t{n}.gguf"
        with open(path, "rb") as f:
            p2.write_bytes(f.read(n))
        expect_error(tmp_path, p2)


def test_truncated_safetensors(tmp_path):
    folder = tm.write_hf(tmp_path / "hf", "llama_mha_tied")
    st = os.path.join(folder, "model.safetensors")
    size = os.path.getsize(st)
    truncate(st, size - 10)
    expect_error(tmp_path, folder, match="truncated")
    truncate(st, 200)
    expect_error(tmp_path, folder, match="truncated")
    truncate(st, 4)
    expect_error(tmp_path, folder, match="truncated")


def test_missing_tensor(tmp_path):
    f = tm.write_hf(tmp_path / "hf", "llama_gqa_untied", drop={"model.layers.1.self_attn.k_proj.weight"})
    expect_error(tmp_path, f, match="model.layers.1.self_attn.k_proj.weight is missing")
    f = tm.write_hf(tmp_path / "hf2", "qwen2_bias_gqa_tied", drop={"model.layers.0.self_attn.v_proj.bias"})
    expect_error(tmp_path, f, match="model.layers.0.self_attn.v_proj.bias is missing")
    f = tm.write_hf(tmp_path / "hf3", "llama_gqa_untied", drop={"lm_head.weight"})
    expect_error(tmp_path, f, match="lm_head.weight is missing")
    g = tm.write_gguf(str(tmp_path / "m.gguf"), "llama_gqa_untied", drop={"blk.2.ffn_up.weight"})
    expect_error(tmp_path, g, match="blk.2.ffn_up.weight is missing")


def test_wrong_shape(tmp_path):
    def widen(name, a):
        return np.concatenate([a, a[:1]]) if name == "model.layers.0.mlp.gate_proj.weight" else a
    f = tm.write_hf(tmp_path / "hf", "llama_mha_tied", transform=widen)
    expect_error(tmp_path, f, match="shape")

    def cut(name, a):
        return a[:, :32] if name == "blk.1.attn_k.weight" else a
    g = tm.write_gguf(str(tmp_path / "m.gguf"), "llama_mha_tied", transform=cut)
    expect_error(tmp_path, g, match="blk.1.attn_k.weight has shape")
    f = tm.write_hf(tmp_path / "hf2", "llama_mha_tied", config_overrides={"num_key_value_heads": 2})
    expect_error(tmp_path, f, match="shape")


def test_unsupported_architecture(tmp_path):
    f = tm.write_hf(tmp_path / "hf", "llama_mha_tied",
                    config_overrides={"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    expect_error(tmp_path, f, match="GPT2LMHeadModel")
    g = tm.write_gguf(str(tmp_path / "m.gguf"), "llama_mha_tied", arch="phi3")
    expect_error(tmp_path, g, match="phi3")


def test_unsupported_settings(tmp_path):
    cases = [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"mlp_bias": True}, "mlp_bias"),
    ]
    for k, (over, match) in enumerate(cases):
        f = tm.write_hf(tmp_path / f"hf{k}", "llama_mha_tied", config_overrides=over)
        expect_error(tmp_path, f, match=match)
    # a bias on o_proj
    f = tm.write_hf(tmp_path / "hfo", "llama_mha_tied")
    from safetensors.numpy import save_file
    st = os.path.join(f, "model.safetensors")
    w = load_file(st)
    w["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    save_file(w, st)
    expect_error(tmp_path, f, match="o_proj")
    g = tm.write_gguf(str(tmp_path / "m.gguf"), "llama_mha_tied",
                      extra_kv={"llama.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)})
    expect_error(tmp_path, g, match="yarn")


def test_sliding_window_limits_seq_len(tmp_path):
    f = tm.write_hf(tmp_path / "hf", "mistral_mqa_hd32", config_overrides={"sliding_window": 128})
    r = run_export(f, tmp_path / "m.bin")
    assert "sliding window 128" in r.stdout
    assert read_model_bin(tmp_path / "m.bin")["header"]["seq_len"] == 128


def test_unsupported_tensor_type(tmp_path):
    g = tm.write_gguf(str(tmp_path / "m.gguf"), "llama_mha_tied",
                      type_overrides={"blk.0.attn_q.weight": QT.Q5_0})
    expect_error(tmp_path, g, match="blk.0.attn_q.weight has type Q5_0")


def test_nan_inf(tmp_path):
    def nan(name, a):
        if name == "model.layers.1.mlp.down_proj.weight":
            a = a.copy()
            a[3, 5] = np.nan
        return a
    f = tm.write_hf(tmp_path / "hf", "llama_mha_tied", transform=nan)
    expect_error(tmp_path, f, match="model.layers.1.mlp.down_proj.weight contains NaN")

    def inf(name, a):
        if name == "output_norm.weight":
            a = a.copy()
            a[7] = np.inf
        return a
    g = tm.write_gguf(str(tmp_path / "m.gguf"), "llama_mha_tied", transform=inf)
    expect_error(tmp_path, g, match="output_norm.weight contains NaN or Inf")

    def big(name, a):
        return a * 1e6 if name == "model.layers.0.self_attn.q_proj.weight" else a
    f = tm.write_hf(tmp_path / "hf2", "llama_mha_tied", transform=big)
    run_export(f, tmp_path / "ok.bin")              # fine in fp32
    expect_error(tmp_path, f, "--dtype", "fp16", match="fp16 range")


def test_bad_inputs(tmp_path):
    expect_error(tmp_path, tmp_path / "nope.gguf", match="no such file")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model at all")
    expect_error(tmp_path, junk)
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path, tmp_path / "empty", match="config.json")
    f = tm.write_hf(tmp_path / "hf", "llama_mha_tied")
    (tmp_path / "hf" / "config.json").write_text("{ not json")
    expect_error(tmp_path, f, match="config.json")


def test_bad_tokenizers(tmp_path):
    g = tm.write_gguf(str(tmp_path / "m.gguf"), "llama_mha_tied", pre="falcon")
    expect_error(tmp_path, g, match="falcon")
    f = tm.write_hf(tmp_path / "hf", "llama_mha_tied")
    tj = os.path.join(f, "tokenizer.json")
    t = json.load(open(tj))
    t["model"]["merges"].append("zz qq")
    json.dump(t, open(tj, "w"))
    expect_error(tmp_path, f, match="zz qq")
    t["model"]["merges"].pop()
    t["pre_tokenizer"] = {"type": "Whitespace"}
    json.dump(t, open(tj, "w"))
    expect_error(tmp_path, f, match="tokenizer")
    r = run_export(f, tmp_path / "nt.bin", "--no-tokenizer")
    assert read_model_bin(tmp_path / "nt.bin")["tokenizer"] is None, r.stdout


def write_raw_safetensors(path, header, blob=b""):
    """a .safetensors file with exactly this JSON header (malformed on purpose)"""
    j = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(j)) + j + blob)


@pytest.mark.parametrize("entry,match", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0]}, "corrupt safetensors entry"),
    ({"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}, "corrupt safetensors entry"),
    ({"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}, "corrupt safetensors entry"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}, "corrupt safetensors entry"),
    ({"shape": [4], "data_offsets": [0, 16]}, "corrupt safetensors entry"),
    ([1, 2, 3], "corrupt safetensors entry"),
    ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "negative dimension"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "out of order"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [-8, 8]}, "out of order"),
    ({"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}, "has 16 bytes for shape [5] F32"),
    ({"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}, "has 16 bytes"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 20]}, "truncated safetensors"),
])
def test_malformed_safetensors_entry(tmp_path, entry, match):
    """an extra file next to a good model: each malformed header entry gets its own message"""
    f = tm.write_hf(tmp_path / "hf", "llama_mha_tied")
    write_raw_safetensors(os.path.join(f, "extra.safetensors"), {"extra.weight": entry},
                          b"\0" * 16)
    expect_error(tmp_path, f, match=match)


def test_malformed_safetensors_file(tmp_path):
    f = tm.write_hf(tmp_path / "hf", "llama_mha_tied")
    extra = os.path.join(f, "extra.safetensors")
    write_raw_safetensors(extra, [1, 2])
    expect_error(tmp_path, f, match="not a JSON object")
    with open(extra, "wb") as fh:
        fh.write(struct.pack("<Q", 5) + b"{bad}")
    expect_error(tmp_path, f, match="corrupt safetensors header")
    with open(extra, "wb") as fh:
        fh.write(struct.pack("<Q", 1 << 62) + b"{}")
    expect_error(tmp_path, f, match="header of 4611686018427387904 bytes")
    # two tensors over the same bytes
    write_raw_safetensors(extra, {"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                  "b.weight": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
                          b"\0" * 16)
    expect_error(tmp_path, f, match="share bytes")


def test_unsupported_safetensors_dtype(tmp_path):
    f = tm.write_hf(tmp_path / "hf", "llama_mha_tied")
    from safetensors.numpy import save_file
    st = os.path.join(f, "model.safetensors")
    w = load_file(st)
    w["model.layers.1.mlp.up_proj.weight"] = w["model.layers.1.mlp.up_proj.weight"].astype(np.float64)
    save_file(w, st)
    expect_error(tmp_path, f, match="model.layers.1.mlp.up_proj.weight has dtype F64")
    w["model.layers.1.mlp.up_proj.weight"] = np.zeros((160, 64), np.int32)
    save_file(w, st)
    expect_error(tmp_path, f, match="has dtype I32")


def test_nan_inf_every_source_type(tmp_path):
    """NaN or Inf in an F16 safetensors tensor, and in a Q8_0 GGUF block (its scale),
    is refused like in F32"""
    from safetensors.numpy import save_file
    f = tm.write_hf(tmp_path / "hf", "llama_mha_tied")
    st = os.path.join(f, "model.safetensors")
    w = load_file(st)
    a = w["model.layers.0.mlp.gate_proj.weight"].astype(np.float16)
    a[1, 2] = np.inf
    w["model.layers.0.mlp.gate_proj.weight"] = a
    save_file(w, st)
    expect_error(tmp_path, f, match="model.layers.0.mlp.gate_proj.weight contains NaN or Inf")

    g = tm.write_gguf(str(tmp_path / "q.gguf"), "llama_mha_tied",
                      type_overrides={"blk.0.ffn_up.weight": QT.Q8_0})
    r = gguf.GGUFReader(g)
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_up.weight")
    assert t.tensor_type == QT.Q8_0
    start = int(t.data_offset)   # the first block's fp16 scale: make it NaN
    data = bytearray(open(g, "rb").read())
    data[start:start + 2] = np.array([np.nan], "<f2").tobytes()
    open(g, "wb").write(bytes(data))
    expect_error(tmp_path, g, match="blk.0.ffn_up.weight contains NaN or Inf")
