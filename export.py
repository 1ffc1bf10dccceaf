#!/usr/bin/env python3
"""export.py: converts a Llama-family model into leankv's model.bin (format: leankv.h).

    python export.py INPUT OUTPUT.bin [--dtype fp32|fp16] [--no-tokenizer]

INPUT is either
  * a GGUF file of the "llama" architecture. Tensors of type F32, F16, BF16, Q8_0, Q4_0 and
    Q4_1 are dequantized with the gguf package. llama.cpp's converter has already permuted the
    q/k rows of every head so that rotary pairs are adjacent, so the file gets rope_style
    LKV_ROPE_INTERLEAVED and the rows are copied as they are.
  * a Hugging Face checkpoint folder (config.json + *.safetensors, optionally tokenizer.json,
    tokenizer_config.json, generation_config.json) of LlamaForCausalLM, MistralForCausalLM or
    Qwen2ForCausalLM. The q/k rows keep the HF layout (rotary pairs (i, i + head_dim/2)), so the
    file gets rope_style LKV_ROPE_HALF. The safetensors files are parsed here directly (header
    JSON + raw little-endian data) so that BF16 checkpoints work without torch and truncation is
    detected before any data is read.

Norms and biases are always written as fp32; matrices and the embedding in --dtype.

Tokenizer section (leankv.h):
  * GGUF "gpt2" (byte-level BPE) -> LKV_TOK_BPE. Normal tokens are stored as raw bytes (GPT-2's
    bytes-to-unicode mapping undone); control and user-defined tokens as their UTF-8 text.
    Merges "left right" become (left_id, right_id, id of left+right). tokenizer.ggml.pre picks
    the pretokenizer: smollm, gpt2/default (also used when the key is absent), llama-bpe, qwen2.
  * GGUF "llama" (SentencePiece) -> LKV_TOK_SPM, pieces as in the vocabulary, with scores.
  * HF tokenizer.json, model BPE with a ByteLevel pre-tokenizer or decoder -> LKV_TOK_BPE. The
    pretokenizer is guessed from the pre_tokenizer config:
        Digits(individual_digits) + ByteLevel                     -> SMOLLM
        Split regex containing \\p{N}{1,3}  (Llama 3 pattern)      -> LLAMA3
        Split regex containing \\p{N} without {1,3}  (Qwen2)       -> QWEN2
        ByteLevel(use_regex=true) alone                            -> GPT2
    anything else is an error (use --no-tokenizer to export the weights anyway). Ids of the
    model's vocabulary that the tokenizer does not define get type UNUSED and no bytes.
    Without tokenizer.json the section is empty (tokenizer_bytes = 0).

Any problem with the input ends with one line "export.py: error: ..." on stderr and exit code 1.
The output is written to OUTPUT.tmp and renamed at the end, so a failed export leaves nothing.
"""

import argparse
import json
import math
import os
import re
import struct
import sys

import numpy as np

# ---- constants mirrored from leankv.h -------------------------------------------------------
LKV_MAGIC = 0x4D564B4C
LKV_VERSION = 1
LKV_HEADER_BYTES = 256
LKV_TENSOR_NAME_MAX = 64
LKV_MAX_STOP = 8
LKV_DTYPE_F32, LKV_DTYPE_F16, LKV_DTYPE_U8 = 0, 1, 2
LKV_ROPE_INTERLEAVED, LKV_ROPE_HALF = 0, 1
LKV_CHAT_NONE, LKV_CHAT_CHATML, LKV_CHAT_LLAMA2, LKV_CHAT_LLAMA3 = 0, 1, 2, 3
LKV_TOK_NONE, LKV_TOK_BPE, LKV_TOK_SPM = 0, 1, 2
LKV_PRETOK_NONE, LKV_PRETOK_GPT2, LKV_PRETOK_SMOLLM, LKV_PRETOK_LLAMA3, LKV_PRETOK_QWEN2 = range(5)
LKV_TT_NORMAL, LKV_TT_UNKNOWN, LKV_TT_CONTROL, LKV_TT_USER, LKV_TT_UNUSED, LKV_TT_BYTE = range(1, 7)

# header: every field 4 bytes up to @128, then four uint64; 160 bytes used of 256
HEADER_FMT = "<I9ifif8i8i3i4Q"
ENTRY_FMT = "<64sii2iQQ"
ALIGN = 64
assert struct.calcsize(HEADER_FMT) == 160
assert struct.calcsize(ENTRY_FMT) == 96

PRETOK_NAMES = {LKV_PRETOK_NONE: "none", LKV_PRETOK_GPT2: "gpt2", LKV_PRETOK_SMOLLM: "smollm",
                LKV_PRETOK_LLAMA3: "llama3", LKV_PRETOK_QWEN2: "qwen2"}
CHAT_NAMES = {LKV_CHAT_NONE: "none", LKV_CHAT_CHATML: "chatml", LKV_CHAT_LLAMA2: "llama2",
              LKV_CHAT_LLAMA3: "llama3"}
STOP_TOKEN_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")


class ExportError(Exception):
    pass


def fail(msg):
    raise ExportError(msg)


# ---- shared helpers -------------------------------------------------------------------------

def gpt2_unicode_to_byte():
    """Inverse of GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the other
    bytes (in increasing order) to U+0100, U+0101, ..."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) +
                 list(range(0xAE, 0xFF + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def chat_kind(template):
    if not template:
        return LKV_CHAT_NONE
    if "<|im_start|>" in template:
        return LKV_CHAT_CHATML
    if "<|start_header_id|>" in template:
        return LKV_CHAT_LLAMA3
    if "[INST]" in template:
        return LKV_CHAT_LLAMA2
    return LKV_CHAT_NONE


def default_system(template):
    """The system message a chat template adds when a conversation brings none, if the template
    spells it out (SmolLM2's and Qwen2's ChatML templates do); else None."""
    if not template:
        return None
    m = re.search(r"<\|im_start\|>system\n([^'\"{}<]+)<\|im_end\|>", template)
    return m.group(1) if m else None


def layer_tensor_names(n_layers, qkv_bias, tied):
    """leankv tensor names in file order."""
    names = ["tok_embeddings"]
    for L in range(n_layers):
        p = f"layers.{L}."
        names += [p + "attn_norm", p + "wq", p + "wk", p + "wv"]
        if qkv_bias:
            names += [p + "bq", p + "bk", p + "bv"]
        names += [p + "wo", p + "ffn_norm", p + "w1", p + "w2", p + "w3"]
    names.append("norm")
    if not tied:
        names.append("output")
    return names


def expected_shape(name, hp):
    d, hd = hp["dim"], hp["head_dim"]
    q, kv, h, v = hp["n_heads"] * hd, hp["n_kv_heads"] * hd, hp["hidden_dim"], hp["vocab_size"]
    short = name.split(".")[-1]
    return {
        "tok_embeddings": (v, d), "output": (v, d), "norm": (d,),
        "attn_norm": (d,), "ffn_norm": (d,),
        "wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q),
        "bq": (q,), "bk": (kv,), "bv": (kv,),
        "w1": (h, d), "w2": (d, h), "w3": (h, d),
    }[short]


def is_fp32_always(name):
    return name.split(".")[-1] in ("attn_norm", "ffn_norm", "norm", "bq", "bk", "bv")


class Source:
    """What a reader hands to the writer."""

    def __init__(self):
        self.kind = ""            # "gguf" / "hf"
        self.arch = ""
        self.hp = {}              # hyperparameters (names of the header fields)
        self.tensors = {}         # leankv name -> (source name, shape, loader() -> float32 array)
        self.tok_section = b""
        self.tok_desc = "none"
        self.bos_id = -1
        self.eos_id = -1
        self.add_bos = 0
        self.chat = LKV_CHAT_NONE
        self.system = None        # the template's default system message (str) or None
        self.stop_ids = []
        self.notes = []


def finish_specials(src, vocab_lookup, extra_eos=()):
    """stop ids: eos, extra eos ids, then the ids of the usual end-of-turn tokens if present."""
    stops = []
    for i in [src.eos_id, *extra_eos]:
        if i is not None and i >= 0 and i not in stops:
            stops.append(int(i))
    for text in STOP_TOKEN_TEXTS:
        i = vocab_lookup(text)
        if i is not None and i >= 0 and i not in stops:
            stops.append(int(i))
    src.stop_ids = stops[:LKV_MAX_STOP]


def pack_tokenizer(kind, pretok, records, merges):
    """records: list of (type, score, bytes); merges: list of (left, right, result)."""
    max_len = max((len(b) for _, _, b in records), default=0)
    out = [struct.pack("<5i", kind, pretok, len(records), len(merges), max_len)]
    for tt, score, b in records:
        out.append(struct.pack("<ifi", int(tt), float(score), len(b)))
        out.append(b)
    if merges:
        out.append(np.asarray(merges, dtype="<i4").tobytes())
    return b"".join(out)


# ---- GGUF -----------------------------------------------------------------------------------

GGUF_LAYER_MAP = {
    "attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk",
    "attn_v.weight": "wv", "attn_output.weight": "wo", "attn_q.bias": "bq",
    "attn_k.bias": "bk", "attn_v.bias": "bv", "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "w1", "ffn_down.weight": "w2", "ffn_up.weight": "w3",
}


def gguf_name_to_lkv(name):
    if name == "token_embd.weight":
        return "tok_embeddings"
    if name == "output_norm.weight":
        return "norm"
    if name == "output.weight":
        return "output"
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in GGUF_LAYER_MAP:
        return f"layers.{int(parts[1])}.{GGUF_LAYER_MAP[parts[2]]}"
    return None


def lkv_to_gguf_name(lkv):
    fixed = {"tok_embeddings": "token_embd.weight", "norm": "output_norm.weight",
             "output": "output.weight"}
    if lkv in fixed:
        return fixed[lkv]
    _, L, short = lkv.split(".")
    return f"blk.{L}." + next(k for k, v in GGUF_LAYER_MAP.items() if v == short)


def read_gguf(path, use_tokenizer=True):
    try:
        import gguf
        from gguf import GGMLQuantizationType as QT
    except ImportError as e:
        fail(f"the gguf package is needed to read {path}: {e}")
    size = os.path.getsize(path)
    try:
        r = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on bad files
        fail(f"{path}: truncated or corrupt GGUF file ({size} bytes); the gguf reader says: "
             f"{type(e).__name__}: {e}")

    def field(key, default=None, required=False):
        f = r.fields.get(key)
        if f is None:
            if required:
                fail(f"{path}: GGUF key {key} is missing")
            return default
        try:
            return f.contents()
        except Exception as e:
            fail(f"{path}: GGUF key {key} cannot be read: {e}")

    src = Source()
    src.kind = "gguf"
    arch = field("general.architecture", required=True)
    if arch != "llama":
        fail(f"{path}: GGUF architecture '{arch}' is not supported (only 'llama')")
    src.arch = arch

    def ikey(key, default=None, required=False):
        v = field(key, default, required)
        if isinstance(v, list):
            fail(f"{path}: GGUF key {key} is a per-layer array; not supported")
        if v is None:
            return None
        return int(v)

    hp = {}
    hp["n_layers"] = ikey("llama.block_count", required=True)
    hp["dim"] = ikey("llama.embedding_length", required=True)
    hp["hidden_dim"] = ikey("llama.feed_forward_length", required=True)
    hp["n_heads"] = ikey("llama.attention.head_count", required=True)
    hp["n_kv_heads"] = ikey("llama.attention.head_count_kv", hp["n_heads"])
    hp["seq_len"] = ikey("llama.context_length", required=True)
    hp["rope_theta"] = float(field("llama.rope.freq_base", 10000.0))
    hp["norm_eps"] = float(field("llama.attention.layer_norm_rms_epsilon", 1e-5))
    if hp["n_heads"] <= 0:
        fail(f"{path}: head_count {hp['n_heads']}")
    if hp["dim"] % hp["n_heads"] and field("llama.attention.key_length") is None:
        fail(f"{path}: embedding_length {hp['dim']} is not a multiple of head_count {hp['n_heads']}")
    hp["head_dim"] = ikey("llama.attention.key_length", hp["dim"] // hp["n_heads"])
    vlen = ikey("llama.attention.value_length", hp["head_dim"])
    if vlen != hp["head_dim"]:
        fail(f"{path}: key_length {hp['head_dim']} != value_length {vlen}; not supported")
    rdim = ikey("llama.rope.dimension_count", hp["head_dim"])
    if rdim != hp["head_dim"]:
        fail(f"{path}: rope.dimension_count {rdim} != head_dim {hp['head_dim']} "
             "(partial rotary embedding); not supported")
    scaling = field("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        fail(f"{path}: rope scaling '{scaling}' is not supported")
    if (ikey("llama.expert_count", 0) or 0) > 0:
        fail(f"{path}: mixture-of-experts llama models are not supported")
    if hp["n_kv_heads"] <= 0 or hp["n_heads"] % hp["n_kv_heads"]:
        fail(f"{path}: head_count {hp['n_heads']} is not a multiple of head_count_kv "
             f"{hp['n_kv_heads']}")
    if hp["head_dim"] % 2:
        fail(f"{path}: head_dim {hp['head_dim']} is odd")
    hp["rope_style"] = LKV_ROPE_INTERLEAVED

    tokens = field("tokenizer.ggml.tokens")
    vocab = ikey("llama.vocab_size")
    if vocab is None:
        if tokens is not None:
            vocab = len(tokens)
        else:
            emb = [t for t in r.tensors if t.name == "token_embd.weight"]
            if not emb:
                fail(f"{path}: tensor token_embd.weight is missing")
            vocab = int(emb[0].shape[1]) if len(emb[0].shape) == 2 else 0
    hp["vocab_size"] = vocab

    # --- tensors
    supported = {QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1}
    by_lkv = {}
    for t in r.tensors:
        lkv = gguf_name_to_lkv(t.name)
        if lkv is None:
            if t.name == "rope_freqs.weight":
                fail(f"{path}: tensor rope_freqs.weight (rope frequency scaling, Llama 3.1 "
                     "style) is not supported")
            fail(f"{path}: unexpected tensor {t.name}")
        if lkv.startswith("layers.") and int(lkv.split(".")[1]) >= hp["n_layers"]:
            fail(f"{path}: tensor {t.name} is beyond block_count {hp['n_layers']}")
        if t.tensor_type not in supported:
            fail(f"{path}: tensor {t.name} has type {t.tensor_type.name}; supported types are "
                 "F32, F16, BF16, Q8_0, Q4_0, Q4_1")
        by_lkv[lkv] = t
    hp["qkv_bias"] = 1 if "layers.0.bq" in by_lkv else 0
    hp["tied_classifier"] = 0 if "output" in by_lkv else 1

    block_sizes = gguf.GGML_QUANT_SIZES
    for name in layer_tensor_names(hp["n_layers"], hp["qkv_bias"], hp["tied_classifier"]):
        t = by_lkv.pop(name, None)
        if t is None:
            fail(f"{path}: tensor {lkv_to_gguf_name(name)} is missing")
        shape = tuple(reversed([int(s) for s in t.shape]))
        want = expected_shape(name, hp)
        if shape != want:
            fail(f"{path}: tensor {t.name} has shape {list(shape)}, expected {list(want)}")
        bs, ts = block_sizes[t.tensor_type]
        nbytes = int(np.prod(shape)) // bs * ts
        if t.data_offset + nbytes > size or t.data.nbytes != nbytes:
            fail(f"{path}: tensor {t.name} extends beyond the end of the file (truncated?)")

        def loader(t=t, want=want):
            a = gguf.quants.dequantize(t.data, t.tensor_type)
            return np.asarray(a, dtype=np.float32).reshape(want)
        src.tensors[name] = (t.name, want, loader)
    if by_lkv:
        fail(f"{path}: unexpected tensor {by_lkv[next(iter(by_lkv))].name}")
    src.hp = hp

    # --- tokenizer
    model = field("tokenizer.ggml.model") if use_tokenizer else None
    src.bos_id = ikey("tokenizer.ggml.bos_token_id", -1)
    src.eos_id = ikey("tokenizer.ggml.eos_token_id", -1)
    src.chat = chat_kind(field("tokenizer.chat_template"))
    src.system = default_system(field("tokenizer.chat_template"))
    lookup = {}
    if tokens is not None:
        for i, s in enumerate(tokens):
            lookup.setdefault(s, i)
    if model in (None, "none", "no_vocab"):
        src.add_bos = 0
        src.tok_desc = "none"
    elif model in ("gpt2", "llama"):
        if tokens is None:
            fail(f"{path}: tokenizer.ggml.tokens is missing")
        if len(tokens) != vocab:
            fail(f"{path}: the tokenizer has {len(tokens)} tokens but vocab_size is {vocab}")
        types = field("tokenizer.ggml.token_type")
        if types is None:
            types = [LKV_TT_NORMAL] * len(tokens)
        scores = field("tokenizer.ggml.scores")
        if scores is None:
            scores = [0.0] * len(tokens)
        if len(types) != len(tokens) or len(scores) != len(tokens):
            fail(f"{path}: token_type/scores arrays do not match the number of tokens")
        if model == "gpt2":
            pre = field("tokenizer.ggml.pre")
            pre_map = {"smollm": LKV_PRETOK_SMOLLM, "gpt2": LKV_PRETOK_GPT2,
                       "default": LKV_PRETOK_GPT2, "llama-bpe": LKV_PRETOK_LLAMA3,
                       "qwen2": LKV_PRETOK_QWEN2}
            if pre is None:
                pretok = LKV_PRETOK_GPT2
                src.notes.append("no tokenizer.ggml.pre: using gpt2")
            elif pre in pre_map:
                pretok = pre_map[pre]
            else:
                fail(f"{path}: pre-tokenizer tokenizer.ggml.pre='{pre}' is not supported "
                     "(supported: smollm, gpt2, default, llama-bpe, qwen2)")
            u2b = gpt2_unicode_to_byte()
            records = []
            for i, (s, tt, sc) in enumerate(zip(tokens, types, scores)):
                if tt in (LKV_TT_CONTROL, LKV_TT_USER):
                    b = s.encode("utf-8")
                else:
                    try:
                        b = bytes(u2b[c] for c in s)
                    except KeyError as e:
                        fail(f"{path}: token {i} {s!r} has a character {e.args[0]!r} outside "
                             "GPT-2's byte alphabet")
                records.append((tt, sc, b))
            merges_s = field("tokenizer.ggml.merges")
            if merges_s is None:
                fail(f"{path}: tokenizer.ggml.merges is missing")
            merges = []
            for k, m in enumerate(merges_s):
                parts = m.split(" ")
                if len(parts) != 2:
                    fail(f"{path}: merge {k} {m!r} is not of the form 'left right'")
                ids = [lookup.get(parts[0]), lookup.get(parts[1]), lookup.get(parts[0] + parts[1])]
                if None in ids:
                    fail(f"{path}: merge {k} {m!r} refers to a token missing from the vocabulary")
                merges.append(ids)
            src.tok_section = pack_tokenizer(LKV_TOK_BPE, pretok, records, merges)
            src.tok_desc = f"bpe/{PRETOK_NAMES[pretok]} {len(merges)} merges"
            default_bos = False
        else:
            records = [(tt, sc, s.encode("utf-8")) for s, tt, sc in zip(tokens, types, scores)]
            src.tok_section = pack_tokenizer(LKV_TOK_SPM, LKV_PRETOK_NONE, records, [])
            src.tok_desc = "spm"
            default_bos = True
        ab = field("tokenizer.ggml.add_bos_token")
        src.add_bos = int(bool(default_bos if ab is None else ab) and src.bos_id >= 0)
    else:
        fail(f"{path}: tokenizer model '{model}' is not supported (gpt2 or llama)")
    eot = ikey("tokenizer.ggml.eot_token_id")
    finish_specials(src, lambda s: lookup.get(s), [eot] if eot is not None else [])
    if hp["vocab_size"] <= 0:
        fail(f"{path}: vocab size {hp['vocab_size']}")
    return src


# ---- Hugging Face folder --------------------------------------------------------------------

ST_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2)}


def read_safetensors_index(path):
    """Parses one .safetensors header; returns {name: (path, dtype, shape, file offset, nbytes)}."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            fail(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            fail(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            fail(f"{path}: corrupt safetensors header: {e}")
    if not isinstance(header, dict):
        fail(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
              and isinstance(info.get("shape"), list) and isinstance(info.get("data_offsets"), list)
              and len(info["data_offsets"]) == 2)
        if ok:
            dt, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
            ints = all(type(x) is int for x in shape + [b, e])   # not bool, float or str
        if not ok or not ints:
            fail(f"{path}: corrupt safetensors entry for {name} (needs a dtype string, a shape "
                 f"of integers and two integer data_offsets): {json.dumps(info)[:120]}")
        if any(x < 0 for x in shape) or not 0 <= b <= e:
            fail(f"{path}: safetensors entry {name} has a negative dimension or data_offsets "
                 f"[{b}, {e}] out of order")
        if base + e > size:
            fail(f"{path}: truncated safetensors file (tensor {name} ends at byte {base + e}, "
                 f"the file has {size})")
        item = ST_DTYPES.get(dt, (None, 0))[1]
        if item and e - b != math.prod(shape) * item:
            fail(f"{path}: safetensors entry {name} has {e - b} bytes for shape {shape} {dt}")
        out[name] = (path, dt, tuple(shape), base + b, e - b)
    spans = sorted((v[3], v[3] + v[4], k) for k, v in out.items() if v[4] > 0)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            fail(f"{path}: tensors {n0} and {n1} share bytes of the file")
    return out


def load_safetensor(entry, name):
    path, dt, shape, off, nbytes = entry
    if dt not in ST_DTYPES:
        fail(f"{path}: tensor {name} has dtype {dt}; supported are F32, F16, BF16")
    npdt, item = ST_DTYPES[dt]
    a = np.fromfile(path, dtype=npdt, count=nbytes // item, offset=off)
    if a.size * item != nbytes:
        fail(f"{path}: tensor {name} is truncated")
    if dt == "BF16":
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False).reshape(shape)


def load_json(path, required=False):
    if not os.path.exists(path):
        if required:
            fail(f"{path} is missing")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"{path}: cannot parse: {e}")


HF_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo", "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv",
    "post_attention_layernorm.weight": "ffn_norm", "mlp.gate_proj.weight": "w1",
    "mlp.down_proj.weight": "w2", "mlp.up_proj.weight": "w3",
}


def hf_name_to_lkv(name):
    if name == "model.embed_tokens.weight":
        return "tok_embeddings"
    if name == "model.norm.weight":
        return "norm"
    if name == "lm_head.weight":
        return "output"
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() \
            and parts[3] in HF_LAYER_MAP:
        return f"layers.{int(parts[2])}.{HF_LAYER_MAP[parts[3]]}"
    return None


def read_hf(folder, use_tokenizer=True):
    cfg = load_json(os.path.join(folder, "config.json"), required=True)
    if not isinstance(cfg, dict):
        fail(f"{folder}/config.json is not a JSON object")
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else cfg.get("model_type", "?")
    supported = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    if arch not in supported or len(archs) != 1:
        fail(f"{folder}: architecture {arch} is not supported ({', '.join(supported)})")
    src = Source()
    src.kind = "hf"
    src.arch = arch

    def get(key, default=None, required=False):
        v = cfg.get(key, default)
        if v is None and required:
            fail(f"{folder}/config.json: {key} is missing")
        return v

    hp = {}
    try:
        hp["dim"] = int(get("hidden_size", required=True))
        hp["hidden_dim"] = int(get("intermediate_size", required=True))
        hp["n_layers"] = int(get("num_hidden_layers", required=True))
        hp["n_heads"] = int(get("num_attention_heads", required=True))
        hp["n_kv_heads"] = int(get("num_key_value_heads") or hp["n_heads"])
        hp["vocab_size"] = int(get("vocab_size", required=True))
        hp["seq_len"] = int(get("max_position_embeddings", required=True))
        hp["rope_theta"] = float(get("rope_theta", 10000.0))
        hp["norm_eps"] = float(get("rms_norm_eps", 1e-6))
        hd = get("head_dim")
        if hd is None:
            if hp["dim"] % hp["n_heads"]:
                fail(f"{folder}: hidden_size is not a multiple of num_attention_heads")
            hd = hp["dim"] // hp["n_heads"]
        hp["head_dim"] = int(hd)
    except (TypeError, ValueError) as e:
        fail(f"{folder}/config.json: bad hyperparameter value: {e}")
    if hp["n_kv_heads"] <= 0 or hp["n_heads"] % hp["n_kv_heads"]:
        fail(f"{folder}: num_attention_heads is not a multiple of num_key_value_heads")
    if hp["head_dim"] % 2:
        fail(f"{folder}: head_dim {hp['head_dim']} is odd")
    act = get("hidden_act", "silu")
    if act != "silu":
        fail(f"{folder}: hidden_act '{act}' is not supported (silu)")
    rp = get("rope_parameters")  # newer transformers: theta and scaling live here
    if isinstance(rp, dict):
        if "rope_theta" in rp:
            hp["rope_theta"] = float(rp["rope_theta"])
        if rp.get("rope_type", "default") != "default":
            fail(f"{folder}: rope_parameters {json.dumps(rp)} is not supported (default rope only)")
    rs = get("rope_scaling")
    if rs is not None:
        rtype = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else rs
        if rtype != "default":
            fail(f"{folder}: rope_scaling {json.dumps(rs)} is not supported (only null)")
    prf = get("partial_rotary_factor", 1.0)
    if prf not in (None, 1, 1.0):
        fail(f"{folder}: partial_rotary_factor {prf} is not supported")
    if get("mlp_bias", False):
        fail(f"{folder}: mlp_bias=true is not supported")
    if arch == "Qwen2ForCausalLM":
        hp["qkv_bias"] = 1
        if get("use_sliding_window", False):
            sw, mwl = get("sliding_window"), get("max_window_layers", hp["n_layers"])
            if sw and mwl is not None and mwl < hp["n_layers"] and sw < hp["seq_len"]:
                src.notes.append(f"sliding window {sw}: seq_len limited to it")
                hp["seq_len"] = int(sw)
    else:
        if get("attention_bias", False):
            fail(f"{folder}: attention_bias=true (biases on q/k/v and o_proj) is not supported")
        hp["qkv_bias"] = 0
        sw = get("sliding_window")
        if sw and sw < hp["seq_len"]:
            src.notes.append(f"sliding window {sw}: seq_len limited to it")
            hp["seq_len"] = int(sw)
    hp["tied_classifier"] = 1 if get("tie_word_embeddings", False) else 0
    hp["rope_style"] = LKV_ROPE_HALF
    src.hp = hp

    # --- weights
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        fail(f"{folder}: no *.safetensors files")
    entries = {}
    for fn in files:
        for name, e in read_safetensors_index(os.path.join(folder, fn)).items():
            if name in entries:
                fail(f"{folder}: tensor {name} appears in two safetensors files")
            entries[name] = e
    by_lkv = {}
    for name, e in entries.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        lkv = hf_name_to_lkv(name)
        if lkv is None:
            if name.endswith("o_proj.bias"):
                fail(f"{folder}: tensor {name}: a bias on o_proj is not supported")
            fail(f"{folder}: unexpected tensor {name}")
        if lkv == "output" and hp["tied_classifier"]:
            continue  # tied: the classifier is the embedding
        if lkv.split(".")[-1] in ("bq", "bk", "bv") and not hp["qkv_bias"]:
            fail(f"{folder}: tensor {name}: q/k/v biases are only supported for Qwen2")
        by_lkv[lkv] = (name, e)
    for name in layer_tensor_names(hp["n_layers"], hp["qkv_bias"], hp["tied_classifier"]):
        if name not in by_lkv:
            hname = {"tok_embeddings": "model.embed_tokens.weight", "norm": "model.norm.weight",
                     "output": "lm_head.weight"}.get(name)
            if hname is None:
                L, short = name.split(".")[1], name.split(".")[2]
                hname = f"model.layers.{L}." + [k for k, v in HF_LAYER_MAP.items() if v == short][0]
            fail(f"{folder}: tensor {hname} is missing")
        hname, e = by_lkv.pop(name)
        want = expected_shape(name, hp)
        if e[2] != want:
            fail(f"{folder}: tensor {hname} has shape {list(e[2])}, expected {list(want)}")
        if e[1] not in ST_DTYPES:
            fail(f"{folder}: tensor {hname} has dtype {e[1]}; supported are F32, F16, BF16")
        src.tensors[name] = (hname, want, lambda e=e, hname=hname: load_safetensor(e, hname))
    if by_lkv:
        fail(f"{folder}: unexpected tensor {next(iter(by_lkv.values()))[0]}")

    # --- tokenizer
    read_hf_tokenizer(folder, cfg, src, use_tokenizer)
    return src


def _walk(node):
    """All dicts in a tokenizer.json component tree (Sequence types nest)."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def guess_pretokenizer(pre, path):
    nodes = list(_walk(pre))
    types = [n.get("type") for n in nodes]
    if "ByteLevel" not in types:
        fail(f"{path}: pre_tokenizer has no ByteLevel step; cannot map it to a leankv pretokenizer")
    regexes = [n["pattern"].get("Regex", "") for n in nodes
               if n.get("type") == "Split" and isinstance(n.get("pattern"), dict)]
    if any(n.get("type") == "Digits" and n.get("individual_digits") for n in nodes) and not regexes:
        return LKV_PRETOK_SMOLLM
    if regexes:
        rx = regexes[0]
        if "\\p{N}{1,3}" in rx:
            return LKV_PRETOK_LLAMA3
        if "\\p{N}" in rx:
            return LKV_PRETOK_QWEN2
        fail(f"{path}: unrecognized pre-tokenizer Split regex {rx!r}")
    bl = [n for n in nodes if n.get("type") == "ByteLevel"]
    if len(nodes) == 1 and bl[0].get("use_regex", True):
        return LKV_PRETOK_GPT2
    fail(f"{path}: unrecognized pre_tokenizer configuration {json.dumps(pre)[:200]}")


def read_hf_tokenizer(folder, cfg, src, use_tokenizer=True):
    tpath = os.path.join(folder, "tokenizer.json")
    tcfg = load_json(os.path.join(folder, "tokenizer_config.json")) or {}
    gcfg = load_json(os.path.join(folder, "generation_config.json")) or {}
    vocab_n = src.hp["vocab_size"]
    tok = load_json(tpath) if use_tokenizer else None
    lookup = {}
    if tok is not None:
        model = tok.get("model") or {}
        pre = tok.get("pre_tokenizer")
        byte_level = any(n.get("type") == "ByteLevel" for n in _walk([pre, tok.get("decoder")]))
        if model.get("type") != "BPE" or not byte_level:
            fail(f"{tpath}: only byte-level BPE tokenizers are supported "
                 f"(model {model.get('type')}); use --no-tokenizer to export without it")
        pretok = guess_pretokenizer(pre, tpath)
        u2b = gpt2_unicode_to_byte()
        records = [(LKV_TT_UNUSED, 0.0, b"")] * vocab_n
        records = list(records)
        vocab = model.get("vocab") or {}
        for s, i in vocab.items():
            if not 0 <= i < vocab_n:
                fail(f"{tpath}: token id {i} is outside the model's vocab_size {vocab_n}")
            try:
                b = bytes(u2b[c] for c in s)
            except KeyError:
                fail(f"{tpath}: token {i} {s!r} has a character outside GPT-2's byte alphabet")
            records[i] = (LKV_TT_NORMAL, 0.0, b)
            lookup.setdefault(s, i)
        for a in tok.get("added_tokens") or []:
            i, s = a.get("id"), a.get("content", "")
            if not isinstance(i, int) or not 0 <= i < vocab_n:
                fail(f"{tpath}: added token {s!r} has an id outside vocab_size {vocab_n}")
            records[i] = (LKV_TT_CONTROL if a.get("special") else LKV_TT_USER, 0.0,
                          s.encode("utf-8"))
            lookup[s] = i
        merges = []
        for k, m in enumerate(model.get("merges") or []):
            parts = m.split(" ") if isinstance(m, str) else list(m)
            if len(parts) != 2:
                fail(f"{tpath}: merge {k} {m!r} is not a pair")
            ids = [vocab.get(parts[0]), vocab.get(parts[1]), vocab.get(parts[0] + parts[1])]
            if None in ids:
                fail(f"{tpath}: merge {k} {m!r} refers to a token missing from the vocabulary")
            merges.append(ids)
        src.tok_section = pack_tokenizer(LKV_TOK_BPE, pretok, records, merges)
        src.tok_desc = f"bpe/{PRETOK_NAMES[pretok]} {len(merges)} merges"

    def tok_id(v):
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            return lookup.get(v)
        return None

    def first_int(v):
        if isinstance(v, list):
            return v[0] if v else None
        return v

    bos = tok_id(tcfg.get("bos_token"))
    if bos is None:
        bos = first_int(cfg.get("bos_token_id"))
    eos = tok_id(tcfg.get("eos_token"))
    if eos is None:
        eos = first_int(cfg.get("eos_token_id"))
    src.bos_id = int(bos) if isinstance(bos, int) else -1
    src.eos_id = int(eos) if isinstance(eos, int) else -1
    ab = tcfg.get("add_bos_token")
    if ab is None and tok is not None and src.bos_id >= 0:
        # TemplateProcessing whose single-sequence template starts with the bos token
        ab = False
        for n in _walk(tok.get("post_processor")):
            if n.get("type") == "TemplateProcessing":
                single = n.get("single") or []
                first = single[0] if single else {}
                sp = first.get("SpecialToken") if isinstance(first, dict) else None
                if sp and lookup.get(sp.get("id")) == src.bos_id:
                    ab = True
    src.add_bos = int(bool(ab) and src.bos_id >= 0)
    tmpl = tcfg.get("chat_template")
    if isinstance(tmpl, list):
        tmpl = next((t.get("template") for t in tmpl if t.get("name") == "default"), None)
    src.chat = chat_kind(tmpl if isinstance(tmpl, str) else None)
    src.system = default_system(tmpl if isinstance(tmpl, str) else None)
    extra = []
    for v in (cfg.get("eos_token_id"), gcfg.get("eos_token_id")):
        extra += v if isinstance(v, list) else ([v] if isinstance(v, int) else [])
    finish_specials(src, lambda s: lookup.get(s), [i for i in extra if isinstance(i, int)])


# ---- writer ---------------------------------------------------------------------------------

def align(x):
    return (x + ALIGN - 1) // ALIGN * ALIGN


def write_model(src, out_path, dtype):
    hp = src.hp
    wdt = LKV_DTYPE_F16 if dtype == "fp16" else LKV_DTYPE_F32
    names = layer_tensor_names(hp["n_layers"], hp["qkv_bias"], hp["tied_classifier"])
    system = src.system.encode("utf-8") if src.system else b""
    n = len(names) + (1 if system else 0)
    table_off = LKV_HEADER_BYTES
    tok_off = table_off + 96 * n
    tok_bytes = len(src.tok_section)
    off = align(tok_off + tok_bytes)
    entries = []
    for name in names:
        shape = src.tensors[name][1]
        dt = LKV_DTYPE_F32 if is_fp32_always(name) else wdt
        nbytes = int(np.prod(shape)) * (4 if dt == LKV_DTYPE_F32 else 2)
        entries.append((name, dt, shape, off, nbytes))
        off = align(off + nbytes)
    if system:   # a byte blob, not a weight
        entries.append(("chat.system", LKV_DTYPE_U8, (len(system),), off, len(system)))
    file_bytes = entries[-1][3] + entries[-1][4]
    if src.bos_id >= hp["vocab_size"] or src.eos_id >= hp["vocab_size"]:
        fail(f"bos/eos id ({src.bos_id}/{src.eos_id}) outside the vocabulary")
    stops = list(src.stop_ids) + [0] * (LKV_MAX_STOP - len(src.stop_ids))
    header = struct.pack(
        HEADER_FMT, LKV_MAGIC, LKV_VERSION, hp["dim"], hp["hidden_dim"], hp["n_layers"],
        hp["n_heads"], hp["n_kv_heads"], hp["head_dim"], hp["vocab_size"], hp["seq_len"],
        hp["rope_theta"], hp["rope_style"], hp["norm_eps"], hp["tied_classifier"],
        hp["qkv_bias"], wdt, src.bos_id, src.eos_id, src.add_bos, src.chat,
        len(src.stop_ids), *stops, n, 0, 0, table_off, tok_off if tok_bytes else 0, tok_bytes,
        file_bytes)
    header += b"\0" * (LKV_HEADER_BYTES - len(header))
    table = b""
    for name, dt, shape, o, nb in entries:
        nm = name.encode()
        if len(nm) >= LKV_TENSOR_NAME_MAX:
            fail(f"tensor name {name} too long")
        s = list(shape) + [1] * (2 - len(shape))
        table += struct.pack(ENTRY_FMT, nm, dt, len(shape), s[0], s[1], o, nb)

    tmp = out_path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(table)
            f.write(src.tok_section)
            for name, dt, shape, o, nb in entries:
                if dt == LKV_DTYPE_U8:
                    f.write(b"\0" * (o - f.tell()))
                    f.write(system)
                    continue
                sname, _, loader = src.tensors[name]
                a = loader()
                if a.shape != tuple(shape):
                    fail(f"tensor {sname} has shape {list(a.shape)}, expected {list(shape)}")
                if not np.isfinite(a).all():
                    fail(f"tensor {sname} contains NaN or Inf values")
                if dt == LKV_DTYPE_F16:
                    with np.errstate(over="ignore"):
                        h = a.astype("<f2")
                    if not np.isfinite(h).all():
                        fail(f"tensor {sname} has values beyond the fp16 range "
                             f"(max |x| = {np.abs(a).max():g}); use --dtype fp32")
                    data = h.tobytes()
                else:
                    data = a.astype("<f4", copy=False).tobytes()
                assert len(data) == nb
                f.write(b"\0" * (o - f.tell()))
                f.write(data)
            if f.tell() != file_bytes:
                fail("internal error: file size mismatch")
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return file_bytes


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="export.py",
        description="Convert a llama-architecture GGUF file or a Hugging Face Llama/Mistral/Qwen2 "
                    "checkpoint folder into leankv's model.bin.")
    ap.add_argument("input", help="a .gguf file or a Hugging Face checkpoint folder")
    ap.add_argument("output", help="the model.bin to write")
    ap.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                    help="storage type of the matrices and the embedding (default fp32)")
    ap.add_argument("--no-tokenizer", action="store_true",
                    help="write no tokenizer section (tokenizer_bytes = 0)")
    args = ap.parse_args(argv)
    try:
        if os.path.isdir(args.input):
            src = read_hf(args.input, not args.no_tokenizer)
        elif os.path.isfile(args.input):
            with open(args.input, "rb") as f:
                magic = f.read(4)
            if magic != b"GGUF":
                fail(f"{args.input}: neither a GGUF file nor a checkpoint folder")
            src = read_gguf(args.input, not args.no_tokenizer)
        else:
            fail(f"{args.input}: no such file or folder")
        size = write_model(src, args.output, args.dtype)
    except ExportError as e:
        print(f"export.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export.py: error: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # anything unforeseen still ends as one line, never a traceback
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        print(f"export.py: error: {msg}", file=sys.stderr)
        return 1
    hp = src.hp
    n_params = sum(int(np.prod(src.tensors[k][1])) for k in src.tensors)
    notes = ("; " + "; ".join(src.notes)) if src.notes else ""
    print(f"export.py: {args.output}: {src.kind}:{src.arch} dim={hp['dim']} "
          f"hidden={hp['hidden_dim']} layers={hp['n_layers']} heads={hp['n_heads']} "
          f"kv_heads={hp['n_kv_heads']} head_dim={hp['head_dim']} vocab={hp['vocab_size']} "
          f"seq_len={hp['seq_len']} theta={hp['rope_theta']:g} eps={hp['norm_eps']:g} "
          f"rope={'half' if hp['rope_style'] == LKV_ROPE_HALF else 'interleaved'} "
          f"tied={hp['tied_classifier']} qkv_bias={hp['qkv_bias']} dtype={args.dtype} "
          f"tokenizer={src.tok_desc} bos={src.bos_id} eos={src.eos_id} add_bos={src.add_bos} "
          f"stop={src.stop_ids} chat={CHAT_NAMES[src.chat]} params={n_params:,} "
          f"bytes={size:,}{notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
