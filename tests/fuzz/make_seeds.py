"""make_seeds.py: writes the fuzz targets' seed inputs (tests/fuzz/seeds/<target>/) and the
small tokenizers the encode and request targets load (tests/fuzz/data/). Everything comes from
tests/tiny_models.py with the dimensions shrunk, so each file is a few KB; the outputs are
committed, so this runs only when the formats change:

    .venv/bin/python tests/fuzz/make_seeds.py

Input formats of the targets (each target's .c says the same):
  model      a model.bin file (byte 255, header padding, odd: the target first sets the
             header's file size to the input's length)
  legacy     a llama2.c checkpoint (the target supplies a 512-token tokenizer.bin)
  tokfile    byte 0 even: a model.bin tokenizer section follows; odd: a llama2.c
             tokenizer.bin follows, bytes 1-2 (little-endian) give the vocabulary size
  encode     byte 0 picks the tokenizer, byte 1 the operation (even: encode the rest as
             text, with room for byte 2 ids; odd: decode the rest as little-endian uint16 ids)
  jsonl      a -f request file
  flags      the command line after "leankv": arguments separated by NUL bytes
"""
import os
import shutil
import struct
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import tiny_models as tm  # noqa: E402

SMALL = dict(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_pos=16)


def put(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def tokenizer_section(model_bin):
    data = open(model_bin, "rb").read()
    off, n = struct.unpack_from("<QQ", data, 136)
    return data[off:off + n]


def main():
    tmp = tempfile.mkdtemp()
    try:
        # model.bin: no tokenizer (vocab 16), fp16 with q/k/v biases, and the full tiny BPE
        variants = {
            "plain_fp32": (dict(SMALL, vocab=16, seed=11), False, ()),
            "qwen2_fp16": (dict(SMALL, vocab=16, seed=12, arch="Qwen2ForCausalLM", bias=True,
                                tied=False, eps=1e-6), False, ("--dtype", "fp16")),
            "bpe_tokenizer": (dict(SMALL, seed=13), True, ()),
        }
        for name, (v, tok, extra) in variants.items():
            folder = tm.write_hf(os.path.join(tmp, name), v, tokenizer=tok)
            out = os.path.join(tmp, name + ".bin")
            tm.run_export(folder, out, *extra)
            data = open(out, "rb").read()
            put("model", name + ".bin", data)
            # byte 255 odd: fuzz_model sets the header's file size to the input's
            put("model", name + "_resized.bin", data[:255] + b"\1" + data[256:])
        bpe = tokenizer_section(os.path.join(tmp, "bpe_tokenizer.bin"))

        # an SPM section: a GGUF with tokenizer.ggml.model "llama"
        g = tm.write_gguf(os.path.join(tmp, "spm.gguf"), dict(SMALL, seed=14), tok_model="llama")
        tm.run_export(g, os.path.join(tmp, "spm.bin"))
        spm = tokenizer_section(os.path.join(tmp, "spm.bin"))

        # llama2.c checkpoints, tied and untied, and a tokenizer.bin
        for name, v in (("tied", dict(SMALL, n_kv_heads=2, vocab=32, seed=15)),
                        ("untied", dict(SMALL, n_kv_heads=1, vocab=32, tied=False, seed=16))):
            put("legacy", name + ".bin", open(tm.write_legacy(os.path.join(tmp, name), v),
                                              "rb").read())
        legacy_tok = open(tm.write_legacy_tokenizer(os.path.join(tmp, "tok.bin"), 300),
                          "rb").read()

        os.makedirs(os.path.join(HERE, "data"), exist_ok=True)
        for name, data in (("tiny_bpe.tok", bpe), ("tiny_spm.tok", spm)):
            with open(os.path.join(HERE, "data", name), "wb") as f:
                f.write(data)

        put("tokfile", "bpe", b"\0" + bpe)
        put("tokfile", "spm", b"\2" + spm)
        put("tokfile", "legacy", b"\1" + struct.pack("<H", 300) + legacy_tok)

        texts = [b"Hello world 2026", b"The capital of France is",
                 b"<|im_start|>user\nWhat is a KV cache?<|im_end|>\n<|im_start|>assistant\n",
                 b"caf\xc3 \xff ok \xe2\x82", "naïve – 東京 🙂 ＡＢＣ".encode(),
                 b"  \t\n\r\n  it's we'll they're 12345678 x\x00y"]
        for k, t in enumerate(texts):
            put("encode", f"enc{k}", bytes([k % 3, 0, 64]) + t)
        put("encode", "dec0", bytes([0, 1, 0]) + struct.pack("<8H", 0, 1, 2, 3, 50, 299, 300, 65535))
        put("encode", "dec1", bytes([1, 1, 0]) + struct.pack("<5H", 3, 4, 100, 259, 1))

        lines = [b'{"prompt": "Hello", "id": "a", "n": 4, "temperature": 0}\n'
                 b'{"prompt": "caf\\u00e9 \\ud83d\\ude00", "id": 7}\n\n'
                 b'{"id": "x", "prompt": "hi", "extra": [1, {"k": null}, true, -1.5e3]}\n',
                 b"plain prompt one\r\nplain prompt two\n",
                 b'{"prompt": "unterminated\n', b'{"prompt": "a", "n": 0}\n',
                 b'{"prompt": "a", "temperature": -1}\n', b'{"prompt": 5}\n',
                 b'{"prompt": "a"} trailing\n', b"[1, 2]\n", b'{"n": 3}\n',
                 b'{"prompt": "' + b"word " * 40 + b'"}\n']
        for k, t in enumerate(lines):
            put("jsonl", f"req{k}", t)

        argvs = [["model.bin", "hello", "-n", "8", "-t", "0.5", "-p", "0.9"],
                 ["model.bin", "-m", "chat", "-y", "sys", "--ctx", "64", "--kv", "k8v4",
                  "--kv-groups", "2"],
                 ["model.bin", "-m", "ppl", "-f", "x.txt", "--ref", "fp32", "--ppl-prefill", "8"],
                 ["model.bin", "-m", "bench", "--batch", "4", "--requests", "8",
                  "--prompt-len", "16", "--gen-len", "8", "--device", "cpu"],
                 ["-h"], ["model.bin", "--frobnicate"], ["model.bin", "-n"],
                 ["model.bin", "--kv", "k3v9"], ["model.bin", "-p", "1.5"],
                 ["model.bin", "--kv-mem", "99999999", "--prefill-chunk", "0"]]
        for k, a in enumerate(argvs):
            put("flags", f"argv{k}", b"\0".join(x.encode() for x in a))
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
