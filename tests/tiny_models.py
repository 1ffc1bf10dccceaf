"""tiny_models.py: tiny random Llama-family checkpoints for tests (seeded, deterministic).

  write_hf(folder, variant)        config.json + model.safetensors (+ tokenizer.json,
                                   tokenizer_config.json): a Hugging Face checkpoint
  write_gguf(path, variant)        the same weights as a "llama" GGUF, q/k rows permuted
  write_legacy(path, variant)      the same weights as a llama2.c legacy checkpoint (leankv.h)
  write_legacy_tokenizer(path, n)  a llama2.c tokenizer.bin with n tokens (256 byte tokens)

and helpers that test_export.py and test_forward.py share (kept here so that neither test file
imports the other): run_export, read_model_bin (an independent numpy reader of model.bin,
written from leankv.h), smollm2_bin (the default model exported once per process).

Weights are defined in Hugging Face layout (rotary pairs (i, i + head_dim/2)). The GGUF and
legacy writers permute the q and k rows of every head the way llama.cpp's converter does, so
that pair i sits in rows (2i, 2i+1): new row 2i <- old row i, new row 2i+1 <- old row i + hd/2
(q/k biases likewise). With interleaved RoPE applied to the permuted rows, q.k is unchanged,
so all three files describe the same function (up to the GGUF's quantization).

Every variant has dim 64, FFN 160 and a vocabulary of 320 ids, of which the byte-level BPE
tokenizer defines 300 (3 specials, 256 bytes, 41 merges); ids 300..319 exist only in the model.
"""

import json
import os
import re
import struct

import numpy as np

VOCAB = 320
TOKENIZER_TOKENS = 300
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                   "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

BASE = dict(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=None,
            vocab=VOCAB, max_pos=256, theta=10000.0, eps=1e-5, tied=True, bias=False,
            arch="LlamaForCausalLM", pretok="gpt2", seed=0)

VARIANTS = {
    # MHA, tied, llama2.c-compatible hyperparameters (theta 1e4, eps 1e-5): also a legacy file
    "llama_mha_tied": dict(seed=1),
    # GQA group 2, untied, 3 layers, Llama-3-like theta
    "llama_gqa_untied": dict(seed=2, n_layers=3, n_kv_heads=2, tied=False, theta=500000.0,
                             eps=1e-6, pretok="smollm"),
    # GQA + untied with llama2.c-compatible hyperparameters: the second legacy file
    "legacy_gqa_untied": dict(seed=3, n_kv_heads=2, tied=False),
    # Qwen2: q/k/v biases
    "qwen2_bias_gqa_tied": dict(seed=4, arch="Qwen2ForCausalLM", bias=True, n_kv_heads=2,
                                theta=1000000.0, eps=1e-6, pretok="qwen2"),
    "qwen2_bias_mha_untied": dict(seed=5, arch="Qwen2ForCausalLM", bias=True, tied=False,
                                  eps=1e-6, pretok="qwen2"),
    # Mistral, one KV head (MQA), head_dim 32 so that n_heads*head_dim (128) != dim (64)
    "mistral_mqa_hd32": dict(seed=6, arch="MistralForCausalLM", n_kv_heads=1, head_dim=32,
                             tied=False, pretok="llama3"),
}


def spec(variant):
    s = dict(BASE)
    s.update(VARIANTS[variant] if isinstance(variant, str) else variant)
    if s["head_dim"] is None:
        s["head_dim"] = s["dim"] // s["n_heads"]
    return s


def legacy_ok(variant):
    s = spec(variant)
    return (s["theta"] == 10000.0 and s["eps"] == 1e-5 and not s["bias"]
            and s["head_dim"] * s["n_heads"] == s["dim"])


# ---- weights --------------------------------------------------------------------------------

def make_weights(variant):
    """HF-named float32 weights. Scales keep activations O(1): matrices N(0, 1/in), embedding
    N(0, 1), norm weights 1 + 0.1 N(0, 1), biases 0.5 N(0, 1); an untied lm_head is 4x a
    matrix so that its logits are as large as the tied ones."""
    s = spec(variant)
    rng = np.random.default_rng(1000 + s["seed"])
    d, hd, h, v = s["dim"], s["head_dim"], s["hidden_dim"], s["vocab"]
    qd, kvd = s["n_heads"] * hd, s["n_kv_heads"] * hd

    def mat(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((v, d)).astype(np.float32)}
    for L in range(s["n_layers"]):
        p = f"model.layers.{L}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "self_attn.q_proj.weight"] = mat(qd, d)
        w[p + "self_attn.k_proj.weight"] = mat(kvd, d)
        w[p + "self_attn.v_proj.weight"] = mat(kvd, d)
        if s["bias"]:
            for nm, n in (("q", qd), ("k", kvd), ("v", kvd)):
                w[p + f"self_attn.{nm}_proj.bias"] = (0.5 * rng.standard_normal(n)).astype(np.float32)
        w[p + "self_attn.o_proj.weight"] = mat(d, qd)
        w[p + "post_attention_layernorm.weight"] = norm(d)
        w[p + "mlp.gate_proj.weight"] = mat(h, d)
        w[p + "mlp.up_proj.weight"] = mat(h, d)
        w[p + "mlp.down_proj.weight"] = mat(d, h)
    w["model.norm.weight"] = norm(d)
    if not s["tied"]:
        w["lm_head.weight"] = mat(v, d) * np.float32(4.0)
    return w


def hf_config(variant):
    s = spec(variant)
    c = {
        "architectures": [s["arch"]],
        "model_type": {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                       "MistralForCausalLM": "mistral"}[s["arch"]],
        "hidden_size": s["dim"], "intermediate_size": s["hidden_dim"],
        "num_hidden_layers": s["n_layers"], "num_attention_heads": s["n_heads"],
        "num_key_value_heads": s["n_kv_heads"], "vocab_size": s["vocab"],
        "max_position_embeddings": s["max_pos"], "rope_theta": s["theta"],
        "rms_norm_eps": s["eps"], "tie_word_embeddings": s["tied"], "hidden_act": "silu",
        "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }
    if s["arch"] == "LlamaForCausalLM":
        c.update(attention_bias=False, mlp_bias=False)
    if s["arch"] == "Qwen2ForCausalLM":
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=s["n_layers"])
    if s["arch"] == "MistralForCausalLM":
        c.update(sliding_window=None)
    if s["head_dim"] * s["n_heads"] != s["dim"]:
        c["head_dim"] = s["head_dim"]
    return c


# ---- a tiny byte-level BPE tokenizer ----------------------------------------------------------

CORPUS = ("the quick brown fox jumps over the lazy dog. the capital of france is paris. "
          "in the beginning there was the word, and the word was with the model. "
          "then they went into the house and there they found the three things.")


def bytes_to_unicode():
    """GPT-2's byte -> printable character table."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) +
            list(range(0xAE, 0x100)))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def tiny_bpe():
    """(tokens list of TOKENIZER_TOKENS strings in id order, merges list of (a, b))."""
    b2u = bytes_to_unicode()
    tokens = list(SPECIALS) + [b2u[b] for b in range(256)]
    words = [[b2u[c] for c in w.encode()] for w in re.findall(r" ?[a-z]+| ?[^a-z ]+", CORPUS)]
    merges = []
    while len(tokens) < TOKENIZER_TOKENS:
        counts = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        best = max(sorted(counts), key=lambda k: counts[k])   # ties: the smallest pair
        merges.append(best)
        tokens.append(best[0] + best[1])
        new_words = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append(out)
        words = new_words
    return tokens, merges


QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_json(pretok):
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pretok == "gpt2":
        return bl
    if pretok == "smollm":
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, bl]}
    rx = {"qwen2": QWEN2_REGEX, "llama3": LLAMA3_REGEX}[pretok]
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False},
        dict(bl, use_regex=False)]}


def tokenizer_json(pretok):
    tokens, merges = tiny_bpe()
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, s in enumerate(SPECIALS)],
        "normalizer": None, "pre_tokenizer": pre_tokenizer_json(pretok),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {s: i for i, s in enumerate(tokens)},
                  "merges": [f"{a} {b}" for a, b in merges]},
    }


# ---- writers ------------------------------------------------------------------------------

def write_hf(folder, variant, tokenizer=True, drop=(), transform=None, config_overrides=None):
    """drop: HF tensor names to leave out; transform(name, array) -> array; config_overrides:
    dict merged into config.json (for malformed-input tests)."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    cfg = hf_config(variant)
    cfg.update(config_overrides or {})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    w = {k: (transform(k, a) if transform else a) for k, a in make_weights(variant).items()
         if k not in drop}
    save_file(w, os.path.join(folder, "model.safetensors"))
    if tokenizer:
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            json.dump(tokenizer_json(spec(variant)["pretok"]), f, ensure_ascii=False)
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                       "add_bos_token": False, "chat_template": CHATML_TEMPLATE}, f)
    return folder


def permute_interleaved(w, n_heads):
    """HF rotate_half row order -> adjacent rotary pairs, per head (rows; works for biases)."""
    rows = w.shape[0]
    hd = rows // n_heads
    return (w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def write_gguf(path, variant, types="f32", drop=(), type_overrides=None, transform=None,
               extra_kv=None, tokenizer=True, pre="smollm", arch="llama", tok_model="gpt2"):
    """The variant's weights as a llama GGUF. types "f32": every tensor F32; "mixed": a mix of
    every type export.py accepts. type_overrides: {gguf tensor name: GGMLQuantizationType};
    transform(gguf_name, array) -> array; extra_kv: {key: (value, GGUFValueType)}.
    tok_model "gpt2": the tiny byte-level BPE; "llama": a SentencePiece-style vocabulary
    (spm_vocab) with scores and no add_bos key."""
    import gguf
    from gguf import GGMLQuantizationType as QT

    s = spec(variant)
    w = make_weights(variant)
    mixed = {"token_embd": QT.Q8_0, "attn_q": QT.Q4_1, "attn_k": QT.Q4_0, "attn_v": QT.F16,
             "attn_output": QT.BF16, "ffn_gate": QT.Q4_1, "ffn_down": QT.Q8_0,
             "ffn_up": QT.Q4_0, "output": QT.F16}
    tensors = [("token_embd.weight", w["model.embed_tokens.weight"])]
    hfmap = [("attn_norm.weight", "input_layernorm.weight"), ("attn_q.weight", "self_attn.q_proj.weight"),
             ("attn_k.weight", "self_attn.k_proj.weight"), ("attn_v.weight", "self_attn.v_proj.weight"),
             ("attn_q.bias", "self_attn.q_proj.bias"), ("attn_k.bias", "self_attn.k_proj.bias"),
             ("attn_v.bias", "self_attn.v_proj.bias"),
             ("attn_output.weight", "self_attn.o_proj.weight"),
             ("ffn_norm.weight", "post_attention_layernorm.weight"),
             ("ffn_gate.weight", "mlp.gate_proj.weight"), ("ffn_down.weight", "mlp.down_proj.weight"),
             ("ffn_up.weight", "mlp.up_proj.weight")]
    for L in range(s["n_layers"]):
        for g, h in hfmap:
            name = f"model.layers.{L}.{h}"
            if name not in w:
                continue
            a = w[name]
            if g.startswith("attn_q."):
                a = permute_interleaved(a, s["n_heads"])
            elif g.startswith("attn_k."):
                a = permute_interleaved(a, s["n_kv_heads"])
            tensors.append((f"blk.{L}.{g}", a))
    tensors.append(("output_norm.weight", w["model.norm.weight"]))
    if not s["tied"]:
        tensors.append(("output.weight", w["lm_head.weight"]))

    wr = gguf.GGUFWriter(path, arch)
    wr.add_name("tiny-" + (variant if isinstance(variant, str) else "custom"))
    wr.add_block_count(s["n_layers"])
    wr.add_context_length(s["max_pos"])
    wr.add_embedding_length(s["dim"])
    wr.add_feed_forward_length(s["hidden_dim"])
    wr.add_head_count(s["n_heads"])
    wr.add_head_count_kv(s["n_kv_heads"])
    if s["head_dim"] * s["n_heads"] != s["dim"]:
        wr.add_key_length(s["head_dim"])
        wr.add_value_length(s["head_dim"])
    wr.add_rope_dimension_count(s["head_dim"])
    wr.add_rope_freq_base(s["theta"])
    wr.add_layer_norm_rms_eps(s["eps"])
    wr.add_vocab_size(s["vocab"])
    if tokenizer and tok_model == "llama":
        toks, scores, ttypes = spm_vocab(s["vocab"])
        wr.add_tokenizer_model("llama")
        wr.add_token_list(toks)
        wr.add_token_scores(scores)
        wr.add_token_types(ttypes)
        wr.add_bos_token_id(1)
        wr.add_eos_token_id(2)
        wr.add_unk_token_id(0)
        wr.add_chat_template("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    elif tokenizer:
        toks, merges = tiny_bpe()
        toks = toks + [f"[PAD{i}]" for i in range(len(toks), s["vocab"])]
        ttypes = [3] * len(SPECIALS) + [1] * (TOKENIZER_TOKENS - len(SPECIALS)) + \
                 [5] * (s["vocab"] - TOKENIZER_TOKENS)
        wr.add_tokenizer_model("gpt2")
        if pre is not None:
            wr.add_tokenizer_pre(pre)
        wr.add_token_list(toks)
        wr.add_token_types(ttypes)
        wr.add_token_merges([f"{a} {b}" for a, b in merges])
        wr.add_bos_token_id(1)
        wr.add_eos_token_id(2)
        wr.add_add_bos_token(False)
        wr.add_chat_template(CHATML_TEMPLATE)
    for k, (val, vt) in (extra_kv or {}).items():
        wr.add_key_value(k, val, vt)
    for name, a in tensors:
        if name in drop:
            continue
        if transform:
            a = transform(name, a)
        kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        qt = QT.F32
        if types == "mixed" and a.ndim == 2:
            qt = mixed[kind]
        qt = (type_overrides or {}).get(name, qt)
        if qt == QT.F32:
            wr.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
        elif qt == QT.F16:
            wr.add_tensor(name, a.astype(np.float16))
        else:
            wr.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(a, np.float32), qt),
                          raw_dtype=qt)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


def spm_vocab(n):
    """A SentencePiece-style vocabulary of n pieces: <unk>, <s>, </s>, <0x00>..<0xFF>, then
    "\u2581"-prefixed pieces with decreasing scores. Returns (pieces, scores, types)."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    letters = "etaoinshrdlucmfwyp"
    k = 0
    while len(pieces) < n:
        extra = "é" if k % 5 == 0 else ""   # some multi-byte UTF-8
        pieces.append("\u2581" + letters[k % 18] + letters[(k // 18) % 18] + extra)
        types.append(1)
        k += 1
    scores = [0.0] * 259 + [-1.0 - i for i in range(n - 259)]
    return pieces[:n], scores[:n], types[:n]


def write_legacy(path, variant):
    """llama2.c's version-0 checkpoint (leankv.h): 7 int32, then fp32 weights; q/k permuted to
    interleaved pairs (see the module docstring). Only for llama2.c-compatible variants."""
    s = spec(variant)
    if not legacy_ok(variant):
        raise ValueError(f"{variant}: not expressible as a legacy checkpoint")
    w = make_weights(variant)
    L = s["n_layers"]
    hd = s["head_dim"]

    def per_layer(h, fn=None):
        return [fn(w[f"model.layers.{i}.{h}"]) if fn else w[f"model.layers.{i}.{h}"]
                for i in range(L)]

    parts = [w["model.embed_tokens.weight"]]
    parts += per_layer("input_layernorm.weight")
    parts += per_layer("self_attn.q_proj.weight", lambda a: permute_interleaved(a, s["n_heads"]))
    parts += per_layer("self_attn.k_proj.weight", lambda a: permute_interleaved(a, s["n_kv_heads"]))
    parts += per_layer("self_attn.v_proj.weight")
    parts += per_layer("self_attn.o_proj.weight")
    parts += per_layer("post_attention_layernorm.weight")
    parts += per_layer("mlp.gate_proj.weight")
    parts += per_layer("mlp.down_proj.weight")
    parts += per_layer("mlp.up_proj.weight")
    parts.append(w["model.norm.weight"])
    ang = np.outer(np.arange(s["max_pos"]), 10000.0 ** (-np.arange(0, hd, 2) / hd))
    parts += [np.cos(ang), np.sin(ang)]
    if not s["tied"]:
        parts.append(w["lm_head.weight"])
    vocab = s["vocab"] if s["tied"] else -s["vocab"]
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", s["dim"], s["hidden_dim"], L, s["n_heads"], s["n_kv_heads"],
                            vocab, s["max_pos"]))
        for a in parts:
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
    return path


def write_legacy_tokenizer(path, n_tokens):
    """llama2.c tokenizer.bin: 0 <unk>, 1 <s>, 2 </s>, 3..258 the byte tokens <0xNN>, then
    short pieces. int32 max_token_length, then per token float32 score, int32 len, bytes."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % i for i in range(256)]
    letters = "etaoinshrdlucmfwyp"
    k = 0
    while len(pieces) < n_tokens:
        a, b = letters[k % len(letters)], letters[(k // len(letters)) % len(letters)]
        pieces.append(("\u2581" + a + b).encode())
        k += 1
    pieces = pieces[:n_tokens]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p) for p in pieces)))
        for i, p in enumerate(pieces):
            score = 0.0 if i < 259 else -float(i)
            f.write(struct.pack("<fi", score, len(p)))
            f.write(p)
    return path


# ---- shared test helpers ------------------------------------------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT = os.path.join(ROOT, "export.py")
SMOL_GGUF = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOL_BIN = os.path.join(ROOT, "models", "smollm2-135m-instruct.bin")


def run_export(*args, check=True):
    """Runs export.py in a subprocess; returns the CompletedProcess."""
    r = subprocess.run([sys.executable, EXPORT, *map(str, args)], capture_output=True,
                       text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"export.py {' '.join(map(str, args))} failed:\n{r.stderr}")
    return r


def build_model(folder, variant):
    """A tiny model of `variant` written as an HF folder under folder/hf and exported to
    folder/m.bin; returns the model.bin path (the fixtures of several test files)."""
    write_hf(folder / "hf", variant)
    run_export(folder / "hf", folder / "m.bin")
    return folder / "m.bin"


def read_model_bin(path):
    """Parses model.bin from the byte offsets of leankv.h (not from export.py's code). Returns
    dict(header=..., tensors={name: ndarray float32 / float16}, entries={name: entry},
    tokenizer=None or dict). Checks the structural rules as it goes (AssertionError)."""
    data = open(path, "rb").read()

    def i32(off):
        return struct.unpack_from("<i", data, off)[0]

    def u64(off):
        return struct.unpack_from("<Q", data, off)[0]

    def f32(off):
        return struct.unpack_from("<f", data, off)[0]

    assert struct.unpack_from("<I", data, 0)[0] == 0x4D564B4C and data[:4] == b"LKVM"
    names = ["version", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
             "vocab_size", "seq_len"]
    h = {n: i32(4 + 4 * k) for k, n in enumerate(names)}
    h["rope_theta"] = f32(40)
    h["rope_style"] = i32(44)
    h["norm_eps"] = f32(48)
    for k, n in enumerate(["tied_classifier", "qkv_bias", "weight_dtype", "bos_id", "eos_id",
                           "add_bos", "chat_template", "n_stop"]):
        h[n] = i32(52 + 4 * k)
    h["stop_ids"] = [i32(84 + 4 * k) for k in range(8)]
    h["n_tensors"], h["reserved0"], h["reserved1"] = i32(116), i32(120), i32(124)
    h["tensor_table_offset"], h["tokenizer_offset"] = u64(128), u64(136)
    h["tokenizer_bytes"], h["file_bytes"] = u64(144), u64(152)
    assert h["version"] == 1
    assert h["reserved0"] == 0 and h["reserved1"] == 0
    assert data[160:256] == bytes(96), "header padding is not zero"
    assert h["file_bytes"] == len(data), (h["file_bytes"], len(data))
    assert 0 <= h["n_stop"] <= 8 and all(s == 0 for s in h["stop_ids"][h["n_stop"]:])
    out = {"header": h, "tensors": {}, "entries": {}, "tokenizer": None}
    spans = [(0, 256)]
    t0 = h["tensor_table_offset"]
    spans.append((t0, t0 + 96 * h["n_tensors"]))
    for k in range(h["n_tensors"]):
        e = t0 + 96 * k
        raw = data[e:e + 64]
        assert b"\0" in raw, "tensor name not NUL-terminated"
        name = raw.split(b"\0")[0].decode()
        dt, nd, s0, s1 = i32(e + 64), i32(e + 68), i32(e + 72), i32(e + 76)
        off, nb = u64(e + 80), u64(e + 88)
        assert dt in (0, 1, 2) and nd in (1, 2)
        assert nd == 2 or s1 == 1, f"{name}: unused dim must be 1"
        assert off % 64 == 0, f"{name}: offset {off} not 64-byte aligned"
        assert nb == s0 * s1 * {0: 4, 1: 2, 2: 1}[dt], name
        assert off + nb <= len(data), name
        shape = (s0, s1) if nd == 2 else (s0,)
        arr = np.frombuffer(data, dtype={0: "<f4", 1: "<f2", 2: "u1"}[dt], count=s0 * s1,
                            offset=off).reshape(shape)
        assert name not in out["tensors"], f"duplicate tensor {name}"
        out["tensors"][name] = arr
        out["entries"][name] = dict(dtype=dt, ndim=nd, shape=shape, offset=off, nbytes=nb)
        spans.append((off, off + nb))
    if h["tokenizer_bytes"]:
        o = h["tokenizer_offset"]
        end = o + h["tokenizer_bytes"]
        spans.append((o, end))
        kind, pre, vs, nm, mx = struct.unpack_from("<5i", data, o)
        p = o + 20
        recs = []
        for _ in range(vs):
            tt, sc, n = struct.unpack_from("<ifi", data, p)
            recs.append((tt, sc, data[p + 12:p + 12 + n]))
            p += 12 + n
        merges = np.frombuffer(data, dtype="<i4", count=3 * nm, offset=p).reshape(nm, 3)
        p += 12 * nm
        assert p == end, f"tokenizer section: parsed {p - o} bytes of {h['tokenizer_bytes']}"
        assert mx == max(len(r[2]) for r in recs)
        out["tokenizer"] = dict(kind=kind, pretokenizer=pre, vocab_size=vs, n_merges=nm,
                                max_token_bytes=mx, records=recs, merges=merges)
    spans.sort()
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a1 <= b0, f"regions overlap: [{a0},{a1}) and [{b0},{b1})"
    return out


_smol_cache = {}


def smollm2_bin():
    """models/smollm2-135m-instruct.bin when it is an fp32 export newer than export.py and the
    GGUF; else the GGUF exported (fp32) once per process into a temporary folder. None
    without the GGUF."""
    if not os.path.exists(SMOL_GGUF):
        return None
    if "bin" not in _smol_cache:
        fresh = os.path.exists(SMOL_BIN) and os.path.getmtime(SMOL_BIN) > max(
            os.path.getmtime(EXPORT), os.path.getmtime(SMOL_GGUF))
        if fresh:  # an fp32 export is what the tests compare against
            with open(SMOL_BIN, "rb") as f:
                head = f.read(64)
            fresh = len(head) == 64 and head[:4] == b"LKVM" and \
                struct.unpack_from("<i", head, 60)[0] == 0
        if fresh:
            _smol_cache["bin"] = SMOL_BIN
        else:
            d = tempfile.mkdtemp(prefix="leankv-smol-")
            import atexit
            import shutil
            atexit.register(shutil.rmtree, d, True)
            path = os.path.join(d, "smollm2-135m-instruct.bin")
            run_export(SMOL_GGUF, path)
            _smol_cache["bin"] = path
    return _smol_cache["bin"]
