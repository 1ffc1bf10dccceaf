"""leankv's CPU logits against Hugging Face transformers' LlamaForCausalLM loaded from the same
GGUF: a second, independent oracle (transformers dequantizes the GGUF with its own code and
undoes llama.cpp's q/k permutation itself, then runs its own Llama implementation).

It needs torch, which the CPU machines here cannot install, so it skips there; it was run on
an H100 machine (torch and transformers installed, the gguf wheel added), where it also runs as
a plain script without pytest:

    python tests/test_hf_oracle.py        # models/SmolLM2-135M-Instruct.Q4_1.gguf + ./leankv

The prompt is 32 tokens. transformers computes in fp32 on the CPU (no TF32, no fp16) and keeps
an fp32 cache; leankv runs with its exact cache (--kv fp32, bound 1e-4) and with its default
fp16 cache (bound 2e-3: the fp16 rounding of K and V alone moves logits by about 3e-4 here,
see test_forward.py). Relative error per position is max|a - b| / max|b| over the vocabulary."""
import os
import subprocess
import sys
import tempfile

import numpy as np

try:
    import pytest
except ImportError:      # run as a script on a machine without pytest
    pytest = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
TEXT = ("Once upon a time, in a small village by the sea, there lived an old fisherman "
        "who knew every star in the sky and every fish in the water. One morning he found "
        "a bottle on the beach.")


def have_torch():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import gguf  # noqa: F401
        return True
    except ImportError:
        return False


def hf_logits(ids):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    torch.backends.cuda.matmul.allow_tf32 = False
    folder, name = os.path.split(GGUF)
    model = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
    return out


def hf_ids():
    from transformers import AutoTokenizer
    folder, name = os.path.split(GGUF)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return tok(TEXT, add_special_tokens=False)["input_ids"][:32]


def leankv_logits(model_bin, ids, extra=()):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "l.f32")
        subprocess.run([os.path.join(ROOT, "leankv"), model_bin, *extra, "-m", "logits", "-i",
                        " ".join(map(str, ids)), "-o", out], check=True)
        return np.fromfile(out, dtype="<f4").reshape(len(ids), -1)


def rel_err(a, b):
    rows = np.abs(a - b).max(1) / np.abs(b).max(1)
    return float(rows.max()), rows


def compare(model_bin):
    ids = hf_ids()
    assert len(ids) == 32
    ref = hf_logits(ids)
    results = {}
    for name, extra, bound in (("--kv fp32", ("--kv", "fp32"), 1e-4),
                               ("--kv fp16", ("--kv", "fp16"), 2e-3)):
        got = leankv_logits(model_bin, ids, extra)
        err, rows = rel_err(got, ref)
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        print(f"leankv CPU ({name}) vs transformers LlamaForCausalLM (GGUF, fp32): max rel err "
              f"{err:.2e} at position {int(rows.argmax())}, median {np.median(rows):.2e}, "
              f"argmax agreement {agree:.3f}, bound {bound:.0e}")
        results[name] = (err, agree, bound)
    for name, (err, agree, bound) in results.items():
        assert err <= bound, f"{name}: {err:.3e} > {bound}"
        assert agree == 1.0, f"{name}: argmax differs"


def _model_bin(tmp):
    out = os.path.join(tmp, "smol.bin")
    subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), GGUF, out], check=True)
    return out


if pytest is not None:
    @pytest.mark.skipif(not have_torch(), reason="needs torch + transformers + gguf (run on "
                        "the GPU machine: python tests/test_hf_oracle.py)")
    def test_against_transformers(tmp_path, leankv_bin):
        compare(_model_bin(str(tmp_path)))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        compare(_model_bin(tmp))
    print("hf oracle: 1 passed, 0 failed")
