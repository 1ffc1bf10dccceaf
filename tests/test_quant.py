"""leankv.h section 4b (quantization of a head vector) against an independent numpy
implementation of ../shared/LEANKV.md section 2, byte for byte: codes, scale/zero pairs and
dequantized values, over thousands of random vectors of every setting (head dim 64 and 128,
bits 2/4/8/16/32, 1/2/4 groups) and hand-made adversarial groups. The C side runs through
tests/quant_driver.c, built with several compilers and flag sets (FMA contraction on and off,
-O0 to -O3), all of which must give the same bytes. Also builds and runs tests/test_quant.c."""
import shutil
import subprocess

import numpy as np
import pytest

F16_MAX = 65504.0
SETTINGS = [(d, bits, groups) for d in (64, 128) for bits in (2, 4, 8, 16, 32)
            for groups in (1, 2, 4)]
N_RANDOM = 3000          # mixed-kind random vectors per setting
N_PER_KIND = 200         # vectors of one kind throughout, per kind and setting

BUILDS = {
    "gcc -O2": ["gcc", "-O2"],
    "gcc -O3 -march=native -ffp-contract=fast": ["gcc", "-O3", "-march=native",
                                                 "-ffp-contract=fast"],
    "gcc -O0": ["gcc", "-O0"],
    "clang -O2 -march=native -ffp-contract=fast": ["clang", "-O2", "-march=native",
                                                   "-ffp-contract=fast"],
}


# ---- the reference: LEANKV.md section 2 in numpy, written from the text, not from leankv.h ----

def reference(x, bits, groups):
    """x (n, d) float32 -> (codes (n, d*bits/8) uint8, sz (n, 4*groups or 0) uint8,
    dequantized (n, d) float32)."""
    n, d = x.shape
    if bits == 32:       # raw floats: an exact debug cache
        return x.view(np.uint8).reshape(n, 4 * d), np.zeros((n, 0), np.uint8), x.copy()
    if bits == 16:       # plain fp16, round to nearest even
        with np.errstate(over="ignore"):
            h = x.astype(np.float16)
        return h.view(np.uint8).reshape(n, 2 * d), np.zeros((n, 0), np.uint8), h.astype(np.float32)
    levels = np.float32(2 ** bits - 1)
    xg = x.reshape(n, groups, d // groups)
    lo, hi = xg.min(axis=2), xg.max(axis=2)
    # scale and zero go to fp16 first; the codes use the rounded values. Both are stored as
    # +0 when zero (the sign of a zero min or range is not meaningful).
    scale = ((hi - lo) / levels).astype(np.float16)          # fp32 subtract, fp32 divide
    zero = lo.astype(np.float16)
    scale = np.where(scale == 0, np.float16(0), scale)
    zero = np.where(zero == 0, np.float16(0), zero)
    s = scale.astype(np.float32)[:, :, None]
    z = zero.astype(np.float32)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.rint((xg - z) / s)                             # round half to even
    q = np.where(s > 0, np.clip(t, 0, levels), 0).astype(np.uint8)   # zero range: q = 0
    # packed low bits first: code i of a byte sits at bits [i*bits, (i+1)*bits)
    per = 8 // bits
    qs = q.reshape(n, d // per, per).astype(np.uint32)
    packed = np.zeros((n, d // per), np.uint32)
    for i in range(per):
        packed |= qs[:, :, i] << (bits * i)
    codes = packed.astype(np.uint8)
    sz = np.stack([scale, zero], axis=-1).reshape(n, 2 * groups).view(np.uint8)
    # q*scale + zero rounded once, as fma does: q*s and z are multiples of 2^-24 below 2^24
    # (fp16 values), so the float64 sum is exact and one rounding to float32 remains
    deq = (q.astype(np.float64) * s.astype(np.float64) + z.astype(np.float64)).astype(np.float32)
    return codes, sz, deq.reshape(n, d)


def test_reference_by_hand():
    """The reference on a vector worked out on paper: min -1, max 3, 4 bits: scale 4/15 =
    0.26667 -> fp16 0.2666015625 (0x3444), zero -1 (0xbc00); 1 -> 2/0.26660 = 7.5018 -> 8,
    3 -> 15.004 -> clamps to 15."""
    x = np.array([[-1, 0.5, 2, 3, -0.25, 1, 1, 1]], np.float32)
    codes, sz, deq = reference(x, 4, 1)
    assert codes.tolist() == [[0x60, 0xFB, 0x83, 0x88]]
    assert sz.view(np.uint16).tolist() == [[0x3444, 0xBC00]]
    assert deq[0, 1] == np.float32(np.float64(6) * 0.2666015625 - 1)


# ---- data: random groups of many kinds, and constructed edge cases ----

def fp16_values(rng, n, emin=-24, emax=5):
    """n random fp16 normal numbers m * 2^e (m in [1024, 2048)), as float64"""
    return rng.integers(1024, 2048, n) * np.exp2(rng.integers(emin, emax + 1, n).astype(float))


def exact_f32(v):
    return v.astype(np.float32).astype(np.float64) == v


def gen_kind(rng, kind, m, gs, bits):
    """m groups of gs values of one kind, float32 (m, gs); 16 and 32 bits get 8-bit shapes"""
    L = 2 ** min(bits, 8) - 1
    logu = lambda lo, hi, size: np.exp(rng.uniform(np.log(lo), np.log(hi), size))
    sign = lambda size: rng.choice([-1.0, 1.0], size)
    col = lambda v: np.asarray(v)[:, None]
    if kind == "normal":
        sig = col(logu(1e-3, 1e2, m))
        mean = col(np.where(rng.random(m) < 0.5, 0, rng.standard_normal(m))) * sig
        v = mean + sig * rng.standard_normal((m, gs))
    elif kind == "uniform":
        v = col(sign(m) * logu(1e-3, 1e3, m)) + col(logu(1e-3, 1e3, m)) * rng.random((m, gs))
    elif kind == "constant":
        c = np.where(rng.random(m) < 0.3, rng.choice([0.0, -0.0], m), sign(m) * logu(1e-9, 6e4, m))
        v = np.repeat(col(c), gs, axis=1)
    elif kind == "outlier":
        v = col(logu(1e-3, 1, m)) * rng.standard_normal((m, gs))
        v[np.arange(m), rng.integers(0, gs, m)] = sign(m) * logu(1e2, 6e4, m)
    elif kind == "negative":
        v = -col(logu(1e-4, 1e3, m)) - col(logu(1e-4, 1e3, m)) * rng.random((m, gs))
    elif kind == "offset":          # narrow range far from zero: the fp16 zero is coarse
        c = sign(m) * logu(1, 6e4, m)
        v = col(c) + col(np.abs(c) * logu(1e-5, 1e-1, m)) * rng.random((m, gs))
    elif kind == "underflow":       # range so small the fp16 scale rounds to 0
        c = np.where(rng.random(m) < 0.4, 0, sign(m) * logu(1e-7, 1e3, m))
        v = col(c) + col(logu(1e-12, 2.9e-8 * L, m)) * rng.random((m, gs))
    elif kind == "subnormal-scale":
        c = np.where(rng.random(m) < 0.5, 0, sign(m) * logu(1e-7, 1e-2, m))
        v = col(c) + col(logu(3e-8 * L, 6e-5 * L, m)) * rng.random((m, gs))
    elif kind == "near-fp16-max":
        sub = col(rng.integers(0, 3, m))
        v = np.where(sub == 0, rng.uniform(-F16_MAX, F16_MAX, (m, gs)),
                     np.where(sub == 1, F16_MAX - col(logu(1, 3e4, m)) * rng.random((m, gs)),
                              rng.choice([-F16_MAX, F16_MAX], (m, gs))))
        v[:, 0] = np.where(sub[:, 0] == 1, F16_MAX, v[:, 0])
    elif kind == "mixed-signs":
        v = sign((m, gs)) * logu(1e-6, 6e4, (m, gs))
    elif kind == "tiny":            # fp32 subnormals and near-subnormals around zero
        v = sign((m, gs)) * logu(1e-44, 1e-30, (m, gs))
    elif kind == "ties":            # (x - zero) / scale exactly k + 1/2
        s = col(fp16_values(rng, m, -24, -10))
        z = np.float16(-rng.random((m, 1)) * L * s).astype(np.float64)
        k = rng.integers(0, L, (m, gs)) + np.where(np.arange(gs) % 2 == 1, 0.5, 0.0)
        v = z + k * s
        v[:, 0], v[:, 1] = z[:, 0], z[:, 0] + L * s[:, 0]
        v = np.where(exact_f32(v).all(axis=1, keepdims=True), v, z)   # inexact: constant
    elif kind == "scale-tie":       # (max - min) / L exactly halfway between two fp16 values
        mid = col((2 * rng.integers(1024, 2048, m) + 1) * np.exp2(rng.integers(-25, -10, m)))
        lo = np.where(rng.random((m, 1)) < 0.5, 0.0, -np.float16(rng.random((m, 1)) * L * mid))
        v = lo + rng.random((m, gs)) * L * mid
        v[:, 0], v[:, 1] = lo[:, 0], lo[:, 0] + L * mid[:, 0]
        v = np.where(exact_f32(v[:, :2]).all(axis=1, keepdims=True), v, lo)
    elif kind == "zero-tie":        # min exactly halfway between two fp16 values
        lo = col(sign(m) * (2 * rng.integers(1024, 2048, m) + 1) * np.exp2(rng.integers(-26, 4, m)))
        v = lo + np.abs(lo) * col(logu(1e-4, 4, m)) * rng.random((m, gs))
        v[:, 0] = lo[:, 0]
    else:
        raise ValueError(kind)
    v = np.clip(v, -F16_MAX, F16_MAX)
    return rng.permuted(v, axis=1).astype(np.float32) if kind not in ("ties", "scale-tie") \
        else v.astype(np.float32)


KINDS = ["normal", "uniform", "constant", "outlier", "negative", "offset", "underflow",
         "subnormal-scale", "near-fp16-max", "mixed-signs", "tiny", "ties", "scale-tie",
         "zero-tie"]


def vectors(rng, d, bits, groups):
    """N_RANDOM vectors whose groups each take a random kind, then N_PER_KIND of each kind
    throughout; for 16 and 32 bits also arbitrary float32 bit patterns"""
    gs = d // groups
    out = np.empty((N_RANDOM, d), np.float32)
    for g in range(groups):
        pick = rng.integers(0, len(KINDS), N_RANDOM)
        for k, kind in enumerate(KINDS):
            idx = np.nonzero(pick == k)[0]
            if len(idx):
                out[idx, g * gs:(g + 1) * gs] = gen_kind(rng, kind, len(idx), gs, bits)
    parts = [out]
    for kind in KINDS:
        parts.append(np.concatenate([gen_kind(rng, kind, N_PER_KIND, gs, bits)
                                     for _ in range(groups)], axis=1))
    if bits >= 16:
        raw = rng.integers(0, 2 ** 32, (N_PER_KIND, d), dtype=np.uint64).astype(np.uint32)
        raw = raw.view(np.float32)
        if bits == 16:       # NaN payloads are not specified for fp16; any other float is
            raw = np.where(np.isnan(raw), np.float32(1.5), raw)
        parts.append(raw)
    return np.ascontiguousarray(np.concatenate(parts))


# ---- the C side ----

@pytest.fixture(scope="module")
def drivers(root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant")
    out = {}
    for name, cmd in BUILDS.items():
        if shutil.which(cmd[0]) is None:
            continue
        exe = tmp / ("quant_driver_" + str(len(out)))
        subprocess.run(cmd + ["-std=gnu11", "-Wall", "-Wextra", f"-I{root}", "-o", str(exe),
                              str(root / "tests" / "quant_driver.c"), "-lm"], check=True)
        out[name] = exe
    assert "gcc -O2" in out
    return out


def run_driver(exe, x, d, bits, groups, tmp_path):
    fin, fout = tmp_path / "in.f32", tmp_path / "out.bin"
    x.tofile(fin)
    subprocess.run([str(exe), str(fin), str(fout), str(d), str(bits), str(groups)], check=True,
                   capture_output=True)
    cb, sb = d * bits // 8, (4 * groups if bits <= 8 else 0)
    rec = np.fromfile(fout, np.uint8).reshape(len(x), cb + sb + 4 * d)
    return rec[:, :cb], rec[:, cb:cb + sb], rec[:, cb + sb:].copy().view(np.float32)


AGREEMENT = {}


@pytest.mark.parametrize("d,bits,groups", SETTINGS)
def test_against_numpy(drivers, d, bits, groups, tmp_path):
    rng = np.random.default_rng(1000 * d + 10 * bits + groups)
    x = vectors(rng, d, bits, groups)
    codes, sz, deq = reference(x, bits, groups)
    for name, exe in drivers.items():
        c_codes, c_sz, c_deq = run_driver(exe, x, d, bits, groups, tmp_path)
        same = ((c_codes == codes).all(axis=1) & (c_sz == sz).all(axis=1) &
                (c_deq.view(np.uint32) == deq.view(np.uint32)).all(axis=1))
        AGREEMENT[(name, d, bits, groups)] = (int(same.sum()), len(x))
        bad = np.nonzero(~same)[0]
        assert len(bad) == 0, (
            f"{name}, d {d} bits {bits} groups {groups}: {len(bad)} of {len(x)} vectors differ; "
            f"first {bad[0]}: x {x[bad[0]][:8]}... C codes {c_codes[bad[0]][:8]} sz "
            f"{c_sz[bad[0]]} numpy codes {codes[bad[0]][:8]} sz {sz[bad[0]]}")
    print(f"d {d} bits {bits:2d} groups {groups}: {len(x)} vectors byte-identical in "
          f"{len(drivers)} builds")


def test_agreement_summary():
    """runs last in this file: totals of the comparisons above"""
    if not AGREEMENT:
        pytest.skip("no comparisons ran")
    total = sum(n for n, _ in AGREEMENT.values())
    tried = sum(m for _, m in AGREEMENT.values())
    builds = sorted({k[0] for k in AGREEMENT})
    print(f"numpy vs C: {total} of {tried} vector comparisons byte-identical "
          f"({len(SETTINGS)} settings x {len(builds)} builds: {', '.join(builds)})")
    assert total == tried


def test_fast_math_refused(root, tmp_path):
    """-ffast-math could turn the division into a reciprocal multiply: leankv.h refuses it"""
    src = tmp_path / "f.c"
    src.write_text('#include "leankv.h"\nint main(void) { return 0; }\n')
    r = subprocess.run(["gcc", "-ffast-math", f"-I{root}", "-c", "-o", str(tmp_path / "f.o"),
                        str(src)], capture_output=True, text=True)
    assert r.returncode != 0 and "IEEE fp32 division" in r.stderr


def test_quant_units(root, tmp_path):
    """tests/test_quant.c: error bounds, packing, re-quantization, exact 16/32-bit paths,
    per-token byte counts against the page layout"""
    exe = tmp_path / "test_quant"
    subprocess.run(["gcc", "-O2", "-march=native", "-std=gnu11", f"-I{root}", "-o", str(exe),
                    str(root / "tests" / "test_quant.c"), "-lm"], check=True)
    r = subprocess.run([str(exe), "-v"], capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].endswith(" 0 failed")
