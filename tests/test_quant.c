/* Unit tests of leankv.h section 4b, the quantization of a head vector (../shared/LEANKV.md
 * section 2), and of the per-token byte counts that section 4's page layout uses.
 *
 *   gcc -O2 -march=native -std=gnu11 -I. tests/test_quant.c -lm && ./a.out [-v]
 *
 * Prints a line per failed check (-v adds a few "info" lines: how tight the error bound is,
 * how often re-quantization is exercised) and ends with "N passed, M failed".
 *
 * The error bound checked for every element (leankv.h 4b states it). With s, z the stored
 * scale and zero (fp16 values), L = 2^bits - 1, u = 2^-24, x' = fmaf(q, s, z):
 *   interior   0 <= rint(t) <= L, t = fl(fl(x - z) / s): each fp32 operation is off by at
 *              most a factor (1 + u), so |t - (x - z)/s| <= (2u + u^2) |x - z| / s, rint adds
 *              1/2, and |q s + z - x| <= s/2 + (2u + u^2) |x - z|.
 *   clamp at 0 rint(t) < 0 needs t <= -1/2, so x < z: x' = z and the error is z - x <= z - min.
 *   clamp at L rint(t) > L needs t > L + 1/2, so (x - z)/s > L: the error is x - (z + L s)
 *              <= max - z - L s.
 *   scale 0    q = 0, x' = z: the error is at most max(z - min, max - z).
 *   fmaf rounds q s + z once: at most half an fp32 ulp of x' more.
 * So |x' - x| <= max(s/2 + (2u + u^2)|x - z|, z - min, max - z - L s) + hulp(x'). The checks
 * below evaluate the right side in long double, exactly apart from the (2u + u^2) term. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "leankv.h"

#include "check.h"

static int verbose;

#define INFO(...) do { if (verbose) { printf("info: "); printf(__VA_ARGS__); printf("\n"); } } while (0)

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (uint32_t)(rng >> 11); }
static double rndu(void) { return (rnd() >> 5) / 134217728.0; }                  /* [0, 1) */
static double rndn(void) { return sqrt(-2.0 * log(1.0 - rndu())) * cos(6.283185307179586 * rndu()); }
static double logu(double lo, double hi) { return lo * pow(hi / lo, rndu()); }  /* log-uniform */

static float fp16_round(float x) { return lkv_h2f(lkv_f2h(x)); }

/* half an fp32 ulp of y (the most a correctly rounded fp32 result is off by) */
static long double hulp(float y) {
    float a = fabsf(y);
    return ((long double)nextafterf(a, INFINITY) - a) / 2;
}

#define U 0x1p-24L

/* ---- adversarial and random groups ------------------------------------------------------ */

enum { G_NORMAL, G_UNIFORM, G_CONST, G_OUTLIER, G_NEGATIVE, G_OFFSET, G_UNDERFLOW, G_SUBSCALE,
       G_HUGE, G_MIXED, G_TIES, G_ZEROS, G_FP16GRID, G_KINDS };
static const char *kind_name[G_KINDS] = {"normal", "uniform", "constant", "outlier", "negative",
    "offset", "underflow", "subnormal-scale", "near-fp16-max", "mixed-signs", "ties", "zeros",
    "fp16-grid"};

static float clamp_fp16(double v) { return (float)(v > 65504 ? 65504 : v < -65504 ? -65504 : v); }

/* Fills x (n) with a group of kind k for `bits` (ties need the level count). */
static void fill_group(float *x, int n, int k, int bits) {
    int L = lkv_levels(bits);
    switch (k) {
    case G_NORMAL: {                     /* what K and V look like: N(mean, sigma) */
        double sigma = logu(1e-3, 1e2), mean = rndu() < 0.5 ? 0 : sigma * rndn();
        for (int i = 0; i < n; i++) x[i] = clamp_fp16(mean + sigma * rndn());
        break;
    }
    case G_UNIFORM: {
        double a = logu(1e-3, 1e3) * (rndu() < 0.5 ? -1 : 1), w = logu(1e-3, 1e3);
        for (int i = 0; i < n; i++) x[i] = clamp_fp16(a + w * rndu());
        break;
    }
    case G_CONST: {                      /* zero range: scale 0, everything comes back as z */
        double v = rndu() < 0.3 ? 0 : logu(1e-9, 6e4) * (rndu() < 0.5 ? -1 : 1);
        for (int i = 0; i < n; i++) x[i] = (float)v;
        break;
    }
    case G_OUTLIER: {                    /* one huge value stretches the scale */
        double sigma = logu(1e-3, 1);
        for (int i = 0; i < n; i++) x[i] = (float)(sigma * rndn());
        x[rnd() % n] = (float)(logu(1e2, 6e4) * (rndu() < 0.5 ? -1 : 1));
        break;
    }
    case G_NEGATIVE: {                   /* all below zero: zero = min is the most negative */
        double hi = -logu(1e-4, 1e3), w = logu(1e-4, 1e3);
        for (int i = 0; i < n; i++) x[i] = clamp_fp16(hi - w * rndu());
        break;
    }
    case G_OFFSET: {                     /* narrow range far from 0: fp16 zero is coarse */
        double c = logu(1, 6e4) * (rndu() < 0.5 ? -1 : 1), w = c * logu(1e-5, 1e-1);
        for (int i = 0; i < n; i++) x[i] = clamp_fp16(c + fabs(w) * rndu());
        break;
    }
    case G_UNDERFLOW: {                  /* range so small the fp16 scale rounds to 0 */
        double c = rndu() < 0.4 ? 0 : logu(1e-7, 1e3) * (rndu() < 0.5 ? -1 : 1);
        double w = logu(1e-12, 2.9e-8 * L);
        for (int i = 0; i < n; i++) x[i] = (float)(c + w * rndu());
        break;
    }
    case G_SUBSCALE: {                   /* fp16 scale subnormal: only a few bits of precision */
        double c = rndu() < 0.5 ? 0 : logu(1e-7, 1e-2) * (rndu() < 0.5 ? -1 : 1);
        double w = logu(3e-8 * L, 6e-5 * L);
        for (int i = 0; i < n; i++) x[i] = (float)(c + w * rndu());
        break;
    }
    case G_HUGE: {                       /* near the fp16 maximum, either end of it */
        int sub = rnd() % 3;
        for (int i = 0; i < n; i++)
            x[i] = sub == 0 ? clamp_fp16((rndu() * 2 - 1) * 65504)
                 : sub == 1 ? clamp_fp16(65504 - logu(1, 3e4) * rndu())
                            : (rnd() & 1 ? 65504.0f : -65504.0f);
        x[0] = sub == 1 ? 65504.0f : x[0];
        break;
    }
    case G_MIXED: {                      /* mixed signs over many decades */
        for (int i = 0; i < n; i++) x[i] = (float)(logu(1e-6, 6e4) * (rnd() & 1 ? -1 : 1));
        break;
    }
    case G_TIES: {                       /* (x - z) / s exactly k + 1/2: round-half-even decides */
        for (;;) {
            float s = ldexpf((float)(1024 + rnd() % 1024), -24 + (int)(rnd() % 14)); /* fp16 normal */
            float z = fp16_round((float)(-rndu() * L * s));
            int ok = 1;
            x[0] = z;
            x[1] = z + L * s;
            ok &= (long double)x[1] == (long double)z + (long double)L * s;
            for (int i = 2; i < n; i++) {
                int kk = (int)(rnd() % L);
                long double want = (long double)z + ((long double)kk + (i & 1 ? 0.5L : 0)) * s;
                x[i] = (float)want;
                ok &= (long double)x[i] == want;
            }
            if (ok) break;
        }
        break;
    }
    case G_ZEROS: {                      /* +0 and -0 and a few tiny values */
        for (int i = 0; i < n; i++) x[i] = rnd() & 1 ? -0.0f : 0.0f;
        if (rnd() & 1) x[rnd() % n] = (float)(logu(1e-30, 1) * (rnd() & 1 ? -1 : 1));
        break;
    }
    case G_FP16GRID: {                   /* fp16 values, so min and max need no rounding */
        double sigma = logu(1e-3, 1e3);
        for (int i = 0; i < n; i++) x[i] = fp16_round(clamp_fp16(sigma * rndn()));
        break;
    }
    }
    if (k != G_TIES) {                   /* the order inside a group must not matter */
        for (int i = n - 1; i > 0; i--) { int j = rnd() % (i + 1); float t = x[i]; x[i] = x[j]; x[j] = t; }
    }
}

/* ---- the per-vector checks ------------------------------------------------------------- */

typedef struct {
    long elems, bad_bound, bad_closed, bad_at, bad_meta, bad_canary;
    long idem_groups, idem_bad, outside, outside_changed;
    double interior_ratio;   /* max err / (s/2) over mixed-sign groups: the bound's tightness */
    char first[300];         /* the first violation, for the failure line */
} Stats;

static void note(Stats *st, const char *what, int g, int j, double a, double b) {
    if (!st->first[0])
        snprintf(st->first, sizeof st->first, "%s (group %d, element %d: %.9g vs %.9g)", what, g,
                 j, a, b);
}

#define MAXD 128
#define CANARY 0xA5

/* quantizes x, checks the bound on every element, the accessors against each other, the
 * bytes it may write, and that re-quantizing the dequantized vector keeps the codes */
static void check_vector(const float *x, int d, int bits, int groups, Stats *st) {
    int L = lkv_levels(bits), gs = d / groups, cb = lkv_code_bytes(d, bits);
    uint8_t codes[MAXD + 16], codes2[MAXD + 16];
    uint16_t sz[2 * 8 + 4], sz2[2 * 8 + 4];
    memset(codes, CANARY, sizeof codes);
    memset(sz, CANARY, sizeof sz);
    lkv_quantize(x, d, bits, groups, codes, sz);
    int canary_ok = 1;
    for (int i = cb; i < (int)sizeof codes; i++) canary_ok &= codes[i] == CANARY;
    for (int i = lkv_sz_bytes(groups, bits) / 2; i < (int)(sizeof sz / 2); i++)
        canary_ok &= sz[i] == (CANARY << 8 | CANARY);
    if (!canary_ok) { st->bad_canary++; note(st, "wrote past its bytes", 0, 0, 0, 0); }

    float y[MAXD], y2[MAXD];
    lkv_dequantize(codes, sz, d, bits, groups, y);
    for (int j = 0; j < d; j++) {
        float a = lkv_dequant_at(codes, sz, d, bits, groups, j);
        if (memcmp(&a, &y[j], 4)) { st->bad_at++; note(st, "dequant_at != dequantize", j / gs, j, a, y[j]); }
    }
    lkv_quantize(y, d, bits, groups, codes2, sz2);
    lkv_dequantize(codes2, sz2, d, bits, groups, y2);

    for (int g = 0; g < groups; g++) {
        const float *xg = x + g * gs;
        float mn = xg[0], mx = xg[0];
        for (int j = 1; j < gs; j++) { mn = fminf(mn, xg[j]); mx = fmaxf(mx, xg[j]); }
        uint16_t sh = sz[2 * g], zh = sz[2 * g + 1];
        float s = lkv_h2f(sh), z = lkv_h2f(zh);
        /* stored pair: scale >= 0, canonical zero, the fp16 of min */
        if ((sh & 0x8000) || zh == 0x8000 || z != fp16_round(mn)) {
            st->bad_meta++; note(st, "scale/zero not as specified", g, 0, s, z);
        }
        long double lo = (long double)z - mn, hi = (long double)mx - z - (long double)L * s;
        int has0 = 0, hasL = 0, mixed = mn <= 0 && mx >= 0 && s >= 0x1p-14f;
        for (int j = 0; j < gs; j++) {
            int jj = g * gs + j, q = lkv_code_at(codes, bits, jj);
            has0 |= q == 0; hasL |= q == L;
            long double err = fabsl((long double)y[jj] - xg[j]);
            long double in = s == 0 ? 0 : (long double)s / 2 + (2 * U + U * U) * fabsl((long double)xg[j] - z);
            long double bound = in;
            if (lo > bound) bound = lo;
            if (hi > bound) bound = hi;
            bound += hulp(y[jj]);
            st->elems++;
            if (!(err <= bound)) { st->bad_bound++; note(st, "error above the bound", g, j, (double)err, (double)bound); }
            if (mixed) {
                /* the closed form for mixed-sign groups with an fp16-normal scale */
                long double R = (long double)mx - mn;
                if (!(err <= (long double)s / 2 + 0x1p-14L * s) ||
                    !(s <= R / L * (1 + 0x1p-11L + 0x1p-21L))) {
                    st->bad_closed++; note(st, "mixed-sign closed form", g, j, (double)err, s);
                }
                if (err / (s / 2.0L) > st->interior_ratio) st->interior_ratio = (double)(err / (s / 2.0L));
            }
        }
        /* Re-quantization keeps codes and scale/zero when the group used both end codes and
         * its zero is not far larger than its range: y's min is z exactly (fmaf(0, s, z)),
         * y's max is within 2^-16 L s of z + L s, so the new scale rounds back to s and every
         * new (y - z) / s is within 0.01 of the old code. Scale 0 groups come back as scale 0. */
        int same = sz2[2 * g] == sh && sz2[2 * g + 1] == zh;
        for (int j = g * gs; j < (g + 1) * gs; j++)
            same &= lkv_code_at(codes, bits, j) == lkv_code_at(codes2, bits, j);
        long double big = fabsl((long double)z) > fabsl((long double)z + (long double)L * s)
                              ? fabsl((long double)z) : fabsl((long double)z + (long double)L * s);
        if (s == 0 || (has0 && hasL && big <= 256.0L * L * s)) {
            st->idem_groups++;
            if (!same) { st->idem_bad++; note(st, "re-quantization changed the group", g, 0, s, z); }
        } else {
            st->outside++;
            st->outside_changed += !same;
        }
    }
}

static void report(const char *what, Stats *st, int strict_tight) {
    CHECK(st->bad_bound == 0, "%s: %ld of %ld elements above the bound; first: %s", what,
          st->bad_bound, st->elems, st->first);
    CHECK(st->bad_closed == 0, "%s: %ld elements break the mixed-sign closed form; first: %s", what,
          st->bad_closed, st->first);
    CHECK(st->bad_at == 0, "%s: lkv_dequant_at differs from lkv_dequantize %ld times; first: %s",
          what, st->bad_at, st->first);
    CHECK(st->bad_meta == 0, "%s: %ld scale/zero pairs not as specified; first: %s", what,
          st->bad_meta, st->first);
    CHECK(st->bad_canary == 0, "%s: %ld vectors wrote past lkv_code_bytes/lkv_sz_bytes", what,
          st->bad_canary);
    CHECK(st->idem_bad == 0, "%s: re-quantization changed %ld of %ld groups; first: %s", what,
          st->idem_bad, st->idem_groups, st->first);
    if (strict_tight)   /* random data must come close to s/2, or the bound is loose */
        CHECK(st->interior_ratio > 0.99 && st->interior_ratio <= 1 + 0x1p-13,
              "%s: max error / (s/2) is %.5f on mixed-sign groups", what, st->interior_ratio);
}

/* every bit width, group count and head dim, on groups of every kind: each group of a
 * vector its own random kind, and vectors of one kind throughout */
static void test_bounds(void) {
    int bitsv[3] = {8, 4, 2}, groupsv[3] = {1, 2, 4}, dims[2] = {64, 128};
    long idem = 0, outside = 0, outside_changed = 0;
    long kind_outside[G_KINDS] = {0}, kind_changed[G_KINDS] = {0}, kind_groups[G_KINDS] = {0};
    for (int bi = 0; bi < 3; bi++)
        for (int gi = 0; gi < 3; gi++)
            for (int di = 0; di < 2; di++) {
                int bits = bitsv[bi], groups = groupsv[gi], d = dims[di], gs = d / groups;
                float x[MAXD];
                Stats mix = {0}, kind[G_KINDS];
                memset(kind, 0, sizeof kind);
                for (int v = 0; v < 2000; v++) {
                    for (int g = 0; g < groups; g++) fill_group(x + g * gs, gs, rnd() % G_KINDS, bits);
                    check_vector(x, d, bits, groups, &mix);
                }
                for (int k = 0; k < G_KINDS; k++)
                    for (int v = 0; v < 150; v++) {
                        for (int g = 0; g < groups; g++) fill_group(x + g * gs, gs, k, bits);
                        check_vector(x, d, bits, groups, &kind[k]);
                    }
                char what[96];
                snprintf(what, sizeof what, "bits %d groups %d d %d, mixed kinds", bits, groups, d);
                report(what, &mix, 0);
                for (int k = 0; k < G_KINDS; k++) {
                    snprintf(what, sizeof what, "bits %d groups %d d %d, %s", bits, groups, d,
                             kind_name[k]);
                    report(what, &kind[k], k == G_NORMAL);
                    idem += kind[k].idem_groups; outside += kind[k].outside;
                    outside_changed += kind[k].outside_changed;
                    kind_outside[k] += kind[k].outside; kind_changed[k] += kind[k].outside_changed;
                    kind_groups[k] += 150 * groups;
                }
                idem += mix.idem_groups; outside += mix.outside; outside_changed += mix.outside_changed;
                INFO("bits %d groups %d d %2d: max err/(s/2) on N(0,1)-like groups %.6f", bits,
                     groups, d, kind[G_NORMAL].interior_ratio);
            }
    INFO("re-quantization: %ld groups inside the guarantee, all unchanged; %ld outside it "
         "(subnormal scale, coarse zero), of which %ld changed", idem, outside,
         outside_changed);
    for (int k = 0; k < G_KINDS; k++)
        if (kind_outside[k])
            INFO("  %-16s %6ld of %6ld groups outside the guarantee, %6ld changed", kind_name[k],
                 kind_outside[k], kind_groups[k], kind_changed[k]);
}

/* hand-made cases where each term of the bound is reached exactly */
static void test_bound_terms(void) {
    /* z - min: fp16(1000.3) = 1000.5, so 1000.3 clamps to code 0 and comes back as 1000.5 */
    float x[64], y[64];
    uint8_t c[64];
    uint16_t sz[8];
    for (int i = 0; i < 64; i++) x[i] = 1000.3f + 0.7f * i / 63;
    lkv_quantize(x, 64, 8, 1, c, sz);
    lkv_dequantize(c, sz, 64, 8, 1, y);
    float z = lkv_h2f(sz[1]), s = lkv_h2f(sz[0]);
    CHECK(z == 1000.5f && lkv_code_at(c, 8, 0) == 0 && y[0] - x[0] == z - x[0] && z - x[0] > s / 2,
          "coarse zero: z %g, code %d, error %g (z - min %g, s/2 %g)", z, lkv_code_at(c, 8, 0),
          y[0] - x[0], z - x[0], s / 2);
    /* max - z - L s: range 357 * 2^-24 at 8 bits: scale 1.4 * 2^-24 rounds to 2^-24 (fp16
     * subnormal), so the top clamps at 255 * 2^-24, 102 * 2^-24 short */
    for (int i = 0; i < 64; i++) x[i] = ldexpf((float)(i * 357 / 63), -24);
    lkv_quantize(x, 64, 8, 1, c, sz);
    lkv_dequantize(c, sz, 64, 8, 1, y);
    s = lkv_h2f(sz[0]);
    CHECK(s == 0x1p-24f && lkv_h2f(sz[1]) == 0 && lkv_code_at(c, 8, 63) == 255 &&
          x[63] - y[63] == ldexpf(102, -24),
          "subnormal scale: s %g, code %d, error %g", s, lkv_code_at(c, 8, 63), x[63] - y[63]);
    /* scale underflow: range 1e-9 at 8 bits, scale 4e-12 rounds to 0: all codes 0, back as z */
    for (int i = 0; i < 64; i++) x[i] = 0.25f + 1e-9f * i;
    lkv_quantize(x, 64, 8, 1, c, sz);
    lkv_dequantize(c, sz, 64, 8, 1, y);
    int all0 = 1;
    for (int i = 0; i < 64; i++) all0 &= c[i] == 0 && y[i] == 0.25f;
    CHECK(sz[0] == 0 && all0, "underflowing scale: scale bits %04x, codes zero and back as z: %d", sz[0], all0);
    /* a constant group, and -0 / +0 */
    for (int i = 0; i < 64; i++) x[i] = -3.5f;
    lkv_quantize(x, 64, 2, 2, c, sz);
    lkv_dequantize(c, sz, 64, 2, 2, y);
    CHECK(sz[0] == 0 && sz[2] == 0 && y[5] == -3.5f && c[0] == 0, "constant group");
    for (int i = 0; i < 64; i++) x[i] = i & 1 ? -0.0f : 0.0f;
    lkv_quantize(x, 64, 4, 1, c, sz);
    CHECK(sz[0] == 0 && sz[1] == 0, "+-0 group: scale %04x zero %04x (want 0000 0000)", sz[0], sz[1]);
    /* a parallel min/max reduction may pair max -0 with min +0 (a scan never does) */
    for (int bits = 2; bits <= 8; bits *= 2) {
        uint16_t sh, zh, sh2, zh2;
        lkv_quant_params(0.0f, -0.0f, bits, &sh, &zh);
        lkv_quant_params(-0.0f, 0.0f, bits, &sh2, &zh2);
        CHECK(sh == 0 && zh == 0 && sh2 == 0 && zh2 == 0, "bits %d, min/max +-0: %04x %04x %04x %04x",
              bits, sh, zh, sh2, zh2);
    }
    x[0] = -1e-9f;   /* min rounds to fp16 -0: stored as +0 */
    lkv_quantize(x, 64, 4, 1, c, sz);
    CHECK(sz[1] == 0, "min -1e-9: zero %04x (want 0000)", sz[1]);
    /* the two ends of the fp16 range */
    x[0] = -65504.0f; x[1] = 65504.0f;
    for (int i = 2; i < 64; i++) x[i] = 0;
    for (int bits = 2; bits <= 8; bits *= 2) {
        lkv_quantize(x, 64, bits, 1, c, sz);
        lkv_dequantize(c, sz, 64, bits, 1, y);
        float sc = lkv_h2f(sz[0]);
        CHECK(isfinite(sc) && lkv_h2f(sz[1]) == -65504.0f && y[0] == -65504.0f &&
              fabsf(y[1] - 65504.0f) <= sc / 2 && fabsf(y[2]) <= sc / 2 + 1,
              "bits %d, +-65504: scale %g, back %g %g %g", bits, sc, y[0], y[1], y[2]);
    }
}

/* exact ties go to the even code */
static void test_ties(void) {
    int bad = 0, n = 0;
    for (int bits = 2; bits <= 8; bits *= 2)
        for (int rep = 0; rep < 3000; rep++) {
            int L = lkv_levels(bits);
            float x[64];
            fill_group(x, 64, G_TIES, bits);     /* x[0] = z, x[1] = z + L s, odd i: ties */
            uint8_t c[64];
            uint16_t sz[2];
            lkv_quantize(x, 64, bits, 1, c, sz);
            float s = lkv_h2f(sz[0]), z = lkv_h2f(sz[1]);
            if (z != x[0] || (long double)x[1] - x[0] != (long double)L * s) { bad++; continue; }
            for (int i = 2; i < 64; i++) {
                long double t = ((long double)x[i] - z) / s;
                int want = (int)t;                         /* t = k or k + 1/2 */
                if (t != want) want += want & 1;           /* k + 1/2 -> the even one */
                bad += lkv_code_at(c, bits, i) != want;
                n += t != (int)t;
            }
        }
    CHECK(bad == 0, "ties: %d codes not rounded half to even (of %d ties)", bad, n);
    INFO("%d exact ties, all to the even code", n);
}

/* every code value at every position: values that quantize to themselves (min 0, max L in
 * the group: scale 1, zero 0), packed bytes against the layout written out per width */
static void test_packing(void) {
    int dims[2] = {64, 128};
    for (int bits = 2; bits <= 8; bits *= 2)
        for (int di = 0; di < 2; di++)
            for (int groups = 1; groups <= 4; groups *= 2) {
                int d = dims[di], L = lkv_levels(bits), gs = d / groups, bad = 0, tried = 0;
                for (int p = 0; p < d; p++)
                    for (int v = 0; v <= L; v++) {
                        int q[MAXD];
                        float x[MAXD], y[MAXD];
                        for (int j = 0; j < d; j++) q[j] = (j * 5 + p + v) % (L + 1);
                        for (int g = 0; g < groups; g++) {   /* both ends in every group */
                            int a = g * gs + (p == g * gs ? 2 : 0), b = g * gs + (p == g * gs + 1 ? 2 : 1);
                            q[a] = 0;
                            q[b] = L;
                        }
                        q[p] = v;
                        for (int j = 0; j < d; j++) x[j] = (float)q[j];
                        uint8_t c[MAXD], want[MAXD];
                        uint16_t sz[8];
                        lkv_quantize(x, d, bits, groups, c, sz);
                        for (int j = 0; j < d * bits / 8; j++)
                            want[j] = bits == 8 ? (uint8_t)q[j]
                                    : bits == 4 ? (uint8_t)(q[2 * j] | q[2 * j + 1] << 4)
                                                : (uint8_t)(q[4 * j] | q[4 * j + 1] << 2 |
                                                            q[4 * j + 2] << 4 | q[4 * j + 3] << 6);
                        lkv_dequantize(c, sz, d, bits, groups, y);
                        int ok = !memcmp(c, want, d * bits / 8);
                        for (int g = 0; g < groups; g++) ok &= sz[2 * g] == 0x3c00 && sz[2 * g + 1] == 0;
                        for (int j = 0; j < d; j++)
                            ok &= lkv_code_at(c, bits, j) == q[j] && y[j] == q[j] &&
                                  lkv_dequant_at(c, sz, d, bits, groups, j) == q[j];
                        bad += !ok;
                        tried++;
                    }
                CHECK(bad == 0, "packing bits %d d %d groups %d: %d of %d vectors wrong", bits, d,
                      groups, bad, tried);
            }
}

/* 16 bits stores lkv_f2h, 32 bits the floats themselves; neither touches sz */
static void test_exact_paths(void) {
    int bad16 = 0, bad32 = 0, badsz = 0;
    float x[MAXD], y[MAXD];
    uint8_t *c = malloc(4 * MAXD);   /* untyped memory, as the page pool: 16/32 bits store */
    uint16_t sz[4];                  /* through uint16_t / float pointers */
    for (uint32_t h0 = 0; h0 < 65536; h0 += 128) {      /* every fp16 value comes back exactly */
        for (int j = 0; j < 128; j++) {
            uint16_t h = (uint16_t)(h0 + j);
            x[j] = ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) ? 0.0f : lkv_h2f(h);  /* not NaN */
        }
        memset(sz, CANARY, sizeof sz);
        lkv_quantize(x, 128, 16, 1, c, sz);
        lkv_dequantize(c, sz, 128, 16, 1, y);
        for (int j = 0; j < 128; j++) {
            uint16_t code;
            memcpy(&code, c + 2 * j, 2);
            float a = lkv_dequant_at(c, sz, 128, 16, 1, j);
            bad16 += code != lkv_f2h(x[j]) || memcmp(&y[j], &x[j], 4) || memcmp(&a, &x[j], 4);
        }
        badsz += sz[0] != (CANARY << 8 | CANARY) || sz[3] != (CANARY << 8 | CANARY);
    }
    for (int rep = 0; rep < 2000; rep++) {
        for (int j = 0; j < 64; j++) {                   /* any bits at all, NaN payloads too */
            uint32_t u = rnd() << 11 ^ rnd();
            if (j == 0) u = 0x80000000u;
            if (j == 1) u = 0x7fc01234u;
            if (j == 2) u = 0x00000001u;
            memcpy(&x[j], &u, 4);
        }
        memset(sz, CANARY, sizeof sz);
        lkv_quantize(x, 64, 32, 2, c, sz);
        lkv_dequantize(c, sz, 64, 32, 2, y);
        bad32 += memcmp(c, x, 256) != 0 || memcmp(y, x, 256) != 0;
        for (int j = 0; j < 64; j++) {
            float a = lkv_dequant_at(c, sz, 64, 32, 2, j);
            bad32 += memcmp(&a, &x[j], 4) != 0;
        }
        for (int j = 0; j < 64; j++) x[j] = (float)(rndn() * logu(1e-8, 1e5));
        lkv_quantize(x, 64, 16, 4, c, sz);
        lkv_dequantize(c, sz, 64, 16, 4, y);
        for (int j = 0; j < 64; j++) {
            uint16_t code;
            memcpy(&code, c + 2 * j, 2);
            bad16 += code != lkv_f2h(x[j]) || y[j] != lkv_h2f(code);
        }
        badsz += sz[0] != (CANARY << 8 | CANARY) || sz[3] != (CANARY << 8 | CANARY);
    }
    CHECK(bad16 == 0, "16-bit path: %d values not the fp16 rounding", bad16);
    CHECK(bad32 == 0, "32-bit path: %d vectors not bit-exact", bad32);
    CHECK(badsz == 0, "16/32-bit paths wrote sz %d times", badsz);
    free(c);
}

/* the per-token byte counts are what lkv_layout reserves, for every precision including 32,
 * with (tiered) and without the scores and positions, and lkv_layout_fit finds the largest
 * token count that fits */
static void test_layout_bytes(void) {
    int bitsv[5] = {2, 4, 8, 16, 32}, bad = 0, badfit = 0, badpage = 0;
    for (int tiered = 0; tiered < 2; tiered++)
    for (int d = 64; d <= 128; d *= 2)
        for (int a = 0; a < 5; a++)
            for (int b = 0; b < 5; b++)
                for (int g = 1; g <= 4; g *= 2) {
                    LkvPrecision p = {bitsv[a], bitsv[b], g};
                    int kb = bitsv[a], vb = bitsv[b];
                    bad += lkv_code_bytes(d, kb) != d * kb / 8 ||
                           lkv_sz_bytes(g, kb) != (kb <= 8 ? 4 * g : 0);
                    for (int T = 1; T <= 70; T++) {
                        LkvPageLayout L;
                        int used = lkv_layout(&L, p, d, T, tiered);
                        int meta_end = tiered ? L.scores : L.used;   /* where v's pairs end */
                        bad += L.k_sz - L.k_codes != lkv_align(T * lkv_code_bytes(d, kb)) ||
                               L.v_codes - L.k_sz != lkv_align(T * lkv_sz_bytes(g, kb)) ||
                               L.v_sz - L.v_codes != lkv_align(T * lkv_code_bytes(d, vb)) ||
                               meta_end - L.v_sz != lkv_align(T * lkv_sz_bytes(g, vb)) ||
                               (tiered ? L.pos - L.scores != lkv_align(T * 4) ||
                                             L.used - L.pos != lkv_align(T * 4)
                                       : L.scores != -1 || L.pos != -1) ||
                               used != L.used || L.tokens != T;
                    }
                    for (int P = 200; P <= 20000; P += 37) {
                        LkvPageLayout L, M;
                        int T = lkv_layout_fit(&L, p, d, P, tiered);
                        badfit += (T > 0 && lkv_layout(&M, p, d, T, tiered) > P) ||
                                  lkv_layout(&M, p, d, T + 1, tiered) <= P || L.tokens != T;
                    }
                    float w;
                    LkvPrecision pp[2] = {p, p};
                    int P = lkv_page_bytes(pp, 1 + tiered, d, &w);
                    LkvPageLayout L;
                    badpage += P <= 0 || P % LKV_PAGE_STEP ||
                               lkv_layout_fit(&L, p, d, P, tiered) < LKV_PAGE_MIN_TOKENS;
                }
    CHECK(bad == 0, "lkv_layout segments disagree with lkv_code_bytes/lkv_sz_bytes %d times", bad);
    CHECK(badfit == 0, "lkv_layout_fit is not the largest fit %d times", badfit);
    CHECK(badpage == 0, "lkv_page_bytes gives an unusable page %d times", badpage);
    LkvPrecision tiers[2] = {{8, 4, 1}, {4, 2, 1}};
    for (int d = 64; d <= 128; d *= 2) {
        float w;
        int P = lkv_page_bytes(tiers, 2, d, &w);
        LkvPageLayout hi, lo;
        lkv_layout_fit(&hi, tiers[0], d, P, 1);
        lkv_layout_fit(&lo, tiers[1], d, P, 1);
        INFO("tiers k8v4 + k4v2, d %d: page %d B, %d / %d tokens, worst waste %.2f%%", d, P,
             hi.tokens, lo.tokens, 100 * w);
    }
}

int main(int argc, char **argv) {
    verbose = argc > 1 && !strcmp(argv[1], "-v");
    test_bounds();
    test_bound_terms();
    test_ties();
    test_packing();
    test_exact_paths();
    test_layout_bytes();
    return check_summary();
}
