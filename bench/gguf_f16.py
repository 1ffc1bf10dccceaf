#!/usr/bin/env python3
"""Write an F16 GGUF from a quantized one (e.g. SmolLM2-135M-Instruct.Q4_1.gguf).

Every quantized 2-D weight (Q4_1, Q8_0, ...) is dequantized with gguf.quants and
stored as F16; F32 tensors (the RMS norms) stay F32, F16 tensors are copied.
All metadata (hyperparameters, tokenizer, chat template, ...) is copied, except
general.file_type, which becomes 1 (MOSTLY_F16).  The weights are then exactly
the values leankv dequantizes to, rounded once to F16.

Needs only numpy and the `gguf` package (pip install --no-deps gguf-*.whl).

usage: python3 bench/gguf_f16.py IN.gguf OUT.gguf [--check]
  --check  read OUT back and compare every tensor with the dequantized input
"""
import argparse
import sys

import numpy as np

try:
    import gguf
    from gguf import GGMLQuantizationType as QT, GGUFValueType as VT
except ImportError:
    sys.exit("gguf_f16.py: the `gguf` package is missing "
             "(python3 -m pip install --no-deps hfcheck/gguf-*.whl)")

MOSTLY_F16 = 1  # llama_ftype LLAMA_FTYPE_MOSTLY_F16


def field_value(field):
    """Value of a reader field, in the form GGUFWriter.add_key_value takes."""
    if hasattr(field, "contents"):
        return field.contents()
    # older gguf: decode by hand
    t = field.types[0]
    if t == VT.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if t == VT.ARRAY:
        if field.types[-1] == VT.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    return field.parts[field.data[0]].tolist()[0]


def dequant(t):
    """float32 numpy array of tensor t in numpy (row-major) shape."""
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists ne0 first
    a = gguf.quants.dequantize(np.asarray(t.data), QT(t.tensor_type))
    return np.asarray(a, dtype=np.float32).reshape(shape)


def convert(src, dst):
    r = gguf.GGUFReader(src)
    arch = field_value(r.fields[gguf.Keys.General.ARCHITECTURE])
    w = gguf.GGUFWriter(dst, arch)
    if "general.alignment" in r.fields:
        w.data_alignment = int(field_value(r.fields["general.alignment"]))

    for f in r.fields.values():
        # GGUF.* are virtual; the writer adds general.architecture itself
        if f.name.startswith("GGUF.") or f.name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = VT(f.types[0])
        sub = VT(f.types[-1]) if vtype == VT.ARRAY else None
        val = field_value(f)
        if f.name == gguf.Keys.General.FILE_TYPE:
            val = MOSTLY_F16
        w.add_key_value(f.name, val, vtype, sub_type=sub)

    counts = {}
    for t in r.tensors:
        qt = QT(t.tensor_type)
        a = dequant(t)
        if qt == QT.F32 or a.ndim == 1:
            out = a.astype(np.float32)          # norms (and any 1-D tensor) stay F32
        else:
            out = a.astype(np.float16)
        key = f"{qt.name}->{'F32' if out.dtype == np.float32 else 'F16'}"
        counts[key] = counts.get(key, 0) + 1
        w.add_tensor(t.name, out)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"gguf_f16: wrote {dst}: {len(r.tensors)} tensors, "
          + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))


def check(src, dst):
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    assert len(a.tensors) == len(b.tensors), "tensor count differs"
    skip = {gguf.Keys.General.FILE_TYPE}
    fa = {k for k in a.fields if not k.startswith("GGUF.")}
    fb = {k for k in b.fields if not k.startswith("GGUF.")}
    assert fa == fb, f"metadata keys differ: {sorted(fa ^ fb)}"
    for k in fa - skip:
        assert field_value(a.fields[k]) == field_value(b.fields[k]), f"metadata {k} differs"
    assert field_value(b.fields[gguf.Keys.General.FILE_TYPE]) == MOSTLY_F16
    worst = 0.0
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.name == tb.name, (ta.name, tb.name)
        assert [int(x) for x in ta.shape] == [int(x) for x in tb.shape], ta.name
        want = QT.F32 if len(ta.shape) == 1 or QT(ta.tensor_type) == QT.F32 else QT.F16
        assert QT(tb.tensor_type) == want, (tb.name, QT(tb.tensor_type).name)
        x, y = dequant(ta), dequant(tb)
        # F16 rounding: relative error <= 2^-11, plus subnormal slack
        err = float(np.max(np.abs(x - y) / (np.abs(x) + 6e-5))) if x.size else 0.0
        worst = max(worst, err)
        assert err <= 2.0 ** -11 + 1e-6, f"{ta.name}: rel err {err}"
    print(f"gguf_f16: check ok: {len(b.tensors)} tensors, {len(fb)} metadata keys, "
          f"max rel err {worst:.2e} (F16 rounding bound {2.0**-11:.2e})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--check", action="store_true", help="verify OUT against IN after writing")
    p.add_argument("--check-only", action="store_true", help="only verify an existing OUT")
    args = p.parse_args()
    if not args.check_only:
        convert(args.src, args.dst)
    if args.check or args.check_only:
        check(args.src, args.dst)


if __name__ == "__main__":
    main()
