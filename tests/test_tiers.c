/* Unit tests of leankv's tiers (../shared/LEANKV.md sections 3-6) on the CPU cache, calling
 * leankv.c's internals the llama2.c way: #define TESTING, then #include the program.
 *
 *   gcc -O2 -fopenmp -I. tests/test_tiers.c tokenizer.c -lm && ./a.out
 *
 *   - the four decode cases and the prefill placement, driven by hand-built scores to results
 *     the test states in advance (positions in each tier, page counts, bytes of moved tokens);
 *   - the significance scores: prefill sums over the last 64 rows, decode GQA-group max, and
 *     attention over a mix of high and low tokens, against dense double-precision references;
 *   - the memory manager's invariants under a long random mix of admissions, placements,
 *     decode steps, releases and preemptions over thousands of heads, a preempted sequence
 *     parked in the swap space when it has room and brought back with every token as it was;
 *   - the tier fractions and compression ratios against a count the test makes from the pages.
 * The last line is "N passed, M failed". */
#define TESTING
#include "../leankv.c"

#include "check.h"

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static uint32_t rnd(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (uint32_t)rng; }
static float rndf(void) { return (rnd() >> 8) / 16777216.0f * 2.0f - 1.0f; }

static const LkvPrecision TIERS[2] = {{8, 4, 1}, {4, 2, 1}};

static Config tiny_config(int layers, int kv_heads, int group, int head_dim) {
    Config c = {0};
    c.n_layers = layers; c.n_kv_heads = kv_heads; c.n_heads = kv_heads * group;
    c.head_dim = head_dim;
    return c;
}

/* x quantized at bits (one group), then dequantized: what a tier stores of x */
static void roundtrip(const float *x, int d, int bits, float *out) {
    uint8_t codes[LKV_MAX_HEAD_DIM];
    uint16_t sz[2];
    lkv_quantize(x, d, bits, 1, codes, sz);
    lkv_dequantize(codes, sz, d, bits, 1, out);
}

static int same(const float *a, const float *b, int d) {
    for (int j = 0; j < d; j++) if (a[j] != b[j]) return 0;
    return 1;
}

/* the key every test token gets: a function of its position, so a moved token can be
 * recognised by its bytes */
static void key_of(int pos, int d, float *k, float *v) {
    for (int j = 0; j < d; j++) {
        k[j] = sinf(0.37f * pos + 0.11f * j) * (1 + pos % 7);
        v[j] = cosf(0.23f * pos - 0.07f * j);
    }
}

/* ---- the decode case rule, from its four lines in LEANKV.md section 4 */
static void test_decode_case_rule(void) {
    int n = 100;
    float ah = 1.0f, al = 0.1f, lo = 0.1f / n, hi = 1.0f / n, inf = INFINITY;
    struct { float mL, mR; int want; } t[] = {
        {0.5f * lo, inf, LKV_CASE_PRUNE},         /* below alpha_low, no low tier */
        {0.5f * lo, 0.8f * lo, LKV_CASE_PRUNE},   /* both below alpha_low, L lower */
        {0.5f * lo, 0.2f * lo, LKV_CASE_SWAP},    /* both below alpha_low, R lower: R goes */
        {0.5f * hi, 0.5f * lo, LKV_CASE_SWAP},    /* L between, R below alpha_low */
        {0.5f * hi, 2.0f * lo, LKV_CASE_DEMOTE},  /* L between, R above alpha_low */
        {0.5f * hi, inf, LKV_CASE_DEMOTE},        /* L between, no low tier */
        {2.0f * hi, 0.1f * lo, LKV_CASE_APPEND},  /* L above alpha_high: nothing moves */
        {inf, 0.1f * lo, LKV_CASE_APPEND},        /* no eligible high token */
        {inf, inf, LKV_CASE_APPEND},
    };
    for (size_t i = 0; i < sizeof t / sizeof *t; i++) {
        int got = lkv_decode_case(t[i].mL, t[i].mR, n, ah, al);
        CHECK(got == t[i].want, "decode case %zu: mL %g mR %g gives %d, want %d", i, t[i].mL,
              t[i].mR, got, t[i].want);
    }
    /* alphas 0: nothing is ever compressed */
    CHECK(lkv_decode_case(0.0f, 0.0f, n, 0, 0) == LKV_CASE_APPEND, "alphas 0 compressed a token");
    CHECK(lkv_queries_seen(100, 10, 36) == 64 && lkv_queries_seen(100, 50, 36) == 50 &&
          lkv_score_first(100) == 36 && lkv_score_first(30) == 0, "n_q / first formulas");
}

/* positions held by a tier of head hh, in slot order */
static int tier_positions(const KVCache *kv, int hh, int tier, int *pos) {
    int n = kv->n_tok[hh * LKV_MAX_TIERS + tier];
    for (int i = 0; i < n; i++) pos[i] = *kv_pos_at(kv, hh, tier, i);
    return n;
}

/* ---- prefill placement: hand-built prompt scores, the sets the test names in advance */
static void test_prefill_placement(void) {
    int d = 64, P = 100, window = 8, group = 3;
    Config c = tiny_config(1, 1, group, d);
    KVCache kv;
    build_kvcache_tiers(&kv, &c, 1, 256, 0, TIERS, 2);
    kv.defaults.window = window;
    float ah = 1.0f, al = 0.1f;
    kv_begin(&kv, 0, P, ah, al);
    CHECK(kv.policy[0].first == 36, "first counted row of a 100-token prompt is %d", kv.policy[0].first);
    if (kv_reserve(&kv, 0, P)) { CHECK(0, "reserve failed"); return; }
    CHECK(kv.n_pg[0] == 7 + 1, "a prompt of 100 reserves %d high pages, want ceil(100/16)+1", kv.n_pg[0]);
    float k[64], v[64];
    for (int p = 0; p < P; p++) { key_of(p, d, k, v); kv_append(&kv, 0, k, v, p); }
    /* wanted class of position p (eligible: p < 92): p % 5 == 0 pruned, 1 or 2 low, else high;
     * the score is set through one query head of the group (the max is what counts), the
     * others get less */
    int want[128], n_high = 0, n_low = 0, high_pos[128], low_pos[128];
    for (int p = 0; p < P; p++) {
        int nq = P - (p > 36 ? p : 36);
        int cls = p >= P - window ? LKV_HIGH : p % 5 == 0 ? LKV_PRUNED : p % 5 <= 2 ? LKV_LOW : LKV_HIGH;
        float mean = cls == LKV_PRUNED ? 0.4f * al / P : cls == LKV_LOW ? 0.5f * (al + ah) / P
                                                                         : 3.0f * ah / P;
        if (p >= P - window) mean = 0;   /* protected whatever its score */
        for (int g = 0; g < group; g++)
            kv.pscore[(size_t)g * kv.ctx + p] = g == p % group ? mean * nq : 0.3f * mean * nq;
        want[p] = cls;
        if (cls == LKV_HIGH) high_pos[n_high++] = p;
        if (cls == LKV_LOW) low_pos[n_low++] = p;
    }
    int free_before = kv.free_count;
    kv_place(&kv, 0);
    int got[128], ok = 1;
    int nh = tier_positions(&kv, 0, LKV_HIGH, got);
    ok &= nh == n_high;
    for (int i = 0; i < nh && ok; i++) ok &= got[i] == high_pos[i];
    CHECK(ok, "high tier after placement: %d tokens, want %d in position order", nh, n_high);
    int nl = tier_positions(&kv, 0, LKV_LOW, got);
    ok = nl == n_low;
    for (int i = 0; i < nl && ok; i++) ok &= got[i] == low_pos[i];
    CHECK(ok, "low tier after placement: %d tokens, want %d in position order", nl, n_low);
    int ph = (n_high + 15) / 16, pl = (n_low + 27) / 28;
    CHECK(kv.layout[0].tokens == 16 && kv.layout[1].tokens == 28 && kv.page_bytes == 1792,
          "k8v4 + k4v2 at d=64: page %d bytes, %d and %d tokens", kv.page_bytes,
          kv.layout[0].tokens, kv.layout[1].tokens);
    CHECK(kv.n_pg[0] == ph && kv.n_pg[1] == pl && kv.free_count == free_before + 8 - ph - pl,
          "placement holds %d + %d pages (want %d + %d), gave back %d (want %d)", kv.n_pg[0],
          kv.n_pg[1], ph, pl, kv.free_count - free_before, 8 - ph - pl);
    /* the bytes: a high token is its k8v4 quantization; a low one was dequantized from k8v4 and
     * quantized again at k4v2; scores are the group max */
    int bytes_ok = 1, score_ok = 1;
    for (int tier = 0; tier < 2; tier++)
        for (int i = 0; i < kv.n_tok[tier]; i++) {
            float gk[64], gv[64], wk[64], wv[64], s8[64], score;
            int pos;
            kv_get(&kv, 0, tier, i, gk, gv, &score, &pos);
            key_of(pos, d, k, v);
            roundtrip(k, d, 8, wk);
            roundtrip(v, d, 4, wv);
            if (tier == LKV_LOW) {
                memcpy(s8, wk, sizeof s8); roundtrip(s8, d, 4, wk);
                memcpy(s8, wv, sizeof s8); roundtrip(s8, d, 2, wv);
            }
            bytes_ok &= same(gk, wk, d) && same(gv, wv, d);
            score_ok &= score == kv.pscore[(size_t)(pos % group) * kv.ctx + pos];
        }
    CHECK(bytes_ok, "a placed token's K/V is not its (re)quantization");
    CHECK(score_ok, "a placed token's score is not the max over its GQA group");
    /* the low pages sit at the right end of the table */
    int W = kv.table_width;
    CHECK(kv.table[W - 1] >= 0 && kv.table[W - 1] != kv.table[0], "low page not at the right end");
    (void)want;
    kv_release(&kv, 0);
    CHECK(kv.free_count == kv.n_pages, "release lost pages: %d of %d free", kv.free_count, kv.n_pages);
    free_kvcache(&kv);
}

/* sets the score of the token at position pos (wherever it is) so that its mean at length n
 * is m */
static void set_mean(KVCache *kv, int hh, int pos, int n, float m) {
    const LkvPolicy *p = &kv->policy[0];
    for (int tier = 0; tier < 2; tier++)
        for (int i = 0; i < kv->n_tok[hh * LKV_MAX_TIERS + tier]; i++)
            if (*kv_pos_at(kv, hh, tier, i) == pos) {
                *kv_score_at(kv, hh, tier, i) = m * lkv_queries_seen(n, pos, p->first);
                return;
            }
    CHECK(0, "position %d is not cached", pos);
}

static int find(const KVCache *kv, int hh, int tier, int pos) {
    for (int i = 0; i < kv->n_tok[hh * LKV_MAX_TIERS + tier]; i++)
        if (*kv_pos_at(kv, hh, tier, i) == pos) return i;
    return -1;
}

/* one decode step of the one head: plan, take, write the token of position n */
static int step(KVCache *kv, int n) {
    kv_plan_step(kv, 0, n);
    int c = kv->plan[0];
    if (kv_take_planned(kv)) { CHECK(0, "take failed at %d", n); return -1; }
    float k[64], v[64];
    key_of(n, kv->head_dim, k, v);
    kv_write_token(kv, 0, k, v, n);
    return c;
}

/* ---- the four decode cases, one after another on one head, each to a stated result */
static void test_decode_cases(void) {
    int d = 64, P = 48, window = 4;   /* 48 = three full k8v4 pages */
    Config c = tiny_config(1, 1, 1, d);
    KVCache kv;
    build_kvcache_tiers(&kv, &c, 1, 256, 0, TIERS, 2);
    kv.defaults.window = window;
    kv_begin(&kv, 0, P, 0.0f, 0.0f);   /* alphas 0 at placement: everything stays high */
    kv_reserve(&kv, 0, P);
    float k[64], v[64], ah = 1.0f, al = 0.1f;
    for (int p = 0; p < P; p++) { key_of(p, d, k, v); kv_append(&kv, 0, k, v, p); }
    kv_place(&kv, 0);
    CHECK(kv.n_tok[0] == 48 && kv.n_tok[1] == 0 && kv.n_pg[0] == 3, "alphas 0 placed %d high, %d low",
          kv.n_tok[0], kv.n_tok[1]);
    kv.policy[0].alpha_high = ah;
    kv.policy[0].alpha_low = al;
    int n = P;
    /* every token well above alpha_high / n, except the one a step is about */
#define ALL_HIGH(n) for (int p = 0; p < (n); p++) if (find(&kv, 0, 0, p) >= 0) set_mean(&kv, 0, p, n, 4.0f * ah / (n))

    /* 1. APPEND: nothing below alpha_high; the high tier is full, so a page is taken */
    ALL_HIGH(n);
    int free0 = kv.free_count;
    int cs = step(&kv, n);
    CHECK(cs == LKV_CASE_APPEND && kv.n_tok[0] == 49 && kv.n_pg[0] == 4 &&
          kv.free_count == free0 - 1 && find(&kv, 0, 0, 48) == 48,
          "APPEND: case %d, %d high tokens in %d pages, took %d", cs, kv.n_tok[0], kv.n_pg[0],
          free0 - kv.free_count);
    n++;

    /* 2. DEMOTE: position 10 between the cuts, no low tier: it moves to a new low page
     *    (re-quantized), the new token 49 takes its high slot */
    ALL_HIGH(n);
    set_mean(&kv, 0, 10, n, 0.5f * ah / n);
    int slot10 = find(&kv, 0, 0, 10);
    float score10 = *kv_score_at(&kv, 0, 0, slot10);
    free0 = kv.free_count;
    cs = step(&kv, n);
    float gk[64], gv[64], wk[64], t8[64], score;
    int pos;
    kv_get(&kv, 0, LKV_LOW, 0, gk, gv, &score, &pos);
    key_of(10, d, k, v);
    roundtrip(k, d, 8, t8); roundtrip(t8, d, 4, wk);
    CHECK(cs == LKV_CASE_DEMOTE && kv.n_tok[0] == 49 && kv.n_tok[1] == 1 && kv.n_pg[1] == 1 &&
          kv.free_count == free0 - 1 && pos == 10 && score == score10 && same(gk, wk, d) &&
          find(&kv, 0, 0, 49) == slot10 && find(&kv, 0, 0, 10) == -1,
          "DEMOTE: case %d, tiers %d/%d, low token pos %d", cs, kv.n_tok[0], kv.n_tok[1], pos);
    n++;

    /* 3. SWAP: low token 10 below alpha_low, high token 20 between the cuts: 20 goes into
     *    10's low slot (10 is pruned), the new token 50 into 20's high slot; no page moves */
    ALL_HIGH(n);
    set_mean(&kv, 0, 10, n, 0.2f * al / n);
    set_mean(&kv, 0, 20, n, 0.5f * ah / n);
    int slot20 = find(&kv, 0, 0, 20);
    free0 = kv.free_count;
    cs = step(&kv, n);
    CHECK(cs == LKV_CASE_SWAP && kv.n_tok[0] == 49 && kv.n_tok[1] == 1 &&
          kv.free_count == free0 && find(&kv, 0, 1, 20) == 0 && find(&kv, 0, 1, 10) == -1 &&
          find(&kv, 0, 0, 50) == slot20, "SWAP: case %d, low holds %d", cs,
          *kv_pos_at(&kv, 0, 1, 0));
    n++;

    /* 4. PRUNE: high token 5 below alpha_low and below the low tier's lowest (20): it is
     *    dropped, the new token 51 takes its slot */
    ALL_HIGH(n);
    set_mean(&kv, 0, 20, n, 0.5f * al / n);
    set_mean(&kv, 0, 5, n, 0.1f * al / n);
    int slot5 = find(&kv, 0, 0, 5);
    free0 = kv.free_count;
    cs = step(&kv, n);
    CHECK(cs == LKV_CASE_PRUNE && kv.n_tok[0] == 49 && kv.n_tok[1] == 1 &&
          kv.free_count == free0 && find(&kv, 0, 0, 5) == -1 && find(&kv, 0, 0, 51) == slot5 &&
          find(&kv, 0, 1, 20) == 0, "PRUNE: case %d", cs);
    n++;

    /* the window: the lowest score sits on a token seen by too few queries, so nothing moves */
    ALL_HIGH(n);
    *kv_score_at(&kv, 0, 0, find(&kv, 0, 0, n - window)) = 0;   /* pos n-4 < n-4 is false */
    cs = step(&kv, n);
    CHECK(cs == LKV_CASE_APPEND, "a token inside the window was compressed (case %d)", cs);
    n++;
    /* ... one step later it is eligible and, with score 0, pruned */
    ALL_HIGH(n);
    *kv_score_at(&kv, 0, 0, find(&kv, 0, 0, n - 1 - window)) = 0;
    cs = step(&kv, n);
    CHECK(cs == LKV_CASE_PRUNE && find(&kv, 0, 0, n - 1 - window) == -1,
          "a token just out of the window was not pruned (case %d)", cs);
#undef ALL_HIGH
    free_kvcache(&kv);
}

/* ---- significance: the sums the attention leaves, against dense references in double */
static void test_scores(void) {
    int d = 64, n_tok = 150, group = 3;
    Config c = tiny_config(1, 1, group, d);
    KVCache kv;
    build_kvcache_tiers(&kv, &c, 1, 256, 0, TIERS, 2);
    int hh = 0;
    kv_reserve(&kv, 0, n_tok);
    float K[150][64], V[150][64], Kq[150][64], Vq[150][64];
    for (int t = 0; t < n_tok; t++) {
        for (int j = 0; j < d; j++) { K[t][j] = rndf() * 3; V[t][j] = rndf(); }
        kv_append(&kv, hh, K[t], V[t], t);
        roundtrip(K[t], d, 8, Kq[t]);
        roundtrip(V[t], d, 4, Vq[t]);
    }
    /* prefill: rows n0-1 .. n0+n-2 of a chunk, rows from `first` on counted */
    float q[ATT_LANES * 64], o[ATT_LANES * 64], psc[256] = {0};
    float *att = malloc(256 * ATT_LANES * sizeof(float));
    for (int i = 0; i < ATT_LANES * d; i++) q[i] = rndf();
    int n0 = n_tok - ATT_LANES + 1, first = n_tok - 5;   /* the last 5 of 16 rows count */
    attention_rows(&kv, hh, n0, ATT_LANES, q, o, d, att, psc, first);
    double want[256] = {0}, worst = 0;
    for (int r = 0; r < ATT_LANES; r++) {
        int qpos = n0 + r - 1, seen = n0 + r;
        if (qpos < first) continue;
        double s[256], mx = -1e30, sum = 0;
        for (int t = 0; t < seen; t++) {
            double x = 0;
            for (int j = 0; j < d; j++) x += (double)q[r * d + j] * Kq[t][j];
            s[t] = x / 8.0;
            if (s[t] > mx) mx = s[t];
        }
        for (int t = 0; t < seen; t++) { s[t] = exp(s[t] - mx); sum += s[t]; }
        for (int t = 0; t < seen; t++) want[t] += s[t] / sum;
    }
    for (int t = 0; t < n_tok; t++) worst = fmax(worst, fabs(want[t] - psc[t]));
    CHECK(worst < 1e-5, "prefill scores differ from the dense sums by %.3g", worst);

    /* demote some tokens so that the head holds a mix, then a decode step: attention over
     * both tiers equals dense attention over what each tier stores, and every token gains the
     * max over the group of its probability */
    kv.defaults.window = 0;
    kv_begin(&kv, 0, n_tok, 0, 0);
    kv.prefilling[0] = 0;
    for (int i = 0; i < 40; i++) {   /* demote high tokens 3i: each takes a low slot */
        int L = find(&kv, hh, 0, 3 * i);
        kv.plan[0] = LKV_CASE_DEMOTE; kv.plan[1] = L; kv.plan[2] = -1;
        if (kv_take_planned(&kv)) { CHECK(0, "take"); return; }
        int cnt = kv.n_tok[1];
        kv_demote(&kv, hh, L, cnt);
        kv.n_tok[1]++;
        /* the high slot is refilled by the last high token, to keep the test's bookkeeping
         * simple: a hole is what the real policy never leaves */
        int last = kv.n_tok[0] - 1;
        if (L != last) kv_copy_high(&kv, hh, last, L);
        kv.n_tok[0]--;
        roundtrip(Kq[3 * i], d, 4, Kq[3 * i]);
        roundtrip(Vq[3 * i], d, 2, Vq[3 * i]);
    }
    CHECK(kv.n_tok[0] == 110 && kv.n_tok[1] == 40, "mix: %d high, %d low", kv.n_tok[0], kv.n_tok[1]);
    float before[150], qg[3 * 64], og[3 * 64], atts[3 * 256];
    for (int t = 0; t < n_tok; t++) {
        int i = find(&kv, hh, 0, t), tier = i < 0;
        if (tier) i = find(&kv, hh, 1, t);
        before[t] = *kv_score_at(&kv, hh, tier, i);
    }
    for (int i = 0; i < 3 * d; i++) qg[i] = rndf();
    attention_paged(&kv, hh, group, qg, atts, 256, og);
    kv_score_decode(&kv, hh, atts, group, 256);
    double worst_o = 0, worst_s = 0;
    double p[3][150];
    for (int g = 0; g < group; g++) {
        double s[150], mx = -1e30, sum = 0;
        for (int t = 0; t < n_tok; t++) {
            double x = 0;
            for (int j = 0; j < d; j++) x += (double)qg[g * d + j] * Kq[t][j];
            s[t] = x / 8.0;
            if (s[t] > mx) mx = s[t];
        }
        for (int t = 0; t < n_tok; t++) { s[t] = exp(s[t] - mx); sum += s[t]; }
        for (int j = 0; j < d; j++) {
            double acc = 0;
            for (int t = 0; t < n_tok; t++) acc += s[t] / sum * Vq[t][j];
            worst_o = fmax(worst_o, fabs(acc - og[g * d + j]));
        }
        for (int t = 0; t < n_tok; t++) p[g][t] = s[t] / sum;
    }
    for (int t = 0; t < n_tok; t++) {
        double mx = fmax(p[0][t], fmax(p[1][t], p[2][t]));
        int i = find(&kv, hh, 0, t), tier = i < 0;
        if (tier) i = find(&kv, hh, 1, t);
        worst_s = fmax(worst_s, fabs(*kv_score_at(&kv, hh, tier, i) - before[t] - mx));
    }
    CHECK(worst_o < 1e-5, "attention over high + low tokens differs from dense by %.3g", worst_o);
    CHECK(worst_s < 1e-6, "decode scores differ from the group max by %.3g", worst_s);
    printf("scores: prefill %.3g, decode %.3g; mixed-tier attention %.3g\n", worst, worst_s, worst_o);
    free(att);
    free_kvcache(&kv);
}

/* ---- the memory manager under a long random mix over thousands of heads */

/* every page owned once (a table or the free ring), the free count exact, each head's pages
 * exactly what its tokens need (a prompt in flight: its reservation), the window kept high */
static int check_invariants(const KVCache *kv, const int *len, const int *active, int *owner) {
    int bad = 0, owned = 0, W = kv->table_width;
    for (int i = 0; i < kv->n_pages; i++) owner[i] = -1;
    for (int hh = 0; hh < kv->n_heads_total; hh++) {
        int seq = hh / (kv->n_layers * kv->n_kv_heads);
        const int *np = &kv->n_pg[hh * LKV_MAX_TIERS], *nt = &kv->n_tok[hh * LKV_MAX_TIERS];
        if (np[0] + np[1] > W) { bad++; continue; }
        if (np[0] != lkv_pages_for(nt[0], kv->layout[0].tokens) ||
            np[1] != lkv_pages_for(nt[1], kv->layout[1].tokens)) bad++;
        if (!active[seq] && (np[0] || np[1] || nt[0] || nt[1])) bad++;
        if (nt[0] + nt[1] > len[seq] || kv->n_seen[hh] != len[seq]) bad++;
        for (int t = 0; t < 2; t++)
            for (int k = 0; k < np[t]; k++) {
                int id = *kv_table_at(kv, hh, t, k);
                if (id < 0 || id >= kv->n_pages || owner[id] != -1) bad++;
                else owner[id] = hh;
                owned++;
            }
        /* positions: distinct, below the length; the last `window` all in the high tier */
        static unsigned char seen[4096];
        memset(seen, 0, len[seq] + 1);
        for (int t = 0; t < 2; t++)
            for (int i = 0; i < nt[t]; i++) {
                int pos = *kv_pos_at(kv, hh, t, i);
                if (pos < 0 || pos >= len[seq] || seen[pos]) { bad++; continue; }
                seen[pos] = (unsigned char)(1 + t);
            }
        for (int pos = len[seq] - kv->policy[seq].window; active[seq] && pos < len[seq]; pos++)
            if (pos >= 0 && seen[pos] != 1) bad++;
    }
    for (int i = 0; i < kv->free_count; i++) {
        int id = kv->free_ids[(kv->free_start + i) % kv->n_pages];
        if (id < 0 || id >= kv->n_pages || owner[id] != -1) bad++;
        else owner[id] = -2;
    }
    if (owned + kv->free_count != kv->n_pages) bad++;
    return bad;
}

/* what seq holds, token by token (tier, position, score, dequantized K and V): FNV-1a */
static uint64_t seq_fingerprint(const KVCache *kv, int seq) {
    uint64_t f = 1469598103934665603ull;
    float k[LKV_MAX_HEAD_DIM], v[LKV_MAX_HEAD_DIM], score;
    int pos;
    for (int a = 0; a < kv->n_layers * kv->n_kv_heads; a++) {
        int hh = kv_head(kv, seq, 0, 0) + a;
        for (int t = 0; t < kv->n_tiers; t++)
            for (int i = 0; i < kv->n_tok[hh * LKV_MAX_TIERS + t]; i++) {
                kv_get(kv, hh, t, i, k, v, &score, &pos);
                const uint8_t *b[4] = {(const uint8_t *)&pos, (const uint8_t *)&score,
                                       (const uint8_t *)k, (const uint8_t *)v};
                size_t n[4] = {4, 4, kv->head_dim * 4u, kv->head_dim * 4u};
                for (int x = 0; x < 4; x++)
                    for (size_t j = 0; j < n[x]; j++) f = (f ^ b[x][j]) * 1099511628211ull;
                f = (f ^ (uint64_t)t) * 1099511628211ull;
            }
    }
    return f;
}

/* the swap space: every page free or held by exactly one parked sequence */
static int check_swap(const LkvSwapSpace *sp, const LkvSwapped *parked, int n_parked) {
    int bad = 0, held = 0;
    char *own = calloc(sp->n_pages, 1);
    for (int i = 0; i < sp->n_free; i++) {
        int id = sp->free_ids[i];
        if (id < 0 || id >= sp->n_pages || own[id]++) bad++;
    }
    for (int p = 0; p < n_parked; p++)
        for (int i = 0; i < parked[p].n_pages; i++, held++) {
            int id = parked[p].pages[i];
            if (id < 0 || id >= sp->n_pages || own[id]++) bad++;
        }
    if (held + sp->n_free != sp->n_pages) bad++;
    free(own);
    return bad;
}

static void test_manager_random(void) {
    int n_seqs = 48, ctx = 96, d = 16, window = 6;
    Config c = tiny_config(8, 8, 1, d);   /* 48 x 8 x 8 = 3072 heads */
    KVCache kv;
    LkvPrecision tiers[2] = {{8, 4, 1}, {4, 2, 1}};
    build_kvcache_tiers(&kv, &c, n_seqs, ctx, 0, tiers, 2);
    /* a pool of a sixth of the worst case, so that admissions fail and steps preempt */
    kv.free_count = kv.n_pages = kv.n_pages / 6;
    kv.defaults.window = window;
    /* a swap space of about a tenth of the pool: some preemptions park, others find it full */
    build_swap(&kv.swap, 1, kv.page_bytes);
    CHECK(kv.swap.n_pages >= kv.n_pages / 10, "1 MiB holds %d swap pages", kv.swap.n_pages);
    free(kv.swap.free_ids);   /* the same memory, as a swap space of a tenth of the pool */
    lkv_swap_init(&kv.swap, kv.swap.pages, kv.n_pages / 10);
    LkvSwapped parked[48] = {{0}};   /* parked sequences (not slots: one comes back anywhere) */
    uint64_t parked_sum[48];
    int parked_len[48], n_parked = 0;
    long n_swap_out = 0, n_swap_full = 0, n_swap_in = 0, n_swap_refused = 0;
    int *len = calloc(n_seqs, sizeof(int)), *active = calloc(n_seqs, sizeof(int));
    int *owner = malloc(kv.n_pages * sizeof(int)), *batch = malloc(n_seqs * sizeof(int));
    float k[16], v[16];
    long n_admit = 0, n_refused = 0, n_steps = 0, n_preempt = 0, n_release = 0, bad = 0;
    long cases[5] = {0};
    for (int op = 0; op < 6000; op++) {
        int r = rnd() % 100, s = rnd() % n_seqs;
        if (r < 15 && !active[s] && n_parked && rnd() % 2) {   /* a parked one comes back */
            int p = rnd() % n_parked;
            if (kv_swap_in(&kv, s, &parked[p])) { n_swap_refused++; continue; }
            if (seq_fingerprint(&kv, s) != parked_sum[p]) bad++;
            len[s] = parked_len[p]; active[s] = 1; n_swap_in++;
            n_parked--;
            parked[p] = parked[n_parked]; parked_sum[p] = parked_sum[n_parked];
            parked_len[p] = parked_len[n_parked];
        } else if (r < 15 && !active[s]) {   /* admission: a prompt, then placement */
            int P = 1 + rnd() % 60;
            float ah = (rnd() % 4) * 0.5f, al = ah * (rnd() % 3) / 4;
            kv_begin(&kv, s, P, ah, al);
            if (kv_reserve(&kv, s, P)) { n_refused++; kv.prefilling[s] = 0; continue; }
            for (int l = 0; l < 8; l++)
                for (int h = 0; h < 8; h++)
                    for (int p = 0; p < P; p++) {
                        for (int j = 0; j < d; j++) { k[j] = rndf(); v[j] = rndf(); }
                        kv_append(&kv, kv_head(&kv, s, l, h), k, v, p);
                    }
            size_t rows = (size_t)8 * 8;
            for (size_t q = 0; q < rows; q++)
                for (int p = 0; p < P; p++) kv.pscore[q * kv.ctx + p] = (rnd() % 1000) / 1000.0f * 2.0f / P;
            kv_place(&kv, s);
            len[s] = P; active[s] = 1; n_admit++;
        } else if (r < 90) {   /* a decode step for a random batch, preempting the last until it fits */
            int nb = 0;
            for (int i = 0; i < n_seqs; i++)
                if (active[i] && len[i] < ctx && rnd() % 3 == 0) batch[nb++] = i;
            if (!nb) continue;
            for (int i = 0; i < nb; i++)   /* fresh scores for a few tokens of every head */
                for (int l = 0; l < 8; l++)
                    for (int h = 0; h < 8; h++) {
                        int hh = kv_head(&kv, batch[i], l, h);
                        for (int t = 0; t < 2; t++)
                            for (int x = 0; x < 2 && kv.n_tok[hh * 2 + t]; x++)
                                *kv_score_at(&kv, hh, t, rnd() % kv.n_tok[hh * 2 + t]) =
                                    (rnd() % 1000) / 1000.0f * 0.3f;
                    }
            for (;;) {
                int need = 0;
                for (int i = 0; i < nb; i++) need += kv_plan_step(&kv, batch[i], len[batch[i]]);
                if (need <= kv.free_count) break;
                int victim = batch[--nb];
                if (kv_swap_out(&kv, victim, &parked[n_parked]) == 0) {
                    parked_sum[n_parked] = seq_fingerprint(&kv, victim);
                    parked_len[n_parked++] = len[victim];
                    n_swap_out++;
                } else n_swap_full++;
                kv_release(&kv, victim);
                active[victim] = 0; len[victim] = 0; n_preempt++;
                if (!nb) break;
            }
            if (!nb) continue;
            if (kv_take_planned(&kv)) { bad++; continue; }
            for (int i = 0; i < nb; i++) {
                for (int l = 0; l < 8; l++)
                    for (int h = 0; h < 8; h++) {
                        int hh = kv_head(&kv, batch[i], l, h);
                        cases[kv.plan[hh * 3]]++;
                        for (int j = 0; j < d; j++) { k[j] = rndf(); v[j] = rndf(); }
                        kv_write_token(&kv, hh, k, v, len[batch[i]]);
                    }
                len[batch[i]]++;
            }
            n_steps++;
        } else if (active[s]) {   /* a request ends */
            kv_release(&kv, s);
            active[s] = 0; len[s] = 0; n_release++;
        }
        if (op % 100 == 0) {
            bad += check_invariants(&kv, len, active, owner);
            bad += check_swap(&kv.swap, parked, n_parked);
        }
    }
    bad += check_invariants(&kv, len, active, owner);
    bad += check_swap(&kv.swap, parked, n_parked);
    printf("manager: %ld admissions (%ld refused), %ld steps, %ld preemptions, %ld releases; "
           "cases prune %ld swap %ld demote %ld append %ld\n", n_admit, n_refused, n_steps,
           n_preempt, n_release, cases[1], cases[2], cases[3], cases[4]);
    CHECK(bad == 0, "manager invariants broken %ld times", bad);
    CHECK(n_refused > 0 && n_preempt > 0 && n_release > 0, "the mix missed full pools or preemption");
    printf("swap: %ld parked (%ld found the swap space full), %ld back (%ld refused for pages), "
           "%d still parked\n", n_swap_out, n_swap_full, n_swap_in, n_swap_refused, n_parked);
    CHECK(n_swap_out > 0 && n_swap_full > 0 && n_swap_in > 0 && n_swap_refused > 0,
          "the mix missed a swap-space case");
    for (int p = 0; p < n_parked; p++) lkv_swap_give(&kv.swap, &parked[p]);
    CHECK(kv.swap.n_free == kv.swap.n_pages, "swap pages lost: %d of %d free", kv.swap.n_free,
          kv.swap.n_pages);
    CHECK(cases[1] && cases[2] && cases[3] && cases[4], "the mix missed a decode case");

    /* ---- tier fractions and ratios against a count the test makes from the pages */
    kv_account_reset(&kv);
    double seen = 0, high = 0, low = 0, pages = 0;
    for (int s = 0; s < n_seqs; s++) {
        if (!active[s]) continue;
        kv_account(&kv, s);
        for (int l = 0; l < 8; l++)
            for (int h = 0; h < 8; h++) {
                int hh = kv_head(&kv, s, l, h);
                seen += len[s];
                /* tokens: distinct positions found in each tier's pages */
                for (int t = 0; t < 2; t++) {
                    int tpp = kv.layout[t].tokens;
                    for (int k2 = 0; k2 < kv.n_pg[hh * 2 + t]; k2++) {
                        pages++;
                        int in_page = kv.n_tok[hh * 2 + t] - k2 * tpp;
                        in_page = in_page > tpp ? tpp : in_page;
                        const int32_t *pp = (const int32_t *)(kv.pool + (size_t)*kv_table_at(&kv, hh, t, k2) *
                                                              kv.page_bytes + kv.layout[t].pos);
                        for (int x = 0; x < in_page; x++)
                            if (pp[x] >= 0 && pp[x] < len[s]) *(t ? &low : &high) += 1;
                    }
                }
            }
    }
    KVTotals tot = kv_totals(&kv);
    double bits = 32 * seen / (high * 12 + low * 6), phys = seen * d * 4 / (pages * kv.page_bytes);
    CHECK(tot.seen == seen && tot.high == high && tot.low == low,
          "totals %g/%g/%g, the test counts %g/%g/%g", tot.seen, tot.high, tot.low, seen, high, low);
    CHECK(fabs(tot.bits_only - bits) < 1e-9 * bits && fabs(tot.physical - phys) < 1e-9 * phys,
          "ratios %.6f/%.6f, the test computes %.6f/%.6f", tot.bits_only, tot.physical, bits, phys);
    printf("fractions: high %.3f low %.3f pruned %.3f; %.2fx bits-only, %.2fx physical\n",
           high / seen, low / seen, 1 - (high + low) / seen, bits, phys);
    for (int s = 0; s < n_seqs; s++) kv_release(&kv, s);
    CHECK(kv.free_count == kv.n_pages, "pages lost at the end: %d of %d free", kv.free_count, kv.n_pages);
    free(len); free(active); free(owner); free(batch);
    free_kvcache(&kv);
}

int main(void) {
    build_h2f_table();
    test_decode_case_rule();
    test_prefill_placement();
    test_decode_cases();
    test_scores();
    test_manager_random();
    return check_summary();
}
