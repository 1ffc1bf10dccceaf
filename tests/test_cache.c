/* Unit tests of the paged KV cache and the formulas in leankv.h, calling leankv.c's
 * internals the llama2.c way: #define TESTING, then #include the program.
 *
 *   gcc -O2 -fopenmp -I. tests/test_cache.c tokenizer.c -lm && ./a.out
 *
 * Each check prints a line; the last line is "N passed, M failed". */
#define TESTING
#include "../leankv.c"

#include "check.h"

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (uint32_t)rng; }
static float rndf(void) { return (rnd() >> 8) / 16777216.0f * 2.0f - 1.0f; }

/* fp16 conversions against the compiler's own IEEE binary16 (_Float16), an independent
 * implementation: every half value both ways, and a stride through all 2^32 float bit
 * patterns plus the rounding boundaries. */
static void test_fp16(void) {
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        _Float16 ref;
        uint16_t hb = (uint16_t)h;
        memcpy(&ref, &hb, 2);
        float a = lkv_h2f(hb), b = (float)ref;
        if (memcmp(&a, &b, 4) != 0 && !(isnan(a) && isnan(b))) bad++;
    }
    CHECK(bad == 0, "lkv_h2f differs from _Float16 on %d of 65536 values", bad);
    bad = 0;
    long tried = 0;
    for (uint64_t u = 0; u < (1ull << 32); u += 4099, tried++) {
        uint32_t bits = (uint32_t)u;
        float f;
        memcpy(&f, &bits, 4);
        _Float16 ref = (_Float16)f;
        uint16_t rb;
        memcpy(&rb, &ref, 2);
        uint16_t mine = lkv_f2h(f);
        if (isnan(f)) { if ((mine & 0x7c00) != 0x7c00 || !(mine & 0x3ff)) bad++; }
        else if (mine != rb) bad++;
    }
    /* exact ties and their neighbours around every half value */
    for (uint32_t h = 0; h < 0x7c00; h++) {
        float lo = lkv_h2f((uint16_t)h), hi = lkv_h2f((uint16_t)(h + 1));
        float mids[3] = {(lo + hi) * 0.5f, nextafterf((lo + hi) * 0.5f, 0), nextafterf((lo + hi) * 0.5f, 1e9f)};
        for (int i = 0; i < 3; i++) {
            _Float16 ref = (_Float16)mids[i];
            uint16_t rb;
            memcpy(&rb, &ref, 2);
            if (lkv_f2h(mids[i]) != rb) bad++;
            tried++;
        }
    }
    CHECK(bad == 0, "lkv_f2h differs from _Float16 on %d of %ld values", bad, tried);
}

/* segments are aligned, in order, disjoint and inside the page, for every precision pair at
 * head dims 64 and 128, in a one-tier cache's pages (no scores or positions) and in a tiered
 * cache's (with them); and the page rule's choice holds at least 16 widest tokens */
static void test_layout(void) {
    int bits[4] = {16, 8, 4, 2}, dims[2] = {64, 128};
    for (int tiered = 0; tiered < 2; tiered++)
    for (int di = 0; di < 2; di++)
        for (int a = 0; a < 4; a++)
            for (int b = 0; b < 4; b++)
                for (int g = 1; g <= 4; g *= 2) {
                    int d = dims[di];
                    LkvPrecision p = {bits[a], bits[b], g}, pp[2] = {p, p};
                    float waste;
                    int P = lkv_page_bytes(pp, 1 + tiered, d, &waste);
                    LkvPageLayout L;
                    int T = lkv_layout_fit(&L, p, d, P, tiered);
                    int ok = P > 0 && P % LKV_PAGE_STEP == 0 && T >= LKV_PAGE_MIN_TOKENS &&
                             L.used <= P && waste >= 0 && waste < 0.5f;
                    int segs[7] = {L.k_codes, L.k_sz, L.v_codes, L.v_sz, L.scores, L.pos, L.used};
                    int sizes[6] = {T * d * p.kbits / 8, p.kbits < 16 ? T * g * 4 : 0,
                                    T * d * p.vbits / 8, p.vbits < 16 ? T * g * 4 : 0, T * 4, T * 4};
                    if (!tiered) {   /* no metadata: v_sz is followed by the end */
                        ok &= L.scores == -1 && L.pos == -1;
                        segs[4] = L.used;
                    }
                    for (int s = 0; s < (tiered ? 6 : 4); s++)
                        ok &= segs[s] % LKV_SEG_ALIGN == 0 && segs[s] + sizes[s] <= segs[s + 1];
                    /* one more token must not fit */
                    LkvPageLayout L2;
                    ok &= lkv_layout(&L2, p, d, T + 1, tiered) > P;
                    CHECK(ok, "layout d=%d k%dv%d g=%d tiered %d: page %d, %d tokens, used %d", d,
                          p.kbits, p.vbits, g, tiered, P, T, L.used);
                }
    /* a one-tier k8v4 page at d 64 holds codes and scales only: 104 bytes a token, not 112 */
    LkvPrecision k8v4 = {8, 4, 1};
    LkvPageLayout L8;
    int P8 = lkv_page_bytes(&k8v4, 1, 64, NULL);
    lkv_layout_fit(&L8, k8v4, 64, P8, 0);
    CHECK(L8.used == L8.tokens * 104, "one-tier k8v4 page: %d bytes for %d tokens", L8.used, L8.tokens);
    /* two tiers share one page size; the rule minimises the worse waste of the two */
    LkvPrecision tiers[2] = {{8, 4, 1}, {4, 2, 1}};
    float waste;
    int P = lkv_page_bytes(tiers, 2, 128, &waste);
    int best_worst_ok = 1;
    for (int Q = P - LKV_PAGE_STEP; Q >= 1024; Q -= LKV_PAGE_STEP) {
        LkvPageLayout L;
        float w = 0;
        for (int t = 0; t < 2; t++) {
            lkv_layout_fit(&L, tiers[t], 128, Q, 1);
            float x = (float)(Q - L.used) / Q;
            if (x > w) w = x;
        }
        lkv_layout_fit(&L, tiers[0], 128, Q, 1);
        if (L.tokens >= LKV_PAGE_MIN_TOKENS && w < waste - 1e-6f) best_worst_ok = 0;
    }
    CHECK(best_worst_ok, "a smaller page than %d has less worst-case waste than %.4f", P, waste);
}

static Config tiny_config(int layers, int kv_heads, int head_dim) {
    Config c = {0};
    c.n_layers = layers; c.n_kv_heads = kv_heads; c.n_heads = kv_heads; c.head_dim = head_dim;
    return c;
}

/* the page manager: under a long random mix of reservations and releases, no page is lost or
 * owned twice and the free count is exact */
static void test_manager(void) {
    int n_seqs = 16, ctx = 200;
    Config c = tiny_config(4, 3, 64);
    KVCache kv;
    build_kvcache(&kv, &c, n_seqs, ctx, 1, (LkvPrecision){16, 16, 1});   /* 1 MiB: far fewer pages than the worst case */
    int *len = calloc(n_seqs, sizeof(int)), *owner = malloc(kv.n_pages * sizeof(int));
    int fails = 0, full_seen = 0;
    for (int step = 0; step < 20000; step++) {
        int s = rnd() % n_seqs;
        if (rnd() % 40 == 0) { kv_release(&kv, s); len[s] = 0; }
        else if (len[s] < ctx) {
            int r = kv_reserve(&kv, s, len[s] + 1);
            if (r == 0) len[s]++;
            else full_seen++;
        }
        if (step % 500 == 0 || step == 19999) {
            for (int i = 0; i < kv.n_pages; i++) owner[i] = -1;
            int owned = 0;
            for (int hh = 0; hh < kv.n_heads_total; hh++) {
                int np = kv.n_pg[hh * LKV_MAX_TIERS];
                int seq = hh / (kv.n_layers * kv.n_kv_heads);
                int need = (len[seq] + kv.layout[0].tokens - 1) / kv.layout[0].tokens;
                if (np != need) fails++;
                for (int i = 0; i < np; i++) {
                    int id = kv.table[(size_t)hh * kv.table_width + i];
                    if (id < 0 || id >= kv.n_pages || owner[id] != -1) fails++;
                    else owner[id] = hh;
                    owned++;
                }
            }
            for (int i = 0; i < kv.free_count; i++) {
                int id = kv.free_ids[(kv.free_start + i) % kv.n_pages];
                if (id < 0 || id >= kv.n_pages || owner[id] != -1) fails++;
                else owner[id] = -2;
            }
            if (owned + kv.free_count != kv.n_pages) fails++;
        }
    }
    CHECK(fails == 0, "page manager invariants broken %d times", fails);
    CHECK(full_seen > 0, "the random mix never filled the pool, so the full case went untested");
    /* a full pool refuses a reservation whole: nothing is taken */
    for (int s = 0; s < n_seqs; s++) kv_release(&kv, s);
    int s = 0, before;
    while (kv_reserve(&kv, s % n_seqs, ctx) == 0) s++;
    before = kv.free_count;
    CHECK(kv_reserve(&kv, s % n_seqs, ctx) == -1 && kv.free_count == before,
          "a refused reservation took pages");
    CHECK(kv_reserve(&kv, 0, ctx * 10) == -2, "a reservation beyond the context was accepted");
    free(len); free(owner);
    free_kvcache(&kv);
}

/* attention read through the page table equals dense fp32 attention over the same fp16
 * values, with pages handed out in a scrambled order */
static void test_paged_attention(void) {
    int d = 64, n = 150;
    Config c = tiny_config(1, 2, d);
    KVCache kv;
    build_kvcache(&kv, &c, 3, 256, 0, (LkvPrecision){16, 16, 1});
    /* scramble the free ring so that pages of one head are not contiguous */
    for (int i = kv.n_pages - 1; i > 0; i--) {
        int j = rnd() % (i + 1), t = kv.free_ids[i];
        kv.free_ids[i] = kv.free_ids[j]; kv.free_ids[j] = t;
    }
    float *K = malloc(n * d * sizeof(float)), *V = malloc(n * d * sizeof(float));
    float q[64], o[64], att[256];
    double worst = 0;
    for (int s = 0; s < 3; s++) {
        for (int t = 0; t < n; t++) {
            if (kv_reserve(&kv, s, t + 1)) { CHECK(0, "reserve failed"); return; }
            for (int j = 0; j < d; j++) { K[t * d + j] = rndf() * 3; V[t * d + j] = rndf(); }
            kv_append(&kv, kv_head(&kv, s, 0, 1), K + t * d, V + t * d, t);
            kv_append(&kv, kv_head(&kv, s, 0, 0), V + t * d, K + t * d, t);  /* another head */
        }
        for (int j = 0; j < d; j++) q[j] = rndf();
        attention_paged(&kv, kv_head(&kv, s, 0, 1), 1, q, att, 256, o);
        double sc[256], mx = -1e30, sum = 0;
        for (int t = 0; t < n; t++) {
            double x = 0;
            for (int j = 0; j < d; j++) x += (double)q[j] * lkv_h2f(lkv_f2h(K[t * d + j]));
            sc[t] = x / sqrt((double)d);
            if (sc[t] > mx) mx = sc[t];
        }
        for (int t = 0; t < n; t++) { sc[t] = exp(sc[t] - mx); sum += sc[t]; }
        for (int j = 0; j < d; j++) {
            double acc = 0;
            for (int t = 0; t < n; t++) acc += sc[t] / sum * lkv_h2f(lkv_f2h(V[t * d + j]));
            double e = fabs(acc - o[j]);
            if (e > worst) worst = e;
        }
        /* a one-tier cache keeps no scores or positions beside its tokens */
        CHECK(kv.layout[0].scores == -1 && kv.layout[0].pos == -1,
              "a one-tier page keeps metadata at %d, %d", kv.layout[0].scores, kv.layout[0].pos);
    }
    CHECK(worst < 1e-5, "paged attention differs from dense by %.3g (bound 1e-5)", worst);
    printf("paged vs dense attention: max abs error %.3g\n", worst);
    free(K); free(V);
    free_kvcache(&kv);
}

/* the prefill kernels against the decode ones: matmul_rows (4x4 tiles and their edges) equals
 * matmul row by row, and attention_rows gives each row of a chunk what attention_paged gives
 * it over the tokens that row may see */
static void test_chunk_kernels(void) {
    int shapes[][3] = {{7, 19, 6}, {8, 64, 12}, {1, 33, 5}, {13, 40, 3}};   /* n, k, d */
    double worst = 0;
    for (int c = 0; c < 4; c++) {
        int n = shapes[c][0], k = shapes[c][1], d = shapes[c][2];
        float *X = malloc(n * k * sizeof(float)), *W = malloc(d * k * sizeof(float));
        float *Y = malloc(n * d * sizeof(float)), y[16];
        for (int i = 0; i < n * k; i++) X[i] = rndf();
        for (int i = 0; i < d * k; i++) W[i] = rndf();
        matmul_rows(Y, X, W, n, k, d);
        for (int t = 0; t < n; t++) {
            matmul(y, X + t * k, W, k, d);
            for (int i = 0; i < d; i++) worst = fmax(worst, fabs(Y[t * d + i] - y[i]));
        }
        free(X); free(W); free(Y);
    }
    CHECK(worst < 1e-5, "matmul_rows differs from matmul by %.3g", worst);

    int hd = 64, n_tok = 150;
    Config c = tiny_config(1, 1, hd);
    KVCache kv;
    build_kvcache(&kv, &c, 1, 256, 0, (LkvPrecision){16, 16, 1});
    int hh = kv_head(&kv, 0, 0, 0);
    if (kv_reserve(&kv, 0, n_tok)) { CHECK(0, "reserve failed"); return; }
    float x[64], v[64];
    for (int t = 0; t < n_tok; t++) {
        for (int j = 0; j < hd; j++) { x[j] = rndf() * 3; v[j] = rndf(); }
        kv_append(&kv, hh, x, v, t);
    }
    float q[ATT_LANES * 64], o[ATT_LANES * 64], want[64];
    float *att = malloc(256 * ATT_LANES * sizeof(float));
    for (int i = 0; i < ATT_LANES * hd; i++) q[i] = rndf();
    worst = 0;
    int tiles[][2] = {{n_tok - ATT_LANES + 1, ATT_LANES}, {n_tok - 4, 5}, {1, 3}};   /* n0, n */
    for (int tl = 0; tl < 3; tl++) {
        int n0 = tiles[tl][0], rows = tiles[tl][1];
        attention_rows(&kv, hh, n0, rows, q, o, hd, att, NULL, 0);
        for (int r = 0; r < rows; r++) {
            kv.n_tok[hh * LKV_MAX_TIERS] = n0 + r;   /* what row r sees */
            attention_paged(&kv, hh, 1, q + r * hd, att, 256, want);
            kv.n_tok[hh * LKV_MAX_TIERS] = n_tok;
            for (int j = 0; j < hd; j++) worst = fmax(worst, fabs(o[r * hd + j] - want[j]));
        }
    }
    CHECK(worst < 1e-6, "attention_rows differs from attention_paged by %.3g", worst);
    printf("chunk kernels vs decode kernels: attention max abs error %.3g\n", worst);
    free(att);
    free_kvcache(&kv);
}

int main(void) {
    build_h2f_table();
    test_fp16();
    test_layout();
    test_manager();
    test_paged_attention();
    test_chunk_kernels();
    return check_summary();
}
