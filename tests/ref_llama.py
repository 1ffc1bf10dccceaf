"""ref_llama.py: an independent numpy reference of the Llama forward pass, for testing leankv.

Written from the architecture, not from leankv or export.py, and reading the weights straight
from the source checkpoint:
  * a Hugging Face folder (config.json + *.safetensors) via safetensors.numpy; q/k rows are in
    HF order, so RoPE pairs channel i with i + head_dim/2 ("rotate_half");
  * a GGUF file: the container is parsed with gguf.GGUFReader, but the block formats
    (F32, F16, BF16, Q8_0, Q4_0, Q4_1) are decoded by this file's own code, written from the
    format description, so that a bug in gguf.quants.dequantize (which export.py uses) cannot
    hide itself. llama.cpp's converter stores q/k rows with the rotary pairs adjacent, so RoPE
    pairs channels (2i, 2i+1).

    h   = embedding[token]
    for each layer:
        x   = rmsnorm(h) * attn_norm
        q,k,v = Wq x (+bq), Wk x (+bk), Wv x (+bv); RoPE on q and k, angle pos * theta^(-2i/hd)
        K,V cache  <- fp16(k), fp16(v)          (see KV_CACHE_DTYPE)
        h  += Wo concat_heads(softmax(q K^T / sqrt(hd), causal) V)   (GQA: head h -> kv h/group)
        x   = rmsnorm(h) * ffn_norm
        h  += W2 (silu(W1 x) * (W3 x))
    logits = (tied ? embedding : output) rmsnorm(h) * norm

The arithmetic is float64 by default.
"""

import json
import os

import numpy as np

# leankv's KV cache holds K (after RoPE) and V as IEEE fp16, so the values attention reads have
# been rounded to fp16. The reference rounds K and V through np.float16 the same way before
# attention (queries are not rounded); without this, the reference would differ from leankv by
# the fp16 rounding error (~1e-3 relative) rather than by fp32 arithmetic noise.
KV_CACHE_DTYPE = np.float16


class RefModel:
    """Hyperparameters + weights. Matrices are [out, in]."""

    def __init__(self, cfg, emb, layers, norm, out):
        self.cfg = cfg          # dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim,
        self.emb = emb          # vocab_size, rope_theta, norm_eps, rope ("interleaved"|"half"),
        self.layers = layers    # tied
        self.norm = norm
        self.out = emb if out is None else out


# ---- loading: Hugging Face ----------------------------------------------------------------

def load_hf(folder, dtype=np.float64, round_matrices_fp16=False):
    """round_matrices_fp16: round matrices and the embedding through fp16 first, to compare with
    a model.bin exported with --dtype fp16 (norms and biases stay exact, as export.py does)."""
    from safetensors.numpy import load_file

    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    w = {}
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".safetensors"):
            w.update(load_file(os.path.join(folder, fn)))
    n_heads = c["num_attention_heads"]
    cfg = dict(
        dim=c["hidden_size"], hidden_dim=c["intermediate_size"],
        n_layers=c["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
        vocab_size=c["vocab_size"], rope_theta=float(c.get("rope_theta", 10000.0)),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope="half",
        tied=bool(c.get("tie_word_embeddings", False)))

    def mat(name):
        a = w[name].astype(np.float32)
        if round_matrices_fp16:
            a = a.astype(np.float16)
        return a.astype(dtype)

    def vec(name):
        return w[name].astype(dtype) if name in w else None

    layers = []
    for L in range(cfg["n_layers"]):
        p = f"model.layers.{L}."
        layers.append(dict(
            attn_norm=vec(p + "input_layernorm.weight"),
            wq=mat(p + "self_attn.q_proj.weight"), wk=mat(p + "self_attn.k_proj.weight"),
            wv=mat(p + "self_attn.v_proj.weight"), wo=mat(p + "self_attn.o_proj.weight"),
            bq=vec(p + "self_attn.q_proj.bias"), bk=vec(p + "self_attn.k_proj.bias"),
            bv=vec(p + "self_attn.v_proj.bias"),
            ffn_norm=vec(p + "post_attention_layernorm.weight"),
            w1=mat(p + "mlp.gate_proj.weight"), w2=mat(p + "mlp.down_proj.weight"),
            w3=mat(p + "mlp.up_proj.weight")))
    out = None if cfg["tied"] else mat("lm_head.weight")
    return RefModel(cfg, mat("model.embed_tokens.weight"), layers, vec("model.norm.weight"), out)


# ---- loading: GGUF, with our own block decoders --------------------------------------------

def _f16(b):
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def decode_ggml(raw, type_name, shape):
    """Decodes one GGUF tensor. raw: its bytes (uint8) or its values as the reader gives them;
    shape: numpy order (rows, cols). Returns float32.
      Q8_0: 34-byte blocks of 32 values: fp16 scale d, 32 int8 q;   x = d * q
      Q4_0: 18-byte blocks: fp16 d, 16 bytes; value j < 16 = low nibble of byte j, value j+16 =
            high nibble of byte j;                                   x = d * (q - 8)
      Q4_1: 20-byte blocks: fp16 d, fp16 m, 16 bytes as Q4_0;         x = d * q + m
      BF16: the high half of an fp32.                                F16/F32: as they are."""
    n = int(np.prod(shape))
    raw = np.ascontiguousarray(raw)
    if type_name == "F32":
        return raw.view("<f4").reshape(shape).astype(np.float32)
    if type_name == "F16":
        return raw.view("<f2").reshape(shape).astype(np.float32)
    b = raw.view(np.uint8).reshape(-1)
    if type_name == "BF16":
        return (b.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if type_name == "Q8_0":
        blk = b.reshape(n // 32, 34)
        d = _f16(blk[:, :2])
        q = blk[:, 2:].view(np.int8).astype(np.float32)
        return (d * q).reshape(shape)
    if type_name in ("Q4_0", "Q4_1"):
        hdr = 2 if type_name == "Q4_0" else 4
        blk = b.reshape(n // 32, 16 + hdr)
        d = _f16(blk[:, 0:2])
        nib = blk[:, hdr:]
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=1).astype(np.float32)
        if type_name == "Q4_0":
            return (d * (q - np.float32(8))).reshape(shape)
        m = _f16(blk[:, 2:4])
        return (d * q + m).reshape(shape)
    raise ValueError(f"ref_llama: GGUF type {type_name} not decoded here")


def load_gguf(path, dtype=np.float64):
    import gguf

    r = gguf.GGUFReader(path)

    def key(k, default=None):
        f = r.fields.get(k)
        return default if f is None else f.contents()

    n_heads = int(key("llama.attention.head_count"))
    dim = int(key("llama.embedding_length"))
    cfg = dict(
        dim=dim, hidden_dim=int(key("llama.feed_forward_length")),
        n_layers=int(key("llama.block_count")), n_heads=n_heads,
        n_kv_heads=int(key("llama.attention.head_count_kv", n_heads)),
        head_dim=int(key("llama.attention.key_length", dim // n_heads)),
        rope_theta=float(key("llama.rope.freq_base", 10000.0)),
        norm_eps=float(key("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope="interleaved")
    t = {x.name: x for x in r.tensors}

    def get(name, optional=False):
        if name not in t:
            if optional:
                return None
            raise KeyError(name)
        x = t[name]
        shape = tuple(int(s) for s in reversed(list(x.shape)))
        return decode_ggml(x.data, x.tensor_type.name, shape).astype(dtype)

    emb = get("token_embd.weight")
    cfg["vocab_size"] = emb.shape[0]
    cfg["tied"] = "output.weight" not in t
    layers = []
    for L in range(cfg["n_layers"]):
        p = f"blk.{L}."
        layers.append(dict(
            attn_norm=get(p + "attn_norm.weight"), wq=get(p + "attn_q.weight"),
            wk=get(p + "attn_k.weight"), wv=get(p + "attn_v.weight"),
            wo=get(p + "attn_output.weight"), bq=get(p + "attn_q.bias", True),
            bk=get(p + "attn_k.bias", True), bv=get(p + "attn_v.bias", True),
            ffn_norm=get(p + "ffn_norm.weight"), w1=get(p + "ffn_gate.weight"),
            w2=get(p + "ffn_down.weight"), w3=get(p + "ffn_up.weight")))
    return RefModel(cfg, emb, layers, get("output_norm.weight"), get("output.weight", True))


def gguf_tokenizer(path):
    """A `tokenizers` byte-level BPE built from a GGUF's gpt2-style vocabulary and merges (not
    leankv's tokenizer): Digits(individual) + ByteLevel, the SmolLM arrangement."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    r = gguf.GGUFReader(path)
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
    vocab = {}
    for i, s in enumerate(toks):
        vocab.setdefault(s, i)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True) for s, ty in zip(toks, types) if ty == 3])
    return tk


# ---- the forward pass -----------------------------------------------------------------------

def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, pos, theta, style):
    """x: [T, heads, hd]; pos: [T]. Pair i rotates by pos * theta^(-2i/hd)."""
    hd = x.shape[-1]
    i = np.arange(hd // 2, dtype=np.float64)
    ang = pos[:, None].astype(np.float64) * theta ** (-2.0 * i / hd)      # [T, hd/2]
    cos = np.cos(ang)[:, None, :].astype(x.dtype)
    sin = np.sin(ang)[:, None, :].astype(x.dtype)
    if style == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
    else:  # "half"
        a, b = x[..., : hd // 2], x[..., hd // 2:]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if style == "interleaved":
        out[..., 0::2], out[..., 1::2] = ra, rb
    else:
        out[..., : hd // 2], out[..., hd // 2:] = ra, rb
    return out


class KVCache:
    def __init__(self, model):
        c = model.cfg
        self.k = [np.zeros((0, c["n_kv_heads"], c["head_dim"])) for _ in range(c["n_layers"])]
        self.v = [np.zeros((0, c["n_kv_heads"], c["head_dim"])) for _ in range(c["n_layers"])]
        self.pos = 0


def forward(model, ids, cache=None):
    """Logits [T, vocab] for the tokens ids following what cache holds (causal). With cache, it
    is extended; without, a fresh one is used."""
    c = model.cfg
    cache = cache if cache is not None else KVCache(model)
    ids = np.asarray(ids, dtype=np.int64)
    T = len(ids)
    hd, nh, nkv = c["head_dim"], c["n_heads"], c["n_kv_heads"]
    group = nh // nkv
    pos = np.arange(cache.pos, cache.pos + T)
    h = model.emb[ids].copy()
    for L, w in enumerate(model.layers):
        x = rmsnorm(h, w["attn_norm"], c["norm_eps"])
        q, k, v = x @ w["wq"].T, x @ w["wk"].T, x @ w["wv"].T
        if w["bq"] is not None:
            q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
        q = rope(q.reshape(T, nh, hd), pos, c["rope_theta"], c["rope"])
        k = rope(k.reshape(T, nkv, hd), pos, c["rope_theta"], c["rope"])
        v = v.reshape(T, nkv, hd)
        # the fp16 KV cache (KV_CACHE_DTYPE above)
        k = k.astype(KV_CACHE_DTYPE).astype(h.dtype)
        v = v.astype(KV_CACHE_DTYPE).astype(h.dtype)
        K = cache.k[L] = np.concatenate([cache.k[L].astype(h.dtype), k])
        V = cache.v[L] = np.concatenate([cache.v[L].astype(h.dtype), v])
        S = K.shape[0]
        kpos = np.arange(S)
        mask = kpos[None, :] > pos[:, None]                        # [T, S]: future tokens
        att = np.empty((T, nh, hd), dtype=h.dtype)
        for head in range(nh):
            kv = head // group
            s = q[:, head, :] @ K[:, kv, :].T / np.sqrt(hd)        # [T, S]
            s = np.where(mask, -np.inf, s)
            s = np.exp(s - s.max(axis=1, keepdims=True))
            p = s / s.sum(axis=1, keepdims=True)
            att[:, head, :] = p @ V[:, kv, :]
        h = h + att.reshape(T, nh * hd) @ w["wo"].T
        x = rmsnorm(h, w["ffn_norm"], c["norm_eps"])
        g = x @ w["w1"].T
        u = x @ w["w3"].T
        h = h + (g / (1.0 + np.exp(-g)) * u) @ w["w2"].T
    cache.pos += T
    h = rmsnorm(h, model.norm, c["norm_eps"])
    return h @ model.out.T


def cast(model, dtype):
    """The same model with its weights in another float type (float32: a second, equally
    valid evaluation, to measure how far fp32 arithmetic alone moves the logits)."""
    def c(a):
        return None if a is None else a.astype(dtype)
    layers = [{k: c(v) for k, v in w.items()} for w in model.layers]
    out = None if model.out is model.emb else c(model.out)
    return RefModel(dict(model.cfg), c(model.emb), layers, c(model.norm), out)


def logits_all(model, ids):
    """Row t: the logits after token t."""
    return forward(model, ids)


def greedy(model, prompt_ids, n, stop_ids=()):
    """Greedy (argmax) continuation of prompt_ids: up to n new ids, ending early (stop id
    included) when a stop id comes. Returns (ids, margins): margins[i] = top1 - top2 logit."""
    cache = KVCache(model)
    logits = forward(model, prompt_ids, cache)[-1]
    out, margins = [], []
    for _ in range(n):
        top = np.argsort(logits)[::-1][:2]
        nxt = int(top[0])
        out.append(nxt)
        margins.append(float(logits[top[0]] - logits[top[1]]))
        if nxt in stop_ids:
            break
        logits = forward(model, [nxt], cache)[-1]
    return out, margins


def rel_err(a, b):
    """Per row: max|a-b| / max|b|; returns the max over rows and the per-row array."""
    a = np.asarray(a, dtype=np.float64).reshape(len(b), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    rows = np.abs(a - b).max(axis=1) / np.abs(b).max(axis=1)
    return float(rows.max()), rows
